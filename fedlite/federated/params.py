"""Fed-MMX parameters as named numpy arrays, the form they travel in (``records``).

Only what is trainable in a round travels: during the frozen-encoder rounds that is the fusion layer
and the heads, not the encoders. Frozen weights are rebuilt locally by every site from the same
config (and the same local pretrained files), and a fingerprint in each message proves they match.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fedlite.model import FedMMX

HEAD_PREFIXES = ("fusion.", "leukemia_head.", "stage_head.")


def trainable_names(model: FedMMX, frozen_encoders: bool) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n.startswith(HEAD_PREFIXES)] if frozen_encoders else names


def get_arrays(model: FedMMX, names: list[str]) -> dict[str, np.ndarray]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().float().cpu().numpy().copy() for n in names}


@torch.no_grad()
def set_arrays(model: FedMMX, arrays: dict[str, np.ndarray]) -> None:
    params = dict(model.named_parameters())
    for name, value in arrays.items():
        params[name].copy_(torch.from_numpy(np.asarray(value)).to(params[name].device, params[name].dtype))


@torch.no_grad()
def add_to_params(model: FedMMX, delta: dict[str, np.ndarray]) -> None:
    params = dict(model.named_parameters())
    for name, value in delta.items():
        params[name].add_(torch.from_numpy(np.asarray(value)).to(params[name].device, params[name].dtype))


def frozen_fingerprint(model: FedMMX, trainable: list[str]) -> str:
    """SHA-256 over every parameter and buffer that does not travel this round."""
    skip = set(trainable)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in skip:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
