"""What the numbers were measured on: CPU, the instruction sets INT8 kernels use, versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

INT8_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
              "amx_int8": "AMX-INT8", "asimddp": "ARM dot product"}


def _cpuinfo() -> tuple[str, set[str]]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    import psutil

    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "int8_instruction_sets": [name for flag, name in INT8_FLAGS.items() if flag in flags],
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("onnxruntime", "torch", "numpy", "fedlite")},
    }
