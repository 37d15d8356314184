"""The wire format of a site's model update: top-k sparsification plus symmetric int8 quantization,
with error feedback so that whatever is not sent this round is sent in a later one.

Hospital uplinks are slow and the update is mostly noise in its small entries, so a site sends only
the largest-magnitude entries of each tensor, quantized to int8 with one float32 scale per tensor.
What was left out (small entries and rounding error) is kept by the site as a residual and added to
the next round's update; summed over rounds, the server therefore receives the true updates minus
only the final residual, which stays bounded.

Encoded, tensor `name` becomes four numpy arrays (so the update fits Flower's `ArrayRecord`):

    name::idx    int32 (k,)   flat indices of the sent entries, strictly increasing and never more
                              than 65535 apart (zero-valued filler entries bridge longer gaps); empty
                              when the whole tensor is sent (then `val` holds all entries in flat order)
    name::val    int8  (k,)   quantized values in [-127, 127]; the entry is val * scale
    name::scale  float32 (1,) max|v| / 127 over the tensor (/ 2^(bits-1) - 1 for fewer bits), 0 when
                              the tensor is all zero
    name::shape  int64 (ndim,) the dense shape

On the wire (``pack_encoded``), the components of all tensors travel together in six arrays,
``codec::names`` (the tensor names, UTF-8, newline-separated), ``codec::shapes`` (each tensor's
ndim then its dims), ``codec::counts`` (each tensor's index and value counts), ``codec::idx``,
``codec::val`` and ``codec::scale``: Flower's record costs about 130 bytes per array, which on a
small model at top-k 1 % is as much as the payload when every tensor brings four arrays. On the
wire ``codec::idx`` holds each index's distance from the one before it (the first: its index + 1)
as uint16, half the bytes of an int32 index; the fillers keep every distance below 2^16.

Bytes on the wire per tensor: 3 per sent entry when sparse (2 distance + 1 value), 1 per entry when
dense, plus the scale, shape, counts and name. A dense float32 update costs 4 per entry, so top-k
fraction f compresses about 4 / (3 f) times (13x at f = 0.1, 133x at f = 0.01) and a dense tensor
4x. Because a distance costs twice a value, a tensor is sent dense whenever that is no larger than
sending its top k (f >= 1/3): dense int8 is then both smaller and more accurate.

numpy only: the hospital agent imports this and must stay free of torch.
"""

from __future__ import annotations

import math

import numpy as np

from fedlite.errors import InputError, Problem

COMPONENTS = ("idx", "val", "scale", "shape")
SEPARATOR = "::"
_SUFFIXES = tuple(SEPARATOR + c for c in COMPONENTS)
_COMPONENT_DTYPES = {"idx": np.int32, "val": np.int8, "scale": np.float32, "shape": np.int64}
_GAP_BYTES = np.dtype(np.uint16).itemsize  # an index on the wire: its distance from the one before
_MAX_GAP = int(np.iinfo(np.uint16).max)
_VALUE_BYTES = np.dtype(np.int8).itemsize
_DENSE_BYTES = np.dtype(np.float32).itemsize
_QMAX_INT8 = 127
# int32 indices address at most this many entries; it also stops a remote site from making the
# server allocate an absurd tensor when no expected shapes are given
_MAX_SIZE = 2**31 - 1


def warmed_topk(fraction: float, warmup_rounds: int, server_round: int) -> float:
    """The top-k fraction of ``server_round``: over the first ``warmup_rounds`` rounds it falls
    geometrically from near 1 to ``fraction`` (fraction^(t / (W + 1)) in round t), as Deep Gradient
    Compression's warm-up does, so the first large updates are not squeezed through 1 %."""
    if warmup_rounds <= 0 or server_round > warmup_rounds:
        return fraction
    return float(fraction ** (max(server_round, 1) / (warmup_rounds + 1)))


