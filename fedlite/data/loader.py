"""Batches for training and evaluation: images preprocessed exactly as the agent does, the paper's
augmentations (flip, Gaussian noise, colour jitter) on training batches, notes tokenized once and
padded per batch to the longest note in it."""

from __future__ import annotations

import logging

import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from fedlite.data.images import IMAGE_SIZE, MEAN, STD, preprocess_image
from fedlite.data.manifest import Dataset
from fedlite.text import encode_notes, pad_id, pad_token_ids

log = logging.getLogger(__name__)


def augment(pixels: torch.Tensor, generator: torch.Generator, noise_std: float = 0.03,
            jitter: float = 0.1) -> torch.Tensor:
    """Random horizontal flip, brightness/contrast/saturation jitter and Gaussian noise on one
    normalised (3, H, W) image."""
    rand = torch.rand(5, generator=generator)
    if rand[0] < 0.5:
        pixels = pixels.flip(-1)
    brightness = 1 + jitter * (2 * rand[1] - 1)
    contrast = 1 + jitter * (2 * rand[2] - 1)
    saturation = 1 + jitter * (2 * rand[3] - 1)
    mean = pixels.mean()
    pixels = (pixels - mean) * contrast + mean
    gray = pixels.mean(dim=0, keepdim=True)
    pixels = (pixels - gray) * saturation + gray
    pixels = pixels * brightness + (brightness - 1)
    return pixels + noise_std * rand[4] * torch.randn(pixels.shape, generator=generator) / 0.5


class CaseDataset(torch.utils.data.Dataset):
    """The cases of one dataset directory as tensors; images are decoded lazily per item."""

    def __init__(self, data: Dataset, tokenizer: Tokenizer | None, max_length: int,
                 use_image: bool = True, train: bool = False, seed: int = 0,
                 image_size: int = IMAGE_SIZE, mean=MEAN, std=STD) -> None:
        self.data = data
        self.use_image = use_image
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.image_size, self.mean, self.std = image_size, mean, std
        self.token_ids: list[list[int]] | None = None
        if tokenizer is not None:
            encoded = encode_notes(tokenizer, [c.text for c in data.cases], max_length)
            if encoded.truncated:
                log.warning("%d of %d notes in %s are longer than %d tokens and were truncated",
                            encoded.truncated, len(data), data.root, max_length)
            self.token_ids = encoded.ids
            self.truncated = encoded.truncated
            self.pad_id = pad_id(tokenizer)
        self.leukemia = torch.tensor([c.leukemia for c in data.cases], dtype=torch.long)
        self.stage = torch.tensor([-1 if c.stage is None else c.stage for c in data.cases], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        """Different augmentations each epoch, reproducible from the seed."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        item = {"leukemia": self.leukemia[index], "stage": self.stage[index]}
        if self.use_image:
            case = self.data.cases[index]
            pixels = torch.from_numpy(preprocess_image(self.data.image_path(case), self.image_size,
                                                       self.mean, self.std))
            if self.train:
                gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
                pixels = augment(pixels, gen)
            item["pixels"] = pixels
        if self.token_ids is not None:
            item["input_ids"] = self.token_ids[index]
        return item

    def collate(self, items: list[dict]) -> dict:
        batch = {"leukemia": torch.stack([i["leukemia"] for i in items]),
                 "stage": torch.stack([i["stage"] for i in items])}
        if self.use_image:
            batch["pixels"] = torch.stack([i["pixels"] for i in items])
        if self.token_ids is not None:
            ids, mask = pad_token_ids([i["input_ids"] for i in items], self.pad_id)
            batch["input_ids"] = torch.from_numpy(ids)
            batch["attention_mask"] = torch.from_numpy(mask)
        return batch


def make_loader(dataset: CaseDataset, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0) -> DataLoader:
    # Workers are not persistent: each epoch's workers get a fresh copy of the dataset, so the
    # epoch set by ``set_epoch`` (and with it the augmentation draw) reaches them.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=dataset.collate,
                      generator=generator, num_workers=num_workers, pin_memory=torch.cuda.is_available())
