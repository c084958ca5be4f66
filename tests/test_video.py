"""Raw-video decoding (docs/method.md §9.8) on real mp4 files written with OpenCV."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from dataloaders.video import (
    CLIP_MEAN,
    CLIP_STD,
    ClipSampling,
    load_video_clip,
    normalize_video,
    order_frames,
    resize_center_crop,
    select_frame_indices,
)
from dataloaders.video_decoding import VideoDecodeError, read_frames

LEVEL = 32  # colour step per frame-index digit; mp4v errors are a few levels, far below LEVEL / 2


def index_colour(frame_index: int) -> tuple[int, int, int]:
    """RGB colour that encodes a frame index < 64 in two base-8 digits (red: low, green: high)."""
    return (frame_index % 8 * LEVEL + 16, frame_index // 8 * LEVEL + 16, 128)


def decode_index(frame_rgb: np.ndarray) -> int:
    red, green, _ = frame_rgb.reshape(-1, 3).mean(axis=0)
    return round((red - 16) / LEVEL) + 8 * round((green - 16) / LEVEL)


def write_index_video(path: Path, n_frames: int, fps: int, width: int = 32, height: int = 24) -> Path:
    """An mp4v video whose frame i is a plain colour encoding i."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for i in range(n_frames):
        writer.write(np.full((height, width, 3), index_colour(i)[::-1], dtype=np.uint8))
    writer.release()
    return path


def frame_indices(frames_rgb) -> list[int]:
    """Frame indices of RGB frames given as numpy [n,H,W,3] or uint8 tensor [n,3,H,W]."""
    if isinstance(frames_rgb, torch.Tensor):
        frames_rgb = frames_rgb.permute(0, 2, 3, 1).numpy()
    return [decode_index(frame) for frame in frames_rgb]


@pytest.fixture(scope="module")
def video_20_frames_8fps(tmp_path_factory) -> Path:
    return write_index_video(tmp_path_factory.mktemp("videos") / "v20.mp4", n_frames=20, fps=8)


@pytest.fixture(scope="module")
def video_40_frames_8fps(tmp_path_factory) -> Path:
    return write_index_video(tmp_path_factory.mktemp("videos") / "v40.mp4", n_frames=40, fps=8)


def test_index_colours_survive_the_codec(video_20_frames_8fps):
    assert frame_indices(read_frames(video_20_frames_8fps, feature_framerate=0)) == list(range(20))


@pytest.mark.parametrize(
    ("feature_framerate", "expected"),
    [
        # duration ceil(20/8) = 3 -> seconds 0..3 inclusive; frame 24 does not exist, so reading stops there.
        (1, [0, 8, 16]),
        (2, [0, 4, 8, 12, 16]),  # step 8 // 2 = 4, offsets 0, 4; frame 20 fails
        (3, [0, 2, 4, 8, 10, 12, 16, 18]),  # step 2, first 3 offsets 0, 2, 4; frame 20 fails
        (0, list(range(20))),
    ],
)
def test_sampling_per_second(video_20_frames_8fps, feature_framerate, expected):
    frames = read_frames(video_20_frames_8fps, feature_framerate)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (24, 32, 3)
    assert frame_indices(frames) == expected


def test_framerate_above_fps_takes_every_frame(tmp_path):
    path = write_index_video(tmp_path / "slow.mp4", n_frames=10, fps=4)
    assert frame_indices(read_frames(path, feature_framerate=8)) == list(range(10))


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [(1, 2, [8, 16]), (2, 31, [16]), (0, 1, [0, 8])],  # end is clipped to the duration (3 s)
)
def test_second_window(video_20_frames_8fps, start, end, expected):
    assert frame_indices(read_frames(video_20_frames_8fps, 1, start_time=start, end_time=end)) == expected


@pytest.mark.parametrize(("start", "end"), [(3, 3), (-1, 2), (None, 2), (2, None)])
def test_bad_window_is_rejected(video_20_frames_8fps, start, end):
    with pytest.raises(ValueError):
        read_frames(video_20_frames_8fps, 1, start_time=start, end_time=end)


@pytest.mark.parametrize(
    ("n_frames", "slice_framepos", "pad_mode", "expected"),
    [
        (20, 0, "zero", list(range(12))),
        (20, 1, "zero", list(range(8, 20))),
        (20, 2, "zero", [0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19]),
        (20, 2, "repeat", [0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19]),
        (20, 0, "repeat", list(range(12))),
        (12, 1, "zero", list(range(12))),
        (5, 2, "zero", [0, 1, 2, 3, 4]),
        (5, 0, "repeat", [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4]),
    ],
)
def test_select_frame_indices(n_frames, slice_framepos, pad_mode, expected):
    assert select_frame_indices(n_frames, 12, slice_framepos, pad_mode).tolist() == expected


def test_select_frame_indices_rejects_unknown_options():
    with pytest.raises(ValueError):
        select_frame_indices(20, 12, 3, "zero")
    with pytest.raises(ValueError):
        select_frame_indices(5, 12, 0, "edge")


