"""Running a bundle with ONNX Runtime alone: the hospital agent's inference path.

Nothing here imports torch, timm or transformers. Images and notes are preprocessed by the same
functions training used (``fedlite.data.images``, ``fedlite.text``) with the settings recorded in the
bundle. Sessions do not busy-spin their threads, so a shared hospital server keeps its cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedlite.data.images import load_image, normalize, preprocess_image, resize
from fedlite.data.manifest import Dataset
from fedlite.errors import InputError
from fedlite.export.bundle import read_bundle_meta, verify_bundle
from fedlite.text import encode_notes, load_tokenizer, pad_id, pad_token_ids


@dataclass(frozen=True)
class RuntimeSettings:
    threads: int = 0  # 0: min(4, cores)
    memory_arena: bool = True
    spin: bool = False

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or min(4, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = self.memory_arena
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return opts


@dataclass
class Prediction:
    leukemia_prob: np.ndarray  # (n, 2)
    stage_prob: np.ndarray  # (n, K)
    truncated_notes: int = 0


class BundleRuntime:
    """A verified bundle's three graphs, its tokenizer and its preprocessing."""

    def __init__(self, bundle: str | Path, settings: RuntimeSettings | None = None, verify: bool = True,
                 public_key: str | Path | None = None) -> None:
        """``public_key``: the bundle must be signed by its holder (``export/signing.py``)."""
        self.path = Path(bundle)
        self.meta = verify_bundle(self.path, public_key) if verify else read_bundle_meta(self.path)
        self.settings = settings or RuntimeSettings()
        opts = self.settings.session_options()
        graphs = self.meta["graphs"]
        self.sessions = {name: ort.InferenceSession(str(self.path / spec["file"]), opts,
                                                    providers=["CPUExecutionProvider"])
                         for name, spec in graphs.items()}
        self.tokenizer = load_tokenizer(self.path / self.meta["tokenizer"])
        self.pad_id = pad_id(self.tokenizer)
        prep = self.meta["preprocessing"]
        self.image_size, self.mean, self.std = prep["image_size"], prep["mean"], prep["std"]
        self.max_length = prep["max_length"]

    @property
    def label_names(self) -> list[str]:
        return self.meta["label_names"]

    @property
    def stage_names(self) -> list[str]:
        return self.meta["stage_names"]

    def load_images(self, paths: list[str | Path]) -> np.ndarray:
        return np.stack([preprocess_image(p, self.image_size, self.mean, self.std) for p in paths])

    def load_smear(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """One decode for both uses: the resized RGB smear a report shows, and the encoder's input."""
        smear = resize(load_image(path), self.image_size)
        return smear, normalize(smear, self.mean, self.std)

    def tokenize(self, notes: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Token ids and attention mask padded to the longest note; also how many notes were cut."""
        encoded = encode_notes(self.tokenizer, notes, self.max_length)
        ids, mask = pad_token_ids(encoded.ids, self.pad_id)
        return ids, mask, encoded.truncated

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions["image_encoder"].run(None, {"pixels": pixels.astype(np.float32, copy=False)})[0]

    def embed_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.sessions["text_encoder"].run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def head(self, image_embedding: np.ndarray, text_embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        leukemia, stage = self.sessions["head"].run(
            None, {"image_embedding": image_embedding, "text_embedding": text_embedding})
        if not (np.isfinite(leukemia).all() and np.isfinite(stage).all()):
            raise InputError("the bundle computed a probability that is NaN or Inf: the model is broken and "
                             "its calls must not be used", path=self.path, hint="reinstall a verified bundle")
        return leukemia, stage

    def predict(self, pixels: np.ndarray, notes: list[str]) -> Prediction:
        ids, mask, truncated = self.tokenize(notes)
        leukemia, stage = self.head(self.embed_images(pixels), self.embed_texts(ids, mask))
        return Prediction(leukemia, stage, truncated)

    def predict_dataset(self, dataset: Dataset, batch_size: int = 16, progress: bool = False) -> Prediction:
        """Every case of a manifest dataset, in manifest order."""
        from tqdm.auto import tqdm

        leukemia, stage, truncated = [], [], 0
        cases = dataset.cases
        for start in tqdm(range(0, len(cases), batch_size), desc="bundle", disable=not progress,
                          leave=False, unit="batch"):
            chunk = cases[start: start + batch_size]
            pred = self.predict(self.load_images([dataset.image_path(c) for c in chunk]), [c.text for c in chunk])
            leukemia.append(pred.leukemia_prob)
            stage.append(pred.stage_prob)
            truncated += pred.truncated_notes
        return Prediction(np.concatenate(leukemia), np.concatenate(stage), truncated)
