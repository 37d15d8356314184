"""The one local training loop: the centralized baseline calls it per epoch, federated sites call it
per round. SGD with momentum or AdamW, linearly decaying lr with an optional warmup, optional
gradient clipping, bf16 autocast on CUDA, an optional FedProx proximal term, and no host round trips
inside the step."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedlite.errors import InputError
from fedlite.metrics import evaluate_predictions
from fedlite.model import FedMMX, FusionHead, multitask_loss


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators from one seed, so a run repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainConfig:
    """The paper's local optimisation settings (SGD). AdamW is offered for encoders trained from
    random initialisation, where plain SGD barely moves a transformer in a few epochs."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 1.0
    proximal_mu: float = 0.0
    optimizer: str = "sgd"
    # The centralized run's first steps ramp the lr up from 0 (a share of all its steps, at most one
    # epoch): Adam's early, poorly estimated steps otherwise knock a transformer from scratch off course.
    warmup_fraction: float = 0.0
    clip_grad_norm: float = 0.0  # > 0: rescale each step's gradient to at most this global L2 norm
    # Encoders loaded from pretrained weights train at lr × this, so the steps that a randomly
    # initialised encoder needs do not wipe out what the pretrained one knows.
    pretrained_lr_scale: float = 1.0


@dataclass
class TrainStats:
    samples: int
    steps: int
    mean_loss: float
    seconds: float
    peak_memory_mb: float


class StepTally:
    """A training call's steps, cases and summed loss, with its progress bar, clock and the device's
    peak memory: what every training loop reports as its ``TrainStats``."""

    def __init__(self, total_steps: int, device: torch.device, desc: str, progress: bool) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.device, self.progress = device, progress
        self.loss_sum = torch.zeros((), device=device)
        self.samples = self.steps = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False, unit="step")

    def add(self, mean_loss: torch.Tensor | None, cases: int) -> None:
        """One step that trained on ``cases`` cases at ``mean_loss`` (None: a step without cases)."""
        if mean_loss is not None:
            self.loss_sum += mean_loss.detach() * cases
        self.samples += cases
        self.steps += 1
        self.bar.update(1)
        if self.progress and self.steps % 10 == 0:
            self.bar.set_postfix(loss=f"{self.loss_sum.item() / max(self.samples, 1):.4f}")

    def close(self) -> TrainStats:
        self.bar.close()
        return TrainStats(samples=self.samples, steps=self.steps,
                          mean_loss=float(self.loss_sum.item() / max(self.samples, 1)),
                          seconds=time.perf_counter() - self.start, peak_memory_mb=peak_memory_mb(self.device))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_batch(model: FedMMX | FusionHead, batch: dict):
    """Cases as pixels and token ids, or as precomputed embeddings (frozen-encoder and edge training)."""
    if "image_embedding" in batch or "text_embedding" in batch:
        return model.classify(batch.get("image_embedding"), batch.get("text_embedding"))
    return model(batch.get("pixels"), batch.get("input_ids"), batch.get("attention_mask"))


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def parameter_groups(model: FedMMX | FusionHead, config: TrainConfig) -> list[dict]:
    """The trainable parameters as optimizer groups, each with the ``lr_scale`` ``set_linear_lr``
    applies: ``config.pretrained_lr_scale`` for encoders ``build_model`` loaded from weights, 1 else."""
    pretrained: set[int] = set()
    if isinstance(model, FedMMX):
        init = model.config.init or {}
        for part, encoder in (("image", model.image_encoder), ("text", model.text_encoder)):
            if encoder is not None and str(init.get(part, "")).startswith("pretrained"):
                pretrained |= {id(p) for p in encoder.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in pretrained], "lr_scale": 1.0},
              {"params": [p for p in trainable if id(p) in pretrained], "lr_scale": config.pretrained_lr_scale}]
    return [g for g in groups if g["params"]]


