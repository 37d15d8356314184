import math

import numpy as np
import pytest

from fedlite.errors import InputError
from fedlite.federated.compress import (
    compression_ratio,
    decode_update,
    dense_nbytes,
    encode_update,
    encoded_nbytes,
    is_encoded,
    is_packed,
    pack_encoded,
    unpack_encoded,
    warmed_topk,
)


def _shapes(tensors):
    return {name: np.shape(t) for name, t in tensors.items()}


def test_dense_round_trip_is_within_half_a_quantization_step():
    rng = np.random.default_rng(0)
    delta = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "fc.bias": (rng.standard_normal(10) * 1e-3).astype(np.float32),
    }
    encoded, residual = encode_update(delta, None, topk_fraction=1.0)
    decoded = decode_update(encoded, _shapes(delta))
    for name, tensor in delta.items():
        scale = float(encoded[f"{name}::scale"][0])
        assert scale == pytest.approx(np.abs(tensor).max() / 127)
        assert decoded[name].dtype == np.float32 and decoded[name].shape == tensor.shape
        assert np.abs(decoded[name] - tensor).max() <= scale / 2 * (1 + 1e-5)
        # dense: no indices travel, every value does
        assert encoded[f"{name}::idx"].size == 0 and encoded[f"{name}::val"].size == tensor.size
        np.testing.assert_array_equal(residual[name], tensor - decoded[name])


def test_topk_keeps_exactly_the_largest_magnitudes():
    rng = np.random.default_rng(1)
    magnitudes = rng.permutation(1000).astype(np.float32) + 1  # distinct, so the top 100 are unambiguous
    tensor = (magnitudes * rng.choice([-1, 1], 1000)).reshape(20, 50).astype(np.float32)
    encoded, residual = encode_update({"w": tensor}, None, topk_fraction=0.1)
    idx = encoded["w::idx"]
    assert idx.dtype == np.int32 and np.all(np.diff(idx) > 0)
    assert set(idx.tolist()) == set(np.argsort(magnitudes)[-100:].tolist())
    decoded = decode_update(encoded)["w"]
    assert np.count_nonzero(decoded) == 100
    assert np.all(decoded.reshape(-1)[idx] * tensor.reshape(-1)[idx] > 0)  # signs survive
    np.testing.assert_array_equal(residual["w"], tensor - decoded)


@pytest.mark.parametrize("size,fraction,sent", [(30, 0.1, 3), (25, 0.1, 3), (1000, 0.001, 1), (1000, 0.0001, 1)])
def test_sent_count_is_ceil_of_fraction_times_size_and_at_least_one(size, fraction, sent):
    tensor = np.arange(1, size + 1, dtype=np.float32)
    encoded, _ = encode_update({"w": tensor}, None, topk_fraction=fraction)
    assert encoded["w::idx"].tolist() == list(range(size - sent, size))


def test_tensor_is_sent_dense_when_that_is_no_larger_than_its_top_k():
    tensor = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    encoded, _ = encode_update({"w": tensor}, None, topk_fraction=0.34)  # 3 bytes × 340 ≥ 1000
    assert encoded["w::idx"].size == 0 and encoded["w::val"].size == 1000
    encoded, _ = encode_update({"w": tensor}, None, topk_fraction=0.33)
    assert encoded["w::idx"].size == 330


def test_indices_far_apart_are_bridged_by_fillers_that_change_nothing():
    """The wire carries each index as its uint16 distance from the one before; entries more than
    65535 apart get zero-valued fillers between them, and the update and residual stay exact."""
    size = 300_000
    tensor = np.zeros(size, np.float32)
    tensor[[5, 70_000, 299_999]] = [1.0, -2.0, 3.0]  # gaps of 6, 69995 and 229999 → 0 + 1 + 3 fillers
    residual_in = {"w": np.full(size, 1e-6, np.float32)}
    encoded, residual = encode_update({"w": tensor}, residual_in, topk_fraction=3 / size)
    idx, val = encoded["w::idx"], encoded["w::val"]
    assert idx.size == 7 and np.all(np.diff(idx.astype(np.int64), prepend=-1) <= 65535)
    assert np.count_nonzero(val) == 3 and set(idx[val != 0].tolist()) == {5, 70_000, 299_999}
    packed = pack_encoded(encoded)
    assert packed["codec::idx"].dtype == np.uint16 and packed["codec::idx"].size == 7
    decoded = decode_update(unpack_encoded(packed), {"w": (size,)})["w"]
    np.testing.assert_array_equal(decoded, decode_update(encoded)["w"])
    np.testing.assert_allclose(decoded + residual["w"], tensor + residual_in["w"], atol=1e-7)
    assert np.count_nonzero(residual["w"] != residual_in["w"]) == 3  # fillers took nothing away
    with pytest.raises(InputError, match="rise by 1 to 65535"):
        pack_encoded({**encoded, "w::idx": np.array([0, 1, 2, 3, 4, 5, 70_000], np.int32)})


