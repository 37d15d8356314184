"""Procedural peripheral-blood-smear images for the embedded synthetic dataset.

The images only need to carry a learnable, imperfect signal: leukemic blasts are large purple cells
whose number grows with stage, while "sparse" and "noisy" images hide most of that signal so the
clinical note has to carry the case. Every cell is painted inside its own bounding box, which keeps
a 224x224 image at a few milliseconds even with a hundred cells.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

SIZE = 224
QUALITIES = ("clear", "sparse", "noisy")
LINEAGES = ("myeloid", "lymphoid")

BACKGROUND = np.array([236.0, 216.0, 222.0], dtype=np.float32)
RED_CELL = np.array([214.0, 128.0, 142.0], dtype=np.float32)
NEUTROPHIL_CYTOPLASM = np.array([224.0, 198.0, 214.0], dtype=np.float32)
NEUTROPHIL_NUCLEUS = np.array([92.0, 40.0, 116.0], dtype=np.float32)
LYMPHOCYTE_CYTOPLASM = np.array([152.0, 172.0, 222.0], dtype=np.float32)
LYMPHOCYTE_NUCLEUS = np.array([74.0, 32.0, 104.0], dtype=np.float32)
BLAST_CYTOPLASM = np.array([168.0, 166.0, 214.0], dtype=np.float32)
BLAST_NUCLEUS = np.array([124.0, 68.0, 160.0], dtype=np.float32)
NUCLEOLUS = np.array([178.0, 142.0, 198.0], dtype=np.float32)
AUER_ROD = np.array([206.0, 56.0, 98.0], dtype=np.float32)

# Whole-image coordinates, built once: only the background uses them.
_ROWS, _COLS = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5


def render_smear(rng: np.random.Generator, leukemia: int, stage: int | None,
                 lineage: str | None, quality: str, num_stages: int = 4) -> np.ndarray:
    """One smear as a (224, 224, 3) uint8 array; all randomness comes from ``rng``."""
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
    severity = _severity(leukemia, stage, num_stages)
    canvas = _background(rng)
    sparse = quality == "sparse"
    n_red = int(rng.integers(2, 15)) if sparse else _red_cell_count(rng, severity)
    for _ in range(n_red):
        _red_cell(canvas, rng)
    kinds = _white_cells_sparse(rng, leukemia) if sparse else _white_cells(rng, leukemia, severity)
    for kind, (cy, cx, radius) in _place(rng, kinds):
        if kind == "blast":
            _blast(canvas, rng, cy, cx, radius, lineage == "myeloid")
        elif kind == "neutrophil":
            _neutrophil(canvas, rng, cy, cx, radius)
        else:
            _lymphocyte(canvas, rng, cy, cx, radius)
    if quality == "noisy":
        return _degrade(canvas, rng)
    return _finish(canvas, rng, blur=float(rng.uniform(0.4, 0.8)), noise=float(rng.uniform(2.0, 4.0)))


def _severity(leukemia: int, stage: int | None, num_stages: int) -> float:
    """Stage as a fraction 0..1 so counts scale the same way for any number of stages."""
    if not leukemia:
        return 0.0
    if stage is None:
        raise ValueError("a positive case needs a stage")
    return stage / max(num_stages - 1, 1)


def _red_cell_count(rng: np.random.Generator, severity: float) -> int:
    # Fewer red cells at higher stage: the marrow is crowded out (anaemia), a weak extra cue.
    return int(np.clip(rng.normal(66 - 22 * severity, 8), 25, 90))


def _white_cells(rng: np.random.Generator, leukemia: int, severity: float) -> list[tuple[str, float]]:
    """Kinds and radii of white cells: blast count and blast fraction both rise with stage."""
    cells: list[tuple[str, float]] = []
    if leukemia:
        n_blasts = 1 + int(rng.poisson(0.8 + 6.0 * severity))
        fraction = float(np.clip(0.35 + 0.6 * severity + rng.normal(0, 0.1), 0.2, 1.0))
        n_other = int(round(n_blasts * (1 - fraction) / fraction))
        cells += [("blast", float(rng.uniform(16.0, 23.0))) for _ in range(n_blasts)]
    else:
        n_other = 1 + int(rng.poisson(1.6))
    for _ in range(n_other):
        cells.append(_normal_white_cell(rng))
    return cells


def _white_cells_sparse(rng: np.random.Generator, leukemia: int) -> list[tuple[str, float]]:
    """Mostly no white cell at all; when one is there it only sometimes is a blast."""
    if rng.random() >= 0.4:
        return []
    if leukemia and rng.random() < 0.5:
        return [("blast", float(rng.uniform(16.0, 23.0)))]
    return [_normal_white_cell(rng)]


def _normal_white_cell(rng: np.random.Generator) -> tuple[str, float]:
    if rng.random() < 0.6:
        return "neutrophil", float(rng.uniform(12.0, 15.0))
    # Some reactive lymphocytes are larger, so size alone is not a perfect blast detector.
    reactive = rng.random() < 0.15
    return "lymphocyte", float(rng.uniform(11.0, 13.5) if reactive else rng.uniform(8.0, 10.5))


def _place(rng: np.random.Generator, kinds: list[tuple[str, float]]):
    """Positions with little white-cell overlap; a cell that finds no room is left out."""
    placed: list[tuple[str, tuple[float, float, float]]] = []
    for kind, radius in kinds:
        for _ in range(30):
            cy, cx = rng.uniform(radius * 0.6, SIZE - radius * 0.6, size=2)
            if all((cy - y) ** 2 + (cx - x) ** 2 >= (0.9 * (radius + r)) ** 2 for _, (y, x, r) in placed):
                placed.append((kind, (float(cy), float(cx), radius)))
                break
    return placed


def _background(rng: np.random.Generator) -> np.ndarray:
    tint = BACKGROUND + rng.normal(0, 4, 3).astype(np.float32)
    slope_y, slope_x = rng.uniform(-0.12, 0.12, 2)
    light = 1.0 + slope_y * _ROWS + slope_x * _COLS
    return np.clip(light[..., None] * tint, 0, 255).astype(np.float32)


def _ellipse(cy: float, cx: float, ry: float, rx: float, angle: float = 0.0):
    """Box slices plus the normalised elliptic radius (1 at the edge) over that box only."""
    reach = max(ry, rx) + 2.0
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, SIZE)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, SIZE)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    cos, sin = math.cos(angle), math.sin(angle)
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    return (slice(y0, y1), slice(x0, x1)), rho


def _coverage(rho: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased inside-ness: about one pixel of soft edge."""
    return np.clip((1.0 - rho) * radius + 0.5, 0.0, 1.0)


