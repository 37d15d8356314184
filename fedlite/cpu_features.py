"""What this CPU's INT8 kernels do: the instruction sets ONNX Runtime's 8-bit products run on.

A bundle quantized with signed weights and unsigned activations (the ``avx512_vnni`` preset) runs
exactly on CPUs with VNNI. On AVX2 or AVX-512 without VNNI, ONNX Runtime multiplies those pairs
with VPMADDUBSW, which saturates its 16-bit sums: outputs can move by a lot, on some inputs only.
Unsigned weights (the ``avx2`` preset) take a widening path there and do not saturate.
"""

from __future__ import annotations

import platform
from pathlib import Path

INT8_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
              "amx_int8": "AMX-INT8", "asimddp": "ARM dot product"}
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags (empty where /proc/cpuinfo does not exist)."""
    if not path.is_file():
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model or platform.machine(), flags


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


def u8s8_saturates(flags: frozenset[str], machine: str | None = None) -> bool:
    """True where ONNX Runtime's U8S8 kernels may saturate: x86 without any VNNI instruction."""
    return is_x86(machine) and not (flags & VNNI_FLAGS)


def bundle_saturates_here(quantization: dict | None, flags: frozenset[str] | None = None,
                          machine: str | None = None) -> bool:
    """True where a bundle's INT8 graphs (bundle.json ``quantization``) pair signed weights with
    unsigned activations and this CPU would run them on saturating kernels."""
    if not quantization or (quantization.get("weights"), quantization.get("activations")) != ("QInt8", "QUInt8"):
        return False
    return u8s8_saturates(cpu_info()[1] if flags is None else flags, machine)


def host_isa(flags: frozenset[str] | None = None, machine: str | None = None) -> str:
    """The quantization preset that runs exactly on this CPU: ``avx512_vnni`` with VNNI, ``arm64`` on
    ARM, and ``avx2`` (unsigned weights, no saturation) on every other x86 CPU."""
    flags = cpu_info()[1] if flags is None else flags
    if not is_x86(machine):
        return "arm64"
    return "avx2" if u8s8_saturates(flags, machine) else "avx512_vnni"