def encode_update(
    delta: dict[str, np.ndarray],
    residual: dict[str, np.ndarray] | None,
    topk_fraction: float = 0.1,
    bits: int = 8,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encode delta + residual; return (encoded arrays, new residual to keep for the next round).

    The new residual is exactly (delta + residual) - decode_update(encoded), so nothing is lost
    across rounds. `bits` below 8 narrows the quantization grid (values still travel as int8)."""
    if not (isinstance(topk_fraction, (int, float, np.floating)) and 0.0 < topk_fraction <= 1.0):
        raise InputError(f"top-k fraction must be in (0, 1], got {topk_fraction!r}", field="topk_fraction")
    if not (isinstance(bits, (int, np.integer)) and 2 <= bits <= 8):
        raise InputError(f"quantization bits must be an integer in [2, 8], got {bits!r}", field="bits")
    _check_residual_matches(delta, residual)
    qmax = 2 ** (bits - 1) - 1
    encoded: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name, tensor in delta.items():
        tensor = np.asarray(tensor)
        if is_encoded({name: None}):
            raise InputError(f"tensor {name!r}: name ends like an encoded component ({SEPARATOR}idx etc.)",
                             hint="rename the tensor; its dense update would pass for an encoded one")
        if tensor.size > _MAX_SIZE:
            raise InputError(f"tensor {name!r}: {tensor.size} entries, more than int32 indices address")
        # a fresh float32 copy: it becomes the new residual, so the caller's arrays are never touched
        pending = np.array(tensor, dtype=np.float32).reshape(-1)
        if residual is not None:
            pending += np.asarray(residual[name], dtype=np.float32).reshape(-1)
        parts = _encode_tensor(name, pending, tensor.shape, qmax, topk_fraction)
        # pending -= decoded, only where something was sent (elsewhere decoded is 0)
        sent_at = parts["idx"] if parts["idx"].size else slice(None)
        pending[sent_at] -= _dequantize(parts["val"], parts["scale"])
        encoded.update({f"{name}{SEPARATOR}{c}": parts[c] for c in COMPONENTS})
        new_residual[name] = pending.reshape(tensor.shape)
    return encoded, new_residual


def decode_update(
    encoded: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Rebuild dense float32 tensors from what a remote site sent.

    The data is untrusted, so every inconsistency is an InputError naming the tensor; nothing is
    skipped. Pass `expected` (name -> shape of the global model) to also reject unknown or missing
    tensors and wrong shapes; without it a site chooses the shapes the server allocates."""
    if not isinstance(encoded, dict):
        raise InputError(f"an encoded update is a dict of numpy arrays, got {type(encoded).__name__}")
    problems: list[Problem] = []
    grouped: dict[str, dict[str, object]] = {}
    for key, array in encoded.items():
        name, sep, component = str(key).rpartition(SEPARATOR)
        if not sep or component not in COMPONENTS:
            suffixes = ", ".join(_SUFFIXES)
            problems.append(Problem(f"key {key!r} is not part of an encoded tensor (no suffix {suffixes})"))
            continue
        grouped.setdefault(name, {})[component] = array
    if expected is not None:
        for name in expected:
            if name not in grouped:
                problems.append(Problem(f"tensor {name!r}: missing from the update"))
    decoded: dict[str, np.ndarray] = {}
    for name, parts in grouped.items():
        want_shape = None
        if expected is not None:
            if name not in expected:
                problems.append(Problem(f"tensor {name!r}: not a tensor of the model"))
                continue
            want_shape = tuple(int(d) for d in expected[name])
        try:
            decoded[name] = _decode_tensor(parts, want_shape)
        except _Malformed as exc:
            problems.append(Problem(f"tensor {name!r}: {exc}"))
    if problems:
        raise InputError(problems)
    return decoded


PACKED_PREFIX = "codec" + SEPARATOR
PACKED_KEYS = tuple(PACKED_PREFIX + part for part in ("names", "shapes", "counts", "idx", "val", "scale"))
_PACKED_DTYPES = dict(zip(PACKED_KEYS, (np.uint8, np.int64, np.int64, np.uint16, np.int8, np.float32)))
_MAX_NDIM = 32


def pack_encoded(encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An encoded update as six arrays, whatever the number of tensors (see the module docstring)."""
    names = list(dict.fromkeys(key.rpartition(SEPARATOR)[0] for key in encoded))
    if any("\n" in name or not name for name in names):
        raise InputError("tensor names must be non-empty and hold no newline to be packed")
    parts = [{c: np.asarray(encoded[f"{name}{SEPARATOR}{c}"]) for c in COMPONENTS} for name in names]
    shapes = [np.concatenate([[p["shape"].size], p["shape"]]) for p in parts]
    return {
        PACKED_KEYS[0]: np.frombuffer("\n".join(names).encode("utf-8"), dtype=np.uint8).copy(),
        PACKED_KEYS[1]: np.concatenate(shapes).astype(np.int64) if shapes else np.empty(0, np.int64),
        PACKED_KEYS[2]: np.array([[p["idx"].size, p["val"].size] for p in parts], dtype=np.int64).reshape(-1),
        PACKED_KEYS[3]: np.concatenate([_gaps(name, p["idx"]) for name, p in zip(names, parts)] or [np.empty(0)])
        .astype(np.uint16),
        PACKED_KEYS[4]: np.concatenate([p["val"] for p in parts] or [np.empty(0)]).astype(np.int8),
        PACKED_KEYS[5]: np.concatenate([p["scale"] for p in parts] or [np.empty(0)]).astype(np.float32),
    }


def _gaps(name: str, idx: np.ndarray) -> np.ndarray:
    """A tensor's sorted flat indices as the distances the wire carries (see the module docstring)."""
    gaps = np.diff(np.asarray(idx, dtype=np.int64), prepend=-1)
    if gaps.size and not (1 <= gaps.min() and gaps.max() <= _MAX_GAP):
        raise InputError(f"tensor {name!r}: indices must rise by 1 to {_MAX_GAP} to be packed",
                         hint="encode the update with encode_update, which bridges longer gaps")
    return gaps


def unpack_encoded(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-tensor components of what a remote party packed, for ``decode_update`` (which checks
    each tensor). The packing itself is untrusted: any inconsistency is an InputError."""
    if not isinstance(packed, dict) or set(packed) != set(PACKED_KEYS):
        have = sorted(packed) if isinstance(packed, dict) else type(packed).__name__
        raise InputError(f"a packed update holds exactly {', '.join(PACKED_KEYS)}; got {have}")
    for key, dtype in _PACKED_DTYPES.items():
        array = packed[key]
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 1:
            raise InputError(f"{key} must be a flat {np.dtype(dtype)} array, got "
                             f"{getattr(array, 'dtype', type(array).__name__)} of shape {getattr(array, 'shape', '?')}")
    names_array, shapes, counts, idx, val, scale = (packed[k] for k in PACKED_KEYS)
    try:
        names = bytes(names_array).decode("utf-8").split("\n") if names_array.size else []
    except UnicodeDecodeError:
        raise InputError(f"{PACKED_KEYS[0]} is not UTF-8") from None
    if len(set(names)) != len(names) or not all(names):
        raise InputError(f"{PACKED_KEYS[0]} holds an empty or repeated tensor name")
    n = len(names)
    if counts.size != 2 * n or scale.size != n:
        raise InputError(f"{n} tensors named but {counts.size // 2} counted and {scale.size} scales")
    counts = counts.reshape(n, 2)
    if (counts < 0).any() or counts[:, 0].sum() != idx.size or counts[:, 1].sum() != val.size:
        raise InputError(f"{PACKED_KEYS[2]} does not add up to the {idx.size} indices and {val.size} values sent")
    encoded: dict[str, np.ndarray] = {}
    at, idx_at, val_at = 0, 0, 0
    for i, name in enumerate(names):
        ndim = int(shapes[at]) if at < shapes.size else -1
        if not 0 <= ndim <= _MAX_NDIM or at + 1 + ndim > shapes.size:
            raise InputError(f"tensor {name!r}: {PACKED_KEYS[1]} is truncated or its rank is out of range")
        k, m = int(counts[i, 0]), int(counts[i, 1])
        flat_idx = np.cumsum(idx[idx_at:idx_at + k], dtype=np.int64) - 1
        if flat_idx.size and flat_idx[-1] > _MAX_SIZE:
            raise InputError(f"tensor {name!r}: {PACKED_KEYS[3]} reaches index {int(flat_idx[-1])}, "
                             f"beyond the {_MAX_SIZE} entries a tensor may have")
        encoded.update({f"{name}{SEPARATOR}shape": shapes[at + 1:at + 1 + ndim].copy(),
                        f"{name}{SEPARATOR}idx": flat_idx.astype(np.int32),
                        f"{name}{SEPARATOR}val": val[val_at:val_at + m],
                        f"{name}{SEPARATOR}scale": scale[i:i + 1]})
        at, idx_at, val_at = at + 1 + ndim, idx_at + k, val_at + m
    if at != shapes.size:
        raise InputError(f"{PACKED_KEYS[1]} holds {shapes.size - at} entries beyond the {n} tensors' shapes")
    return encoded


def is_packed(arrays: dict) -> bool:
    """Whether ``arrays`` is a packed update rather than dense tensors: any ``codec::`` key counts,
    so a partly packed dict goes to ``unpack_encoded``, which says what is wrong with it."""
    return any(isinstance(key, str) and key.startswith(PACKED_PREFIX) for key in arrays)


def is_encoded(arrays: dict) -> bool:
    """Whether `arrays` is an encoded update rather than dense tensors. Any component-suffixed key
    counts, so a partly encoded dict goes to decode_update, which says what is wrong with it."""
    return any(isinstance(key, str) and key.endswith(_SUFFIXES) for key in arrays)


def encoded_nbytes(encoded: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in encoded.values()))


def dense_nbytes(delta: dict[str, np.ndarray]) -> int:
    """Bytes of the update sent as plain float32, whatever dtype the arrays have here."""
    return int(sum(np.asarray(a).size for a in delta.values())) * _DENSE_BYTES


def compression_ratio(delta: dict[str, np.ndarray], encoded: dict[str, np.ndarray]) -> float:
    """Dense float32 bytes over the bytes of ``encoded`` as it travels, packed."""
    sent = encoded_nbytes(encoded if is_packed(encoded) else pack_encoded(encoded))
    return dense_nbytes(delta) / sent if sent else float("nan")


class _Malformed(Exception):
    """One tensor's problem, collected into a Problem naming the tensor."""


def _check_residual_matches(delta: dict[str, np.ndarray], residual: dict[str, np.ndarray] | None) -> None:
    if residual is None:
        return
    problems = [Problem(f"tensor {n!r}: no residual kept from earlier rounds")
                for n in delta if n not in residual]
    problems += [Problem(f"tensor {n!r}: residual kept but tensor not in the update")
                 for n in residual if n not in delta]
    for name in delta.keys() & residual.keys():
        have, want = np.shape(residual[name]), np.shape(delta[name])
        if have != want:
            problems.append(Problem(f"tensor {name!r}: residual has shape {have}, update has {want}"))
    if problems:
        raise InputError(problems)


def _sent_count(size: int, topk_fraction: float) -> int:
    # rounding first keeps 0.1 * 30 = 3.0000000000000004 from becoming 4
    return min(size, max(1, math.ceil(round(topk_fraction * size, 6))))


def _encode_tensor(
    name: str, flat: np.ndarray, shape: tuple[int, ...], qmax: int, topk_fraction: float
) -> dict[str, np.ndarray]:
    size = flat.size
    magnitude = np.abs(flat)
    peak = float(magnitude.max()) if size else 0.0
    if not math.isfinite(peak):
        raise InputError(f"tensor {name!r}: update contains NaN or infinite values (did training diverge?)")
    k = _sent_count(size, topk_fraction)
    if k * (_GAP_BYTES + _VALUE_BYTES) >= size * _VALUE_BYTES:
        idx = np.empty(0, dtype=np.int32)
        values = flat
    else:
        # the k largest magnitudes; the peak is among them, so it sets the scale
        top = np.argpartition(magnitude, size - k)[size - k:]
        top.sort()
        idx, fillers = _bridge_gaps(top)
        values = flat[idx]
        values[fillers] = 0.0
    scale = np.float32(peak / qmax)
    if scale > 0:
        val = np.clip(np.rint(values / scale), -qmax, qmax).astype(np.int8)
    else:  # all zero, or so small the scale underflows: send zeros and keep the rest as residual
        scale = np.float32(0.0)
        val = np.zeros(values.size, dtype=np.int8)
    return {
        "idx": idx,
        "val": val,
        "scale": np.array([scale], dtype=np.float32),
        "shape": np.array(shape, dtype=np.int64).reshape(-1),
    }


def _bridge_gaps(top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``top`` with filler indices added wherever two are more than ``_MAX_GAP``
    apart (the first counts from -1), so each distance fits the wire's uint16; returns the indices
    as int32 and a mask of the fillers, whose values are sent as 0 and leave the residual as it was."""
    gaps = np.diff(top, prepend=-1)
    needed = (gaps - 1) // _MAX_GAP
    if not needed.any():
        return top.astype(np.int32), np.zeros(top.size, dtype=bool)
    starts = np.concatenate([[-1], top[:-1]])
    fillers = np.concatenate([starts[i] + _MAX_GAP * np.arange(1, n + 1) for i, n in enumerate(needed) if n])
    idx = np.concatenate([top, fillers])
    order = np.argsort(idx, kind="stable")
    return idx[order].astype(np.int32), (np.arange(idx.size) >= top.size)[order]


def _dequantize(val: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The one place values are rebuilt, so the residual a site keeps matches what the server sees."""
    return val.astype(np.float32) * scale[0]


def _decode_tensor(parts: dict[str, object], want_shape: tuple[int, ...] | None) -> np.ndarray:
    missing = [SEPARATOR + c for c in COMPONENTS if c not in parts]
    if missing:
        raise _Malformed(f"missing {', '.join(missing)}")
    for component, dtype in _COMPONENT_DTYPES.items():
        array = parts[component]
        if not isinstance(array, np.ndarray):
            raise _Malformed(f"{SEPARATOR}{component} is a {type(array).__name__}, not a numpy array")
        if array.dtype != dtype:
            raise _Malformed(f"{SEPARATOR}{component} has dtype {array.dtype}, expected {np.dtype(dtype)}")
        if array.ndim != 1:
            raise _Malformed(f"{SEPARATOR}{component} has {array.ndim} dimensions, expected a flat array")
    idx, val, scale, shape_array = parts["idx"], parts["val"], parts["scale"], parts["shape"]

    if (shape_array < 0).any():
        raise _Malformed(f"negative dimension in shape {shape_array.tolist()}")
    shape = tuple(int(d) for d in shape_array)
    if want_shape is not None and shape != want_shape:
        raise _Malformed(f"shape {shape} does not match the model's {want_shape}")
    size = math.prod(shape)
    if size > _MAX_SIZE:
        raise _Malformed(f"shape {shape} has {size} entries, more than the {_MAX_SIZE} int32 indices address")

    if scale.shape != (1,):
        raise _Malformed(f"{SEPARATOR}scale has {scale.size} values, expected exactly 1")
    if not math.isfinite(float(scale[0])) or scale[0] < 0:
        raise _Malformed(f"scale {float(scale[0])} is not a finite non-negative number")
    if val.size and int(val.min()) < -_QMAX_INT8:
        raise _Malformed(f"value {int(val.min())} is outside the symmetric int8 range [-127, 127]")

    out = np.zeros(size, dtype=np.float32)
    if idx.size == 0:  # dense (or nothing sent)
        if val.size not in (0, size):
            raise _Malformed(f"{val.size} values without indices: a dense tensor needs all {size}")
        if val.size:
            out[:] = _dequantize(val, scale)
        return out.reshape(shape)
    if val.size != idx.size:
        raise _Malformed(f"{val.size} values for {idx.size} indices")
    if idx.size > size:
        raise _Malformed(f"{idx.size} entries sent for a tensor of {size}")
    steps = np.diff(idx.astype(np.int64))  # int32 differences could wrap around and pass as sorted
    if (steps == 0).any():
        raise _Malformed(f"duplicate index {int(idx[1:][steps == 0][0])}")
    if (steps < 0).any():
        raise _Malformed("indices are not sorted ascending")
    if idx[0] < 0 or idx[-1] >= size:
        bad = int(idx[0]) if idx[0] < 0 else int(idx[-1])
        raise _Malformed(f"index {bad} out of range for {size} entries")
    out[idx] = _dequantize(val, scale)
    return out.reshape(shape)
