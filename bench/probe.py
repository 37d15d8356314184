"""One measured configuration, run in a fresh process so its load time and peak memory are its own.

The parent (``fedlite.bench.runner``) writes a JSON spec to stdin and reads one JSON line back. ``kind = "bundle"`` runs a bundle with ONNX Runtime only and never imports torch; ``kind =
"torch"`` runs a checkpoint with torch, the baseline a user would otherwise deploy.
"""

from __future__ import annotations

import math
import time

import numpy as np

from fedlite.bench.fresh_process import answer, peak_rss_mb
from fedlite.bench.stats import latency_summary, repeated_summary
from fedlite.text import encode_notes, pad_token_ids

STAGES = ("preprocess", "tokenize", "image_encoder", "text_encoder", "head")


class BundleEngine:
    def __init__(self, path: str, threads: int) -> None:
        from fedlite.agents.runtime import BundleRuntime, RuntimeSettings

        self.rt = BundleRuntime(path, RuntimeSettings(threads=threads))

    def preprocess(self, paths):
        return self.rt.load_images(paths)

    def tokenize(self, notes):
        ids, mask, _ = self.rt.tokenize(notes)
        return ids, mask

    def image(self, pixels):
        return self.rt.embed_images(pixels)

    def text(self, ids, mask):
        return self.rt.embed_texts(ids, mask)

    def head(self, z, h):
        return self.rt.head(z, h)


class TorchEngine:
    """The FP32 torch checkpoint behind the same five stages (same numpy preprocessing)."""

    def __init__(self, path: str, threads: int) -> None:
        import torch

        from fedlite.checkpoint import load_checkpoint
        from fedlite.data.images import preprocess_image
        from fedlite.text import pad_id

        torch.set_num_threads(threads)
        self.torch = torch
        ckpt = load_checkpoint(path)
        self.model = ckpt.model.eval()
        self.tokenizer, self.max_length, self.pad = ckpt.tokenizer, ckpt.max_length, pad_id(ckpt.tokenizer)
        prep = ckpt.meta["preprocessing"]
        self._pre = lambda p: preprocess_image(p, prep["image_size"], prep["mean"], prep["std"])

    def preprocess(self, paths):
        return np.stack([self._pre(p) for p in paths])

    def tokenize(self, notes):
        return pad_token_ids(encode_notes(self.tokenizer, notes, self.max_length).ids, self.pad)

    def image(self, pixels):
        with self.torch.inference_mode():
            return self.model.encode_image(self.torch.from_numpy(pixels))

    def text(self, ids, mask):
        with self.torch.inference_mode():
            return self.model.encode_text(self.torch.from_numpy(ids), self.torch.from_numpy(mask))

    def head(self, z, h):
        with self.torch.inference_mode():
            out = self.model.classify(z, h)
            return out.leukemia_logits.softmax(-1).numpy(), out.stage_logits.softmax(-1).numpy()


def single_stream(engine, cases: list[dict], runs: int) -> tuple[list[float], dict[str, list[float]]]:
    """One case at a time, image file and note text in, probabilities out; per-stage times too."""
    total, stages = [], {s: [] for s in STAGES}
    for i in range(runs):
        case = cases[i % len(cases)]
        t0 = time.perf_counter()
        pixels = engine.preprocess([case["image"]])
        t1 = time.perf_counter()
        ids, mask = engine.tokenize([case["text"]])
        t2 = time.perf_counter()
        z = engine.image(pixels)
        t3 = time.perf_counter()
        h = engine.text(ids, mask)
        t4 = time.perf_counter()
        engine.head(z, h)
        t5 = time.perf_counter()
        for name, a, b in zip(STAGES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            stages[name].append((b - a) * 1e3)
        total.append((t5 - t0) * 1e3)
    return total, stages


def throughput(engine, cases: list[dict], batch: int) -> dict:
    """Cases per second through encoders and head at one batch size (inputs already preprocessed)."""
    chosen = [cases[i % len(cases)] for i in range(batch)]
    pixels = engine.preprocess([c["image"] for c in chosen])
    ids, mask = engine.tokenize([c["text"] for c in chosen])
    engine.head(engine.image(pixels), engine.text(ids, mask))  # warm-up at this shape
    iterations = max(2, math.ceil(64 / batch))
    start = time.perf_counter()
    for _ in range(iterations):
        engine.head(engine.image(pixels), engine.text(ids, mask))
    seconds = time.perf_counter() - start
    return {"batch": batch, "cases_per_second": batch * iterations / seconds,
            "ms_per_batch": seconds / iterations * 1e3}


def run(spec: dict) -> dict:
    import psutil

    start = time.perf_counter()
    engine = (TorchEngine if spec["kind"] == "torch" else BundleEngine)(spec["path"], spec["threads"])
    load_seconds = time.perf_counter() - start
    rss_after_load = psutil.Process().memory_info().rss / 2**20
    cases = spec["cases"]
    single_stream(engine, cases, spec["warmup"])
    repeats, stage_runs = [], {s: [] for s in STAGES}
    for _ in range(spec["repeats"]):
        total, stages = single_stream(engine, cases, spec["runs"])
        repeats.append(total)
        for name in STAGES:
            stage_runs[name].extend(stages[name])
    single_stream_peak = peak_rss_mb()  # before large batches grow the activation arena
    return {
        "load_seconds": load_seconds,
        "rss_after_load_mb": rss_after_load,
        "latency_ms": repeated_summary(repeats),
        "stage_latency_ms": {name: latency_summary(v) for name, v in stage_runs.items()},
        "peak_rss_single_stream_mb": single_stream_peak,
        "throughput": [throughput(engine, cases, b) for b in spec["batches"]],
    }


if __name__ == "__main__":
    answer(run)
