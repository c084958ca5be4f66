import json
import logging
import math
import sys

import numpy as np
import torch

from engine.run_logging import RunLogger


def test_main_rank_writes_log_metrics_and_tensorboard(tmp_path):
    run = RunLogger(tmp_path / "run", is_main=True, tensorboard=True)
    try:
        logging.getLogger("t2vlp.trainer").info("step %d loss %.3f", 7, 1.25)
        logging.getLogger("t2vlp.trainer").debug("not written")
        run.log_metrics({"task": "retrieval", "step": 7, "t2v": {"R1": np.float32(12.5), "MnR": math.nan}})
        run.log_metrics({"task": "retrieval", "step": 8, "loss": torch.tensor(0.5)})
        run.scalar("train/loss", 1.25, 7)
    finally:
        run.close()
    log_text = (tmp_path / "run" / "log.txt").read_text()
    assert "step 7 loss 1.250" in log_text and "not written" not in log_text
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"task": "retrieval", "step": 7, "t2v": {"R1": 12.5, "MnR": None}},
        {"task": "retrieval", "step": 8, "loss": 0.5},
    ]
    assert any((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    logging.getLogger("t2vlp.trainer").info("after close")
    assert "after close" not in (tmp_path / "run" / "log.txt").read_text()


def test_other_ranks_write_no_files_and_only_warnings(tmp_path, capsys):
    run = RunLogger(tmp_path / "run", is_main=False, rank=3)
    try:
        logging.getLogger("t2vlp.trainer").info("info from rank 3")
        logging.getLogger("t2vlp.trainer").warning("skipped 2 videos")
        run.log_metrics({"step": 1})
        run.scalar("x", 1.0, 1)
    finally:
        run.close()
    assert not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    assert "[rank 3]" in err and "skipped 2 videos" in err and "info from rank 3" not in err


def test_missing_tensorboard_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with caplog.at_level(logging.WARNING):
        run = RunLogger(tmp_path, is_main=True, tensorboard=True)
        run.scalar("train/loss", 1.0, 1)
        run.close()
    warnings = [r for r in caplog.records if "TensorBoard is unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert not (tmp_path / "tensorboard").exists()
