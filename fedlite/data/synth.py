"""The embedded default dataset: smear images paired with clinical notes, generated offline.

Each case independently gets an image quality and a note detail, so for some cases only the image
is informative, for some only the note, for some both and for some neither: a model that fuses both
modalities can beat either alone. Every case draws from its own ``default_rng([seed, index, ...])``
streams, so the bytes written do not depend on the number of workers.
"""

from __future__ import annotations

import io
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from fedlite import __version__
from fedlite.atomic import staged_dir
from fedlite.data.manifest import DEFAULT_STAGE_NAMES, Case, Dataset, DatasetInfo, write_dataset
from fedlite.data.notes import write_note
from fedlite.data.smear import LINEAGES, render_smear
from fedlite.errors import InputError

IMAGE_DIR = "images"
JPEG_QUALITY = 92
QUALITY_MIX = {"clear": 0.6, "sparse": 0.2, "noisy": 0.2}
DETAIL_MIX = {"full": 0.45, "partial": 0.3, "vague": 0.25}
# Stream tags in ``default_rng([seed, index, tag])``: separate streams keep a change to one modality
# from reshuffling the other. Never 0: NumPy seeds [s, i, 0] and [s, i] identically.
_PLAN_STREAM, _IMAGE_STREAM, _NOTE_STREAM, _LABEL_STREAM = 1, 2, 3, 4
CHUNK = 32


def synthesize(out_dir: str | Path, n_cases: int = 5400, seed: int = 0, positive_fraction: float = 0.55,
               num_stages: int = 4, workers: int | None = None, progress: bool = True,
               force: bool = False) -> Dataset:
    """Generate a dataset directory; it appears complete at ``out_dir`` or not at all."""
    out_dir = Path(out_dir)
    _check_arguments(out_dir, n_cases, seed, positive_fraction, num_stages, force)
    n_cases, seed, num_stages, positive_fraction = int(n_cases), int(seed), int(num_stages), float(positive_fraction)
    labels = plan_labels(n_cases, seed, positive_fraction, num_stages)
    with staged_dir(out_dir, force=True, what="dataset") as staging:
        (staging / IMAGE_DIR).mkdir()
        width = max(5, len(str(n_cases)))
        tasks = [(staging, seed, index, width, leukemia, stage, num_stages)
                 for index, (leukemia, stage) in enumerate(labels)]
        cases = _run(tasks, workers, progress)
        info = DatasetInfo(stage_names=stage_names(num_stages),
                           extra={"generator": _generator_settings(n_cases, seed, positive_fraction, num_stages)})
        write_dataset(staging, info, cases)
    return Dataset(root=out_dir, info=info, cases=cases)


def stage_names(num_stages: int) -> tuple[str, ...]:
    if num_stages == len(DEFAULT_STAGE_NAMES):
        return DEFAULT_STAGE_NAMES
    return tuple(f"Stage {k}" for k in range(1, num_stages + 1))


def plan_labels(n_cases: int, seed: int, positive_fraction: float, num_stages: int) -> list[tuple[int, int | None]]:
    """Exact positive count and stages as equal as possible, shuffled; depends on seed and n_cases only."""
    rng = np.random.default_rng([seed, n_cases, _LABEL_STREAM])
    n_positive = round(n_cases * positive_fraction)
    stages = rng.permutation(np.arange(n_positive) % num_stages)
    labels: list[tuple[int, int | None]] = [(1, int(s)) for s in stages] + [(0, None)] * (n_cases - n_positive)
    order = rng.permutation(n_cases)
    return [labels[i] for i in order]


def _check_arguments(out_dir: Path, n_cases: int, seed: int, positive_fraction: float, num_stages: int,
                     force: bool) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"the seed must be a non-negative whole number, got {seed!r}")
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 1:
        raise InputError(f"the number of cases must be a whole number of at least 1, got {n_cases!r}")
    if not 0 < positive_fraction < 1:
        raise InputError(f"the positive fraction must be strictly between 0 and 1, got {positive_fraction!r}")
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)) or num_stages < 2:
        raise InputError(f"the number of stages must be a whole number of at least 2, got {num_stages!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("exists and is not a directory", path=out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError("the output directory already exists and is not empty", path=out_dir,
                         hint="choose a new directory or pass force to replace it")


def _generator_settings(n_cases: int, seed: int, positive_fraction: float, num_stages: int) -> dict:
    return {"name": "fedlite.data.synth", "fedlite_version": __version__, "seed": seed, "n_cases": n_cases,
            "positive_fraction": positive_fraction, "num_stages": num_stages,
            "image_quality_mix": QUALITY_MIX, "note_detail_mix": DETAIL_MIX}


def _run(tasks: list[tuple], workers: int | None, progress: bool) -> list[Case]:
    chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="synthesizing cases", unit="case")
    cases: list[Case] = []
    try:
        if workers == 1:
            results = map(_make_chunk, chunks)
            for chunk_cases in results:
                cases += chunk_cases
                if bar is not None:
                    bar.update(len(chunk_cases))
        else:
            with Pool(workers) as pool:
                for chunk_cases in pool.imap(_make_chunk, chunks):
                    cases += chunk_cases
                    if bar is not None:
                        bar.update(len(chunk_cases))
    finally:
        if bar is not None:
            bar.close()
    return cases


def _make_chunk(tasks: list[tuple]) -> list[Case]:
    return [make_case(*task) for task in tasks]


def make_case(root: Path, seed: int, index: int, width: int, leukemia: int, stage: int | None,
              num_stages: int) -> Case:
    """Render, encode and write one case's image, and return its manifest record."""
    plan = np.random.default_rng([seed, index, _PLAN_STREAM])
    lineage = str(plan.choice(LINEAGES)) if leukemia else None
    quality = str(plan.choice(list(QUALITY_MIX), p=list(QUALITY_MIX.values())))
    detail = str(plan.choice(list(DETAIL_MIX), p=list(DETAIL_MIX.values())))
    pixels = render_smear(np.random.default_rng([seed, index, _IMAGE_STREAM]), leukemia, stage, lineage,
                          quality, num_stages=num_stages)
    text = write_note(np.random.default_rng([seed, index, _NOTE_STREAM]), leukemia, stage, lineage, detail,
                      num_stages=num_stages)
    case_id = f"case-{index + 1:0{width}d}"
    image = f"{IMAGE_DIR}/{case_id}.jpg"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    (root / image).write_bytes(buffer.getvalue())
    return Case(id=case_id, image=image, text=text, leukemia=leukemia, stage=stage)
