"""CLIP BPE tokenizer, as the original loaders use it (docs/method.md §2.2).

The vocabulary and the BPE algorithm come from the `open_clip_torch` package, which ships OpenAI's
`bpe_simple_vocab_16e6.txt.gz`; nothing is downloaded. Cleaning is OpenAI's: ftfy + HTML unescape,
whitespace folding, lower case.
"""

from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer

SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0  # also the BPE id of "!" inside a word: masks, not ids, tell padding apart


class ClipTokenizer:
    """Text -> fixed-length CLIP ids and mask: `[SOT] words [EOT] 0 ...` of length `max_words`."""

    def __init__(self) -> None:
        self._bpe = SimpleTokenizer()
        self.vocab_size = len(self._bpe.encoder)
        if self._bpe.encoder["<start_of_text>"] != SOT_ID or self._bpe.encoder["<end_of_text>"] != EOT_ID:
            raise RuntimeError("open_clip's BPE vocabulary does not match OpenAI CLIP's special ids")

    def bpe_ids(self, text: str) -> list[int]:
        """Word-piece ids of `text` without SOT/EOT."""
        return self._bpe.encode(text)

    def encode(self, text: str, max_words: int, drop_zero_ids: bool = False) -> tuple[list[int], list[int]]:
        """Ids and attention mask of length `max_words`.

        As CLIP4Clip: SOT plus the word pieces are cut to `max_words - 1`, then EOT is appended, so a long
        caption keeps its first `max_words - 2` pieces. `drop_zero_ids` removes BPE id 0 ("!" inside a
        word) before truncation, which is what the original WebVid loaders did.
        """
        if max_words < 2:
            raise ValueError(f"max_words must be at least 2 (SOT and EOT), got {max_words}")
        words = self.bpe_ids(text)
        if drop_zero_ids:
            words = [i for i in words if i != PAD_ID]
        ids = [SOT_ID, *words[: max_words - 2], EOT_ID]
        mask = [1] * len(ids) + [0] * (max_words - len(ids))
        ids = ids + [PAD_ID] * (max_words - len(ids))
        return ids, mask

    def decode(self, ids: list[int], strip: bool = True) -> str:
        """Text of the pieces after SOT and before the first EOT (padding after EOT is ignored). `strip=False`
        keeps the space each word-final piece leaves at the end, as the original's captions had."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == SOT_ID:
            ids = ids[1:]
        if EOT_ID in ids:
            ids = ids[: ids.index(EOT_ID)]
        text = self._bpe.decode(ids)
        return text.strip() if strip else text
