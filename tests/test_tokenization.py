"""CLIP BPE tokenisation as docs/method.md §2.2 specifies."""

from __future__ import annotations

import open_clip
import pytest

from modules.tokenization import EOT_ID, SOT_ID, ClipTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_known_clip_ids(tokenizer):
    # ids of OpenAI's CLIP vocabulary (bpe_simple_vocab_16e6): "a"=320, "photo"=1125, "of"=539, "cat"=2368
    ids, mask = tokenizer.encode("A photo of a cat", max_words=10)
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]
    assert mask == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert tokenizer.encode("a dog is running!", 8)[0] == [49406, 320, 1929, 533, 2761, 256, 49407, 0]


@pytest.mark.parametrize(
    "text",
    [
        "a red circle moves to the left",
        "Two  DOGS play in the snow &amp; ice!!",
        "it s raining",
        "naïve café – “quoted”",
    ],
)
def test_matches_the_reference_tokenizer(tokenizer, text):
    reference = open_clip.tokenize([text], context_length=77)[0].tolist()
    ids, mask = tokenizer.encode(text, max_words=77)
    assert ids == reference
    assert sum(mask) == len([i for i in reference if i != 0]) or sum(mask) == reference.index(EOT_ID) + 1


def test_truncation_keeps_sot_and_eot_within_max_words(tokenizer):
    text = "one two three four five six seven eight nine ten"
    ids, mask = tokenizer.encode(text, max_words=6)
    pieces = tokenizer.bpe_ids(text)
    assert ids == [SOT_ID, *pieces[:4], EOT_ID]
    assert mask == [1] * 6
    assert tokenizer.decode(ids) == "one two three four"


def test_empty_caption_and_zero_ids(tokenizer):
    ids, mask = tokenizer.encode("", max_words=4)
    assert ids == [SOT_ID, EOT_ID, 0, 0] and mask == [1, 1, 0, 0]
    # '!))' is "!" (id 0) + "))</w>": id 0 is a real token unless WebVid's rule drops it
    assert tokenizer.encode("x !))", 6) == ([SOT_ID, 343, 0, 5167, EOT_ID, 0], [1, 1, 1, 1, 1, 0])
    assert tokenizer.encode("x !))", 6, drop_zero_ids=True) == (
        [SOT_ID, 343, 5167, EOT_ID, 0, 0],
        [1, 1, 1, 1, 0, 0],
    )
    with pytest.raises(ValueError, match="at least 2"):
        tokenizer.encode("x", max_words=1)


def test_decode_ignores_padding_after_eot(tokenizer):
    ids, _ = tokenizer.encode("a man is cooking", 12)
    assert tokenizer.decode(ids) == "a man is cooking"
