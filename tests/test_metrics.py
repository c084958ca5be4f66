import math

import numpy as np
import pytest
import torch

from engine.evaluation.metrics import (
    chance_retrieval_metrics,
    correct_ranks,
    format_retrieval_table,
    retrieval_metrics,
)


def test_square_matrix_with_diagonal_ground_truth():
    sim = np.array([
        [0.9, 0.1, 0.2],  # correct 0.9 is the best -> rank 1
        [0.5, 0.4, 0.6],  # two scores above 0.4 -> rank 3
        [0.3, 0.3, 0.3],  # all tied: the correct item goes last -> rank 3
    ])
    assert correct_ranks(sim).tolist() == [1, 3, 3]
    metrics = retrieval_metrics(sim)
    assert metrics["R1"] == pytest.approx(100 / 3)
    assert metrics["R5"] == 100.0
    assert metrics["R10"] == 100.0
    assert metrics["MdR"] == 3.0
    assert metrics["MnR"] == pytest.approx(7 / 3)


def test_ties_never_count_in_the_models_favour():
    sim = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
    # CLIP4Clip would give ranks 1, 1, 1 (R@1 = 100); ties put the correct item last among equals.
    assert correct_ranks(sim).tolist() == [2, 2, 3]
    assert retrieval_metrics(sim)["R1"] == 0.0


def test_rectangular_with_explicit_ground_truth():
    sim = np.array([
        [0.1, 0.5, 0.2, 0.4],  # gt column 3 (0.4): one higher -> rank 2
        [0.7, 0.7, 0.9, 0.1],  # gt column 1 (0.7): 0.9 higher, 0.7 tie -> rank 3
    ])
    metrics = retrieval_metrics(sim, gt=[3, 1])
    assert metrics == {"R1": 0.0, "R5": 100.0, "R10": 100.0, "MdR": 2.5, "MnR": 2.5}


def test_more_queries_than_candidates():
    # 4 captions for 2 videos (multi-caption text->video).
    sim = np.array([[0.9, 0.1], [0.2, 0.3], [0.4, 0.8], [0.6, 0.5]])
    assert correct_ranks(sim, gt=np.array([0, 0, 1, 1])).tolist() == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="diagonal"):
        retrieval_metrics(sim)


def test_recall_at_5_and_10_and_median_on_designed_ranks():
    n_candidates = 30
    wanted_ranks = [1, 1, 2, 5, 6, 10, 11, 30]
    sim = np.tile(-np.arange(n_candidates, dtype=np.float64), (len(wanted_ranks), 1))  # column j has rank j + 1
    gt = [rank - 1 for rank in wanted_ranks]
    metrics = retrieval_metrics(sim, gt=gt)
    assert metrics["R1"] == pytest.approx(100 * 2 / 8)
    assert metrics["R5"] == pytest.approx(100 * 4 / 8)
    assert metrics["R10"] == pytest.approx(100 * 6 / 8)
    assert metrics["MdR"] == 5.5
    assert metrics["MnR"] == pytest.approx(66 / 8)


def test_torch_input_in_bfloat16_and_rows_beyond_one_chunk():
    n = 2500  # more rows than one internal chunk
    sim = torch.eye(n, dtype=torch.bfloat16)
    sim[0, 1] = 2.0  # row 0: the correct candidate is second
    metrics = retrieval_metrics(sim)
    assert metrics["R1"] == pytest.approx(100 * (n - 1) / n)
    assert metrics["MnR"] == pytest.approx((n + 1) / n)


def test_nan_raises_by_default_and_ranks_last_on_request():
    sim = np.array([
        [math.nan, 0.5, 0.1],       # correct score NaN -> rank 3 (last)
        [math.nan, 0.2, 0.1],       # NaN competitor never beats a number -> rank 1
        [-math.inf, math.nan, -math.inf],  # -inf is an ordinary score: ties with the other -inf -> rank 2
    ])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(sim)
    assert correct_ranks(sim, nan_policy="last").tolist() == [3, 1, 2]


def test_invalid_ground_truth():
    sim = np.zeros((2, 3))
    with pytest.raises(ValueError, match="gt columns"):
        retrieval_metrics(sim, gt=[0, 3])
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(sim, gt=[0])


def test_chance_metrics_and_table():
    chance = chance_retrieval_metrics(1000)
    assert chance == {"R1": 0.1, "R5": 0.5, "R10": 1.0, "MdR": 500.5, "MnR": 500.5}
    t2v = {"R1": 45.2, "R5": 71.0, "R10": 80.55, "MdR": 2.0, "MnR": 14.25}
    v2t = {"R1": 44.0, "R5": 70.1, "R10": 81.0, "MdR": 2.0, "MnR": 10.5}
    table = format_retrieval_table(t2v, v2t, chance=chance)
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["R1", "R5", "R10", "MdR", "MnR"]
    assert lines[1].split() == ["text->video", "45.20", "71.00", "80.55", "2.00", "14.25"]
    assert lines[3].split() == ["chance", "0.10", "0.50", "1.00", "500.50", "500.50"]
    assert len(format_retrieval_table(t2v, v2t).splitlines()) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_input():
    sim = torch.tensor([[0.9, 0.1], [0.95, 0.3]], device="cuda", dtype=torch.float16)
    assert correct_ranks(sim).tolist() == [1, 2]
