"""Video files: frames in [-1, 1] (N, 3, k, H, W) chunks to .mp4 (H.264), .webm (VP9), .gif or a
folder of PNGs, written as they come; and frames read one at a time from a video file or a PNG
folder. Encoding and decoding video files uses PyAV (`pip install 'vaeinfer[video]'`), imported
only when a video file is used; a PNG folder needs Pillow only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from vaeinfer.errors import InputError

# suffix -> (codec, pixel format, options)
CODECS = {".mp4": ("libx264", "yuv420p", {"crf": "18"}), ".webm": ("libvpx-vp9", "yuv420p", {"crf": "30", "b": "0"}),
          ".gif": ("gif", "rgb8", {})}
READ_SUFFIXES = (".mp4", ".webm", ".gif", ".mkv", ".mov", ".avi")
DEFAULT_FPS = 16  # Wan's frame rate


def _av():
    try:
        import av
    except ImportError as e:
        raise InputError(f"video files need PyAV ({e}): pip install 'vaeinfer[video]' "
                         "(or write a folder of PNGs: -o FOLDER/)") from None
    return av


def is_video_out(path: str) -> bool:
    """A video output: a video suffix, or a folder of PNGs (a name ending in '/' or without suffix)."""
    return Path(path).suffix.lower() in CODECS or path.endswith(("/", os.sep)) or not Path(path).suffix


def _uint8(chunk: np.ndarray) -> np.ndarray:
    """(N, 3, k, H, W) in [-1, 1] -> uint8 (N, k, H, W, 3)."""
    u8 = (np.clip(chunk, -1.0, 1.0) * np.float32(127.5) + np.float32(128.0)).astype(np.uint8)
    return u8.transpose(0, 2, 3, 4, 1)


class VideoWriter:
    """Write clips chunk by chunk: `write((N, 3, k, H, W))`, then `close()`. One file per clip:
    `path` for one clip, `stem-i.suffix` for N clips (a PNG folder: `clip-i/` subfolders)."""

    def __init__(self, path: str | Path, fps: float = DEFAULT_FPS):
        self.path, self.fps = Path(path), fps
        self.folder = is_video_out(str(path)) and self.path.suffix.lower() not in CODECS
        self._outs, self._frames, self.paths = None, 0, []
        if not self.folder:
            _av()

    def _open(self, n: int, height: int, width: int) -> None:
        names = [self.path] if n == 1 else [self.path.with_name(f"{self.path.stem}-{i}{self.path.suffix}") for i in range(n)]
        self.paths, self._outs = names, []
        if self.folder:
            for p in names:
                p.mkdir(parents=True, exist_ok=True)
            return
        av = _av()
        codec, pix, options = CODECS[self.path.suffix.lower()]
        for p in names:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.stem}.part{p.suffix}")
            container = av.open(str(tmp), "w")
            stream = container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1000), options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, pix
            self._outs.append((container, stream, tmp, p))

    def write(self, chunk: np.ndarray) -> None:
        if self._outs is None:
            self._open(chunk.shape[0], chunk.shape[3], chunk.shape[4])
        frames = _uint8(chunk)
        for i in range(frames.shape[0]):
            for j in range(frames.shape[1]):
                if self.folder:
                    from PIL import Image

                    Image.fromarray(frames[i, j]).save(self.paths[i] / f"frame-{self._frames + j:05d}.png")
                    continue
                av = _av()
                container, stream, _, _ = self._outs[i]
                for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i, j], format="rgb24")):
                    container.mux(packet)
        self._frames += frames.shape[1]

    def close(self) -> None:
        for container, stream, tmp, final in self._outs or ():
            for packet in stream.encode():
                container.mux(packet)
            container.close()
            os.replace(tmp, final)


def frame_count(path: str | Path) -> int | None:
    """The frames a video file or PNG folder holds, where its header says (None: unknown)."""
    path = Path(path)
    if path.is_dir():
        return len(_pngs(path))
    with _av().open(str(path)) as container:
        return int(container.streams.video[0].frames) or None


def _pngs(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise InputError(f"{folder}: expected a folder of image files (frames), found none")
    return files


def read_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Frames (1, 3, H, W) float32 in [-1, 1], one at a time, from a video file or a folder of images."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        for p in _pngs(path):
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"))
            yield (a.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(127.5) - np.float32(1.0))
        return
    av = _av()
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise InputError(f"{path}: cannot read it as a video: {e}") from None
    with container:
        for frame in container.decode(container.streams.video[0]):
            a = frame.to_ndarray(format="rgb24")
            yield a.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
