"""How far INT8 outputs move from FP32 on this CPU, per quantization preset.

A hospital's CPU decides which preset runs exactly: signed weights on unsigned activations
(``avx512_vnni``) saturate in ONNX Runtime's AVX2 kernels, which CPUs without VNNI use. Run it on the
machine in question, or emulate one without VNNI::

    fedlite bench int8-saturation --out bench/results/int8-saturation/native.json
    qemu-x86_64 -cpu Haswell $(which python) -m fedlite.cli bench int8-saturation --out .../haswell.json

The graph is Conv → Relu → MatMul → Tanh → Gemm with random weights (the operator kinds static QDQ
quantizes in the encoders), calibrated on six batches; the error is the largest absolute output
difference over the largest absolute FP32 output, per input batch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np

from fedlite.atomic import atomic_write_text
from fedlite.cpu_features import cpu_info, host_isa


def write_small_graph(path: Path) -> Path:
    """Conv -> Relu -> MatMul -> Tanh -> Gemm over 3×8×8 inputs, weights from a fixed seed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["pixels", "cw", "cb"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], axis=1, name="flatten"),
             helper.make_node("MatMul", ["flat", "w1"], ["hidden"], name="matmul"),
             helper.make_node("Add", ["hidden", "b1"], ["biased"], name="add"),
             helper.make_node("Tanh", ["biased"], ["tanh"], name="tanh"),
             helper.make_node("Gemm", ["tanh", "w2", "b2"], ["logits"], name="gemm")]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(nodes, "tiny", [pixels], [logits],
                              [weight("cw", 4, 3, 3, 3), weight("cb", 4), weight("w1", 256, 16), weight("b1", 16),
                               weight("w2", 16, 4), weight("b2", 4)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def small_graph_feeds(n: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Batches of two inputs whose scale cycles 1, 2, 3: each holds extremes another lacks."""
    rng = np.random.default_rng(seed)
    return [{"pixels": (rng.standard_normal((2, 3, 8, 8)) * (1 + i % 3)).astype(np.float32)} for i in range(n)]


def relative_errors(fp32: Path, int8: Path, inputs: list[dict[str, np.ndarray]]) -> list[float]:
    from fedlite.export.quantize import session

    a, b = session(fp32), session(int8)
    errors = []
    for feed in inputs:
        x, y = a.run(None, feed)[0], b.run(None, feed)[0]
        errors.append(float(np.abs(x - y).max() / np.abs(x).max()))
    return errors


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the result as JSON here.")
@click.option("--inputs", default=13, show_default=True, help="Input batches the error is measured on.")
def main(out: Path | None, inputs: int) -> None:
    from fedlite.export.quantize import ISA_PRESETS, QuantSettings, quantize_graph

    model, flags = cpu_info()
    result = {"cpu": model, "preset_for_this_cpu": host_isa(flags), "presets": {}}
    with tempfile.TemporaryDirectory(prefix="fedlite-saturation-") as scratch:
        graph = write_small_graph(Path(scratch) / "graph.onnx")
        tests = [small_graph_feeds(1, seed)[0] for seed in range(7, 7 + inputs)]
        for isa in ISA_PRESETS:
            int8 = Path(scratch) / f"{isa}.onnx"
            quantize_graph(graph, int8, QuantSettings(mode="static", isa=isa), lambda: iter(small_graph_feeds()))
            errors = relative_errors(graph, int8, tests)
            result["presets"][isa] = {"weights_activations": "/".join(ISA_PRESETS[isa]),
                                      "max_relative_error": max(errors),
                                      "median_relative_error": float(np.median(errors))}
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
