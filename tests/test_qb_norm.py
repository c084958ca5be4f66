"""QB-Norm (querybank normalisation, dynamic inverted softmax) against a direct computation of the paper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.evaluation.qb_norm import qb_norm_scores


def direct_qb_norm(test: np.ndarray, bank: np.ndarray, beta: float, k: int) -> np.ndarray:
    """The formula written out with loops: the activation set is every gallery item some bank query ranks in its
    top k; a test query whose best item is in it gets exp(beta s(q,g)) / sum_b exp(beta s(b,g))."""
    n_test, n_gallery = test.shape
    active = set()
    for row in bank:
        active.update(int(g) for g in np.argsort(-row, kind="stable")[:k])
    out = test.astype(np.float64).copy()
    for q in range(n_test):
        if int(np.argmax(test[q])) in active:
            for g in range(n_gallery):
                out[q, g] = math.exp(beta * test[q, g]) / sum(math.exp(beta * bank[b, g]) for b in range(len(bank)))
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_qb_norm_equals_the_direct_computation(k):
    rng = np.random.default_rng(3)
    test = rng.uniform(-1, 1, (7, 5))
    bank = rng.uniform(-1, 1, (11, 5))
    bank[:, 2] += 0.8  # a hub: every bank query likes item 2
    got = qb_norm_scores(torch.from_numpy(test), torch.from_numpy(bank), beta=20.0, k=k).numpy()
    np.testing.assert_allclose(got, direct_qb_norm(test, bank, 20.0, k), rtol=1e-12)
    normalised = [q for q in range(7) if not np.array_equal(got[q], test[q])]
    assert len(normalised) == {1: 6, 2: 7}[k]  # with k = 1 one query's best item is in no bank query's top 1


def test_a_hub_loses_its_place_in_the_ranking():
    # gallery item 0 is a hub (every bank query scores it high); the query slightly prefers it over its true match 1
    bank = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.85, 0.0, 0.2]])
    test = np.array([[0.60, 0.55, 0.0]])
    assert np.argmax(test[0]) == 0
    assert int(qb_norm_scores(torch.from_numpy(test), torch.from_numpy(bank)).argmax()) == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="beta > 0"):
        qb_norm_scores(torch.zeros(2, 3), torch.zeros(4, 3), beta=0)
    with pytest.raises(ValueError, match="must cover the test gallery"):
        qb_norm_scores(torch.zeros(2, 3), torch.zeros(4, 2))


@pytest.mark.slow
def test_a_named_bank_file_is_used_and_labelled(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                                tmp_path):
    from tests.test_retrieval_training import main_task_retrieval_msrvtt, retrieval_argv
    from tests.test_stage1_training import metrics

    bank = tmp_path / "bank.txt"
    bank.write_text("a red circle moves left\n\na blue square\na green triangle spins\n")
    argv = [arg for arg in retrieval_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                          tmp_path / "run", "--do_eval", "--qbnorm", "--qbnorm_bank", str(bank))
            if arg != "--do_train"]
    assert main_task_retrieval_msrvtt.main(argv) == 0
    rows = {row["scoring"]: row for row in metrics(tmp_path / "run")}
    assert rows["qbnorm"]["bank"] == {"source": str(bank), "size": 3} and rows["qbnorm"]["base"] == "meanP"
    assert rows["qbnorm"]["n_texts"] == rows["meanP"]["n_texts"] == 6
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"retrieval (QB-Norm on meanP, bank of 3 from {bank})" in log
