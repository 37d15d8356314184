"""ONNX Runtime graph fusions and INT8 quantization of the encoder graphs.

Only MatMul/Gemm, ORT's fused Attention (its packed QKV weights) and, for static QDQ, Conv are
quantized (the word-embedding table too, if asked); LayerNorm, Softmax and GELU stay in float. In a
convolutional network (one with depthwise convolutions: MobileNetV2) so do, unless asked, the
depthwise convolutions and the stem that reads the pixels: they carry most of its INT8 error for a
small share of its compute (on a MobileNetV2 fine-tuned from ImageNet weights, 96.7 % of the
leukemia calls kept with both in float, 94.2 % with the stem quantized, 95.8 % with everything).
Dynamic quantization computes activation scales per call (no calibration data); static QDQ fixes
them from calibration cases, pooled here or summarised at each site (export/calibration.py).
Instruction-set presets follow optimum's AutoQuantizationConfig: VNNI and ARM take signed weights,
plain AVX2 unsigned ones.
The head graph stays FP32: it is a fraction of the compute and the part sites fine-tune.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)
from onnxruntime.quantization.calibrate import TensorsData
from onnxruntime.quantization.shape_inference import quant_pre_process

from fedlite.errors import InputError
from fedlite.export.calibration import CalibrationStats, calibrated_tensors, ranges_from_statistics

log = logging.getLogger(__name__)

# (weight type, activation type) per instruction set, as in optimum's AutoQuantizationConfig.
ISA_PRESETS = {
    "avx512_vnni": ("QInt8", "QUInt8"),
    "avx2": ("QUInt8", "QUInt8"),
    "arm64": ("QInt8", "QUInt8"),
}
MODES = ("dynamic", "static")
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention")
STATIC_OPS = ("MatMul", "Gemm", "Conv")
FUSED_OPS = ("Attention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "EmbedLayerNormalization", "SkipSimplifiedLayerNormalization")


@dataclass(frozen=True)
class QuantSettings:
    mode: str = "dynamic"
    isa: str = "avx512_vnni"
    per_channel: bool = True
    reduce_range: bool = False
    embeddings: bool = False  # also the word-embedding table (Gather): a 28996-row vocabulary is 4x smaller
    all_convs: bool = False  # static mode: also a convolutional network's depthwise convolutions and stem

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown quantization mode {self.mode!r}", hint=f"choose one of {', '.join(MODES)}")
        if self.isa not in ISA_PRESETS:
            raise InputError(f"unknown instruction-set preset {self.isa!r}",
                             hint=f"choose one of {', '.join(ISA_PRESETS)}")

    @property
    def operators(self) -> list[str]:
        ops = list(DYNAMIC_OPS if self.mode == "dynamic" else STATIC_OPS)
        return ops + ["Gather"] if self.embeddings else ops

    @property
    def weight_type(self) -> QuantType:
        return getattr(QuantType, ISA_PRESETS[self.isa][0])

    @property
    def activation_type(self) -> QuantType:
        return getattr(QuantType, ISA_PRESETS[self.isa][1])

    def to_dict(self) -> dict:
        weights, activations = ISA_PRESETS[self.isa]
        return {**asdict(self), "weights": weights, "activations": activations,
                "operators": self.operators}


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def op_counts(path: str | Path) -> dict[str, int]:
    return dict(Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node))


def _max_difference(a: str | Path, b: str | Path, feeds: list[dict[str, np.ndarray]]) -> float:
    sa, sb = session(a), session(b)
    return max(float(np.abs(x - y).max()) for feed in feeds
               for x, y in zip(sa.run(None, feed), sb.run(None, feed)))


@contextlib.contextmanager
def _quiet_onnxruntime_tools():
    """ORT's optimizer and quantizer log advice on the root logger at WARNING (pre-processing hints,
    head-count guesses); the outcome is checked here instead, so keep them out of the user's log."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@dataclass
class FusionResult:
    applied: bool
    fused_ops: dict[str, int]
    max_difference: float