def test_order_frames():
    indices = np.arange(6)
    assert order_frames(indices, 0, None).tolist() == [0, 1, 2, 3, 4, 5]
    assert order_frames(indices, 1, None).tolist() == [5, 4, 3, 2, 1, 0]
    shuffled = order_frames(indices, 2, np.random.default_rng(7))
    assert shuffled.tolist() == np.random.default_rng(7).permutation(6).tolist()
    assert sorted(shuffled.tolist()) == list(range(6)) and shuffled.tolist() != list(range(6))
    with pytest.raises(ValueError):
        order_frames(indices, 2, None)


def test_clip_uniform_slice(video_40_frames_8fps):
    # 40 frames at 8 fps, 1 frame/s -> frames 0, 8, 16, 24, 32; linspace(0, 4, 3) -> 0, 2, 4.
    video, mask = load_video_clip(video_40_frames_8fps, ClipSampling(max_frames=3, feature_framerate=1,
                                                                     slice_framepos=2, image_size=16))
    assert video.shape == (3, 3, 16, 16) and video.dtype == torch.uint8
    assert mask.dtype == torch.long and mask.tolist() == [1, 1, 1]
    assert frame_indices(video) == [0, 16, 32]


def test_clip_zero_padding(video_40_frames_8fps):
    video, mask = load_video_clip(video_40_frames_8fps, ClipSampling(max_frames=8, feature_framerate=1,
                                                                     image_size=16, pad_mode="zero"))
    assert mask.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert frame_indices(video[:5]) == [0, 8, 16, 24, 32]
    assert video[5:].eq(0).all()


def test_clip_repeat_padding(video_40_frames_8fps):
    video, mask = load_video_clip(video_40_frames_8fps, ClipSampling(max_frames=8, feature_framerate=1,
                                                                     image_size=16, pad_mode="repeat"))
    assert mask.tolist() == [1] * 8
    # linspace(0, 4, 8) truncated = 0 0 1 1 2 2 3 4 over the sampled frames 0 8 16 24 32
    assert frame_indices(video) == [0, 0, 8, 8, 16, 16, 24, 32]


def test_clip_frame_order(video_40_frames_8fps):
    options = dict(max_frames=8, feature_framerate=1, image_size=16, pad_mode="zero")
    reversed_video, mask = load_video_clip(video_40_frames_8fps, ClipSampling(frame_order=1, **options))
    assert frame_indices(reversed_video[:5]) == [32, 24, 16, 8, 0] and mask.sum() == 5
    shuffled = ClipSampling(frame_order=2, **options)
    first, _ = load_video_clip(video_40_frames_8fps, shuffled, rng=np.random.default_rng(3))
    again, _ = load_video_clip(video_40_frames_8fps, shuffled, rng=np.random.default_rng(3))
    assert torch.equal(first, again)
    expected = [[0, 8, 16, 24, 32][i] for i in np.random.default_rng(3).permutation(5)]
    assert frame_indices(first[:5]) == expected
    assert first[5:].eq(0).all()


def test_resize_center_crop_takes_the_middle_of_a_wide_frame():
    frame = np.zeros((40, 80, 3), dtype=np.uint8)
    frame[:, :10] = (255, 0, 0)
    frame[:, 10:70] = (0, 255, 0)
    frame[:, 70:] = (0, 0, 255)
    out = resize_center_crop(frame[None], 20)  # 40x80 -> 20x40 -> crop columns 10..29 = original 20..59
    assert out.shape == (1, 3, 20, 20) and out.dtype == torch.uint8
    assert out[0, 1].eq(255).all() and out[0, 0].eq(0).all() and out[0, 2].eq(0).all()


def test_resize_center_crop_matches_the_original_pil_transform():
    y, x = np.mgrid[0:60, 0:36]  # a tall frame
    smooth = 127 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)
    frame = np.stack([smooth, 255 - smooth, np.full_like(smooth, 90)], axis=-1).astype(np.uint8)
    original = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(24)])
    expected = np.asarray(original(Image.fromarray(frame))).astype(int)
    ours = resize_center_crop(frame[None], 24)[0].permute(1, 2, 0).numpy().astype(int)
    assert ours.shape == (24, 24, 3)
    assert np.abs(ours - expected).max() <= 1


def test_normalize_video_numbers():
    video = torch.zeros(2, 4, 3, 5, 5, dtype=torch.uint8)
    video[1] = 255
    out = normalize_video(video)
    assert out.dtype == torch.float32 and out.shape == video.shape
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, 0, :, 2, 2], -mean / std)
    torch.testing.assert_close(out[1, 3, :, 0, 4], (1 - mean) / std)
    torch.testing.assert_close(out[0, 0, 0, 0, 0], torch.tensor(-0.48145466 / 0.26862954))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match="nope.mp4"):
        load_video_clip(path, ClipSampling(max_frames=4, image_size=16))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(VideoDecodeError, match="empty.mp4"):
        load_video_clip(path, ClipSampling(max_frames=4, image_size=16))


def test_corrupt_files(tmp_path, video_20_frames_8fps):
    truncated = tmp_path / "truncated.mp4"
    data = video_20_frames_8fps.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(bytes(range(256)) * 8)
    for path in (truncated, garbage):
        with pytest.raises(VideoDecodeError, match=path.name):
            read_frames(path)


def test_zero_frame_file(tmp_path):
    path = tmp_path / "zero_frames.mp4"
    cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (32, 24)).release()
    with pytest.raises(VideoDecodeError, match="zero_frames.mp4") as raised:
        read_frames(path)
    assert isinstance(raised.value, RuntimeError)
