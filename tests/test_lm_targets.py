"""MLM masks and prefix-LM starts: only word tokens, the ratio honoured, reproducible per (seed, epoch, index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloaders.lm_targets import IGNORE_INDEX, WithLanguageModelTargets, language_model_targets
from modules.fusion_objectives import prefix_scored_positions
from modules.tokenization import EOT_ID, SOT_ID


def caption(length: int, max_words: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(max_words, dtype=torch.long)
    ids[:length] = torch.arange(100, 100 + length)
    ids[0], ids[length - 1] = SOT_ID, EOT_ID
    mask = (torch.arange(max_words) < length).long()
    return ids, mask


def test_only_word_tokens_are_masked_and_they_are_the_only_targets():
    ids, mask = caption(9)
    for seed in range(50):
        targets = language_model_targets(ids, mask, 0.5, np.random.default_rng(seed))
        masked = targets["mlm_labels"] != IGNORE_INDEX
        assert masked.any()
        assert not masked[0] and not masked[8] and not masked[9:].any()  # never SOT, EOT or padding
        assert torch.equal(targets["mlm_labels"][masked], ids[masked])  # targets are the original ids
        assert (targets["mlm_input_ids"][masked] == 0).all()  # masked inputs are id 0
        assert torch.equal(targets["mlm_input_ids"][~masked], ids[~masked])  # nothing else changes
        assert 0 <= int(targets["plm_start"]) <= 7


def test_mask_ratio_is_honoured_and_one_token_is_always_masked():
    ids, mask = caption(16)  # 14 word tokens
    rng = np.random.default_rng(0)
    counts = [int((language_model_targets(ids, mask, 0.3, rng)["mlm_labels"] != IGNORE_INDEX).sum())
              for _ in range(2000)]
    assert abs(np.mean(counts) - 0.3 * 14) < 0.15
    never = language_model_targets(ids, mask, 0.0, np.random.default_rng(1))
    assert torch.nonzero(never["mlm_labels"] != IGNORE_INDEX).flatten().tolist() == [1]  # the first word
    empty = language_model_targets(*caption(2), 0.15, np.random.default_rng(1))
    assert (empty["mlm_labels"] == IGNORE_INDEX).all() and int(empty["plm_start"]) == 0


def test_prefix_positions_run_from_the_start_to_the_last_word():
    _, mask = caption(6, max_words=8)
    scored = prefix_scored_positions(torch.stack([mask, mask]), torch.tensor([0, 3]))
    assert scored.tolist() == [[True] * 5 + [False] * 2, [False] * 3 + [True] * 2 + [False] * 2]


class Captions(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        if index == 5:
            return None
        ids, mask = caption(8 + index % 8)
        return {"input_ids": ids, "attention_mask": mask, "index": index}


def test_targets_depend_on_seed_epoch_and_index_only():
    first, second = WithLanguageModelTargets(Captions(), 0.3, seed=4), WithLanguageModelTargets(Captions(), 0.3, seed=4)
    order = list(range(40))
    np.random.default_rng(0).shuffle(order)
    a = {i: first[i] for i in range(40)}
    b = {i: second[i] for i in order}  # another visiting order (other ranks / workers) gives the same draws
    assert a[5] is None and b[5] is None
    for i in range(40):
        if a[i] is not None:
            assert torch.equal(a[i]["mlm_labels"], b[i]["mlm_labels"]) and a[i]["plm_start"] == b[i]["plm_start"]
    second.set_epoch(1)
    assert any(not torch.equal(a[i]["mlm_labels"], second[i]["mlm_labels"]) for i in range(40) if i != 5)
    with pytest.raises(ValueError, match="mask_ratio"):
        WithLanguageModelTargets(Captions(), 1.5)
