"""Directories the coordinator ships to its sites once (a teacher checkpoint, a bundle to verify),
checked by hash and kept in the site's cache.

A shipment is the files' bytes as uint8 arrays (they travel in a Flower ArrayRecord like any
parameters) and a digest over the names and SHA-256 of every file. A site writes a shipment into
``CACHE/<kind>-<digest>/`` only after its bytes match the digest, and later messages name the digest
alone: the files reach each site once, and a site never uses files the coordinator did not send.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from fedlite.atomic import owner_only_dir, published_once, staged_dir
from fedlite.errors import InputError

MAX_FILES = 64


def _digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}\0{hashes[name]}\n" for name in sorted(hashes)).encode()).hexdigest()


def pack_files(directory: str | Path, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], str]:
    """The files of ``directory`` (or just ``names``) as arrays, and the digest that names them."""
    directory = Path(directory)
    names = names or sorted(p.name for p in directory.iterdir() if p.is_file())
    arrays = {name: np.frombuffer((directory / name).read_bytes(), dtype=np.uint8) for name in names}
    return arrays, _digest({n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in arrays.items()})


def _check_names(names) -> None:
    if len(names) > MAX_FILES:
        raise InputError(f"a shipment of {len(names)} files; at most {MAX_FILES} are accepted")
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise InputError(f"a shipped file may not be called {name!r}")


def _verified(directory: Path, digest: str) -> bool:
    hashes = {}
    try:
        for path in directory.iterdir():
            sha = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(chunk)
            hashes[path.name] = sha.hexdigest()
    except FileNotFoundError:  # another site is replacing a damaged copy right now
        return False
    return _digest(hashes) == digest


def cached_shipment(cache_dir: str | Path, kind: str, digest: str,
                    arrays: dict[str, np.ndarray] | None = None) -> Path:
    """The directory of shipment ``digest``: from the cache, or written from ``arrays`` once they
    are proven to be what the digest names."""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InputError(f"not a SHA-256 digest: {digest[:80]!r}")
    target = Path(cache_dir) / f"{kind}-{digest[:32]}"
    found = target.is_dir()
    if found and _verified(target, digest):
        return target
    if arrays is None:
        raise InputError(f"this site holds no {kind} {digest[:12]}", path=target,
                         hint="the coordinator sends it once at the start of the job; restart the job")
    _check_names(arrays)
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
            raise InputError(f"shipped file {name!r} must be a flat uint8 array")
    if _digest({n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in arrays.items()}) != digest:
        raise InputError(f"the shipped {kind} does not match its digest {digest[:12]}",
                         hint="it was changed in transit; the coordinator must send it again")
    owner_only_dir(cache_dir)
    # a damaged copy found above is replaced; otherwise the first of several sites writing it at
    # once wins (deciding on a fresh look would replace a copy another site just published)
    writing = staged_dir(target, force=True, what=kind) if found else published_once(target)
    with writing as staged:
        for name, value in arrays.items():
            (staged / name).write_bytes(value.tobytes())
            os.chmod(staged / name, 0o600)
    if not _verified(target, digest):
        raise InputError(f"the cached {kind} does not match its digest {digest[:12]}", path=target,
                         hint="another process is writing this cache; restart the job")
    return target
