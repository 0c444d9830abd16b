"""Writing and reading videos and frame folders (imageio + imageio-ffmpeg).

* ``.mp4`` — H.264 (libx264), ``yuv420p`` pixel format so that every common player opens it, constant quality
  ``crf`` (default 18, visually near-lossless but *not* lossless). ``yuv420p`` needs even width and height:
  odd sizes are padded by one row/column that repeats the last row/column (never rescaled), so a read-back
  frame of an odd-sized video is one pixel larger in that direction.
* ``.gif`` — palette-quantised (256 colours per frame), loops forever. Lossy in colour; for previews.
* a folder of PNG files (:func:`write_frames` / :func:`read_frames`) — lossless, one file per frame,
  ``frame_00000.png`` …; this is what the CLI's ``--frames-dir`` writes.

Frames are ``(T, H, W, 3)`` numpy arrays or torch tensors, ``uint8`` or float in ``[0, 1]`` (floats are
rounded to uint8), validated with :func:`sagevideo.metrics.validate_video`. Unsupported extensions raise
:class:`UnsupportedFormatError`; a destination that cannot be created or written raises :class:`VideoWriteError`.

Never compute fidelity metrics on frames that went through ``.mp4`` or ``.gif``: compression error dwarfs the
attention error being measured. Use the raw frames (or a PNG folder).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sagevideo.metrics import to_uint8_numpy

__all__ = [
    "VIDEO_EXTENSIONS",
    "EncoderUnavailableError",
    "UnsupportedFormatError",
    "VideoWriteError",
    "mp4_unavailable_reason",
    "read_frames",
    "read_video",
    "write_frames",
    "write_video",
]

VIDEO_EXTENSIONS = (".mp4", ".gif")
_FRAME_RE = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.png$", re.IGNORECASE)


class UnsupportedFormatError(ValueError):
    """The file extension is not one this module writes or reads."""


class VideoWriteError(OSError):
    """The destination folder could not be created or is not writable."""


class EncoderUnavailableError(RuntimeError):
    """Writing ``.mp4`` needs ffmpeg through imageio-ffmpeg, and it cannot be loaded here."""


def mp4_unavailable_reason() -> str | None:
    """``None`` when ``.mp4`` can be written here, else why not (with the fix). ``.gif`` and PNG folders need
    only Pillow."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # ImportError, or RuntimeError when no ffmpeg binary is found
        return (f"writing .mp4 needs ffmpeg through the imageio-ffmpeg package, which is not usable here "
                f"({type(exc).__name__}: {exc}); `pip install imageio-ffmpeg`, or write .gif or a PNG folder")
    return None


def _extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        raise UnsupportedFormatError(
            f"unsupported video extension {path.suffix or '(none)'!r} for {path}; use one of "
            f"{', '.join(VIDEO_EXTENSIONS)} (or write_frames() for a PNG folder)"
        )
    return ext


