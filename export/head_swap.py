"""A new bundle from an existing one with other head weights: what edge fine-tuning produces.

The encoders, tokenizer and preprocessing are copied unchanged (so sites keep their cached
embeddings); ``head.safetensors`` gets the new weights and ``head.onnx`` the same graph with its
weight initializers replaced. Before the new bundle is sealed, its head graph is run against the
weights in torch on random embeddings, so a bundle whose two head files disagree is never written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fedlite.atomic import staged_dir
from fedlite.errors import InputError
from fedlite.export.bundle import seal_bundle, verify_bundle

INITIALIZER_PREFIX = "model."  # HeadGraph wraps the model as `self.model`


def read_head_weights(bundle: str | Path, meta: dict | None = None) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    bundle = Path(bundle)
    meta = meta or verify_bundle(bundle)
    return load_file(str(bundle / meta["head_weights"]))


def fusion_head_from_weights(meta: dict, weights: dict[str, np.ndarray]):
    """The torch FusionHead with these weights, its widths taken from the bundle and the weights."""
    import torch

    from fedlite.model import FusionHead

    model = meta["model"]
    if model["fusion"] == "none":
        fusion_dim = 0  # no fusion layer: the heads read [z ‖ h]
    elif "fusion.proj.weight" in weights:
        fusion_dim = weights["fusion.proj.weight"].shape[0]
    else:
        fusion_dim = weights.get("fusion.image_proj.weight", weights["fusion.gate.weight"]).shape[0]
    head = FusionHead(model["fusion"], model["image_embedding"], model["text_embedding"], fusion_dim,
                      model["num_stages"])
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()}
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"head weights do not fit the bundle's head: missing {missing}, unexpected {unexpected}")
    return head.eval()


def _replace_initializers(source: Path, target: Path, weights: dict[str, np.ndarray]) -> None:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise InputError("writing a bundle with a new head needs the onnx package",
                         hint="pip install 'fedlite[train]' on the coordinator") from None
    graph_model = onnx.load(str(source))
    by_name = {init.name: init for init in graph_model.graph.initializer}
    for name, value in weights.items():
        init = by_name.get(INITIALIZER_PREFIX + name)
        if init is None:
            raise InputError(f"the head graph has no weight {INITIALIZER_PREFIX + name}", path=source)
        old = numpy_helper.to_array(init)
        if old.shape != value.shape:
            raise InputError(f"weight {name}: new shape {value.shape}, the graph's is {old.shape}", path=source)
        init.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=old.dtype), init.name))
    onnx.save(graph_model, str(target))


def _check_head_graph(path: Path, meta: dict, weights: dict[str, np.ndarray], tolerance: float = 1e-4) -> None:
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, meta["model"]["image_embedding"])).astype(np.float32)
    h = rng.standard_normal((8, meta["model"]["text_embedding"])).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    leukemia, stage = session.run(None, {"image_embedding": z, "text_embedding": h})
    with torch.no_grad():
        out = fusion_head_from_weights(meta, weights).classify(torch.from_numpy(z), torch.from_numpy(h))
    expected = (out.leukemia_logits.softmax(-1).numpy(), out.stage_logits.softmax(-1).numpy())
    gap = max(float(np.abs(leukemia - expected[0]).max()), float(np.abs(stage - expected[1]).max()))
    if gap > tolerance:
        raise RuntimeError(f"the rewritten head graph differs from its weights by {gap:.2e}")


def write_bundle_with_head(bundle: str | Path, out: str | Path, weights: dict[str, np.ndarray], record: dict,
                           force: bool = False, signing_key=None) -> dict:
    """Copy ``bundle`` to ``out`` with new head ``weights``; the version goes up by one and
    ``record`` (what changed the head) is appended to the manifest's ``head_updates``; signed with
    ``signing_key`` when given."""
    from safetensors.numpy import save_file

    bundle, out = Path(bundle), Path(out)
    meta = verify_bundle(bundle)
    current = read_head_weights(bundle, meta)
    if set(weights) != set(current):
        raise InputError(f"new head weights name {sorted(set(weights) ^ set(current))} differently from the bundle's")
    head_file = meta["graphs"]["head"]["file"]
    with staged_dir(out, force=force, what="bundle") as staged:
        for name in meta["files"]:
            if name not in (head_file, meta["head_weights"]):
                shutil.copyfile(bundle / name, staged / name)
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        save_file(arrays, str(staged / meta["head_weights"]))
        _replace_initializers(bundle / head_file, staged / head_file, arrays)
        _check_head_graph(staged / head_file, meta, arrays)
        new_meta = {k: v for k, v in meta.items() if k not in ("files", "content_sha256")}
        new_meta["bundle_version"] = int(meta["bundle_version"]) + 1
        new_meta["head_updates"] = [*meta.get("head_updates", []),
                                    {"from_version": meta["bundle_version"], **record}]
        sealed = seal_bundle(staged, new_meta, signing_key=signing_key)
    return sealed
