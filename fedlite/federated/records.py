"""Arrays in and out of Flower's ArrayRecord.

numpy only, so that what reads or writes a message's arrays (the site API, the coordinator's
rounds) does not need torch: a site's light handlers, such as the data check, start without it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}
