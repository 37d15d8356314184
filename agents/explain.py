"""SHAP explanations of one case, computed on the site with the shap library and the bundle's graphs.

Each modality is explained on its own, as the paper does: the image's features are the ViT's patches
(masked to a baseline), the note's features are its tokens (masked with [MASK]). Owen values come
from shap's Partition explainer, which follows a hierarchy of the features (neighbouring patches,
tokens of a phrase) and so spends a fixed ``max_evals`` budget on the regions that matter.

Because the bundle ships its encoders as separate graphs, explaining the image reruns only the image
encoder with the note's embedding computed once, and the other way round: that, INT8 and batching
are what make an explanation take seconds on a CPU instead of minutes.

The explainers only need a *scorer*, a function from a batch of masked inputs to the explained
outputs, so the same code explains a bundle here and a torch teacher in the benchmark's reference.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from fedlite.agents.runtime import BundleRuntime
from fedlite.errors import InputError

# (n, ...) masked inputs -> (n, outputs) explained outputs
Scorer = Callable[[np.ndarray], np.ndarray]
BASELINES = ("mean", "black")


@dataclass(frozen=True)
class ExplainSettings:
    max_evals: int = 500  # model evaluations per modality (both outputs share them); shap's default
    baseline: str = "mean"  # masked patches: the smear's mean colour, or black
    batch_size: int = 16  # masked inputs per encoder call: larger batches only grow memory on CPUs
    modality_weight: float = 0.5  # λ of the joint profile [λ·φ̂_v ‖ (1 − λ)·φ̂_t]

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise InputError(f"unknown baseline {self.baseline!r}", hint=f"choose one of {', '.join(BASELINES)}")
        if self.max_evals < 10:
            raise InputError(f"--max-evals must be at least 10, got {self.max_evals}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        if not 0.0 <= self.modality_weight <= 1.0:
            raise InputError(f"the modality weight λ must be in [0, 1], got {self.modality_weight}")


@dataclass
class ModalityExplanation:
    """Owen values of one modality's features for every explained output."""

    values: np.ndarray  # (features, outputs)
    base_values: np.ndarray  # (outputs,): the outputs with every feature masked
    outputs: np.ndarray  # (outputs,): the outputs of the unmasked case
    evaluations: int
    seconds: float

    @property
    def additivity_error(self) -> np.ndarray:
        """|Σφ + base − f(x)| per output: how far the values are from adding up to the prediction."""
        return np.abs(self.values.sum(axis=0) + self.base_values - self.outputs)

    def top_features(self, output: int, k: int = 10) -> list[int]:
        """Indices of the k features with the largest |φ| for one output, largest first."""
        order = np.argsort(-np.abs(self.values[:, output]), kind="stable")
        return [int(i) for i in order[:k]]


def stage_phrase(name: str) -> str:
    """A stage as a sentence names it: 'Stage II' stays, a bare 'II' becomes 'stage II'."""
    return name if name.lower().startswith("stage") else f"stage {name}"


@dataclass
class CaseExplanation:
    output_names: list[str]  # ["P(leukemia)", "P(stage <predicted>)"]
    prediction: dict
    image: ModalityExplanation  # features: patches, row-major over the grid
    text: ModalityExplanation  # features: token positions of the (truncated) note, [CLS]/[SEP] included
    grid: int
    tokens: list[str]
    words: list[dict] = field(default_factory=list)  # {"text", "tokens": [positions]} for display
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def image_map(self, output: int) -> np.ndarray:
        return self.image.values[:, output].reshape(self.grid, self.grid)

    def word_values(self, output: int) -> list[float]:
        """A word's value is the sum over its WordPiece tokens (Owen values add up over coalitions)."""
        return [float(self.text.values[w["tokens"], output].sum()) for w in self.words]

    def describe(self, case_id: str) -> str:
        """One line: the case's prediction and how long explaining it took."""
        pred, took = self.prediction, self.timings
        return (f"{case_id}: {pred['leukemia']} (P = {pred['leukemia_probability']:.3f}"
                + (f", {stage_phrase(pred['stage'])}" if pred["stage"] else "") + f"), explained in "
                f"{took['total_seconds']:.2f} s (image {took['image_seconds']:.2f} s, note {took['text_seconds']:.2f} s)")

    def joint_profile(self, output: int, weight: float) -> np.ndarray:
        """Paper eq. 23: [λ·φ̂_v ‖ (1 − λ)·φ̂_t] with each part L2-normalised. The two halves are
        on a common scale for display; ranking one modality against the other is not meaningful."""
        return np.concatenate([weight * _unit(self.image.values[:, output]),
                               (1 - weight) * _unit(self.text.values[:, output])])


