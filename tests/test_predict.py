"""predict.py on the small demo data: search equals the evaluation's ranking, incremental re-indexing, the HTML
page in headless Chromium, caption/answer equal to what the evaluation decoded, refusals of wrong checkpoints."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import predict
from dataloaders.demo_data import COLOURS
from engine.evaluation.retrieval import encode_split, similarity_matrix
from inference.trained_model import load_trained_model
from inference.video_index import VideoIndex
from modules.checkpoint import original_format_state_dict
from tests.torchrun import ROOT

sys.path.insert(0, str(ROOT / "video_captioning"))
sys.path.insert(0, str(ROOT / "video_qa"))
sys.path.insert(0, str(ROOT / "tests"))


def link_test_videos(demo: dict[str, Path], folder: Path) -> tuple[list[str], list[str]]:
    """The demo's test videos, linked into `folder`; returns their ids in the csv's order."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with open(demo["test_csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        (folder / f"{row['video_id']}.mp4").symlink_to(demo["videos_dir"] / f"{row['video_id']}.mp4")
    return [row["video_id"] for row in rows], [row["sentence"] for row in rows]


def run_predict(*arguments: str, check: bool = True, subprocess_run: bool = False) -> subprocess.CompletedProcess:
    """predict.py with `arguments`, in this process (fast) or as a real subprocess."""
    if subprocess_run:
        result = subprocess.run([sys.executable, str(ROOT / "predict.py"), *arguments], capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
                                timeout=600)
    else:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = predict.main(list(arguments) + (["--device", "cpu"] if arguments[0] != "--help" else []))
        result = subprocess.CompletedProcess(arguments, code, out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def stage2_model(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path_factory) -> Path:
    """A tiny stage-2-shaped checkpoint (fusion keys present) with a run.json beside it, as training leaves it."""
    from tests.test_retrieval_training import main_task_retrieval_msrvtt, retrieval_argv

    out = tmp_path_factory.mktemp("predict_model")
    argv = retrieval_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, out, "--max_steps=2",
                          "--eval_steps=0", "--no-eval_before_training")
    assert main_task_retrieval_msrvtt.main(argv) == 0
    return out / "ckpt" / "pytorch_model.bin.2"


def test_search_ranks_videos_as_the_evaluation_does(stage2_model, small_demo_source, tmp_path, capsys):
    ids, captions = link_test_videos(small_demo_source, tmp_path / "videos")
    run_predict("index", str(tmp_path / "videos"), "--init_model", str(stage2_model), "--out", str(tmp_path / "ix"),
                "--num_workers", "0")
    index = VideoIndex.load(tmp_path / "ix")
    assert [Path(p).stem for p in index.paths] == sorted(ids)
    # the evaluation's meanP matrix of the same checkpoint and sampling (run.json: 3 frames at 2 fps, 16 words)
    from dataloaders.msrvtt import MSRVTTTestDataset

    trained = load_trained_model(stage2_model)
    assert trained.settings["max_frames"] == 3 and trained.settings["fusion_layers"] == 2  # from run.json
    dataset = MSRVTTTestDataset(small_demo_source["test_csv"], small_demo_source["videos_dir"], max_words=16,
                                feature_framerate=2, max_frames=3, image_size=32, pad_mode="repeat")
    encoded = encode_split(trained.model, dataset, batch_size=4, device=torch.device("cpu"), precision="fp32",
                           show_progress=False)
    sim = similarity_matrix(trained.model, encoded)
    top3 = 0
    for row, caption in enumerate(captions):
        hits = json.loads(run_predict("query", str(tmp_path / "ix"), caption, "--top_k", "6", "--json").stdout)
        expected = [encoded["video_ids"][i] for i in np.argsort(-sim[row], kind="stable")]
        assert [Path(hit["path"]).stem for hit in hits] == expected
        assert hits[0]["score"] == pytest.approx(float(sim[row].max()), abs=1e-3)
        top3 += ids[row] in [Path(hit["path"]).stem for hit in hits[:3]]
    print(f"own video in the top 3 for {top3} of {len(captions)} test captions")
    reranked = json.loads(run_predict("query", str(tmp_path / "ix"), captions[0], "--top_k", "3", "--rerank",
                                      "--json").stdout)
    assert len(reranked) == 3 and all(hit["score"] > 1000 for hit in reranked)  # candidates above every raw score