def test_error_feedback_delivers_the_sum_of_true_updates_up_to_the_final_residual():
    rng = np.random.default_rng(3)
    size, rounds = 2000, 200
    drift = rng.standard_normal(size).astype(np.float32)  # a consistent direction, as training has
    true_sum, sent_sum, sent_sum_without_feedback = (np.zeros(size) for _ in range(3))
    residual, residual_norms, gaps_without_feedback = None, [], []
    for _ in range(rounds):
        true = (drift + 0.5 * rng.standard_normal(size)).astype(np.float32)
        encoded, residual = encode_update({"w": true}, residual, topk_fraction=0.05)
        sent_sum += decode_update(encoded)["w"]
        encoded_alone, _ = encode_update({"w": true}, None, topk_fraction=0.05)
        sent_sum_without_feedback += decode_update(encoded_alone)["w"]
        true_sum += true
        residual_norms.append(np.linalg.norm(residual["w"]))
        gaps_without_feedback.append(np.linalg.norm(sent_sum_without_feedback - true_sum))

    # what did not arrive is exactly what the site still holds
    np.testing.assert_allclose(true_sum - sent_sum, residual["w"], atol=1e-3)
    gap = np.linalg.norm(sent_sum - true_sum)
    assert gap == pytest.approx(residual_norms[-1], rel=1e-5)
    # bounded: the second half of training never exceeds the first half's worst by much
    assert max(residual_norms[rounds // 2:]) < 1.5 * max(residual_norms[: rounds // 2])
    # without feedback the dropped part piles up round after round
    assert gaps_without_feedback[-1] > 1.8 * gaps_without_feedback[rounds // 2 - 1]
    assert gaps_without_feedback[-1] > 10 * gap


def test_all_zero_tensor_gets_zero_scale_and_decodes_to_zeros():
    zeros = np.zeros((3, 5), dtype=np.float32)
    encoded, residual = encode_update({"z": zeros}, None, topk_fraction=0.1)
    assert encoded["z::scale"].tolist() == [0.0]
    np.testing.assert_array_equal(decode_update(encoded)["z"], zeros)
    np.testing.assert_array_equal(residual["z"], zeros)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (0,), (0, 4)])
def test_scalar_one_element_and_empty_tensors_keep_their_shape(shape):
    tensor = np.full(shape, -0.37, dtype=np.float32)
    encoded, residual = encode_update({"t": tensor}, None, topk_fraction=0.1)
    assert encoded["t::shape"].dtype == np.int64 and tuple(encoded["t::shape"]) == shape
    decoded = decode_update(encoded, {"t": shape})["t"]
    assert decoded.shape == shape
    np.testing.assert_allclose(decoded, tensor, rtol=1e-6)
    np.testing.assert_allclose(residual["t"], 0, atol=1e-7)


def test_fewer_bits_narrow_the_grid():
    tensor = np.linspace(-1, 1, 101, dtype=np.float32)
    encoded, _ = encode_update({"w": tensor}, None, topk_fraction=1.0, bits=4)
    assert np.abs(encoded["w::val"]).max() == 7
    assert np.abs(decode_update(encoded)["w"] - tensor).max() <= 1 / 7 / 2 + 1e-6


def test_inputs_are_not_modified():
    rng = np.random.default_rng(4)
    delta = {"w": rng.standard_normal(100).astype(np.float32)}
    residual = {"w": rng.standard_normal(100).astype(np.float32)}
    before = (delta["w"].copy(), residual["w"].copy())
    encode_update(delta, residual, topk_fraction=0.1)
    np.testing.assert_array_equal(delta["w"], before[0])
    np.testing.assert_array_equal(residual["w"], before[1])


def test_compression_ratio_matches_the_byte_count():
    tensor = np.random.default_rng(5).standard_normal((100, 1000)).astype(np.float32)
    delta = {"w": tensor}
    assert dense_nbytes(delta) == 4 * tensor.size
    sparse, _ = encode_update(delta, None, topk_fraction=0.1)
    # unpacked: 4 index + 1 value bytes per sent entry, plus a 4-byte scale and an 8-byte-per-dimension
    # shape; on the wire 2 distance + 1 value bytes, plus the name, rank and counts
    assert encoded_nbytes(sparse) == 5 * 10_000 + 4 + 16
    assert encoded_nbytes(pack_encoded(sparse)) == 3 * 10_000 + 4 + 24 + 16 + 1
    assert 13 < compression_ratio(delta, sparse) == pytest.approx(4 / (0.1 * 3), rel=1e-2)
    dense, _ = encode_update(delta, None, topk_fraction=1.0)
    assert compression_ratio(delta, dense) == pytest.approx(4, rel=1e-3)


def test_is_encoded_tells_encoded_from_dense():
    delta = {"w": np.ones(10, dtype=np.float32)}
    encoded, _ = encode_update(delta, None)
    assert is_encoded(encoded)
    assert not is_encoded(delta)
    assert not is_encoded({})
    assert is_encoded({"w": np.ones(3), "v::val": np.ones(3, np.int8)})  # partly encoded goes to the decoder


def test_encoded_update_survives_flower_array_record():
    flwr_app = pytest.importorskip("flwr.app")
    delta = {"w": np.random.default_rng(6).standard_normal((8, 8)).astype(np.float32), "s": np.float32(3.0)}
    encoded, _ = encode_update(delta, None, topk_fraction=0.1)
    record = flwr_app.ArrayRecord({k: flwr_app.Array(v) for k, v in encoded.items()})
    received = {k: a.numpy() for k, a in record.items()}
    for name, tensor in decode_update(received, _shapes(delta)).items():
        np.testing.assert_array_equal(tensor, decode_update(encoded)[name])


def test_warm_up_falls_geometrically_to_the_fraction():
    assert [round(warmed_topk(0.01, 3, r), 4) for r in (1, 2, 3, 4, 9)] == [0.3162, 0.1, 0.0316, 0.01, 0.01]
    assert warmed_topk(0.1, 0, 1) == 0.1


def _model_update(seed=8):
    rng = np.random.default_rng(seed)
    return {"enc.layer.0.weight": rng.standard_normal((16, 12)).astype(np.float32),
            "enc.layer.0.bias": rng.standard_normal(16).astype(np.float32),
            "head.scale": np.float32(rng.standard_normal()) * np.ones((), np.float32),
            "empty": np.zeros((0, 3), np.float32)}


def test_packed_update_is_six_arrays_that_unpack_to_the_same_components_through_flower():
    flwr_app = pytest.importorskip("flwr.app")
    delta = _model_update()
    encoded, _ = encode_update(delta, None, topk_fraction=0.1)
    packed = pack_encoded(encoded)
    assert len(packed) == 6 and is_packed(packed) and not is_packed(encoded) and not is_packed(delta)
    record = flwr_app.ArrayRecord({k: flwr_app.Array(v) for k, v in packed.items()})
    unpacked = unpack_encoded({k: a.numpy() for k, a in record.items()})
    assert unpacked.keys() == encoded.keys()
    for key, value in encoded.items():
        assert unpacked[key].dtype == value.dtype
        np.testing.assert_array_equal(unpacked[key], value)
    for name, tensor in decode_update(unpacked, _shapes(delta)).items():
        np.testing.assert_array_equal(tensor, decode_update(encoded)[name])
    # what packing costs in payload: the names, one rank per tensor and two counts per tensor; and
    # what it saves: each int32 index travels as a uint16 distance
    names = sum(len(n.encode()) for n in delta) + len(delta) - 1
    indices = sum(encoded[f"{n}::idx"].size for n in delta)
    assert encoded_nbytes(packed) == (encoded_nbytes(encoded) + names + 8 * len(delta) + 16 * len(delta)
                                      - 2 * indices)
    assert pack_encoded({}) and unpack_encoded(pack_encoded({})) == {}


def _packed():
    return pack_encoded(encode_update(_model_update(), None, topk_fraction=0.1)[0])


def _repack(key, value):
    def mutate(packed):
        packed[key] = value(packed[key]) if callable(value) else value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pop("codec::scale"), "holds exactly"),
    (lambda p: p.update({"codec::extra": np.zeros(1, np.int8)}), "holds exactly"),
    (_repack("codec::idx", lambda a: a.astype(np.int32)), "flat uint16"),
    (_repack("codec::val", lambda a: a.reshape(1, -1)), "flat int8"),
    (_repack("codec::names", np.frombuffer(b"\xff\xfe", np.uint8).copy()), "not UTF-8"),
    (_repack("codec::names", lambda a: np.frombuffer(b"a\na\nb\nc", np.uint8).copy()), "empty or repeated"),
    (_repack("codec::scale", lambda a: a[:-1]), "scales"),
    (_repack("codec::counts", lambda a: a + 1), "does not add up"),
    (_repack("codec::counts", lambda a: np.where(np.arange(a.size) == 0, -a[1], a)), "does not add up"),
    (_repack("codec::shapes", lambda a: a[:-1]), "truncated"),
    (_repack("codec::shapes", lambda a: np.concatenate([[99], a[1:]])), "out of range"),
    (_repack("codec::shapes", lambda a: np.concatenate([a, [0]])), "beyond"),
])
def test_malformed_packing_is_rejected(mutate, message):
    packed = _packed()
    mutate(packed)
    with pytest.raises(InputError, match=message):
        unpack_encoded(packed)


