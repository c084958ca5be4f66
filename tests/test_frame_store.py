"""The decode-once frame store (frozen_tfrecord.py --feature_framerate, dataloaders/frame_store.py): clips read
from it equal, bit for bit, the clips decoded from the raw videos with the same flags."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import frozen_tfrecord as ft
from conversion.convert import ConversionConfig, ConversionSummary
from conversion.encoding import EncodeOptions
from dataloaders.frame_store import FrameStore, manifest_path
from dataloaders.raw_video_text import PairsDataset
from dataloaders.video import ClipSampling, load_video_clip
from dataloaders.video_decoding import VideoDecodeError
from modules.errors import InputError

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32

# (frames, fps, width, height): landscape and portrait, down- and up-scaled, a frame rate not dividing evenly
VIDEOS = {
    "clip_a": (50, 10, 96, 72),
    "clip_b": (37, 8, 60, 80),
    "clip_c": (9, 4, 24, 20),
    "clip_d": (75, 25, 64, 48),
}


def write_textured_video(path: Path, n_frames: int, fps: int, width: int, height: int, seed: int) -> None:
    """Noise plus a moving gradient: every frame differs and resizing has real work to do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for position in range(n_frames):
        frame = (base.astype(np.float64) * 0.6 + np.roll(ramp, 3 * position, axis=1) * 0.4).astype(np.uint8)
        writer.write(frame)
    writer.release()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("frame_store_videos")
    for seed, (name, spec) in enumerate(VIDEOS.items()):
        write_textured_video(root / "nested" / f"{name}.mp4", *spec, seed=seed)
    (root / "broken.mp4").write_bytes(b"not a video")
    return root


def convert_store(video_dir: Path, output_dir: Path, **options) -> ConversionSummary:
    config = ConversionConfig(output_dir=str(output_dir), video_dir=str(video_dir), shard_size=3, workers=0,
                                 progress=False, options=EncodeOptions(num_frames=0, **options))
    return ft.convert(config)


@pytest.fixture(scope="module")
def stores(video_dir, tmp_path_factory) -> dict[int, Path]:
    """A PNG store per sampling rate: 1 and 2 frames per second, and every frame (0)."""
    made = {}
    for rate in (1, 2, 0):
        output = tmp_path_factory.mktemp(f"store_{rate}")
        summary = convert_store(video_dir, output, feature_framerate=rate, image_size=IMAGE_SIZE, frame_format="png")
        assert summary.n_written == len(VIDEOS) and summary.failures == {"bad_video": 1}
        made[rate] = output
    return made