def _blend(canvas: np.ndarray, box, alpha: np.ndarray, color) -> None:
    region = canvas[box]
    region += alpha[..., None] * (color - region)


def _jitter(rng: np.random.Generator, color: np.ndarray, spread: float) -> np.ndarray:
    return color + rng.normal(0, spread, 3).astype(np.float32)


def _red_cell(canvas: np.ndarray, rng: np.random.Generator) -> None:
    radius = float(rng.uniform(8.5, 11.5))
    cy, cx = rng.uniform(-4, SIZE + 4, 2)
    shape = _ellipse(cy, cx, radius * rng.uniform(0.9, 1.0), radius, float(rng.uniform(0, math.pi)))
    if shape is None:
        return
    box, rho = shape
    base = _jitter(rng, RED_CELL, 5)
    pallor = np.clip(1.0 - rho / 0.55, 0.0, 1.0) ** 1.5 * 0.7
    rim = np.clip((rho - 0.75) / 0.25, 0.0, 1.0) * 0.08
    color = base * (1.0 - rim[..., None]) + pallor[..., None] * (BACKGROUND - base)
    # Slightly translucent, so overlapping cells look darker where they stack.
    _blend(canvas, box, _coverage(rho, radius) * 0.88, color)


def _neutrophil(canvas: np.ndarray, rng: np.random.Generator, cy: float, cx: float, radius: float) -> None:
    shape = _ellipse(cy, cx, radius, radius)
    if shape is None:
        return
    box, rho = shape
    granules = rng.normal(0, 7, rho.shape).astype(np.float32)[..., None]
    _blend(canvas, box, _coverage(rho, radius), _jitter(rng, NEUTROPHIL_CYTOPLASM, 4) + granules)
    lobes = int(rng.choice([2, 3, 3, 4, 4, 5]))
    start = float(rng.uniform(0, 2 * math.pi))
    span = float(rng.uniform(2.8, 4.4))
    arc = radius * 0.42
    color = _jitter(rng, NEUTROPHIL_NUCLEUS, 5)
    for i in range(lobes):
        theta = start + span * i / max(lobes - 1, 1)
        ly, lx = cy + arc * math.sin(theta), cx + arc * math.cos(theta)
        lobe_r = float(rng.uniform(3.2, 4.5))
        lobe = _ellipse(ly, lx, lobe_r * 0.8, lobe_r, theta + math.pi / 2)
        if lobe is not None:
            lbox, lrho = lobe
            _blend(canvas, lbox, _coverage(lrho, lobe_r * 0.8), color)


