"""Record payloads: a clip's sampled frames as our JPEG/PNG layout or the original's raw layout, and frame-store
records for fine-tuning (dataloaders/clip_store.py has the schema)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from conversion.decoders import DECODERS, DecodedClip, VideoSource, scaled_size
from conversion.items import DECODED_SEQUENTIALLY, Failure
from dataloaders.clip_store import RAW_SIDE, encode_image_clip_record, encode_raw_clip_record
from dataloaders.video_decoding import VideoDecodeError, read_sampled_frames


@dataclass(frozen=True)
class EncodeOptions:
    num_frames: int = 12
    short_side: int = 256
    jpeg_quality: int = 90
    raw: bool = False
    frame_format: str = "jpeg"
    feature_framerate: int | None = None  # set: a downstream frame store (dataloaders/frame_store.py)
    image_size: int = 224  # frame store: the loader's resize + center crop
    decoder: str = DECODERS[0]  # for video files; in-memory members are always decoded with PyAV
    min_frames: int = 2  # a source with fewer decodable frames is not a video (a still image): not stored
    resize: str = "area"  # "swscale": PyAV's colour conversion and area resize in one call (other pixels, faster)

    @property
    def is_frame_store(self) -> bool:
        return self.feature_framerate is not None

    @property
    def decode_to_short_side(self) -> int | None:
        """The short side the decoder scales frames to itself (`--resize swscale`), else None."""
        return self.short_side if self.resize == "swscale" else None

    def recorded(self) -> dict:
        """The options a shard's sidecar records (a rerun keeps a shard only if they are the same)."""
        options = asdict(self)
        if not self.is_frame_store:
            for key in ("feature_framerate", "image_size") + (("frame_format",) if self.frame_format == "jpeg" else ()):
                options.pop(key)
            if self.resize == "area":  # the default: sidecars of earlier conversions record no such key
                options.pop("resize")
        else:  # the fine-tuning loaders' own decoder and sampling, every video kept
            options.pop("min_frames")
            options.pop("decoder")
            options.pop("resize")
        return options


def encode_clip(clip_id: str, frames_bgr: list[np.ndarray], positions: list[int], options: EncodeOptions, *,
                window: tuple[float, float] | None = None, source_id: str | None = None) -> bytes:
    """One record payload for the sampled frames, in the layout `options` asks for; a clip of a longer video also
    records its window (seconds) and source video."""
    if options.raw:
        resized = [cv2.resize(frame, (RAW_SIDE, RAW_SIDE)) for frame in frames_bgr]  # bilinear, as the original
        return encode_raw_clip_record(np.stack(resized))
    height, width = scaled_size(frames_bgr[0].shape[:2], options.short_side)
    images = []
    for frame in frames_bgr:
        if frame.shape[:2] != (height, width):
            frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        images.append(encode_image(frame, options))
    return encode_image_clip_record(clip_id, images, height, width, positions, options.frame_format.encode(),
                                    window=window, source_id=source_id)


def encode_decoded_clip(clip_id: str, clip: DecodedClip, options: EncodeOptions, where: str, *,
                        window: tuple[float, float] | None = None, source_id: str | None = None
                        ) -> tuple[bytes | None, Failure | None]:
    """What a decoded clip becomes: (payload, None); (None, the Failure that keeps it out: a source of one frame
    is a still image, `not_a_video`, one of fewer than --min_frames a `short_video`); or (payload, a `fewer_frames`
    note: stored with fewer frames than asked for)."""
    if clip.source_frames < options.min_frames:
        kind = "not_a_video" if clip.source_frames <= 1 else "short_video"
        return None, Failure(kind, clip_id, where, f"{clip.source_frames} decodable frame(s), fewer than "
                                                   f"--min_frames {options.min_frames}")
    payload = encode_clip(clip_id, clip.frames, clip.positions, options, window=window, source_id=source_id)
    if options.num_frames and len(clip.frames) < options.num_frames:
        return payload, Failure("fewer_frames", clip_id, where,
                                f"stored {len(clip.frames)} of the {options.num_frames} frames asked for")
    return payload, None


def sequential_decoding_note(source: VideoSource, clip_id: str, where: str) -> Failure | None:
    """The `decoded_sequentially` note, with its reason, on a source whose last read decoded every frame from the
    start because seeking was unsafe; None when it sought (or its decoder always reads sequentially)."""
    reason = getattr(source, "sequential_reason", None)
    return Failure(DECODED_SEQUENTIALLY, clip_id, where, reason) if reason else None


def encode_frame_store_clip(video_id: str, path: str, options: EncodeOptions) -> tuple[bytes, int]:
    """A frame-store record: the frames the raw-video loader samples at `--feature_framerate`, resized and
    center-cropped exactly as it does (so reading them back gives its clips), with their positions and fps."""
    from dataloaders.video import resize_center_crop  # torch: imported only where a frame store is written

    sampled = read_sampled_frames(path, options.feature_framerate)
    clip = resize_center_crop(sampled.frames, options.image_size).permute(0, 2, 3, 1).numpy()
    images = [encode_image(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), options) for frame in clip]
    payload = encode_image_clip_record(video_id, images, options.image_size, options.image_size,
                                       sampled.positions.tolist(), options.frame_format.encode(), fps=sampled.fps)
    return payload, len(images)


def encode_image(frame_bgr: np.ndarray, options: EncodeOptions) -> bytes:
    if options.frame_format == "png":
        ok, encoded = cv2.imencode(".png", frame_bgr)
    else:
        ok, encoded = cv2.imencode(".jpg", frame_bgr, [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality])
    if not ok:
        raise VideoDecodeError(f"{options.frame_format.upper()} encoding failed")
    return encoded.tobytes()
