"""Static INT8 calibration from statistics merged across sites, against pooled calibration."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from flwr.app import Array, ArrayRecord
from onnx import helper
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

from fedlite.bench.int8_saturation import small_graph_feeds, write_small_graph
from fedlite.cpu_features import host_isa
from fedlite.errors import InputError
from fedlite.export.calibration import (calibrated_tensors, collect_statistics, decode_statistics, histogram_edges,
                                        merge_statistics, ranges_from_statistics)
from fedlite.export.quantize import QuantSettings, op_counts, prepare_graph, quantize_graph, session


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    """Conv -> Relu -> MatMul -> Tanh -> Gemm: the operator kinds static QDQ quantizes in the encoders."""
    return write_small_graph(tmp_path_factory.mktemp("graph") / "encoder.onnx")


@pytest.fixture(scope="module")
def prepared(graph) -> Path:
    """What the coordinator ships to sites: the graph it will quantize, after pre-processing."""
    path = graph.with_name("encoder.prep.onnx")
    prepare_graph(graph, path)
    return path


def _feeds(n=6, seed=1):
    return small_graph_feeds(n, seed)  # sites differ in scale, so each holds some extreme the other lacks


OPERATORS = QuantSettings(mode="static").operators


class _Reader:
    """onnxruntime's calibration data reader over a list of feeds."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _values(prepared, feeds, name):
    """Every value the tensor takes on these feeds: what a pooled histogram counts."""
    model = onnx.load(prepared)
    if name not in {o.name for o in model.graph.output}:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([name], feed)[0].ravel() for feed in feeds])


def _site_stats(prepared, feeds, edges=None):
    """Each site's reply travels as a Flower ArrayRecord and is decoded as untrusted input."""
    arrays = collect_statistics(prepared, feeds, OPERATORS, edges)
    record = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    return decode_statistics({name: a.numpy() for name, a in record.items()},
                             expected=calibrated_tensors(prepared, OPERATORS))


def test_merged_site_minmax_is_the_pooled_range(prepared, tmp_path):
    feeds = _feeds()
    merged = merge_statistics([_site_stats(prepared, feeds[:2]), _site_stats(prepared, feeds[2:])])

    pooled = create_calibrator(prepared, OPERATORS, augmented_model_path=str(tmp_path / "augmented.onnx"),
                               calibrate_method=CalibrationMethod.MinMax)
    pooled.collect_data(_Reader(feeds))
    pooled = pooled.compute_data()

    assert set(merged.ranges) == set(pooled.keys()) == {"conv", "flat", "biased", "logits", "pixels", "tanh"}
    for name, (low, high) in merged.ranges.items():
        assert low.tobytes() == pooled[name].range_value[0].tobytes(), name
        assert high.tobytes() == pooled[name].range_value[1].tobytes(), name
    site_a = _site_stats(prepared, feeds[:2])
    assert any(site_a.ranges[n][1][0] < merged.ranges[n][1][0] for n in merged.ranges)  # the merge did something


@pytest.mark.parametrize("isa,per_channel", [("avx2", True), ("avx512_vnni", True), ("avx512_vnni", False)])
def test_graph_from_merged_statistics_is_the_pooled_static_graph(graph, prepared, tmp_path, isa, per_channel):
    settings = QuantSettings(mode="static", isa=isa, per_channel=per_channel)
    feeds = _feeds()
    quantize_graph(graph, tmp_path / "pooled.onnx", settings, lambda: iter(feeds))
    merged = merge_statistics([_site_stats(prepared, feeds[:3]), _site_stats(prepared, feeds[3:5]),
                               _site_stats(prepared, feeds[5:])])
    quantize_graph(graph, tmp_path / "merged.onnx", settings, ranges=merged)

    assert op_counts(tmp_path / "merged.onnx")["QuantizeLinear"] >= 4
    assert (tmp_path / "merged.onnx").read_bytes() == (tmp_path / "pooled.onnx").read_bytes()


