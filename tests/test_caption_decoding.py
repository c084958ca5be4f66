"""Caption decoding: cached greedy = the original's re-encoding greedy, beam 1 = greedy, beam >= greedy."""

from __future__ import annotations

import itertools

import pytest
import torch

from modules.caption_decoding import beam_search, decode_captions, greedy_decode, greedy_decode_reencode
from modules.checkpoint import write_random_clip_checkpoint
from modules.model import T2VLP, T2VLPConfig
from modules.tokenization import EOT_ID
from tests.model_helpers import TINY_FUSION_CLIP

T, K, D = 3, 8, TINY_FUSION_CLIP.embed_dim
# A small effective vocabulary (EOT among it): a random model then makes real choices and sometimes stops.
WORDS = torch.tensor([320, 1929, 2866, 3306, 4558, 5093, 7151, 8046, 10461, 12134, EOT_ID])


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory):
    path = write_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "caption.pt", TINY_FUSION_CLIP, seed=5)
    torch.manual_seed(0)
    model = T2VLP.from_pretrained(path, config=T2VLPConfig(with_fusion=True, fusion_layers=2, head_dropout=0.5))
    with torch.no_grad():
        bias = torch.full_like(model.clip.fusion_logit_bias, -1e4)
        bias[WORDS] = torch.randn(len(WORDS), generator=torch.Generator().manual_seed(1))
        bias[EOT_ID] = 2.0
        model.clip.fusion_logit_bias.copy_(bias)
        model.clip.fusion_proj_embedding.mul_(4.0)  # larger logits: the video and the prefix decide the words
    return model.eval()


def video_inputs(batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, T, D, generator=generator)
    video_mask = torch.ones(batch, T, dtype=torch.long)
    video_mask[0, 1:] = 0  # a short video: padded frames must not matter to any decoder
    tubes = torch.randn(batch, K, D, generator=generator)
    return frames, video_mask, tubes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_gives_the_tokens_of_the_original_procedure(caption_model, seed):
    inputs = video_inputs(6, seed)
    reference = greedy_decode_reencode(caption_model, *inputs, max_steps=12)
    cached = greedy_decode(caption_model, *inputs, max_steps=12)
    assert cached.tokens == reference.tokens
    assert cached.scores == pytest.approx(reference.scores, abs=1e-4)
    assert any(len(tokens) < 12 for tokens in reference.tokens), "no caption stopped at EOT: the test is too weak"
    assert len({tuple(tokens) for tokens in reference.tokens}) > 1, "every video got the same caption"


def test_greedy_scores_are_the_summed_log_probabilities_of_its_tokens(caption_model):
    frames, video_mask, tubes = video_inputs(3, 4)
    decoded = greedy_decode(caption_model, frames, video_mask, tubes, max_steps=10)
    for row, tokens in enumerate(decoded.tokens):
        ids = torch.tensor([[49406, *tokens, EOT_ID]]) if len(tokens) < 10 else torch.tensor([[49406, *tokens]])
        _, text = caption_model.encode_text(ids, torch.ones_like(ids))
        states = caption_model.fuse(frames[row : row + 1], video_mask[row : row + 1], tubes[row : row + 1], text,
                                    torch.ones_like(ids), causal_text=True)
        start = 1 + T + K
        log_probs = torch.log_softmax(caption_model.token_logits(states[0, start:-1]), dim=-1)
        expected = log_probs.gather(1, ids[0, 1:, None]).sum().item()
        assert decoded.scores[row] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 3])
def test_beam_one_equals_greedy(caption_model, seed):
    inputs = video_inputs(5, seed)
    greedy = greedy_decode(caption_model, *inputs, max_steps=12)
    beam = beam_search(caption_model, *inputs, beam_size=1, max_steps=12, length_penalty=0.0)
    assert beam.tokens == greedy.tokens
    assert beam.scores == pytest.approx(greedy.scores, abs=1e-4)


@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_beam_search_never_scores_below_greedy(caption_model, beam_size):
    inputs = video_inputs(8, 10 + beam_size)
    greedy = greedy_decode(caption_model, *inputs, max_steps=10)
    beam = beam_search(caption_model, *inputs, beam_size=beam_size, max_steps=10, length_penalty=0.0)
    assert all(b >= g - 1e-4 for b, g in zip(beam.scores, greedy.scores)), (beam.scores, greedy.scores)
    assert any(b > g + 1e-3 for b, g in zip(beam.scores, greedy.scores)), "beam search never found anything better"


def test_beam_results_do_not_depend_on_the_other_videos_of_the_batch(caption_model):
    frames, video_mask, tubes = video_inputs(4, 7)
    together = beam_search(caption_model, frames, video_mask, tubes, beam_size=3, max_steps=10)
    alone = beam_search(caption_model, frames[2:3], video_mask[2:3], tubes[2:3], beam_size=3, max_steps=10)
    assert together.tokens[2] == alone.tokens[0]


def test_beam_scores_are_exhaustive_on_a_tiny_search_space(caption_model):
    """With 3 steps and 11 usable words, exhaustive search is cheap: a wide beam must find the true optimum."""
    frames, video_mask, tubes = video_inputs(1, 9)
    sequences = set()
    for sequence in itertools.product(WORDS.tolist(), repeat=3):
        sequences.add(sequence[: sequence.index(EOT_ID) + 1] if EOT_ID in sequence else sequence)
    best = float("-inf")
    for length in {len(sequence) for sequence in sequences}:  # one batched forward per length
        ids = torch.tensor([[49406, *sequence] for sequence in sequences if len(sequence) == length])
        count = ids.shape[0]
        _, text = caption_model.encode_text(ids, torch.ones_like(ids))
        states = caption_model.fuse(frames.expand(count, -1, -1), video_mask.expand(count, -1),
                                    tubes.expand(count, -1, -1), text, torch.ones_like(ids), causal_text=True)
        log_probs = torch.log_softmax(caption_model.token_logits(states[:, 1 + T + K : -1]), dim=-1)
        best = max(best, log_probs.gather(2, ids[:, 1:, None]).sum(dim=(1, 2)).max().item())
    beam = beam_search(caption_model, frames, video_mask, tubes, beam_size=len(WORDS) ** 2, max_steps=3,
                       length_penalty=0.0)
    assert beam.scores[0] == pytest.approx(best, abs=1e-4)


def test_decode_captions_dispatches_on_beam_size(caption_model):
    inputs = video_inputs(3, 2)
    assert decode_captions(caption_model, *inputs, beam_size=1, max_steps=8).tokens == \
        greedy_decode(caption_model, *inputs, max_steps=8).tokens
    assert decode_captions(caption_model, *inputs, beam_size=3, max_steps=8, length_penalty=0.5).tokens == \
        beam_search(caption_model, *inputs, beam_size=3, max_steps=8, length_penalty=0.5).tokens