def fuse_graph(src: Path, dst: Path, model_type: str, feeds: list[dict[str, np.ndarray]],
               tolerance: float = 1e-3) -> FusionResult:
    """Apply ORT's transformer fusions; keep the fused graph only if it computes the same outputs."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_onnxruntime_tools():
        fused = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
        fused.save_model_to_file(str(dst))
    counts = {op: n for op, n in op_counts(dst).items() if op in FUSED_OPS}
    diff = _max_difference(src, dst, feeds)
    if diff > tolerance or not counts:
        dst.write_bytes(src.read_bytes())
        if diff > tolerance:
            log.warning("ORT fusions changed %s's outputs by %.2g; exporting it unfused", src.name, diff)
        return FusionResult(False, {}, diff)
    return FusionResult(True, counts, diff)


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def prepare_graph(src: str | Path, dst: str | Path) -> None:
    """ORT's quantization pre-processing: the graph static quantization calibrates and quantizes.
    Sites calibrate on this output, so tensor names match the coordinator's."""
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def float_convs(graph: str | Path) -> list[str]:
    """The Conv nodes static INT8 leaves in float: a convolutional network's grouped (depthwise)
    convolutions and its stem, the convolutions that read a graph input. None in a ViT, whose
    only convolution is the patch embedding."""
    model = onnx.load(str(graph), load_external_data=False)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    if not depthwise:
        return []
    inputs = {i.name for i in model.graph.input}
    return depthwise + [n.name for n in convs if n.input[0] in inputs]


def _check_ranges(ranges: TensorsData, prepared: Path, settings: QuantSettings, graph: Path) -> None:
    expected = set(calibrated_tensors(prepared, settings.operators))
    missing, extra = sorted(expected - set(ranges.keys())), sorted(set(ranges.keys()) - expected)
    if missing or extra:
        shown = ", ".join((missing or extra)[:5]) + (" ..." if len(missing or extra) > 5 else "")
        raise InputError(f"calibration statistics {'lack' if missing else 'add'} {len(missing or extra)} tensor(s) "
                         f"of this graph: {shown}", path=graph,
                         hint="collect them on prepare_graph's output of this graph with the same operators")


def quantize_graph(src: Path, dst: Path, settings: QuantSettings,
                   calibration: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None, *,
                   ranges: CalibrationStats | TensorsData | None = None) -> None:
    """Quantize one encoder graph to INT8 into ``dst``.

    Static mode takes either ``calibration`` (pooled cases, calibrated here) or ``ranges``: statistics
    merged from sites (MinMax unless already turned into onnxruntime ranges by
    ``ranges_from_statistics``), so the coordinator quantizes without seeing a case.
    """
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True}
    if settings.mode == "dynamic":
        with _quiet_onnxruntime_tools():
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=settings.operators,
                             per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                             weight_type=settings.weight_type, extra_options=extra)
        return
    if calibration is not None and ranges is not None:
        raise ValueError("pass calibration cases or merged ranges, not both")
    if calibration is None and ranges is None:
        raise InputError("static quantization needs calibration cases", hint="pass --calibration DIR")
    if isinstance(ranges, CalibrationStats):
        ranges = ranges_from_statistics(ranges)
    if ranges is not None and "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise RuntimeError("quantizing from merged calibration ranges needs an onnxruntime whose quantize_static "
                           "takes calibration_cache_path; upgrade onnxruntime")
    static = dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=settings.operators,
                  per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                  activation_type=settings.activation_type, weight_type=settings.weight_type, extra_options=extra)
    prepared = dst.with_name(dst.stem + ".prep.onnx")
    prepare_graph(src, prepared)
    if not settings.all_convs:
        static["nodes_to_exclude"] = float_convs(prepared)
    try:
        if ranges is None:
            quantize_static(str(prepared), str(dst), _Feeds(calibration()), **static)
            return
        _check_ranges(ranges, prepared, settings, src)
        from onnxruntime.quantization.calibrate import save_tensors_data  # with calibration_cache_path

        # quantize_static reads a calibration cache instead of running cases: the same quantizer,
        # fed ranges that were never computed here.
        with tempfile.TemporaryDirectory(prefix="fedlite-ranges-") as scratch:
            cache = Path(scratch) / "ranges.json"
            save_tensors_data(ranges, cache)
            quantize_static(str(prepared), str(dst), None, calibrate_method=ranges.calibration_method,
                            calibration_cache_path=str(cache), **static)
    finally:
        prepared.unlink(missing_ok=True)