def test_histograms_on_shared_edges_add_up_to_the_pooled_histogram(graph, prepared, tmp_path):
    feeds = _feeds()
    edges = histogram_edges(merge_statistics([_site_stats(prepared, feeds[:2]), _site_stats(prepared, feeds[2:])]),
                            bins=256)
    merged = merge_statistics([_site_stats(prepared, feeds[:2], edges), _site_stats(prepared, feeds[2:], edges)])
    pooled = _site_stats(prepared, feeds, edges)

    for name, (counts, bins) in pooled.histograms.items():
        assert np.array_equal(merged.histograms[name][0], counts) and np.array_equal(merged.histograms[name][1], bins)
        assert counts.sum() == _values(prepared, feeds, name).size
    for method in ("entropy", "percentile"):
        a, b = ranges_from_statistics(merged, method), ranges_from_statistics(pooled, method)
        assert a.calibration_method == b.calibration_method
        for name in a.keys():
            assert np.array_equal(a[name].range_value, b[name].range_value), (method, name)
            low, high = merged.ranges[name]
            assert low[0] <= a[name].range_value[0] <= a[name].range_value[1] <= high[0]

    settings = QuantSettings(mode="static", isa=host_isa())  # signed weights saturate on CPUs without VNNI
    quantize_graph(graph, tmp_path / "entropy.onnx", settings, ranges=ranges_from_statistics(merged, "entropy"))
    x = _feeds(1, seed=7)[0]
    fp32, int8 = session(graph).run(None, x)[0], session(tmp_path / "entropy.onnx").run(None, x)[0]
    assert np.abs(fp32 - int8).max() < 0.1 * np.abs(fp32).max()


def test_a_site_calibrates_without_writing_beside_the_shipped_graph(prepared, monkeypatch):
    """Simulated sites share one cache: a file written beside the shipped graph (onnxruntime's
    shape-inferred copy) would be another site's to trip over."""
    import onnx

    written, infer = [], onnx.shape_inference.infer_shapes_path
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path",
                        lambda src, out, *a, **k: (written.append(Path(out)), infer(src, out, *a, **k))[1])
    before = sorted(prepared.parent.iterdir())
    collect_statistics(prepared, _feeds(2), OPERATORS)
    assert written and all(path.parent != prepared.parent for path in written)
    assert sorted(prepared.parent.iterdir()) == before


def _good(prepared):
    return collect_statistics(prepared, _feeds(2), OPERATORS)


@pytest.mark.parametrize("mutate,tensor,words", [
    (lambda s: s.update({"conv::min": np.array([np.nan], np.float32)}), "conv", "not finite"),
    (lambda s: s.update({"conv::max": np.array([1.0])}), "conv", "float32"),
    (lambda s: s.update({"tanh::min": np.zeros((2,), np.float32)}), "tanh", "shape (1,)"),
    (lambda s: s.update({"tanh::min": np.array([5.0], np.float32), "tanh::max": np.array([1.0], np.float32)}),
     "tanh", "above max"),
    (lambda s: s.pop("logits::max"), "logits", "both min and max"),
    (lambda s: s.update({"logits::mean": np.zeros(1, np.float32)}), "logits::mean", "not a calibration statistic"),
    (lambda s: s.update({"flat::min": [0.0]}), "flat", "not a numpy array"),
    (lambda s: s.update({"other::min": np.zeros(1, np.float32), "other::max": np.ones(1, np.float32)}), "other",
     "not a tensor the coordinator's graph calibrates"),
    (lambda s: (s.pop("pixels::min"), s.pop("pixels::max")), "pixels", "missing"),
    (lambda s: s.update({"conv::hist": np.ones(4, np.int64)}), "conv", "needs both hist and edges"),
    (lambda s: s.update({"conv::hist": np.ones(4, np.int64), "conv::edges": np.arange(4, dtype=np.float32)}),
     "conv", "shape (5,)"),
    (lambda s: s.update({"conv::hist": -np.ones(4, np.int64), "conv::edges": np.arange(5, dtype=np.float32)}),
     "conv", "non-negative"),
])
def test_malformed_statistics_are_refused_naming_the_tensor(prepared, mutate, tensor, words):
    arrays = _good(prepared)
    mutate(arrays)
    with pytest.raises(InputError) as err:
        decode_statistics(arrays, expected=calibrated_tensors(prepared, OPERATORS), source="site-2 statistics")
    message = str(err.value)
    assert f"field '{tensor}'" in message and words in message and "site-2 statistics" in message