def test_reindexing_encodes_only_new_and_changed_files(stage2_model, small_demo_source, tmp_path):
    ids, _ = link_test_videos(small_demo_source, tmp_path / "videos")
    (tmp_path / "videos" / "notes.txt").write_text("not a video")
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\x00" * 100)
    first = run_predict("index", str(tmp_path / "videos"), "--init_model", str(stage2_model), "--out",
                        str(tmp_path / "ix"), "--num_workers", "0").stdout
    assert "6 encoded, 0 unchanged, 0 removed, 1 unreadable" in first and "broken.mp4" in first
    before = np.load(tmp_path / "ix" / "clip_features.npy")
    (tmp_path / "videos" / f"{ids[0]}.mp4").unlink()
    (tmp_path / "videos" / "added.mp4").symlink_to(small_demo_source["videos_dir"] / "video0.mp4")
    run_predict("index", str(tmp_path / "videos"), "--init_model", str(stage2_model), "--out", str(tmp_path / "ix"),
                "--num_workers", "0")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    update = meta["last_update"]
    assert [Path(p).name for p in update["encoded"]] == ["added.mp4"]  # broken.mp4 is retried: it failed again
    assert update["reused"] == 5 and [Path(p).stem for p in update["removed"]] == [ids[0]]
    assert [Path(f["path"]).name for f in update["failed"]] == ["broken.mp4"]
    after = np.load(tmp_path / "ix" / "clip_features.npy")
    paths = [entry["path"] for entry in meta["videos"]]
    old_paths = sorted(str(tmp_path / "videos" / f"{i}.mp4") for i in ids)
    for path in paths:
        if path in old_paths:  # unchanged videos keep their features, bit for bit
            assert np.array_equal(after[paths.index(path)], before[old_paths.index(path)])


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_results_page_renders_with_thumbnails(stage2_model, small_demo_source, tmp_path):
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI: .ci/run installs Debian's chromium")
        pytest.skip("Chromium not installed (Debian: apt-get install chromium)")
    link_test_videos(small_demo_source, tmp_path / "videos")
    run_predict("index", str(tmp_path / "videos"), "--init_model", str(stage2_model), "--out", str(tmp_path / "ix"),
                "--num_workers", "0")
    page = tmp_path / "results.html"
    run_predict("query", str(tmp_path / "ix"), "a red circle moves to the left", "--top_k", "3", "--html", str(page))
    text = page.read_text()
    assert text.count("data:image/jpeg;base64,") >= 3 * 4 and "a red circle moves to the left" in text
    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=900,700", page.as_uri()], capture_output=True, timeout=120, check=True)
    image = cv2.cvtColor(cv2.imread(str(shot)), cv2.COLOR_BGR2RGB).astype(int)
    # the thumbnails show the demo's saturated shape colours, which nothing else on the page has
    shape_pixels = sum(int((np.abs(image - np.array(rgb)).sum(axis=-1) < 60).sum()) for rgb in COLOURS.values()
                       if rgb != (250, 250, 250))
    assert shape_pixels > 2000, shape_pixels


@pytest.mark.slow
def test_caption_and_answer_print_what_the_evaluation_decoded(small_demo_source, tiny_fusion_clip_checkpoint,
                                                              stage1_checkpoint, tmp_path):
    import main_task_qa_msrvtt
    import msvd_captioning
    from test_caption_training import caption_argv
    from test_qa_training import qa_argv

    caption_out = tmp_path / "caption"
    assert msvd_captioning.main(caption_argv(small_demo_source["msvd_dir"], small_demo_source["videos_dir"],
                                             tiny_fusion_clip_checkpoint, stage1_checkpoint, caption_out,
                                             "--max_steps=2", "--eval_split=test", "--no-eval_before_training",
                                             "--no-test_after_training")) == 0
    decoded = json.loads((caption_out / "predictions_test_step2.json").read_text())
    videos = [str(small_demo_source["videos_dir"] / f"{item['video_id']}.mp4") for item in decoded[:3]]
    printed = run_predict("caption", *videos, "--init_model", str(caption_out / "ckpt" / "pytorch_model.bin.2"))
    lines = printed.stdout.strip().splitlines()
    assert [line.split("\t") for line in lines] == [[video, item["caption"]] for video, item in zip(videos, decoded)]

    qa_out = tmp_path / "qa"
    assert main_task_qa_msrvtt.main(qa_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                            qa_out, "--max_steps=2", "--no-eval_before_training")) == 0
    rows = [json.loads(line) for line in (qa_out / "predictions_test_step2.jsonl").read_text().splitlines()]
    for row in rows[:2]:
        video = str(small_demo_source["videos_dir"] / f"{row['video_id']}.mp4")
        answer, score = run_predict("answer", video, row["question"], "--init_model",
                                    str(qa_out / "ckpt" / "pytorch_model.bin.2")).stdout.strip().split("\t")
        assert answer == row["prediction"] and float(score) == pytest.approx(row["score"], abs=1e-3)