def _ensure_writable_dir(folder: Path) -> None:
    """Create ``folder`` (with parents) and check that files can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise VideoWriteError(f"cannot create output folder {folder}: a path component is a file ({exc})") from exc
    except OSError as exc:
        raise VideoWriteError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not folder.is_dir():
        raise VideoWriteError(f"output path {folder} exists and is not a folder")
    # os.access is unreliable (root, ACLs, read-only mounts): try to create a file instead.
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sagevideo-write-test-"):
            pass
    except OSError as exc:
        raise VideoWriteError(f"output folder {folder} is not writable: {exc.strerror or exc}") from exc


def _pad_even(frames: np.ndarray) -> np.ndarray:
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def write_video(path: str | os.PathLike, frames: Any, fps: float = 16.0, *, crf: int = 18) -> Path:
    """Write ``frames`` to ``path`` (``.mp4``: H.264 yuv420p; ``.gif``: looping GIF). Returns the path.

    Args:
        path: destination file; its folder is created if needed.
        frames: ``(T, H, W, 3)`` uint8 or [0, 1]-float numpy array / torch tensor.
        fps: frames per second (> 0).
        crf: x264 constant rate factor for ``.mp4`` (0 = lossless in luma but still 4:2:0 chroma, 18 default,
            51 worst). Ignored for ``.gif``.

    Raises:
        EncoderUnavailableError: ``.mp4`` without a usable imageio-ffmpeg (:func:`mp4_unavailable_reason`).
    """
    path = Path(path)
    ext = _extension(path)
    if not (isinstance(fps, (int, float)) and fps > 0 and np.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not (isinstance(crf, int) and 0 <= crf <= 51):
        raise ValueError(f"crf must be an int in 0..51, got {crf!r}")
    data = to_uint8_numpy(frames, "frames")
    _ensure_writable_dir(path.parent)
    if ext == ".mp4":
        reason = mp4_unavailable_reason()
        if reason is not None:
            raise EncoderUnavailableError(reason)

    import imageio.v2 as iio2

    if ext == ".mp4":
        data = _pad_even(data)
        writer = iio2.get_writer(
            str(path), format="FFMPEG", mode="I", fps=float(fps), codec="libx264", pixelformat="yuv420p",
            quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(crf), "-preset", "medium", "-movflags", "+faststart"],
        )
        try:
            for frame in data:
                writer.append_data(frame)
        finally:
            writer.close()
    else:  # .gif via Pillow
        import imageio.v3 as iio3

        duration_ms = 1000.0 / float(fps)
        iio3.imwrite(str(path), list(data), extension=".gif", duration=duration_ms, loop=0)
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Read an ``.mp4`` or ``.gif`` written by :func:`write_video` into a ``(T, H, W, 3)`` uint8 array."""
    path = Path(path)
    ext = _extension(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video file: {path}")
    if ext == ".mp4":
        import imageio.v2 as iio2

        reader = iio2.get_reader(str(path), format="FFMPEG")
        try:
            frames = [np.asarray(f)[..., :3] for f in reader]
        finally:
            reader.close()
    else:
        import imageio.v3 as iio3

        # GIF frames come back as RGB or RGBA depending on the palette; keep RGB.
        frames = [np.asarray(f)[..., :3] for f in iio3.imiter(str(path), extension=".gif")]
    if not frames:
        raise ValueError(f"{path} contains no frames")
    return np.stack(frames).astype(np.uint8, copy=False)


def write_frames(folder: str | os.PathLike, frames: Any, *, prefix: str = "frame_") -> list[Path]:
    """Write each frame as a lossless PNG ``<folder>/<prefix><index:05d>.png``; returns the written paths.

    Existing files with the same names are overwritten; other files in the folder are left alone.
    """
    folder = Path(folder)
    if os.sep in prefix or (os.altsep and os.altsep in prefix):
        raise ValueError(f"prefix must not contain a path separator, got {prefix!r}")
    data = to_uint8_numpy(frames, "frames")
    _ensure_writable_dir(folder)

    import imageio.v3 as iio3

    width = max(5, len(str(len(data) - 1)))
    paths = []
    for i, frame in enumerate(data):
        p = folder / f"{prefix}{i:0{width}d}.png"
        iio3.imwrite(str(p), frame, extension=".png")
        paths.append(p)
    return paths


def read_frames(folder: str | os.PathLike, *, prefix: str = "frame_") -> np.ndarray:
    """Read the ``<prefix><index>.png`` files of ``folder`` (in index order) into a ``(T, H, W, 3)`` uint8 array."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such frame folder: {folder}")
    indexed = []
    for p in folder.iterdir():
        m = _FRAME_RE.match(p.name)
        if m and m.group("prefix") == prefix:
            indexed.append((int(m.group("index")), p))
    if not indexed:
        raise FileNotFoundError(f"no {prefix}<index>.png files in {folder}")
    import imageio.v3 as iio3

    frames = []
    for _, p in sorted(indexed):
        img = np.asarray(iio3.imread(str(p), extension=".png"))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        frames.append(img[..., :3])
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"frames in {folder} have different sizes: {sorted(shapes)}")
    return np.stack(frames).astype(np.uint8, copy=False)
