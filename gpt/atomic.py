"""The one atomic-write helper: a crash (or power loss) never leaves a half-written output where a reader expects a
whole one, and outputs get ordinary permissions (0644 files, 0755 directories, under the process umask).

Files are written to a temp name in the same directory, fsynced, `os.replace`d into place, and the parent directory
is fsynced so the rename itself is durable. Directories are filled next to their final location (every file fsynced),
swapped in with two renames (the old copy is removed only after the new one is in place), and both parents fsynced.
Every module that writes an artifact goes through here; none calls mkstemp/mkdtemp/os.replace itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"  # every temp file/dir this module makes is named `.<final name>.<random>.tmp`


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: makes renames/creations inside it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (deepest first), then `root` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to produce the file, then fsync it and rename it to `path` (parent fsynced).

    For writers that want a file name (safetensors' save_file, matplotlib's savefig). On any error the temp file
    is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an output is an ordinary file
        _fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write_atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """JSON with sorted keys and a trailing newline, so equal content gives equal bytes (stable DVC hashes)."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def make_temp_dir(final: str | Path) -> Path:
    """An empty directory next to `final` (same filesystem, so the final rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TEMP_SUFFIX, dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output is an ordinary directory
    return tmp


def _set_ordinary_modes(root: Path) -> None:
    """0666/0777 minus the umask on everything under `root`: some writers create 0600 files (safetensors'
    save_file, hence transformers' save_pretrained), and an output is an ordinary file."""
    mask = _umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Make the finished `tmp` directory durable and move it to `final`, replacing what was there."""
    tmp, final = Path(tmp), Path(final)
    _set_ordinary_modes(tmp)
    fsync_tree(tmp)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}{TEMP_SUFFIX}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temp dir to fill; on success it replaces `final`, on error it is deleted and `final` is untouched."""
    final = Path(final)
    tmp = make_temp_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def remove_stale_temps(parent: str | Path, name: str | None = None) -> list[Path]:
    """Delete temp files/dirs this module left in `parent` after a kill (only those for `name`, if given).

    Call at the start of a writer: a killed run leaves `.<name>.*.tmp` behind, which nothing else would remove."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    pattern = f".{name}.*{TEMP_SUFFIX}" if name else f".*{TEMP_SUFFIX}"
    removed = []
    for path in parent.glob(pattern):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
