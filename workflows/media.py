"""Writing rendered images and videos: mp4 when an encoder is installed, PNG frames otherwise; atomic."""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8_frames(x) -> np.ndarray:
    """Pipeline output (tensor or array, [F, H, W, C] or [F, C, H, W], floats in [0, 1]) as uint8 [F, H, W, C].
    uint8 input is already in pixel units and keeps its values (converting it again would saturate it)."""
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3, 4):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def _mp4_writer_available() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401
        import imageio.v2  # noqa: F401
        return True
    except Exception:
        return False


TEMP_MARK = ".attnproc-tmp-"


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp"):
    """A temporary path beside ``path`` to write to: it replaces ``path`` when the block succeeds and is removed
    when it fails, so readers never see a half-written file. The file is created with the user's umask (like any
    other file they write). Its name, ``.<name>.attnproc-tmp-<pid>-<random><suffix>``, lets
    :func:`remove_stale_temp_files` find what a killed writer left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 0o666 minus the umask
    try:
        yield str(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files under ``folder`` whose writer (a process on this machine) is gone: a render
    killed mid-write leaves one. Returns what was removed."""
    removed = []
    for tmp in Path(folder).rglob(f".*{TEMP_MARK}*"):
        pid = tmp.name.split(TEMP_MARK, 1)[1].split("-", 1)[0]
        if tmp.is_file() and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def save_image(frame: np.ndarray, path: Path) -> Path:
    with atomic_path(path, ".tmp.png") as tmp:
        Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame).save(tmp, format="PNG")
    return Path(path)


def save_video(frames, path: Path, fps: int = 8) -> Path:
    """Write ``frames`` to ``path`` (.mp4) if an encoder is installed, else to a folder of PNGs next to it.

    Returns the path written (the .mp4 file, or the folder ``<stem>_frames``).
    """
    frames = to_uint8_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _mp4_writer_available():
        import imageio.v2 as imageio

        h, w = frames.shape[1:3]
        if h % 2 or w % 2:  # yuv420p needs even sizes
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        with atomic_path(path, ".tmp.mp4") as tmp:
            imageio.mimwrite(tmp, list(frames), format="FFMPEG", fps=fps, macro_block_size=1, codec="libx264",
                             pixelformat="yuv420p")
        return path
    folder = path.with_name(path.stem + "_frames")
    for i, frame in enumerate(frames):
        save_image(frame, folder / f"{i:04d}.png")
    return folder
