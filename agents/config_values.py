"""The values an agent config holds, each checked on its own: host:port addresses, paths, memory
sizes as systemd writes them, bounded integers. ``convert`` turns a TOML value into a setting's
value or raises ValueError saying what is wrong with it; ``agent_config`` names the file and field.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

_MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # systemd's, base 1024
_MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$", re.IGNORECASE)
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                          r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def parse_memory(text: str) -> int:
    """Bytes in a systemd-style size ("6G", "512M", "1.5G", "1073741824"); suffixes are base 1024."""
    match = _MEMORY_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a memory size")
    value = float(match.group(1)) * _MEMORY_UNITS[match.group(2).upper()]
    if value < 1 or not math.isfinite(value):
        raise ValueError(f"{text!r} is not a positive memory size")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (a name, an IPv4 address or a bracketed IPv6 address) -> (host, port)."""
    if "://" in address:
        raise ValueError(f"{address!r} has a URL scheme; give host:port only")
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
        if not sep:
            raise ValueError(f"{address!r} is not [IPv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{address!r} is not host:port")
        if ":" in host:
            raise ValueError(f"{address!r}: write an IPv6 address in brackets, e.g. [::1]:9093")
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} is not a host name or IP address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def _as_address(value: Any) -> str:
    text = _as_text(value)
    parse_address(text)
    return text


def _as_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    if has_control(value):
        raise ValueError("must not contain control characters (newlines, tabs, ...)")
    return value


def _as_path(value: Any, base: Path) -> Path:
    path = Path(os.path.expanduser(_as_text(value)))
    return path if path.is_absolute() else base / path


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _as_int(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer in {low}..{high}, got {value!r}")
        return value
    return check


def _as_memory(value: Any) -> str:
    text = _as_text(value).strip()
    parse_memory(text)
    return text[:-1] + text[-1].upper() if text[-1].isalpha() else text


def has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def convert(kind: str, value: Any, base: Path) -> Any:
    converters: dict[str, Callable[[Any], Any]] = {
        "address": _as_address, "path": lambda v: _as_path(v, base), "bool": _as_bool,
        "port": _as_int(1, 65535), "threads": _as_int(0, 1024), "memory": _as_memory,
        "cases": _as_int(0, 10_000_000),
    }
    return converters[kind](value)