@pytest.mark.integration
def test_wrong_checkpoints_are_refused_clearly(stage1_checkpoint, stage2_model, small_demo_source, tmp_path):
    video = str(small_demo_source["videos_dir"] / "video0.mp4")
    result = run_predict("caption", video, "--init_model", str(stage1_checkpoint), check=False, subprocess_run=True)
    assert result.returncode == 2 and "no fusion encoder (a stage-1 checkpoint?): caption needs" in result.stderr
    result = run_predict("answer", video, "what?", "--init_model", str(stage1_checkpoint), check=False)
    assert result.returncode == 2 and "answer needs" in result.stderr
    link_test_videos(small_demo_source, tmp_path / "videos")
    run_predict("index", str(tmp_path / "videos"), "--init_model", str(stage1_checkpoint), "--out",
                str(tmp_path / "ix"), "--num_workers", "0", "--max_frames", "3", "--feature_framerate", "2",
                "--max_words", "16")
    result = run_predict("query", str(tmp_path / "ix"), "a red circle", "--rerank", check=False)
    assert result.returncode == 2 and "--rerank needs a stage-2 or downstream checkpoint" in result.stderr
    result = run_predict("query", str(tmp_path / "nothing"), "a red circle", check=False)
    assert result.returncode == 2 and "is not an index" in result.stderr


def test_an_original_format_checkpoint_alone_is_enough(stage2_model, small_demo_source, tmp_path):
    """No run.json beside it: the original's defaults apply, flags override what the tiny model needs."""
    trained = load_trained_model(stage2_model)
    released = tmp_path / "released.bin"
    torch.save({"global_step": 2, "model_state_dict": original_format_state_dict(trained.model, trained.model.clip)},
               released)
    video = str(small_demo_source["videos_dir"] / "video0.mp4")
    result = run_predict("caption", video, "--init_model", str(released), check=False)
    assert result.returncode == 2 and "fusion_layers 6 must be in 1..2" in result.stderr
    ours = run_predict("caption", video, "--init_model", str(stage2_model)).stdout
    theirs = run_predict("caption", video, "--init_model", str(released), "--fusion_layers", "2", "--max_frames",
                         "3", "--feature_framerate", "2", "--max_words", "16", "--match_norm", "group").stdout
    assert ours == theirs


def test_a_checkpoint_without_clip_weights_needs_the_clip_file(stage2_model, tiny_fusion_clip_checkpoint,
                                                               small_demo_source, tmp_path):
    """Only then is --visual_pretrain_path needed; the CLIP weights come from it, the rest from the checkpoint."""
    from modules.checkpoint import read_model_state_dict

    state = read_model_state_dict(stage2_model)
    clip_keys = ("clip.visual.", "clip.transformer.", "clip.token_embedding", "clip.positional_embedding",
                 "clip.ln_final", "clip.text_projection", "clip.logit_scale")
    without = {key: value for key, value in state.items() if not key.startswith(clip_keys)}
    partial = tmp_path / "ckpt" / "pytorch_model.bin.2"  # beside the same run.json settings
    partial.parent.mkdir()
    shutil.copy(stage2_model.parent.parent / "run.json", tmp_path / "run.json")
    torch.save({"global_step": 2, "model_state_dict": without}, partial)
    video = str(small_demo_source["videos_dir"] / "video0.mp4")
    result = run_predict("caption", video, "--init_model", str(partial), check=False)
    assert result.returncode == 2 and "give --visual_pretrain_path" in result.stderr
    with_clip = run_predict("caption", video, "--init_model", str(partial), "--visual_pretrain_path",
                            str(tiny_fusion_clip_checkpoint)).stdout
    assert with_clip.split("\t")[0] == video


# ----------------------------------------------------------------------------------------------- index robustness


def changed_copy(checkpoint: Path, target: Path) -> Path:
    """`checkpoint` with one weight changed, saved at `target`."""
    state = torch.load(checkpoint, weights_only=True)
    state["model_state_dict"]["clip.logit_scale"] = state["model_state_dict"]["clip.logit_scale"] + 0.5
    torch.save(state, target)
    return target


