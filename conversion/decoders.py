"""Which frames a stored clip holds (one rule, `clip_positions`), and the decoders that read them.

A frame's position is its number in presentation order, counted from the first frame, as a decoder reading the
video sequentially from its start outputs them. The decoders differ in where the bytes come from and how much of
the video they decode to reach those positions:

* `PyAVVideo`: a file or bytes in memory (a webdataset member), through PyAV. It decodes only the frames the
  wanted ones depend on (docs/data.md §1.1, Decoding): one demux lists every packet's timestamp and keyframe flag, position p
  is the p-th smallest timestamp, and each wanted frame is reached by seeking to the keyframe at or before it and
  decoding forward, skipping non-reference frames that are not wanted. The same frames as a sequential decode, checked
  as it goes; a source whose timestamps or packets make that unsafe is decoded sequentially instead and says so
  (`sequential_reason`).
* `OpenCVVideo`: a file, through OpenCV's FFmpeg backend, always sequentially from the first frame (the
  original's extractor; `--decoder opencv`).
* `FrameFolder`: the original's pre-extracted frame folders, in sorted file-name order.

All give BGR uint8 frames, turned upright as the container's rotation says (as OpenCV does). `read_clips` applies
the rule to every clip of one source, opening it once for all of them (a second pass only when the container
over-reported its frame count).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from dataloaders.files import printable
from dataloaders.video_decoding import VideoDecodeError, open_capture

FRAME_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
DECODERS = ("pyav", "opencv")  # the first is the default
WINDOW_EPSILON = 1e-6  # seconds * fps products within this of an integer count as that integer


class BadWindow(ValueError):
    """A clip window that holds no frame of its source (starts past the end, empty, or ends before it starts)."""


# ----------------------------------------------------------------------------------------------- the rule


def sample_positions(n_available: int, n_wanted: int) -> list[int]:
    """The middle of each of `n_wanted` equal segments; every position when there are not more than that."""
    if n_wanted <= 0 or n_available <= n_wanted:
        return list(range(n_available))
    return [int((i + 0.5) * n_available / n_wanted) for i in range(n_wanted)]


def window_frames(window: tuple[float, float], fps: float, frame_count: int) -> range:
    """The frames f of a source with `frame_count` frames whose time f / fps lies in [start, end)."""
    start, end = window
    if end < start:
        raise BadWindow(f"the window ends before it starts ({start:g} s to {end:g} s)")
    first = math.ceil(start * fps - WINDOW_EPSILON)
    if first >= frame_count:
        raise BadWindow(f"the window starts at {start:g} s, past the end of the video ({frame_count} frames at "
                        f"{fps:g} fps: {frame_count / fps:.3f} s)")
    stop = min(math.ceil(end * fps - WINDOW_EPSILON), frame_count)
    if stop <= first:
        raise BadWindow(f"the window {start:g} s to {end:g} s holds no frame at {fps:g} fps")
    return range(first, stop)


def clip_positions(frame_count: int, fps: float, num_frames: int, window: tuple[float, float] | None) -> list[int]:
    """Frame numbers a clip stores: `num_frames` sampled uniformly (`sample_positions`) over the whole source, or
    over the frames inside `window` (seconds) as absolute frame numbers of the source."""
    frames = range(frame_count) if window is None else window_frames(window, fps, frame_count)
    return [frames[i] for i in sample_positions(len(frames), num_frames)]


def scaled_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side scaled down to `short_side` (never up)."""
    height, width = size
    scale = short_side / min(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


# ----------------------------------------------------------------------------------------------- decoders


class VideoSource(Protocol):
    """A source of frames. `frame_count` is what the container reports (counted by decoding when it reports
    nothing); `read` decodes sequentially and returns the frames at `positions` (sorted) and how many frames it
    decoded before stopping (all of them, or the position past the last one asked for)."""

    fps: float

    def frame_count(self) -> int: ...

    def read(self, positions: Sequence[int]) -> tuple[dict[int, np.ndarray], int]: ...


def _keep_positions(frames: Callable[[], object], positions: Sequence[int],
                    to_bgr: Callable[[object], np.ndarray | None]) -> tuple[dict[int, np.ndarray], int]:
    """Walk the decoded frames in order up to the last position (all of them when `positions` is empty)."""
    wanted = set(positions)
    last = max(positions) if positions else None
    kept: dict[int, np.ndarray] = {}
    position = 0
    for frame in frames():
        if last is not None and position > last:
            break
        if position in wanted:
            image = to_bgr(frame)
            if image is None:
                break
            kept[position] = image
        position += 1
    return kept, position


class SequentialVideo:
    """What the video decoders share: the container's frame count (`_reported`), or a count by decoding."""

    _reported = 0

    def frame_count(self) -> int:
        if self._reported > 0:
            return self._reported
        return self.read([])[1]  # no (or a bogus) count in the container: count by decoding

    def read(self, positions: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
        raise NotImplementedError


class OpenCVVideo(SequentialVideo):
    """A video file through OpenCV's FFmpeg backend; `threads` 0 lets FFmpeg choose."""

    def __init__(self, path: str, threads: int = 0) -> None:
        if not os.path.exists(path):
            raise VideoDecodeError(f"file not found: {printable(path)}")
        self.path = path
        self.threads = threads
        capture = self._open()
        try:
            self.fps = capture.get(cv2.CAP_PROP_FPS)
            self._reported = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        finally:
            capture.release()

    def _open(self) -> cv2.VideoCapture:
        params = [cv2.CAP_PROP_N_THREADS, self.threads] if self.threads else []
        capture = open_capture(self.path, cv2.CAP_FFMPEG, params)
        if not capture.isOpened():
            capture.release()
            raise VideoDecodeError(f"cannot open video (corrupt or not a video?): {printable(self.path)}")
        return capture

    def read(self, positions: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
        capture = self._open()

        def grabbed():
            while capture.grab():
                yield capture

        def retrieve(grabbed_capture: cv2.VideoCapture) -> np.ndarray | None:
            ok, frame = grabbed_capture.retrieve()
            return frame if ok else None

        try:
            return _keep_positions(grabbed, positions, retrieve)
        finally:
            capture.release()


class UnsafeSeek(Exception):
    """Why a source cannot be read by seeking with the certainty of a sequential decode."""


KEEP_PACKETS_BYTES = 64 << 20  # a source up to this size keeps its packets from the index for decoding


@dataclass(frozen=True)
class PacketIndex:
    """A video stream's packets in decode order: presentation timestamps and keyframe flags, and the packets
    themselves when they came to at most KEEP_PACKETS_BYTES (else they are demuxed again where needed)."""

    pts: np.ndarray  # int64
    keyframe: np.ndarray  # bool
    packets: list | None = None

    def __len__(self) -> int:
        return len(self.pts)


def index_packets(container, stream) -> PacketIndex:
    """Demux (no decoding) every packet of `stream`; `UnsafeSeek` when the packets do not map one to one onto the
    frames a sequential decode outputs, in timestamp order."""
    import av

    pts, keyframe, packets, size = [], [], [], 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            if packet.pts is None:
                raise UnsafeSeek("packets without timestamps")
            if packet.is_discard or packet.is_corrupt:
                raise UnsafeSeek("packets marked " + ("discarded (an edit list)" if packet.is_discard else "corrupt"))
            pts.append(packet.pts)
            keyframe.append(packet.is_keyframe)
            size += packet.size
            if packets is not None:
                packets.append(packet)
                if size > KEEP_PACKETS_BYTES:
                    packets = None  # a long source: demuxed again, run by run
    except av.FFmpegError as error:
        raise UnsafeSeek(f"the container is damaged ({error})") from error
    if not pts:
        raise UnsafeSeek("no packets")
    index = PacketIndex(np.asarray(pts, dtype=np.int64), np.asarray(keyframe, dtype=bool), packets)
    if not index.keyframe[0]:
        raise UnsafeSeek("the first packet is not a keyframe")
    if len(np.unique(index.pts)) != len(index):
        raise UnsafeSeek("repeated timestamps")
    if stream.frames and stream.frames != len(index):
        raise UnsafeSeek(f"the container reports {stream.frames} frames but holds {len(index)} packets")
    return index


class CannotSeek(Exception):
    """The demuxer did not land on the keyframe it was sent to (MPEG-TS seeks by byte estimates)."""


def _checked(packets, index: PacketIndex, number: int):
    """(number, packet) of the stream's packets from packet `number` on, each checked against `index`: the packets
    a seek landed on or a demux from the start gives must be those the index lists (else `CannotSeek` at the first
    packet, `UnsafeSeek` after it)."""
    first = number
    for packet in packets:
        if packet.size == 0:
            continue
        if number >= len(index) or packet.pts != index.pts[number] or packet.is_keyframe != index.keyframe[number]:
            if number == first:
                raise CannotSeek()
            raise UnsafeSeek("the container did not give the same packets when read again")
        yield number, packet
        number += 1


@dataclass(frozen=True)
class SeekPlan:
    """What to decode for the wanted frames: runs of packets (decode order, both ends included), each from a
    keyframe to the last wanted packet that needs it, and the position of each wanted timestamp. Every wanted
    packet lies in one run, after the keyframe it needs."""

    runs: list[tuple[int, int]]
    position_of: dict[int, int]  # wanted pts -> position

    @classmethod
    def of(cls, index: PacketIndex, positions: Sequence[int]) -> SeekPlan:
        by_time = np.argsort(index.pts, kind="stable")
        last_key = np.maximum.accumulate(np.where(index.keyframe, np.arange(len(index)), 0))
        position_of, needs = {}, []
        for position in positions:
            packet = int(by_time[position])
            pts = int(index.pts[packet])
            start = int(last_key[packet])
            while index.pts[start] > pts:  # shown before its keyframe (an open GOP): decode from the keyframe before
                if start == 0:
                    raise UnsafeSeek("a frame is shown before the first keyframe")
                start = int(last_key[start - 1])
            position_of[pts] = position
            needs.append((start, packet))
        runs: list[tuple[int, int]] = []
        for start, end in sorted(needs):  # overlapping or adjacent: decoding on is no dearer than starting again
            if runs and start <= runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], max(runs[-1][1], end))
            else:
                runs.append((start, end))
        return cls(runs, position_of)


class _WantedFrames:
    """The wanted frames coming out of one run of a seeking read, converted as they come; `UnsafeSeek` if frames
    leave the decoder out of timestamp order or a wanted one is marked corrupt."""

    def __init__(self, position_of: dict[int, int], to_bgr: Callable[[object], np.ndarray]) -> None:
        self.position_of = position_of
        self.to_bgr = to_bgr
        self.kept: dict[int, np.ndarray] = {}
        self.count = 0  # frames out of the decoder
        self.last_pts: int | None = None  # of this run

    def add(self, frames) -> None:
        for frame in frames:
            self.count += 1
            if frame.pts is not None:
                if self.last_pts is not None and frame.pts <= self.last_pts:
                    raise UnsafeSeek("frames came out of timestamp order")
                self.last_pts = frame.pts
            position = self.position_of.get(frame.pts)
            if position is not None:
                if frame.is_corrupt:
                    raise UnsafeSeek("a wanted frame decoded as corrupt")
                self.kept[position] = self.to_bgr(frame)


class PyAVVideo(SequentialVideo):
    """A video file or in-memory bytes through PyAV; `threads` 0 lets FFmpeg choose. `seek` False decodes every
    frame from the start, as OpenCV does. With `short_side`, frames come out already scaled down to it: swscale's
    colour conversion and area resize in one call (`--resize swscale`; other pixels than OpenCV's conversion and
    INTER_AREA resize, and faster)."""

    def __init__(self, source: str | bytes, threads: int = 0, name: str | None = None,
                 short_side: int | None = None, seek: bool = True) -> None:
        self.source = source
        self.short_side = short_side
        self.seek = seek
        self.name = printable(name or (source if isinstance(source, str) else "video bytes"))
        self.threads = threads
        self.sequential_reason: str | None = None  # why the last read decoded from the start instead of seeking
        self.frames_decoded = 0  # frames the decoder output in the last read
        self._reformatter = None  # PyAV's, made on first use
        self._unread = None  # the container opened here, until the first read takes it
        if isinstance(source, str) and not os.path.exists(source):
            raise VideoDecodeError(f"file not found: {printable(source)}")
        container = self._open()
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self._reported = stream.frames or self._estimated_count(container, stream)
        self._unread = container  # opening probes the stream: the first read takes this one as it is

    def _open(self):
        import av

        if self._unread is not None:
            container, self._unread = self._unread, None
            return container
        try:
            container = av.open(io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source)
        except (av.FFmpegError, ValueError, OSError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise VideoDecodeError(f"cannot open video (corrupt or not a video?): {self.name}: {reason}") from error
        if not container.streams.video:
            container.close()
            raise VideoDecodeError(f"no video stream in {self.name}")
        return container

    def _estimated_count(self, container, stream) -> int:
        """OpenCV's estimate for containers without a frame count: duration x fps, rounded."""
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / 1e6
        else:
            return 0
        return math.floor(seconds * self.fps + 0.5)

    def _decoder(self, container):
        stream = container.streams.video[0]
        if self.threads:
            stream.codec_context.thread_count = self.threads
        stream.thread_type = "AUTO"
        return stream

    def read(self, positions: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
        self.sequential_reason = None
        if not self.seek or not positions:
            return self.read_sequentially(positions)
        try:
            return self._read_by_seeking(sorted(positions))
        except UnsafeSeek as reason:
            self.sequential_reason = str(reason)
            return self.read_sequentially(positions)

    def read_sequentially(self, positions: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
        """Decode from the first frame, keeping the frames at `positions`."""
        import av

        with self._open() as container:
            stream = self._decoder(container)

            def decoded():
                try:
                    yield from container.decode(stream)
                except av.FFmpegError:  # a damaged tail: keep what decoded before it, as OpenCV does
                    return

            kept, self.frames_decoded = _keep_positions(decoded, positions, self._to_bgr)
            return kept, self.frames_decoded

    def _read_by_seeking(self, positions: list[int]) -> tuple[dict[int, np.ndarray], int]:
        """The frames at `positions` (sorted): one demux indexes the packets, then each run of the plan is decoded
        from its keyframe, reached by seeking (or, where the demuxer cannot seek exactly, by reading on from the
        start); `UnsafeSeek` when the packets or a decoded frame contradict the index."""
        container = self._open()
        try:
            index = index_packets(container, container.streams.video[0])
            inside = [p for p in positions if p < len(index)]
            plan = SeekPlan.of(index, inside)
            try:
                kept = self._decode_runs(container, index, plan, by_seeking=True)
            except CannotSeek:
                container.close()
                container = self._open()
                kept = self._decode_runs(container, index, plan, by_seeking=False)
        finally:
            container.close()
        if len(kept) != len(inside):
            raise UnsafeSeek("a wanted frame did not come out of its decode")
        return kept, (positions[-1] + 1 if len(inside) == len(positions) else len(index))

    def _decode_runs(self, container, index: PacketIndex, plan: SeekPlan, by_seeking: bool) -> dict[int, np.ndarray]:
        """Decode each run of packets, skipping the non-reference frames that are not wanted, draining the decoder
        at its end; the wanted frames are checked and converted as they come out."""
        import av

        stream = self._decoder(container)
        codec = stream.codec_context
        out = _WantedFrames(plan.position_of, self._to_bgr)
        from_start = None if by_seeking else _checked(container.demux(stream), index, 0)
        try:
            for start, end in plan.runs:
                if index.packets is not None:  # kept from the index
                    packets = enumerate(index.packets[start:end + 1], start)
                elif by_seeking:
                    container.seek(int(index.pts[start]), stream=stream, backward=True, any_frame=False)
                    packets = _checked(container.demux(stream), index, start)
                else:
                    packets = from_start
                for number, packet in packets:
                    if number < start:
                        continue
                    codec.skip_frame = "DEFAULT" if packet.pts in plan.position_of else "NONREF"
                    out.add(codec.decode(packet))
                    if number == end:
                        break
                out.add(codec.decode(None))
                codec.flush_buffers()
                out.last_pts = None
        except av.FFmpegError as error:
            raise UnsafeSeek(f"decoding failed ({error})") from error
        self.frames_decoded = out.count
        return out.kept

    def _to_bgr(self, frame) -> np.ndarray:
        if self._reformatter is None:  # one for all frames: it keeps its swscale context (half the cost per frame)
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()
        if self.short_side is None:
            image = self._reformatter.reformat(frame, format="bgr24").to_ndarray()
        else:  # scaled before it is turned: the same size either way round
            height, width = scaled_size((frame.height, frame.width), self.short_side)
            image = self._reformatter.reformat(frame, format="bgr24", width=width, height=height,
                                               interpolation="AREA").to_ndarray()
        return upright(image, frame.rotation)


_ROTATIONS = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}


def upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """A frame turned as its container's display matrix says (`rotation`: degrees counter-clockwise, as PyAV
    gives it), which OpenCV's FFmpeg backend does by default."""
    turn = _ROTATIONS.get(round(rotation) % 360)
    return image if turn is None else cv2.rotate(image, turn)


class FrameFolder:
    """The original's input: a folder of frame images, in sorted file-name order (no frame rate)."""

    fps = 0.0

    def __init__(self, folder: str) -> None:
        if not os.path.isdir(folder):
            raise VideoDecodeError(f"frame folder not found: {folder}")
        self.folder = folder
        self.names = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in FRAME_EXTENSIONS)
        if not self.names:
            raise VideoDecodeError(f"no image files in {folder}")

    def frame_count(self) -> int:
        return len(self.names)

    def read(self, positions: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
        frames = {}
        for position in positions:
            frame = cv2.imread(os.path.join(self.folder, self.names[position]), cv2.IMREAD_COLOR)
            if frame is None:
                raise VideoDecodeError(f"unreadable image {self.names[position]} in {self.folder}")
            frames[position] = frame
        return frames, len(self.names)


def open_source(location: str | bytes, kind: str, decoder: str, threads: int = 0, name: str | None = None,
                short_side: int | None = None) -> VideoSource:
    """A `VideoSource` for a video file or bytes (`kind` "video") or a frame folder (`kind` "frames"); PyAV scales
    frames to `short_side` itself when it is given."""
    if kind == "frames":
        return FrameFolder(location)
    if decoder == "pyav" or isinstance(location, bytes):
        return PyAVVideo(location, threads, name, short_side)
    if decoder != "opencv":
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    return OpenCVVideo(location, threads)


# ----------------------------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class DecodedClip:
    frames: list[np.ndarray]  # BGR uint8, in position order
    positions: list[int]  # frame numbers in the source
    source_frames: int  # frames of the source (or of the window) the positions were sampled from


def read_clips(source: VideoSource, num_frames: int, windows: Sequence[tuple[float, float] | None]
               ) -> list[DecodedClip | BadWindow | VideoDecodeError]:
    """Each window's clip (None: the whole source), decoding the source once for all of them; a window with no
    frame is a `BadWindow`, a clip of which no frame decoded a `VideoDecodeError` (both returned, not raised)."""
    count = source.frame_count()
    if count <= 0:
        raise VideoDecodeError("no frame could be decoded")
    wanted = _positions_of(windows, count, source.fps, num_frames)
    frames, decoded = source.read(_all_positions(wanted))
    if any(isinstance(positions, list) and positions and positions[-1] >= decoded for positions in wanted):
        # the container over-reported its frame count: sample again over the frames that exist
        if decoded == 0:
            raise VideoDecodeError("no frame could be decoded")
        wanted = _positions_of(windows, decoded, source.fps, num_frames)
        frames, _ = source.read(_all_positions(wanted))
        count = decoded
    clips: list[DecodedClip | BadWindow | VideoDecodeError] = []
    for window, positions in zip(windows, wanted):
        if not isinstance(positions, list):
            clips.append(positions)
            continue
        kept = [p for p in positions if p in frames]
        if not kept:
            clips.append(VideoDecodeError("no frame could be decoded"))
            continue
        available = count if window is None else len(window_frames(window, source.fps, count))
        clips.append(DecodedClip([frames[p] for p in kept], kept, available))
    return clips


def _all_positions(wanted: list[list[int] | BadWindow]) -> list[int]:
    """Every frame some clip needs, sorted: the one pass over the source reads them all."""
    return sorted({p for positions in wanted if isinstance(positions, list) for p in positions})


def _positions_of(windows: Sequence[tuple[float, float] | None], count: int, fps: float, num_frames: int
                  ) -> list[list[int] | BadWindow]:
    wanted: list[list[int] | BadWindow] = []
    for window in windows:
        try:
            wanted.append(clip_positions(count, fps, num_frames, window))
        except BadWindow as error:
            wanted.append(error)
    return wanted
