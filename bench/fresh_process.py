"""A measurement in a process of its own, so that its load time and peak memory are its own: the
parent starts ``python -m module`` with a JSON spec on stdin and reads one JSON line back
(``run_probe``); the probe answers through ``answer``, which adds its own peak resident memory
(``peak_rss_mb``) and which of the heavy libraries it loaded.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

HEAVY_MODULES = ("torch", "timm", "transformers")


def run_probe(module: str, spec: dict, timeout_s: int) -> dict:
    """``python -m module`` in a fresh process, the JSON spec on stdin, one JSON line back."""
    done = subprocess.run([sys.executable, "-m", module], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{module} ({spec.get('kind')}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Linux's ru_maxrss survives fork and exec, so a child
    would report its parent's peak; VmHWM belongs to the process's own address space."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


def heavy_modules_loaded() -> list[str]:
    return sorted(m for m in HEAVY_MODULES if m in sys.modules)


def answer(run: Callable[[dict], dict]) -> None:
    """A probe's ``__main__``: the spec from stdin, ``run(spec)`` with the process's peak memory and
    heavy libraries as one JSON line on stdout."""
    result = run(json.loads(sys.stdin.read()))
    result.update(peak_rss_mb=peak_rss_mb(), heavy_modules_loaded=heavy_modules_loaded())
    print(json.dumps(result))
