"""Poor slides on purpose: Gaussian blur and Gaussian noise of a given strength, applied to a
dataset's images into a corrupted copy, so a model and its bundle can be scored on how they hold up
(the robustness comparison of the seed literature). Deterministic: the same strength and seed give
the same pixels, and a stronger corruption moves every image further from the original.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from fedlite.atomic import staged_dir
from fedlite.data.images import load_image
from fedlite.data.manifest import Dataset, DatasetInfo, read_dataset, write_dataset
from fedlite.errors import InputError

# strength: the blur's standard deviation in pixels; the noise's in units of the full 0-255 range
CORRUPTIONS = ("blur", "noise")


def corrupt(rgb: np.ndarray, kind: str, strength: float, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image with ``kind`` applied at ``strength`` (0: unchanged)."""
    if kind not in CORRUPTIONS:
        raise InputError(f"unknown corruption {kind!r}", hint=f"one of {', '.join(CORRUPTIONS)}")
    if not strength >= 0:
        raise InputError(f"a corruption's strength must be >= 0, got {strength}")
    if strength == 0:
        return rgb.copy()
    if kind == "blur":
        return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius=strength)), dtype=np.uint8)
    noise = np.random.default_rng(seed).standard_normal(rgb.shape) * strength * 255
    return np.clip(np.rint(rgb.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def corrupted_copy(data: str | Path, out: str | Path, kind: str, strength: float, seed: int = 0,
                   force: bool = False, progress: bool = True) -> Dataset:
    """The dataset with every image corrupted, written to ``out`` (PNG images, the same cases and
    labels); each case's noise is seeded by its position, so the copy is reproducible."""
    from tqdm.auto import tqdm

    source = read_dataset(data)
    with staged_dir(out, force=force, what="corrupted dataset") as staged:
        (staged / "images").mkdir()
        cases = []
        for i, case in enumerate(tqdm(source.cases, desc=f"{kind} {strength:g}", unit="case", disable=not progress,
                                      leave=False)):
            image = f"images/{i:06d}.png"
            Image.fromarray(corrupt(load_image(source.image_path(case)), kind, strength, seed=seed + i)).save(
                staged / image)
            cases.append(replace(case, image=image))
        info = DatasetInfo(source.info.stage_names, source.info.label_names,
                           {k: v for k, v in source.info.extra.items() if k != "image_dirs"}
                           | {"corruption": {"kind": kind, "strength": strength, "seed": seed, "of": str(data)}})
        write_dataset(staged, info, cases)
    return read_dataset(out)