def make_optimizer(params: list[torch.nn.Parameter] | list[dict], config: TrainConfig,
                   lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def set_linear_lr(optimizer: torch.optim.Optimizer, lr_start: float, lr_end: float, step: int,
                  total_steps: int, warmup_steps: int = 0) -> None:
    """lr from ``lr_start`` to ``lr_end`` linearly over ``total_steps``, times (step + 1)/warmup_steps
    during the first ``warmup_steps``, times each group's ``lr_scale``."""
    lr = lr_start + (lr_end - lr_start) * step / total_steps
    if step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_local(model: FedMMX, loader: DataLoader, config: TrainConfig, device: torch.device,
                lr_start: float, lr_end: float, epochs: int | None = None,
                global_params: dict[str, torch.Tensor] | None = None,
                progress: bool = True, desc: str = "train",
                optimizer: torch.optim.Optimizer | None = None, first_epoch: int = 0,
                warmup_steps: int = 0) -> TrainStats:
    """Train in place for ``epochs`` (default ``config.epochs``) with lr decaying linearly from
    ``lr_start`` to ``lr_end`` over the steps of this call.

    ``global_params`` with ``config.proximal_mu > 0`` adds FedProx's (μ/2)‖θ − θ_global‖² over the
    trainable parameters. A caller that trains one epoch per call (to evaluate in between) passes
    its ``optimizer``, so momentum and Adam's moments carry over, and ``first_epoch``, so every epoch
    draws its own augmentations; without them each call starts afresh, as a federated site's round does.
    The first ``warmup_steps`` of the call ramp the lr up; ``config.clip_grad_norm`` clips each step.
    """
    epochs = config.epochs if epochs is None else epochs
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = make_optimizer(parameter_groups(model, config), config, lr_start)
    total_steps = max(1, epochs * len(loader))
    use_prox = global_params is not None and config.proximal_mu > 0
    if use_prox:
        anchors = [global_params[n].to(device) for n, _ in named_trainable]
    tally = StepTally(total_steps, device, desc, progress)
    for epoch in range(epochs):
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(first_epoch + epoch)
        for batch in loader:
            set_linear_lr(optimizer, lr_start, lr_end, tally.steps, total_steps, warmup_steps)
            batch = to_device(batch, device)
            with autocast_for(device):
                out = forward_batch(model, batch)
            loss, _ = multitask_loss(out, batch["leukemia"], batch["stage"], config.gamma)
            if use_prox:
                prox = sum(((p - a) ** 2).sum() for (_, p), a in zip(named_trainable, anchors))
                loss = loss + 0.5 * config.proximal_mu * prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            optimizer.step()
            tally.add(loss, len(batch["leukemia"]))
    return tally.close()


@torch.no_grad()
def predict(model: FedMMX, loader: DataLoader, device: torch.device, progress: bool = False,
            desc: str = "evaluate") -> tuple[np.ndarray, np.ndarray]:
    """Leukemia and stage probabilities for every case, in loader order."""
    model.to(device).eval()
    leukemia, stage = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        batch = to_device(batch, device)
        with autocast_for(device):
            out = forward_batch(model, batch)
        leukemia.append(out.leukemia_logits.float().softmax(-1))
        stage.append(out.stage_logits.float().softmax(-1))
    leukemia_prob, stage_prob = torch.cat(leukemia).cpu().numpy(), torch.cat(stage).cpu().numpy()
    if not (np.isfinite(leukemia_prob).all() and np.isfinite(stage_prob).all()):
        raise InputError("the model computed a probability that is NaN or Inf: it is broken")
    return leukemia_prob, stage_prob


def evaluate_model(model: FedMMX, loader: DataLoader, device: torch.device, progress: bool = False) -> dict:
    leukemia_prob, stage_prob = predict(model, loader, device, progress)
    dataset = loader.dataset
    return evaluate_predictions(dataset.leukemia.numpy(), dataset.stage.numpy(), leukemia_prob, stage_prob)