def test_statistics_that_cannot_be_merged_or_quantized_are_refused(graph, prepared, tmp_path):
    feeds = _feeds()
    a = _site_stats(prepared, feeds[:3])
    b = decode_statistics({k: v for k, v in collect_statistics(prepared, feeds[3:], OPERATORS).items()
                           if not k.startswith("tanh::")})
    with pytest.raises(InputError, match="field 'tanh': calibrated by only some sites"):
        merge_statistics([a, b])

    edges = histogram_edges(a, bins=128)
    other = {**edges, "conv": np.linspace(-1, 1, 129, dtype=np.float32)}
    with pytest.raises(InputError, match="field 'conv': histograms differ in their edges"):
        merge_statistics([_site_stats(prepared, feeds[:3], edges), _site_stats(prepared, feeds[3:], other)])
    with pytest.raises(InputError, match="field 'conv': entropy calibration needs a histogram"):
        ranges_from_statistics(a, "entropy")
    with pytest.raises(InputError, match="needs at least 128 histogram bins"):
        ranges_from_statistics(_site_stats(prepared, feeds, histogram_edges(a, bins=64)), "entropy")

    with pytest.raises(InputError, match="lack 1 tensor"):
        quantize_graph(graph, tmp_path / "int8.onnx", QuantSettings(mode="static"), ranges=b)
    with pytest.raises(InputError, match="no calibration cases"):
        collect_statistics(prepared, iter([]), OPERATORS)
    with pytest.raises(InputError, match="histogram edges: field 'conv'"):
        collect_statistics(prepared, feeds, OPERATORS, {k: v for k, v in edges.items() if k != "conv"})


def _conv_stack(path: Path) -> Path:
    """A stem reading the pixels, a depthwise Conv (group = channels) and a pointwise one, as in a
    MobileNetV2."""
    rng = np.random.default_rng(0)
    init = [onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "full_w"),
            onnx.numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "depthwise_w"),
            onnx.numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "pointwise_w")]
    nodes = [helper.make_node("Conv", ["pixels", "full_w"], ["full"], name="stem", pads=[1] * 4),
             helper.make_node("Relu", ["full"], ["relu"], name="relu"),
             helper.make_node("Conv", ["relu", "depthwise_w"], ["dw"], name="depthwise", group=4, pads=[1] * 4),
             helper.make_node("Conv", ["dw", "pointwise_w"], ["out"], name="pointwise")]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT,
                                                                             [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("all_convs", [False, True])
def test_static_mode_keeps_a_conv_nets_depthwise_convolutions_and_stem_in_float_unless_asked(tmp_path, all_convs):
    graph = _conv_stack(tmp_path / "convs.onnx")
    feeds = [{"pixels": np.random.default_rng(i).normal(size=(1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    settings = QuantSettings(mode="static", isa="avx2", all_convs=all_convs)
    quantize_graph(graph, tmp_path / "int8.onnx", settings, lambda: iter(feeds))
    model = onnx.load(tmp_path / "int8.onnx")
    conv_weights = {n.name: n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert conv_weights["pointwise"] in dequantized  # an INT8 weight, dequantized into the Conv
    assert (conv_weights["depthwise"] in dequantized) is all_convs
    assert (conv_weights["stem"] in dequantized) is all_convs
    assert settings.to_dict()["all_convs"] is all_convs