def test_an_index_knows_its_model(stage2_model, small_demo_source, tmp_path):
    videos, index = tmp_path / "videos", tmp_path / "index"
    link_test_videos(small_demo_source, videos)
    model = tmp_path / "model.bin"
    shutil.copy(stage2_model, model)
    shutil.copy(stage2_model.parent.parent / "run.json", tmp_path / "run.json")
    run_predict("index", str(videos), "--init_model", str(model), "--out", str(index), "--num_workers", "0")

    other = changed_copy(stage2_model, tmp_path / "other.bin")
    refused = run_predict("query", str(index), "a red circle", "--init_model", str(other), check=False)
    assert refused.returncode == 2 and f"was built with {model.resolve()}, not with --init_model {other}" in \
        refused.stderr and len(refused.stderr.splitlines()) == 1
    allowed = run_predict("query", str(index), "a red circle", "--init_model", str(other), "--allow_other_model")
    assert len(allowed.stdout.splitlines()) == 6
    same = tmp_path / "same.bin"
    shutil.copy(model, same)  # the same contents elsewhere is the same model
    assert run_predict("query", str(index), "a red circle", "--init_model", str(same)).returncode == 0

    changed_copy(stage2_model, model)  # the index's checkpoint overwritten in place
    refused = run_predict("query", str(index), "a red circle", check=False)
    assert refused.returncode == 2 and "has changed since index" in refused.stderr
    again = run_predict("index", str(videos), "--init_model", str(model), "--out", str(index), "--num_workers", "0")
    assert "6 encoded, 0 unchanged" in again.stdout
    assert run_predict("query", str(index), "a red circle").returncode == 0


def test_a_damaged_index_is_refused_by_query_and_rebuilt_by_index(stage2_model, small_demo_source, tmp_path):
    videos, index = tmp_path / "videos", tmp_path / "index"
    link_test_videos(small_demo_source, videos)
    build = ("index", str(videos), "--init_model", str(stage2_model), "--out", str(index), "--num_workers", "0")
    run_predict(*build)
    for damage, message in [
        (lambda: (index / "clip_features.npy").unlink(), "clip_features.npy is missing"),
        (lambda: np.save(index / "clip_features.npy", np.zeros((5, 32), np.float32)),
         "clip_features.npy has 5 rows for the 6 videos"),
        (lambda: np.save(index / "tubes.npy", np.zeros((2, 8, 32), np.float16)), "tubes.npy has 2 rows"),
    ]:
        damage()
        refused = run_predict("query", str(index), "a red circle", check=False)
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.splitlines()) == 1
        assert "6 encoded, 0 unchanged" in run_predict(*build).stdout  # rebuilt
    (index / "index.json").write_text("{not json")
    for command in (("query", str(index), "a red circle"), build):
        refused = run_predict(*command, check=False)
        assert refused.returncode == 2 and "index.json is damaged" in refused.stderr
    shutil.rmtree(index)
    run_predict(*build)
    for empty in ("", "   "):
        refused = run_predict("query", str(index), empty, check=False)
        assert refused.returncode == 2 and "the query is empty" in refused.stderr


def test_an_index_folder_in_use_is_refused(stage2_model, small_demo_source, tmp_path):
    from dataloaders.files import FolderLock

    videos, index = tmp_path / "videos", tmp_path / "index"
    link_test_videos(small_demo_source, videos)
    with FolderLock(index):
        refused = run_predict("index", str(videos), "--init_model", str(stage2_model), "--out", str(index),
                              "--num_workers", "0", check=False)
    assert refused.returncode == 2 and f"the index folder {index} is in use by pid {os.getpid()}" in refused.stderr
    assert not (index / "index.json").exists()


def test_link_loops_under_the_indexed_folder_list_each_video_once(stage2_model, small_demo_source, tmp_path,
                                                                  caplog):
    videos, index = tmp_path / "videos", tmp_path / "index"
    link_test_videos(small_demo_source, videos / "a")
    (videos / "a" / "back").symlink_to(videos)  # two loops
    (videos / "loop").symlink_to(".")
    done = run_predict("index", str(videos), "--init_model", str(stage2_model), "--out", str(index),
                       "--num_workers", "0")
    assert "6 encoded" in done.stdout
    assert len(VideoIndex.load(index).paths) == 6
    assert "a folder already walked" in caplog.text
