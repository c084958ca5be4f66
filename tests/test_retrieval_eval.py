"""Multi-sentence retrieval metrics, the rerank and DSL on hand-made matrices, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.evaluation.dual_softmax import dual_softmax_scores
from engine.evaluation.metrics import best_positive_ranks, correct_ranks
from engine.evaluation.retrieval import retrieval_rows

# 3 captions, 2 videos: captions 0 and 1 describe video 0, caption 2 video 1.
CAPTION_VIDEO = torch.tensor([0, 0, 1])
S = torch.tensor([[0.9, 0.85],
                  [0.3, 0.60],
                  [0.2, 0.80]])
# Match probability p[text, video] that the fake fusion head returns.
P = torch.tensor([[0.80, 0.2],
                  [0.90, 0.5],
                  [0.05, 0.9]])


def test_multi_sentence_ranks_by_hand():
    # text->video: caption 0 -> video 0 first (0.9 > 0.85); caption 1 -> video 0 second; caption 2 -> video 1 first
    assert best_positive_ranks(S, CAPTION_VIDEO, torch.arange(2)).tolist() == [1, 2, 1]
    # video->text: video 0's best caption (0.9) beats the only wrong one; video 1's only caption (0.8) is below
    # caption 0 (0.85, wrong) -> rank 2
    assert best_positive_ranks(S.t(), torch.arange(2), CAPTION_VIDEO).tolist() == [1, 2]
    tied = S.clone()
    tied[2, 0] = 0.9  # a wrong caption tied with video 0's best: ties never help
    assert best_positive_ranks(tied.t(), torch.arange(2), CAPTION_VIDEO).tolist() == [2, 2]


def test_single_caption_groups_equal_diagonal_ranks():
    sim = np.random.default_rng(0).normal(size=(7, 7)).round(1)  # rounding makes ties
    assert (best_positive_ranks(sim, np.arange(7), np.arange(7)) == correct_ranks(sim)).all()
    with pytest.raises(ValueError, match="row 1 has no correct candidate"):
        best_positive_ranks(sim[:2, :2], np.array([0, 5]), np.arange(2))


class FakeFusionModel(torch.nn.Module):
    """`similarity` returns S; `match_logits` scores pair (video v, text t) with probability P[t, v]. Videos and
    texts carry their own index in `frames` / `text_tokens` so the fake can tell which pair it scores."""

    def __init__(self, sim: torch.Tensor, probability: torch.Tensor, expected_group: int | None = None) -> None:
        super().__init__()
        self.sim, self.probability, self.expected_group = sim, probability, expected_group
        self.groups: list[int] = []

    def similarity(self, text, frames, video_mask):
        return self.sim[text[:, 0].long()][:, frames[:, 0, 0].long()]

    def match_logits(self, frames, video_mask, tubes, text_tokens, attention_mask, *, group_size=None):
        self.groups.append(group_size)
        p = self.probability[text_tokens[:, 0, 0].long(), frames[:, 0, 0].long()]
        return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)  # softmax(.)[1] == p


def encoded_split(n_texts: int, n_videos: int, caption_video: torch.Tensor) -> dict:
    return {
        "text": torch.arange(n_texts, dtype=torch.float32)[:, None],
        "frames": torch.arange(n_videos, dtype=torch.float32)[:, None, None].expand(n_videos, 2, 1),
        "video_mask": torch.ones(n_videos, 2, dtype=torch.long),
        "tubes": torch.zeros(n_videos, 1, 1),
        "text_tokens": torch.arange(n_texts, dtype=torch.float32)[:, None, None].expand(n_texts, 3, 1),
        "attention_mask": torch.ones(n_texts, 3, dtype=torch.long),
        "caption_video": caption_video, "video_ids": [f"v{i}" for i in range(n_videos)], "n_skipped": 0,
    }


def test_multi_sentence_rows_meanp_and_rerank_by_hand():
    model = FakeFusionModel(S, P)
    rows = retrieval_rows(model, encoded_split(3, 2, CAPTION_VIDEO), rerank_top_k=3)
    meanp, rerank = rows
    assert (meanp["scoring"], rerank["scoring"], rerank["top_k"]) == ("meanP", "rerank", 3)
    assert meanp["multi_sentence"] and (meanp["n_texts"], meanp["n_videos"]) == (3, 2)
    assert meanp["t2v"]["R1"] == pytest.approx(200 / 3) and meanp["t2v"]["MnR"] == pytest.approx(4 / 3)
    assert (meanp["v2t"]["R1"], meanp["v2t"]["MdR"], meanp["v2t"]["MnR"]) == (50.0, 1.5, 1.5)
    # Rerank, by hand: caption 1 over videos (0, 1): softmax(0.3, 0.6) = (0.4256, 0.5744), times p = (0.9, 0.5)
    # -> (0.383, 0.287): video 0 now first. Video 1 over captions (0, 1, 2): softmax(0.85, 0.6, 0.8) =
    # (0.3663, 0.2853, 0.3484), times p = (0.2, 0.5, 0.9) -> (0.073, 0.143, 0.314): caption 2 now first.
    assert rerank["t2v"]["R1"] == 100.0 and rerank["v2t"]["R1"] == 100.0
    assert set(model.groups) == {2, 3}  # each query's K candidates one group (K = 2 videos, 3 captions)


def test_rerank_of_the_top_one_keeps_the_first_stage_order():
    rows = retrieval_rows(FakeFusionModel(S, P), encoded_split(3, 2, CAPTION_VIDEO), rerank_top_k=1)
    assert rows[1]["t2v"] == rows[0]["t2v"] and rows[1]["v2t"] == rows[0]["v2t"]


def test_dual_softmax_by_hand():
    sim = torch.tensor([[5.0, 3.0], [4.5, 4.0]])  # video 0 is a "hub": caption 1 prefers it (4.5 > 4)
    # columns: softmax(5, 4.5) = (0.6225, 0.3775), softmax(3, 4) = (0.2689, 0.7311)
    expected = torch.tensor([[5 * 0.622459, 3 * 0.268941], [4.5 * 0.377541, 4 * 0.731059]], dtype=torch.float64)
    assert torch.allclose(dual_softmax_scores(sim), expected, atol=1e-5)
    hot = dual_softmax_scores(sim, temperature=0.5)
    assert hot[0, 0] == pytest.approx(5 / (1 + math.exp(-1)))
    with pytest.raises(ValueError):
        dual_softmax_scores(sim, temperature=0)
    model = FakeFusionModel(sim, torch.full((2, 2), 0.5))
    rows = retrieval_rows(model, encoded_split(2, 2, torch.arange(2)), rerank_top_k=2, dsl=True)
    by_label = {(row["scoring"], row.get("base")): row for row in rows}
    assert set(by_label) == {("meanP", None), ("dsl", "meanP"), ("rerank", None), ("dsl", "rerank")}
    assert by_label[("meanP", None)]["t2v"]["R1"] == 50.0  # caption 1 retrieves the hub
    assert by_label[("dsl", "meanP")]["t2v"]["R1"] == 100.0  # DSL: 1.699 < 2.924, video 1 first
    assert by_label[("dsl", "meanP")]["v2t"]["R1"] == 100.0
    # p = 0.5 everywhere: the rerank orders by softmax of the first stage, so it agrees with it
    assert by_label[("rerank", None)]["t2v"]["R1"] == 50.0 and by_label[("dsl", "rerank")]["t2v"]["R1"] == 100.0
