"""What the numbers were measured on: CPU, the instruction sets INT8 kernels use, versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from fedlite.cpu_features import INT8_FLAGS, cpu_info


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    import psutil

    model, flags = cpu_info()
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
