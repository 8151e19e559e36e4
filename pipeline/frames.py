"""Frame reading for the later stages: sequential PyAV decoding of LeRobot v3.0 videos.

LeRobot v3.0 concatenates many episodes into one mp4 per camera; episode e's frame i sits at
`from_timestamp[e] + i / fps` inside that file. `PyAVFrameSource` opens each file once, seeks only when
it must (the first episode of a file, or a jump), decodes forward and cuts at the episode's timestamps,
yielding one frame at a time (bounded memory for long episodes). The pixels equal what
`LeRobotDataset(..., video_backend="pyav")[i]` returns (same decoder, same rgb24 conversion), which the
tests check frame by frame; the match rule is lerobot's too: the decoded frame nearest to the query
timestamp, within `tolerance_s`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import av
import numpy as np


class FrameDecodeError(Exception):
    """A video does not hold the frames an episode needs (missing, truncated, corrupt)."""


@dataclasses.dataclass(frozen=True)
class VideoSpan:
    """An episode's frames of one camera: `length` frames from `from_ts` in `path`, at `fps`."""

    path: Path
    from_ts: float
    length: int
    fps: float

    def timestamp(self, i: int) -> float:
        return self.from_ts + i / self.fps


@runtime_checkable
class FrameSource(Protocol):
    """Episodes -> frames. Yields uint8 arrays [H, W, 3] in episode order."""

    def frames(self, span: VideoSpan) -> Iterator[np.ndarray]: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class _OpenFile:
    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    decoder: Iterator[av.VideoFrame] | None = None
    last_ts: float | None = None  # timestamp of the last frame handed out (decoder sits right after it)


def _frame_ts(frame: av.VideoFrame) -> float:
    return float(frame.pts * frame.time_base)


def _open(path: Path, threads: int) -> _OpenFile:
    if not Path(path).exists():
        raise FrameDecodeError(f"video file {path} is missing")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise FrameDecodeError(f"cannot open video {path}: {e}") from None
    if not container.streams.video:
        container.close()
        raise FrameDecodeError(f"{path} has no video stream")
    stream = container.streams.video[0]
    if threads != 1:
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
    return _OpenFile(container, stream)


