"""The hospital agent's own work, measured in a fresh process like every other configuration.

Three kinds, chosen by the JSON spec on stdin (one JSON line comes back):
- ``explain``: ``explain_case`` with the bundle (cached embeddings, INT8 encoders, batched);
- ``explain-reference``: the same shap Partition explanations run naively on the torch FP32 teacher,
  both encoders re-run for every evaluation of either modality (what a user without fedlite's split
  graphs would do); the top-10 features of both are compared by the runner;
- ``edge``: the agent's heavy path: embed a site's cases with the bundle, train one edge round of
  the head on them and encode its update, then explain one case, with the peak RSS after each step.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from fedlite.bench.fresh_process import answer, peak_rss_mb

TOP_K = 10


def _top(values: np.ndarray) -> list[list[int]]:
    return [[int(i) for i in np.argsort(-np.abs(values[:, o]), kind="stable")[:TOP_K]] for o in range(values.shape[1])]


def _explained(image, text, seconds: float) -> dict:
    """What the runner compares, from the two modalities' ModalityExplanation."""
    return {"seconds": seconds, "image_seconds": image.seconds, "text_seconds": text.seconds,
            "evaluations": [image.evaluations, text.evaluations],
            "additivity_error": float(max(image.additivity_error.max(), text.additivity_error.max())),
            "top_patches": _top(image.values), "top_tokens": _top(text.values)}


def _import_shap() -> float:
    """shap's import (about 2 s, once per process) is timed apart from the explanations."""
    from fedlite.agents.explain import import_shap

    start = time.perf_counter()
    import_shap()
    return time.perf_counter() - start


def explain_with_bundle(spec: dict) -> dict:
    from fedlite.agents.explain import ExplainSettings, explain_case
    from fedlite.agents.runtime import BundleRuntime, RuntimeSettings

    import_seconds = _import_shap()
    runtime = BundleRuntime(spec["path"], RuntimeSettings(threads=spec["threads"]))
    settings = ExplainSettings(max_evals=spec["max_evals"])
    cases = []
    for case in spec["cases"]:
        start = time.perf_counter()
        expl = explain_case(runtime, runtime.load_images([case["image"]])[0], case["text"], settings)
        cases.append(_explained(expl.image, expl.text, time.perf_counter() - start))
    return {"cases": cases, "shap_import_seconds": import_seconds}


