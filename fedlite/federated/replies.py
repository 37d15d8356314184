"""A site's reply is untrusted input: every field the coordinator uses is read through here.

Each reader checks the record's kind, the values' types, finiteness and ranges, and turns any
problem into a ``ReplyError`` that names the field, so the caller rejects that one reply (logged,
with the site named) and the run goes on. Metrics the coordinator does not know are dropped, so
nothing a site makes up reaches the run's records.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedlite.errors import InputError

MAX_SITE_CASES = 10_000_000  # more cases than any hospital holds: a larger count is a lie
MAX_SITE_NAME = 100
_SITE_NAME = re.compile(r"[\w.\-+@ ]+")


class ReplyError(InputError):
    """Why one site's reply cannot be used."""


# name -> (integer?, lowest, highest); every value must be a finite number in range.
_NOW_SPAN = 10 * 365 * 86400.0  # wall-clock stamps: within ten years of now either way
METRICS = {
    "num-examples": (True, 0, MAX_SITE_CASES),
    "validation-cases": (True, 0, MAX_SITE_CASES),
    "problems": (True, 0, 10 * MAX_SITE_CASES),  # a site's data check: problems found in its data
    "train-loss": (False, 0.0, 1e6),
    "samples": (True, 0, 10**12),
    "steps": (True, 0, 10**12),
    "epsilon": (False, 0.0, 1e9),
    "train-seconds": (False, 0.0, 1e7),
    "eval-seconds": (False, 0.0, 1e7),
    "embed-seconds": (False, 0.0, 1e7),
    "peak-memory-mb": (False, 0.0, 1e9),
    "embeddings-cached": (True, 0, 1),
    "compute-start": None, "compute-end": None, "train-start": None, "train-end": None,  # wall clock
}


def reply_metrics(msg: Message, required: tuple[str, ...] = ("num-examples",)) -> dict[str, float | int]:
    """The reply's known metrics, each checked; ``required`` ones must be there."""
    record = _record(msg, "metrics", MetricRecord)
    values = {}
    for name, value in record.items():
        if name not in METRICS:
            continue
        values[name] = _number(name, value, METRICS[name])
    missing = [name for name in required if name not in values]
    if missing:
        raise ReplyError(f"metrics lack {', '.join(missing)}")
    return values


def reply_arrays(msg: Message, key: str = "arrays") -> dict[str, np.ndarray]:
    """The reply's tensors: an ArrayRecord of numeric arrays (finiteness is the screen's to judge)."""
    record = _record(msg, key, ArrayRecord)
    arrays = {}
    try:
        for name, array in record.items():
            value = array.numpy()
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
                raise ReplyError(f"{key}/{name}: not a numeric array")
            arrays[str(name)] = value
    except ReplyError:
        raise
    except Exception as exc:  # a record that does not decode is a malformed reply, whatever numpy says
        raise ReplyError(f"{key}: unreadable arrays ({type(exc).__name__})") from None
    return arrays


def reply_site(msg: Message, node_id: int) -> str:
    """The name a site gives itself in its reply when it is a plain short name, else its node id."""
    fallback = f"node-{node_id}"
    if msg.has_error():
        return fallback
    try:
        info = msg.content.get("info")
        name = info.get("site") if isinstance(info, ConfigRecord) else None
    except Exception:
        return fallback
    if isinstance(name, str) and 0 < len(name) <= MAX_SITE_NAME and _SITE_NAME.fullmatch(name):
        return name
    return fallback


def _record(msg: Message, key: str, kind: type):
    try:
        record = msg.content.get(key)
    except Exception:
        record = None
    if record is None:
        raise ReplyError(f"no {key} in the reply")
    if not isinstance(record, kind):
        raise ReplyError(f"{key} is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _number(name: str, value, rule) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyError(f"metric {name} is a {type(value).__name__}, expected a number")
    if not math.isfinite(value):
        raise ReplyError(f"metric {name} is {value}")
    if rule is None:
        if abs(value - time.time()) > _NOW_SPAN:
            raise ReplyError(f"metric {name} ({value}) is no wall-clock time")
        return float(value)
    integer, low, high = rule
    if integer and float(value) != int(value):
        raise ReplyError(f"metric {name} ({value}) is not a whole number")
    if not low <= value <= high:
        raise ReplyError(f"metric {name} ({value}) is outside [{low}, {high}]")
    return int(value) if integer else float(value)
