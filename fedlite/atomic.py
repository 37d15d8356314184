"""Writing outputs so that a crash never leaves half of one and never destroys the previous one:
everything is written into a temporary sibling and renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from fedlite.errors import InputError


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """``mode``: the file's permissions (e.g. 0o600 for what must stay with its owner); default:
    readable as the umask allows."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp's 0600 would hide shared datasets from colleagues
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_free(path: str | Path, force: bool, what: str, option: str = "--out") -> None:
    """Refuse to write over an existing, non-empty output unless asked: checked before any work, so
    a refused run costs nothing and an existing one loses nothing."""
    path = Path(path)
    if path.exists() and not force and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{what} already exists", path=path, hint=f"choose another {option} or pass --force")


def owner_only_dir(path: str | Path) -> Path:
    """A directory for patient-derived files (caches, reports): created if needed, and 0700 even if
    it existed or the umask is lax."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def staged_dir(final: str | Path, force: bool = True, what: str = "output") -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it replaces ``final``.

    An existing non-empty ``final`` is refused unless ``force``; when replaced, the old directory is
    moved aside first and deleted only after the new one is in place.
    """
    final = Path(final)
    if final.exists() and not force and (not final.is_dir() or any(final.iterdir())):
        raise InputError(f"{what} already exists", path=final, hint="choose another path or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ready = tmp.with_name(tmp.name[: -len(".tmp")] + ".ready")
    os.replace(tmp, ready)  # complete: from here on a crash is recoverable (recover_staged)
    if not final.exists():
        os.replace(ready, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, old / final.name)
    try:
        os.replace(ready, final)
    except BaseException:
        os.replace(old / final.name, final)
        shutil.rmtree(ready, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def published_once(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final`` that becomes ``final`` unless another writer
    published it first: for content-addressed directories, where every writer's copy is the same
    and concurrent writers (sites sharing one cache) must not fail each other. An existing
    ``final`` is left to the caller to check."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)  # refuses a non-empty final: the first writer's copy stays
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_staged(final: str | Path) -> bool:
    """Finish a replacement of ``final`` that a crash interrupted between its two renames: the new
    complete directory is put in place, else the old one is restored. True if one was."""
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return False
    ready = sorted(final.parent.glob(f".{final.name}.*.ready"), key=lambda p: p.stat().st_mtime)
    olds = [p / final.name for p in final.parent.glob(f".{final.name}.*.old") if (p / final.name).is_dir()]
    if ready:
        os.replace(ready[-1], final)
    elif olds:
        os.replace(olds[0], final)
    else:
        return False
    for leftover in [*ready[:-1], *(p.parent for p in olds)]:
        shutil.rmtree(leftover, ignore_errors=True)
    return True


def json_text(value, indent: int | None = None) -> str:
    """Strict JSON of a record: an undefined metric (NaN, e.g. the AUC of a set with one class) or an
    infinity is written as null, never as the NaN/Infinity tokens other JSON readers refuse."""
    import json
    import math

    def finite(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {k: finite(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    return json.dumps(finite(value), indent=indent, allow_nan=False)