@pytest.mark.parametrize("distances, message", [
    (lambda a: np.where(np.arange(a.size) == 1, 0, a), "duplicate index"),  # a distance of 0
    (lambda a: np.where(np.arange(a.size) == 0, 0, a), "index -1 out of range"),
    (lambda a: np.full_like(a, 65535), "out of range for"),  # past the tensor's end
])
def test_a_consistent_packing_of_a_bad_tensor_still_fails_its_decode(distances, message):
    packed = _packed()
    packed["codec::idx"] = distances(packed["codec::idx"]).astype(np.uint16)  # same counts
    with pytest.raises(InputError, match=message):
        decode_update(unpack_encoded(packed), _shapes(_model_update()))


def test_distances_adding_up_past_any_tensor_are_refused_before_decoding():
    packed = pack_encoded({"w::idx": np.arange(40_000, dtype=np.int32), "w::val": np.ones(40_000, np.int8),
                           "w::scale": np.ones(1, np.float32), "w::shape": np.array([2**31 - 1], np.int64)})
    packed["codec::idx"] = np.full(40_000, 65535, np.uint16)  # reaches 2.6e9
    with pytest.raises(InputError, match="beyond the 2147483647 entries"):
        unpack_encoded(packed)


def test_names_that_cannot_be_packed_are_refused():
    encoded, _ = encode_update({"a\nb": np.ones(3, np.float32)}, None)
    with pytest.raises(InputError, match="newline"):
        pack_encoded(encoded)


