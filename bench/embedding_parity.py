"""How much INT8 quantization moves a bundle: embeddings and predictions of two bundles of the same
model (typically FP32 and INT8) on the same cases.

Random weights hide quantization error (their activations have no outliers), so run it on a bundle
whose encoders carry real pretrained weights, e.g. a text encoder from a local BERT checkpoint:

    fedlite bench embedding-parity FP32_BUNDLE INT8_BUNDLE --data DATA/split/test
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from fedlite.agents.runtime import BundleRuntime
from fedlite.data.manifest import read_dataset
from fedlite.export.parity import agreement


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def embedding_drift(reference: np.ndarray, candidate: np.ndarray) -> dict:
    cos = cosine_rows(reference, candidate)
    rel = np.linalg.norm(reference - candidate, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "relative_l2_mean": float(rel.mean()), "relative_l2_max": float(rel.max())}


def compare_bundles(reference: Path, candidate: Path, data: Path, batch_size: int = 16) -> dict:
    runtimes = {"reference": BundleRuntime(reference), "candidate": BundleRuntime(candidate)}
    dataset = read_dataset(data)
    collected: dict[str, dict[str, list]] = {k: {"z": [], "h": [], "p": [], "s": []} for k in runtimes}
    for start in range(0, len(dataset), batch_size):
        chunk = dataset.cases[start: start + batch_size]
        for name, rt in runtimes.items():
            pixels = rt.load_images([dataset.image_path(c) for c in chunk])
            ids, mask, _ = rt.tokenize([c.text for c in chunk])
            z, h = rt.embed_images(pixels), rt.embed_texts(ids, mask)
            p, s = rt.head(z, h)
            for key, value in zip("zhps", (z, h, p, s)):
                collected[name][key].append(value)
    ref = {k: np.concatenate(v) for k, v in collected["reference"].items()}
    cand = {k: np.concatenate(v) for k, v in collected["candidate"].items()}
    return {
        "reference": {"bundle": str(reference), "quantization": runtimes["reference"].meta["quantization"]},
        "candidate": {"bundle": str(candidate), "quantization": runtimes["candidate"].meta["quantization"]},
        "cases": len(dataset),
        "image_embedding": embedding_drift(ref["z"], cand["z"]),
        "text_embedding": embedding_drift(ref["h"], cand["h"]),
        "predictions": agreement((ref["p"], ref["s"]), (cand["p"], cand["s"])),
    }


@click.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Dataset directory of cases.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
def main(reference: Path, candidate: Path, data: Path, out: Path | None) -> None:
    report = compare_bundles(reference, candidate, data)
    text = json.dumps(report, indent=2)
    click.echo(text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