def _lymphocyte(canvas: np.ndarray, rng: np.random.Generator, cy: float, cx: float, radius: float) -> None:
    shape = _ellipse(cy, cx, radius, radius * rng.uniform(0.95, 1.05))
    if shape is None:
        return
    box, rho = shape
    _blend(canvas, box, _coverage(rho, radius), _jitter(rng, LYMPHOCYTE_CYTOPLASM, 5))
    nucleus_r = radius * float(rng.uniform(0.72, 0.85))
    shift = radius - nucleus_r
    ny, nx = cy + rng.uniform(-shift, shift) * 0.6, cx + rng.uniform(-shift, shift) * 0.6
    nucleus = _ellipse(ny, nx, nucleus_r, nucleus_r * rng.uniform(0.9, 1.0), float(rng.uniform(0, math.pi)))
    if nucleus is not None:
        nbox, nrho = nucleus
        clumps = rng.normal(0, 9, nrho.shape).astype(np.float32)[..., None]
        _blend(canvas, nbox, _coverage(nrho, nucleus_r), _jitter(rng, LYMPHOCYTE_NUCLEUS, 4) + clumps)


def _blast(canvas: np.ndarray, rng: np.random.Generator, cy: float, cx: float, radius: float,
           myeloid: bool) -> None:
    """Large cell, large fine-chromatin nucleus, pale nucleoli, sometimes an Auer rod."""
    shape = _ellipse(cy, cx, radius * rng.uniform(0.9, 1.0), radius, float(rng.uniform(0, math.pi)))
    if shape is None:
        return
    box, rho = shape
    _blend(canvas, box, _coverage(rho, radius), _jitter(rng, BLAST_CYTOPLASM, 5))
    # The nucleus sits off-centre, leaving a crescent of cytoplasm on the far side.
    toward = float(rng.uniform(0, 2 * math.pi))
    offset = radius * float(rng.uniform(0.08, 0.15))
    ny, nx = cy + offset * math.sin(toward), cx + offset * math.cos(toward)
    nucleus_r = radius * float(rng.uniform(0.74, 0.82))
    nucleus = _ellipse(ny, nx, nucleus_r * rng.uniform(0.85, 1.0), nucleus_r, float(rng.uniform(0, math.pi)))
    if nucleus is not None:
        nbox, nrho = nucleus
        chromatin = rng.normal(0, 5, nrho.shape).astype(np.float32)[..., None]
        _blend(canvas, nbox, _coverage(nrho, nucleus_r), _jitter(rng, BLAST_NUCLEUS, 5) + chromatin)
    for _ in range(int(rng.integers(1, 4))):
        dist = nucleus_r * float(rng.uniform(0.0, 0.5))
        theta = float(rng.uniform(0, 2 * math.pi))
        size = float(rng.uniform(1.8, 3.0))
        spot = _ellipse(ny + dist * math.sin(theta), nx + dist * math.cos(theta), size, size)
        if spot is not None:
            sbox, srho = spot
            _blend(canvas, sbox, _coverage(srho, size) * 0.85, NUCLEOLUS)
    if myeloid and rng.random() < 0.6:
        away = toward + math.pi + float(rng.uniform(-0.4, 0.4))
        dist = radius * 0.84
        length = float(rng.uniform(3.0, 5.0))
        rod = _ellipse(cy + dist * math.sin(away), cx + dist * math.cos(away), 0.9, length, away + math.pi / 2)
        if rod is not None:
            rbox, rrho = rod
            _blend(canvas, rbox, _coverage(rrho, 1.2) * 0.9, AUER_ROD)


def _finish(canvas: np.ndarray, rng: np.random.Generator, blur: float, noise: float) -> np.ndarray:
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, noise, pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _degrade(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heavy blur, washed-out contrast, a colour cast and strong noise: a barely usable slide."""
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(float(rng.uniform(2.5, 4.5)))), dtype=np.float32)
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    pixels = mean + (pixels - mean) * float(rng.uniform(0.35, 0.6))
    pixels *= rng.uniform(0.7, 1.3, 3).astype(np.float32)
    pixels += float(rng.uniform(-25, 25))
    pixels += rng.normal(0, float(rng.uniform(30, 50)), pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)