def explain_with_torch_teacher(spec: dict) -> dict:
    """Naive shap on the teacher: every evaluation runs the whole model on (masked image, note)."""
    import torch

    from fedlite.agents.explain import ExplainSettings, NoteTokenizer, explain_image, explain_text, patch_baseline
    from fedlite.checkpoint import load_checkpoint
    from fedlite.data.images import preprocess_image

    import_seconds = _import_shap()
    torch.set_num_threads(spec["threads"])
    ckpt = load_checkpoint(spec["path"])
    model = ckpt.model.eval()
    prep = ckpt.meta["preprocessing"]
    settings = ExplainSettings(max_evals=spec["max_evals"])
    tokenizer = NoteTokenizer(ckpt.tokenizer, ckpt.max_length)
    mask_id = ckpt.tokenizer.token_to_id("[MASK]")
    cases = []
    for case in spec["cases"]:
        start = time.perf_counter()
        pixels = preprocess_image(case["image"], prep["image_size"], prep["mean"], prep["std"])
        ids = np.asarray([tokenizer(case["text"])["input_ids"]], dtype=np.int64)
        with torch.inference_mode():
            out = model(torch.from_numpy(pixels[None]), torch.from_numpy(ids), torch.ones_like(torch.from_numpy(ids)))
        stage = int(out.stage_logits.argmax(-1)[0])

        def run(pix: np.ndarray, tok: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                o = model(torch.from_numpy(pix), torch.from_numpy(tok), torch.ones_like(torch.from_numpy(tok)))
                return np.stack([o.leukemia_logits.softmax(-1)[:, 1].numpy(),
                                 o.stage_logits.softmax(-1)[:, stage].numpy()], axis=1)

        image = explain_image(lambda b: run(b, np.repeat(ids, len(b), axis=0)), pixels,
                              patch_baseline(pixels, settings.baseline, prep["mean"], prep["std"]),
                              model.config.image.patch_size, settings)
        text = explain_text(lambda b: run(np.repeat(pixels[None], len(b), axis=0), b.astype(np.int64)),
                            case["text"], tokenizer, mask_id, settings)
        cases.append(_explained(image, text, time.perf_counter() - start))
    return {"cases": cases, "shap_import_seconds": import_seconds}


def edge_heavy_path(spec: dict) -> dict:
    """Embed, train one round, encode the update, explain: what an agent does at its busiest, through
    the agent's own functions (the embedding cache, the edge round a site runs, the explainer)."""
    import torch
    from flwr.app import Context, RecordDict

    from fedlite.agents.edge_client import evaluate_head, train_head
    from fedlite.agents.embedding_cache import site_embeddings
    from fedlite.agents.explain import ExplainSettings, explain_case
    from fedlite.agents.runtime import BundleRuntime, RuntimeSettings
    from fedlite.data.manifest import read_dataset
    from fedlite.export.head_swap import read_head_weights
    from fedlite.federated.compress import decode_update, encoded_nbytes, unpack_encoded
    from fedlite.federated.config import FederatedConfig

    torch.set_num_threads(spec["threads"])
    stages = {}
    runtime = BundleRuntime(spec["path"], RuntimeSettings(threads=spec["threads"]))
    dataset = read_dataset(spec["site"])
    with tempfile.TemporaryDirectory(prefix="fedlite-bench-cache-") as cache:
        start = time.perf_counter()
        embeddings = site_embeddings(runtime, dataset, cache)
        stages["embed"] = {"seconds": time.perf_counter() - start, "cases": len(embeddings),
                           "peak_rss_mb": peak_rss_mb()}
        start = time.perf_counter()
        site_embeddings(runtime, dataset, cache)
        stages["embed_cached"] = {"seconds": time.perf_counter() - start}
    weights = read_head_weights(spec["path"])
    run = FederatedConfig(rounds=1, local_epochs=spec["epochs"], batch_size=32, lr=spec["lr"], optimizer="sgd",
                          compress=True, topk_fraction=spec["topk"], edge_bundle=str(spec["path"]))
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    before = evaluate_head(runtime, embeddings, weights).metrics()["loss"]
    start = time.perf_counter()
    update = train_head(runtime, embeddings, weights, run, 1, context)
    seconds = time.perf_counter() - start
    delta = decode_update(unpack_encoded(update.arrays), {name: value.shape for name, value in weights.items()})
    sent = {name: weights[name] + delta[name] for name in weights}  # the head the coordinator gets from it
    stages["train_round"] = {"seconds": seconds, "epochs": spec["epochs"], "steps": int(update.metrics["steps"]),
                             "local_loss_before": before,
                             "local_loss_after": evaluate_head(runtime, embeddings, sent).metrics()["loss"],
                             "update_bytes": encoded_nbytes(update.arrays),
                             "dense_head_bytes": int(sum(v.size for v in weights.values()) * 4),
                             "student_fp32_bytes": int(runtime.meta["model"]["parameters"]) * 4,
                             "peak_rss_mb": peak_rss_mb()}
    case = dataset.cases[0]
    stages["explain"] = {"shap_import_seconds": _import_shap()}
    start = time.perf_counter()
    explain_case(runtime, runtime.load_images([dataset.image_path(case)])[0], case.text,
                 ExplainSettings(max_evals=spec["max_evals"]))
    stages["explain"].update(seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
    return {"stages": stages}


KINDS = {"explain": explain_with_bundle, "explain-reference": explain_with_torch_teacher, "edge": edge_heavy_path}


def run(spec: dict) -> dict:
    return KINDS[spec["kind"]](spec)


if __name__ == "__main__":
    answer(run)
