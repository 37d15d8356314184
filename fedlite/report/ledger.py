"""What a report has already built, keyed by a hash of the configuration that built it.

A report is many runs; rerunning ``fedlite report`` reuses every finished run whose configuration
(settings and the split it trained on) hashes the same, continues an unfinished federated run from
its last round, and redoes the rest: an interrupted report resumes where it stopped, a changed
setting redoes what it changes. A run trained on other stage names is refused, never reused or
replaced unasked: its numbers would not mean the same thing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator

from fedlite.atomic import atomic_write_text, json_text
from fedlite.checkpoint import read_checkpoint_meta
from fedlite.errors import InputError

LEDGER = "runs.json"
log = logging.getLogger(__name__)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Ledger:
    """``OUT/runs.json``: artifact name → the hash of its configuration, once it is finished."""

    def __init__(self, out: Path, force: bool = False):
        self.path = Path(out) / LEDGER
        self.force = force
        self.entries: dict = {}
        if self.path.is_file() and not force:
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(f"corrupt report ledger ({exc.msg})", path=self.path,
                                 hint="pass --force to rebuild every run") from None

    def finished(self, name: str, config: dict, where: Path) -> bool:
        """Whether ``where`` holds the finished artifact ``name`` built from ``config``."""
        entry = self.entries.get(name, {})
        return Path(where).exists() and entry.get("hash") == config_hash(config) and entry.get("finished", False)

    def started(self, name: str, config: dict) -> bool:
        """Whether ``name`` was started from this same config (and so may be continued)."""
        entry = self.entries.get(name, {})
        return entry.get("hash") == config_hash(config) and not entry.get("finished", False)

    def mark(self, name: str, config: dict, finished: bool, seconds: float | None = None) -> None:
        self.entries[name] = {"hash": config_hash(config), "finished": finished, "config": config,
                              "seconds": seconds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json_text(self.entries, indent=2) + "\n")

    @contextlib.contextmanager
    def building(self, name: str, config: dict) -> Iterator[None]:
        """Marks ``name`` started, then finished with the seconds it took, only if the block completes."""
        self.mark(name, config, finished=False)
        start = time.perf_counter()
        yield
        self.mark(name, config, finished=True, seconds=time.perf_counter() - start)

    def build_seconds(self) -> float:
        """What every finished artifact took to build, whichever invocation built it."""
        return sum(e.get("seconds") or 0.0 for e in self.entries.values() if e.get("finished"))


def check_stages(checkpoint: Path, stage_names: list[str], force: bool) -> None:
    """Refuse to reuse or replace a run trained on other stages (``force`` replaces it)."""
    if force or not (checkpoint / "config.json").is_file():
        return
    theirs = read_checkpoint_meta(checkpoint)["stage_names"]
    if list(theirs) != list(stage_names):
        raise InputError(f"this run was trained on the stages {theirs}, the split names {list(stage_names)}",
                         path=checkpoint, hint="report into another --out, or pass --force to retrain it")
