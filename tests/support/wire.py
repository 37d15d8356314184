"""What a site's reply carries, read as the coordinator reads it: packed codec arrays unpacked into
each tensor's components, dense arrays as they are."""

from __future__ import annotations

import numpy as np

from fedlite.federated.compress import SEPARATOR, is_packed, unpack_encoded


def sent_arrays(record) -> dict[str, np.ndarray]:
    arrays = {key: value.numpy() for key, value in record.items()}
    return unpack_encoded(arrays) if is_packed(arrays) else arrays


def sent_tensor_names(record) -> set[str]:
    return {key.split(SEPARATOR)[0] for key in sent_arrays(record)}