def assert_same_clip(stored: tuple[torch.Tensor, torch.Tensor], decoded: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert stored[0].dtype == decoded[0].dtype == torch.uint8
    assert torch.equal(stored[1], decoded[1])
    assert torch.equal(stored[0], decoded[0]), f"max difference {(stored[0].int() - decoded[0].int()).abs().max()}"


CLIP_FLAGS = [
    dict(max_frames=max_frames, slice_framepos=slice_framepos, frame_order=frame_order, pad_mode=pad_mode)
    for max_frames, slice_framepos, frame_order, pad_mode in itertools.product(
        (3, 12), (0, 1, 2), (0, 1, 2), ("zero", "repeat"))
]


@pytest.mark.slow
@pytest.mark.parametrize("rate", [1, 2, 0])
def test_stored_clips_equal_decoded_clips_for_every_sampling_flag(video_dir, stores, rate):
    store = FrameStore(stores[rate], feature_framerate=rate, image_size=IMAGE_SIZE)
    assert len(store) == len(VIDEOS) and "broken" not in store
    n_real_frames = set()
    for (name, _), flags in itertools.product(VIDEOS.items(), CLIP_FLAGS):
        sampling = ClipSampling(feature_framerate=rate, image_size=IMAGE_SIZE, **flags)
        seed = [rate, flags["max_frames"], flags["slice_framepos"], flags["frame_order"]]
        decoded = load_video_clip(video_dir / "nested" / f"{name}.mp4", sampling, rng=np.random.default_rng(seed))
        stored = store.load_clip(name, sampling, rng=np.random.default_rng(seed))
        assert_same_clip(stored, decoded)
        n_real_frames.add(int(decoded[1].sum()))
    assert len(n_real_frames) > 2  # short and long videos, cut and padded, were all exercised


@pytest.mark.parametrize("window", [(0, 1), (1, 3), (2, 100), (4, 6)])
def test_time_windows_read_the_same_seconds_as_the_decoder(video_dir, stores, window):
    store = FrameStore(stores[2], feature_framerate=2, image_size=IMAGE_SIZE)
    start, end = window
    for name in VIDEOS:
        sampling = ClipSampling(feature_framerate=2, image_size=IMAGE_SIZE, max_frames=12)
        try:
            decoded = load_video_clip(video_dir / "nested" / f"{name}.mp4", sampling, start_time=start, end_time=end)
        except VideoDecodeError:  # the window starts after the video ends: the store refuses it too
            with pytest.raises(VideoDecodeError, match="no stored frame"):
                store.load_clip(name, sampling, start_time=start, end_time=end)
            continue
        assert_same_clip(store.load_clip(name, sampling, start_time=start, end_time=end), decoded)


def test_datasets_give_the_same_samples_from_the_store(video_dir, stores, caplog, tmp_path):
    """A dataset with --frame_store yields what the raw-video dataset yields, training and evaluation views,
    and decodes a video the store lacks from its file (saying so once)."""
    pairs = [(name, f"a caption of {name}") for name in VIDEOS] + [("clip_a", "a second caption")]
    options = dict(feature_framerate=1, image_size=IMAGE_SIZE, max_frames=4, frame_order=2, pad_mode="repeat",
                   as_split=True, window=(1, 4))
    files = {name: video_dir / "nested" / f"{name}.mp4" for name in VIDEOS}
    raw = PairsDataset(pairs, video_dir, video_files=files, **options)
    stored = PairsDataset(pairs, video_dir, video_files=files, frame_store=stores[1], **options)
    for epoch in (0, 1):
        raw.set_epoch(epoch)
        stored.set_epoch(epoch)
        for index in range(len(pairs)):
            expected, got = raw[index], stored[index]
            assert_same_clip((got["video"], got["video_mask"]), (expected["video"], expected["video_mask"]))
            assert torch.equal(torch.as_tensor(got["input_ids"]), torch.as_tensor(expected["input_ids"]))
    raw_videos, stored_videos = raw.video_dataset(), stored.video_dataset()
    assert len(raw_videos) == len(VIDEOS)
    for index in range(len(raw_videos)):
        expected, got = raw_videos[index], stored_videos[index]
        assert_same_clip((got["video"], got["video_mask"]), (expected["video"], expected["video_mask"]))

    files["extra"] = tmp_path / "extra.mp4"
    write_textured_video(files["extra"], 20, 10, 40, 30, seed=9)
    with_extra = PairsDataset([("extra", "not stored")] * 2, video_dir, video_files=files, frame_store=stores[1],
                              **options)
    with caplog.at_level(logging.WARNING, logger="t2vlp.data"):
        sample = with_extra[0]
        with_extra[1]
    expected = PairsDataset([("extra", "not stored")], video_dir, video_files=files, **options)[0]
    assert_same_clip((sample["video"], sample["video_mask"]), (expected["video"], expected["video_mask"]))
    assert sum("extra is not in --frame_store" in message for message in caplog.messages) == 1


def test_a_store_of_other_sampling_or_a_webvid_store_is_refused(stores, tmp_path):
    with pytest.raises(InputError, match=r"--feature_framerate 2 and image size 32; this run samples 1 per second"):
        FrameStore(stores[2], feature_framerate=1, image_size=IMAGE_SIZE)
    with pytest.raises(InputError, match="this run samples 1 per second at 224"):
        PairsDataset([], tmp_path, frame_store=stores[1], feature_framerate=1, image_size=224)
    (tmp_path / "path.index").write_text("")
    with pytest.raises(InputError, match="a WebVid store has no such file"):
        FrameStore(tmp_path, feature_framerate=1, image_size=IMAGE_SIZE)


def test_store_manifest_records_the_sampling(stores):
    text = manifest_path(stores[2]).read_text()
    assert '"feature_framerate": 2' in text and f'"image_size": {IMAGE_SIZE}' in text and '"png"' in text


def test_jpeg_store_is_close_but_not_claimed_lossless(video_dir, tmp_path):
    convert_store(video_dir, tmp_path, feature_framerate=1, image_size=IMAGE_SIZE, frame_format="jpeg",
                  jpeg_quality=95)
    store = FrameStore(tmp_path, feature_framerate=1, image_size=IMAGE_SIZE)
    assert not store.manifest.lossless
    decoded = load_video_clip(video_dir / "nested" / "clip_a.mp4", ClipSampling(image_size=IMAGE_SIZE))
    stored = store.load_clip("clip_a", ClipSampling(image_size=IMAGE_SIZE))
    difference = (stored[0].float() - decoded[0].float()).abs()
    assert torch.equal(stored[1], decoded[1]) and 0 < difference.mean() < 8


def test_sidecars_record_the_options_that_shape_the_records(tmp_path):
    """A rerun keeps a shard only if these match: the decoder and --min_frames decide which frames and clips a
    WebVid shard holds; a frame store always decodes as the fine-tuning loaders do and keeps every video."""
    assert set(EncodeOptions().recorded()) == {"num_frames", "short_side", "jpeg_quality", "raw", "decoder",
                                               "min_frames"}
    store = EncodeOptions(feature_framerate=1).recorded()
    assert store["feature_framerate"] == 1 and "decoder" not in store and "min_frames" not in store


def test_rerun_keeps_the_finished_shards(video_dir, stores, tmp_path):
    first = convert_store(video_dir, tmp_path, feature_framerate=1, image_size=IMAGE_SIZE, frame_format="png")
    shards = sorted(tmp_path.glob("*.tfrecord"))
    again = convert_store(video_dir, tmp_path, feature_framerate=1, image_size=IMAGE_SIZE, frame_format="png")
    # The shard holding the broken video is converted again (the video might have been restored), the other kept.
    assert (first.n_shards, again.n_shards_resumed, again.n_shards_retried) == (2, 1, 1)
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in sorted(stores[1].glob("*.tfrecord"))]


@pytest.mark.integration
@pytest.mark.parametrize("extra", [["--num_frames", "8"], ["--raw"], ["--short_side", "128"]])
def test_converter_refuses_flags_that_do_not_apply_to_a_store(video_dir, tmp_path, extra):
    result = subprocess.run(
        [sys.executable, "frozen_tfrecord.py", "--video_dir", str(video_dir), "--feature_framerate", "1",
         "--output_dir", str(tmp_path), *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "does not apply" in result.stderr and extra[0] in result.stderr


def test_benchmark_runs_and_prints_both_paths(capsys):
    """bench/bench_frame_store.py at toy size (a smoke test; its speed figures are in bench/RESULTS.md)."""
    from bench import bench_frame_store as bench

    argv = ["--n_videos", "2", "--seconds", "3", "--width", "64", "--height", "48", "--image_size", "32",
            "--passes", "1", "--codec", "mp4v"]
    assert bench.main(argv) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:4]}
    assert set(rows) == {"raw", "frame"}
    assert float(rows["raw"][2]) > 0 and rows["raw"][3] == "1.00x" and float(rows["frame"][2]) > 0