# --- malformed input from a remote site --------------------------------------------------------


def _valid():
    tensor = np.random.default_rng(7).standard_normal(100).astype(np.float32)
    encoded, _ = encode_update({"w": tensor}, None, topk_fraction=0.1)
    return encoded


def _set(key, value):
    def mutate(encoded):
        encoded[key] = value

    return mutate


def _set_idx(position, value):
    def mutate(encoded):
        encoded["w::idx"] = encoded["w::idx"].copy()
        encoded["w::idx"][position] = value

    return mutate


def _swap_first_indices(encoded):
    idx = encoded["w::idx"].copy()
    idx[[0, 1]] = idx[[1, 0]]
    encoded["w::idx"] = idx


MALFORMED = {
    "missing scale": (lambda e: e.pop("w::scale"), "missing ::scale"),
    "missing idx": (lambda e: e.pop("w::idx"), "missing ::idx"),
    "extra component": (_set("w::extra", np.zeros(1)), "'w::extra' is not part of an encoded tensor"),
    "index past the end": (_set_idx(-1, 100), "index 100 out of range"),
    "negative index": (_set_idx(0, -1), "index -1 out of range"),
    "wrapping int32 indices": (
        _set("w::idx", np.array([2**31 - 1, -(2**31)] + list(range(8)), np.int32)), "not sorted"),
    "duplicate index": (lambda e: _set_idx(1, e["w::idx"][0])(e), "duplicate index"),
    "unsorted indices": (_swap_first_indices, "not sorted"),
    "int64 indices": (lambda e: _set("w::idx", e["w::idx"].astype(np.int64))(e), "::idx has dtype int64"),
    "float values": (lambda e: _set("w::val", e["w::val"].astype(np.float32))(e), "::val has dtype float32"),
    "float64 scale": (_set("w::scale", np.array([0.1])), "::scale has dtype float64"),
    "int32 shape": (_set("w::shape", np.array([100], np.int32)), "::shape has dtype int32"),
    "list instead of array": (_set("w::scale", [0.1]), "not a numpy array"),
    "2-d indices": (lambda e: _set("w::idx", e["w::idx"].reshape(2, 5))(e), "2 dimensions"),
    "nan scale": (_set("w::scale", np.array([np.nan], np.float32)), "not a finite non-negative"),
    "infinite scale": (_set("w::scale", np.array([np.inf], np.float32)), "not a finite non-negative"),
    "negative scale": (_set("w::scale", np.array([-0.5], np.float32)), "not a finite non-negative"),
    "two scales": (_set("w::scale", np.array([0.1, 0.2], np.float32)), "expected exactly 1"),
    "fewer values than indices": (lambda e: _set("w::val", e["w::val"][:-1])(e), "9 values for 10 indices"),
    "more entries than the tensor": (_set("w::shape", np.array([5], np.int64)), "10 entries sent for a tensor of 5"),
    "negative dimension": (_set("w::shape", np.array([-100], np.int64)), "negative dimension"),
    "absurd size": (_set("w::shape", np.array([2**40], np.int64)), "more than"),
    "int8 -128": (lambda e: _set("w::val", np.full(10, -128, np.int8))(e), "outside the symmetric int8 range"),
    "dense with too few values": (
        lambda e: (_set("w::idx", np.empty(0, np.int32))(e), _set("w::val", np.ones(7, np.int8))(e)),
        "7 values without indices"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_update_is_rejected_naming_the_tensor(case):
    mutate, fragment = MALFORMED[case]
    encoded = _valid()
    mutate(encoded)
    with pytest.raises(InputError) as exc:
        decode_update(encoded)
    message = str(exc.value)
    assert "'w" in message and fragment in message


def test_update_must_match_the_model():
    encoded = _valid()
    with pytest.raises(InputError, match=r"tensor 'w': shape \(100,\) does not match the model's \(10, 10\)"):
        decode_update(encoded, {"w": (10, 10)})
    with pytest.raises(InputError, match="tensor 'w': not a tensor of the model"):
        decode_update(encoded, {"v": (100,)})
    with pytest.raises(InputError, match="tensor 'b': missing from the update"):
        decode_update(encoded, {"w": (100,), "b": (3,)})
    with pytest.raises(InputError, match="'bias' is not part of an encoded tensor"):
        decode_update({**encoded, "bias": np.zeros(3, np.float32)}, {"w": (100,)})


def test_every_bad_tensor_is_reported_not_just_the_first():
    encoded = _valid()
    encoded.update({k.replace("w", "v"): a for k, a in encoded.items()})
    encoded["w::scale"] = np.array([np.nan], np.float32)
    encoded.pop("v::val")
    with pytest.raises(InputError) as exc:
        decode_update(encoded)
    assert len(exc.value.problems) == 2
    assert "tensor 'w'" in str(exc.value) and "tensor 'v': missing ::val" in str(exc.value)


def test_encode_rejects_bad_settings_and_diverged_updates():
    delta = {"w": np.ones(10, np.float32)}
    for fraction in (0, -0.1, 1.5, math.nan):
        with pytest.raises(InputError, match="top-k fraction"):
            encode_update(delta, None, topk_fraction=fraction)
    for bits in (1, 9, 8.0):
        with pytest.raises(InputError, match="bits"):
            encode_update(delta, None, bits=bits)
    with pytest.raises(InputError, match="tensor 'w': update contains NaN"):
        encode_update({"w": np.array([1.0, np.inf], np.float32)}, None)
    with pytest.raises(InputError, match="tensor 'w': residual has shape"):
        encode_update(delta, {"w": np.zeros(11, np.float32)})
    with pytest.raises(InputError, match="tensor 'w': no residual kept"):
        encode_update(delta, {})
    with pytest.raises(InputError, match="tensor 'x::idx': name ends like an encoded component"):
        encode_update({"x::idx": np.ones(3, np.float32)}, None)