class PyAVFrameSource:
    """Sequential decoder over LeRobot videos (see module docstring).

    size: optional (height, width) to resize to with swscale (area); None keeps the native size.
    threads: decoder threads per stream (0 = FFmpeg's choice, 1 = no threading).
    """

    def __init__(self, *, tolerance_s: float = 1e-4, size: tuple[int, int] | None = None, threads: int = 1,
                 max_open: int = 4):
        self.tolerance_s, self.size, self.threads, self.max_open = tolerance_s, size, threads, max_open
        self._files: OrderedDict[Path, _OpenFile] = OrderedDict()

    def _get(self, path: Path) -> _OpenFile:
        path = Path(path)
        if path in self._files:
            self._files.move_to_end(path)
            return self._files[path]
        f = _open(path, self.threads)
        self._files[path] = f
        while len(self._files) > self.max_open:
            _, old = self._files.popitem(last=False)
            old.container.close()
        return f

    def _drop(self, path: Path) -> None:
        f = self._files.pop(Path(path), None)
        if f is not None:
            f.container.close()

    def _to_array(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is None:
            return frame.to_ndarray(format="rgb24")
        h, w = self.size
        return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()

    def frames(self, span: VideoSpan) -> Iterator[np.ndarray]:
        tol = self.tolerance_s
        f = self._get(span.path)
        t0 = span.timestamp(0)
        # keep decoding forward when this episode starts right after the last one we cut from this file
        if f.decoder is None or f.last_ts is None or not (f.last_ts + tol < t0 <= f.last_ts + 1.0):
            f.container.seek(max(int(t0 / f.stream.time_base), 0), stream=f.stream, backward=True, any_frame=False)
            f.decoder = f.container.decode(f.stream)
            f.last_ts = None
        i = 0
        try:
            while i < span.length:
                try:
                    frame = next(f.decoder)
                except StopIteration:
                    raise FrameDecodeError(
                        f"{span.path}: video ends before frame {i} of the episode (t={span.timestamp(i):.4f}s, "
                        f"episode needs {span.length} frames up to t={span.timestamp(span.length - 1):.4f}s); "
                        "the file is truncated or its metadata is wrong"
                    ) from None
                ts = _frame_ts(frame)
                target = span.timestamp(i)
                if ts < target - tol:
                    continue
                if ts > target + tol:
                    raise FrameDecodeError(
                        f"{span.path}: no frame at t={target:.4f}s (episode frame {i}); the next decoded frame "
                        f"is at t={ts:.4f}s (dropped frames or timestamps off by more than {tol}s)"
                    )
                f.last_ts = ts
                yield self._to_array(frame)
                i += 1
        except av.error.FFmpegError as e:
            self._drop(span.path)
            raise FrameDecodeError(f"{span.path}: decoding failed near t={span.timestamp(i):.4f}s: {e}") from None
        except BaseException:
            self._drop(span.path)  # a half-consumed decoder must not be reused
            raise

    def read_episode(self, span: VideoSpan) -> np.ndarray:
        """All frames of a span as [T, H, W, 3] (for tests and small episodes; `frames` streams)."""
        return np.stack(list(self.frames(span)))

    def close(self) -> None:
        for f in self._files.values():
            f.container.close()
        self._files.clear()

    def __enter__(self) -> PyAVFrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoProber:
    """Cheap validation: can the first and the last frame of an episode be decoded from its video?

    Seeks to each end and decodes forward to it, so a truncated file, a corrupt stream or metadata that
    points past the end of the video is caught without decoding every frame.
    """

    def __init__(self, *, tolerance_s: float = 1e-4, max_open: int = 8):
        self.tolerance_s, self.max_open = tolerance_s, max_open
        self._files: OrderedDict[Path, _OpenFile | FrameDecodeError] = OrderedDict()

    def _get(self, path: Path) -> _OpenFile:
        path = Path(path)
        if path not in self._files:
            try:
                self._files[path] = _open(path, threads=1)
            except FrameDecodeError as e:
                self._files[path] = e
            while len(self._files) > self.max_open:
                _, old = self._files.popitem(last=False)
                if isinstance(old, _OpenFile):
                    old.container.close()
        entry = self._files[path]
        if isinstance(entry, FrameDecodeError):
            raise entry
        return entry

    def _decode_at(self, f: _OpenFile, t: float) -> float | None:
        f.container.seek(max(int(t / f.stream.time_base), 0), stream=f.stream, backward=True, any_frame=False)
        for frame in f.container.decode(f.stream):
            ts = _frame_ts(frame)
            if ts >= t - self.tolerance_s:
                return ts
        return None

    def check(self, span: VideoSpan) -> str | None:
        """None when the span's first and last frames decode at their timestamps, else the reason."""
        try:
            f = self._get(span.path)
        except FrameDecodeError as e:
            return str(e)
        for i in (0, span.length - 1):
            t = span.timestamp(i)
            try:
                ts = self._decode_at(f, t)
            except av.error.FFmpegError as e:
                return f"{span.path}: cannot decode frame {i} at t={t:.4f}s: {e}"
            if ts is None:
                end = float(f.stream.duration * f.stream.time_base) if f.stream.duration else float("nan")
                return (f"{span.path}: video ends before frame {i} at t={t:.4f}s (stream duration {end:.3f}s); "
                        "the file is truncated or the episode metadata points past its end")
            if abs(ts - t) > self.tolerance_s:
                return f"{span.path}: no frame at t={t:.4f}s (frame {i}); nearest decodable frame at t={ts:.4f}s"
        return None

    def close(self) -> None:
        for f in self._files.values():
            if isinstance(f, _OpenFile):
                f.container.close()
        self._files.clear()
