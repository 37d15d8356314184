"""Cases as precomputed embeddings, batched as the training loops take them: what frozen-encoder
training (a federated run's frozen rounds, a hospital agent's edge rounds) feeds the fusion layer and
heads instead of pixels and token ids.

An image may have several embeddings, one per augmented view of it; epoch k of training reads view
(offset + k) mod V, so a run's epochs walk through the views as the uncached path draws a fresh
augmentation each epoch. A note has one (notes are not augmented).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class EmbeddedCases(Dataset):
    def __init__(self, image_views: dict[int, np.ndarray] | None, text: np.ndarray | None, leukemia: np.ndarray,
                 stage: np.ndarray, views: int = 1, epoch_offset: int = 0) -> None:
        """``image_views``: view → (n, d) array, holding at least the views the epochs to come read
        (None: no image modality); ``text``: (n, d) or None."""
        self.image_views = {v: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                            for v, a in (image_views or {}).items()}
        self.text = None if text is None else torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32))
        self.leukemia = torch.as_tensor(leukemia, dtype=torch.long)
        self.stage = torch.as_tensor(stage, dtype=torch.long)
        self.views, self.epoch_offset = views, epoch_offset
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.leukemia)

    def set_epoch(self, epoch: int) -> None:
        self.view = (self.epoch_offset + epoch) % self.views
        if self.image_views and self.view not in self.image_views:
            raise ValueError(f"epoch {epoch} reads view {self.view}, which was not embedded")

    def __getitem__(self, i: int) -> dict:
        item = {"leukemia": self.leukemia[i], "stage": self.stage[i]}
        if self.image_views:
            item["image_embedding"] = self.image_views[self.view][i]
        if self.text is not None:
            item["text_embedding"] = self.text[i]
        return item


def embedding_loader(cases: EmbeddedCases, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(cases, batch_size=batch_size, shuffle=shuffle, generator=generator)