def import_shap():
    """shap, imported with numba's JIT off unless the user chose otherwise.

    shap compiles its numba kernels on first use in every process: 10-20 s on two cores, far longer
    than an explanation at these sizes (at most a few hundred features and evaluations), where the
    kernels' plain-Python versions take milliseconds. Only shap's own functions are affected: the
    setting is read when they are decorated, and the environment is restored right after.
    """
    if "shap" in sys.modules or "numba" in sys.modules or "NUMBA_DISABLE_JIT" in os.environ:
        import shap
        return shap
    os.environ["NUMBA_DISABLE_JIT"] = "1"
    try:
        import shap
    finally:
        del os.environ["NUMBA_DISABLE_JIT"]
    return shap


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _batched(score: Scorer, batch_size: int) -> Scorer:
    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate([score(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])
    return run


def _counting(score: Scorer) -> tuple[Scorer, list[int]]:
    count = [0]

    def run(x: np.ndarray) -> np.ndarray:
        count[0] += len(x)
        return score(x)
    return run, count


def patch_baseline(pixels: np.ndarray, mode: str, mean: tuple, std: tuple) -> np.ndarray:
    """The (3, H, W) image a masked patch shows: the smear's own mean colour, or black, normalised
    as the encoder expects."""
    if mode == "mean":
        return np.broadcast_to(pixels.mean(axis=(1, 2), keepdims=True), pixels.shape).astype(np.float32)
    black = (0.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.broadcast_to(black[:, None, None], pixels.shape).astype(np.float32)


def explain_image(score_pixels: Scorer, pixels: np.ndarray, baseline: np.ndarray, patch: int,
                  settings: ExplainSettings) -> ModalityExplanation:
    """Owen values of the (H/patch)² patches of one (3, H, W) image.

    shap masks a grid of ones (its Image masker and partition tree over the grid); each masked grid
    becomes the image with the masked patches taken from ``baseline``.
    """
    shap = import_shap()
    grid = pixels.shape[-1] // patch

    def score_masks(masks: np.ndarray) -> np.ndarray:
        keep = masks.reshape(len(masks), grid, grid) > 0.5
        keep = np.repeat(np.repeat(keep, patch, axis=1), patch, axis=2)[:, None]
        return score_pixels(np.where(keep, pixels[None], baseline[None]).astype(np.float32))

    scorer, count = _counting(_batched(score_masks, settings.batch_size))
    start = time.perf_counter()
    full = scorer(np.ones((1, grid * grid), np.float32))[0]
    explainer = shap.explainers.Partition(scorer, shap.maskers.Image(0.0, shape=(grid, grid, 1)))
    result = explainer(np.ones((1, grid, grid, 1), np.float32), max_evals=settings.max_evals,
                       batch_size=settings.batch_size, silent=True)
    values = np.asarray(result.values[0]).reshape(grid * grid, -1)
    return ModalityExplanation(values, np.asarray(result.base_values[0]).reshape(-1), full, count[0],
                               time.perf_counter() - start)


class NoteTokenizer:
    """The bundle's `tokenizers` tokenizer in the call shape shap's Text masker expects, truncating
    to the model's window exactly as prediction does."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, text: str):
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)
        return self.tokenizer.encode(text)

    def __call__(self, text: str, return_offsets_mapping: bool = False) -> dict:
        encoding = self.encode(text)
        out = {"input_ids": list(encoding.ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = [tuple(o) for o in encoding.offsets]
        return out


def explain_text(score_ids: Scorer, note: str, tokenizer: NoteTokenizer, mask_id: int,
                 settings: ExplainSettings) -> ModalityExplanation:
    """Owen values of the note's tokens; a masked token becomes [MASK] (the sequence keeps its length)."""
    shap = import_shap()
    scorer, count = _counting(_batched(score_ids, settings.batch_size))
    start = time.perf_counter()
    full = scorer(np.asarray([tokenizer(note)["input_ids"]], dtype=np.int64))[0]
    masker = shap.maskers.Text(tokenizer, mask_token=int(mask_id), output_type="token_ids")
    result = shap.explainers.Partition(scorer, masker)([note], max_evals=settings.max_evals,
                                                       batch_size=settings.batch_size, silent=True)
    values = np.asarray(result.values[0]).reshape(len(result.values[0]), -1)
    return ModalityExplanation(values, np.asarray(result.base_values[0]).reshape(-1), full, count[0],
                               time.perf_counter() - start)


def group_words(encoding) -> list[dict]:
    """WordPiece tokens grouped into the words a reader sees; special tokens are left out."""
    words: list[dict] = []
    last = None
    for position, (word_id, (begin, end)) in enumerate(zip(encoding.word_ids, encoding.offsets)):
        if word_id is None:
            continue
        if word_id == last:
            words[-1]["tokens"].append(position)
            words[-1]["end"] = end
        else:
            words.append({"tokens": [position], "begin": begin, "end": end})
        last = word_id
    return words


def explain_case(runtime: BundleRuntime, pixels: np.ndarray, note: str,
                 settings: ExplainSettings = ExplainSettings()) -> CaseExplanation:
    """Both modalities of one case, for P(leukemia) and P(predicted stage), with the bundle.

    ``pixels``: the preprocessed (3, H, W) image. The note must already be checked.
    """
    start = time.perf_counter()
    tokenizer = NoteTokenizer(runtime.tokenizer, runtime.max_length)
    encoding = tokenizer.encode(note)
    ids = np.asarray([encoding.ids], dtype=np.int64)
    ones = np.ones_like(ids)
    z = runtime.embed_images(pixels[None])
    h = runtime.embed_texts(ids, ones)
    leukemia, stage = runtime.head(z, h)
    stage_index = int(stage[0].argmax())
    embed_seconds = time.perf_counter() - start

    def outputs(z_batch: np.ndarray, h_batch: np.ndarray) -> np.ndarray:
        p_leukemia, p_stage = runtime.head(z_batch, h_batch)
        return np.stack([p_leukemia[:, 1], p_stage[:, stage_index]], axis=1)

    def score_pixels(batch: np.ndarray) -> np.ndarray:
        return outputs(runtime.embed_images(batch), np.repeat(h, len(batch), axis=0))

    def score_ids(batch: np.ndarray) -> np.ndarray:
        batch = batch.astype(np.int64, copy=False)
        return outputs(np.repeat(z, len(batch), axis=0), runtime.embed_texts(batch, np.ones_like(batch)))

    mask_id = runtime.tokenizer.token_to_id("[MASK]")
    if mask_id is None:
        raise InputError("the bundle's tokenizer has no [MASK] token to mask notes with",
                         path=runtime.path / runtime.meta["tokenizer"])
    patch = int(runtime.meta["model"]["patch_size"])
    baseline = patch_baseline(pixels, settings.baseline, runtime.mean, runtime.std)
    image = explain_image(score_pixels, pixels, baseline, patch, settings)
    text = explain_text(score_ids, note, tokenizer, mask_id, settings)
    positive = bool(leukemia[0, 1] >= 0.5)
    stage_name = runtime.stage_names[stage_index]
    prediction = {
        "leukemia": runtime.label_names[int(positive)],
        "leukemia_probability": float(leukemia[0, 1]),
        "stage": stage_name if positive else None,
        "explained_stage": stage_name,
        "stage_probabilities": {n: float(p) for n, p in zip(runtime.stage_names, stage[0])},
        "note_truncated": bool(encoding.overflowing),
    }
    return CaseExplanation(
        output_names=["P(leukemia)", f"P({stage_phrase(stage_name)})"], prediction=prediction, image=image, text=text,
        grid=pixels.shape[-1] // patch, tokens=list(encoding.tokens), words=group_words(encoding),
        timings={"embed_seconds": embed_seconds, "image_seconds": image.seconds, "text_seconds": text.seconds,
                 "total_seconds": time.perf_counter() - start},
        settings=asdict(settings))
