"""Differential privacy for one federated site: DP-SGD with Opacus (Poisson sampling, per-case
clipping, Gaussian noise) and an RDP accountant whose history travels between rounds, so ε covers
every round the site has trained, not just the last one."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch.nn import functional as F
from torch.utils.data import DataLoader

from fedlite.errors import InputError
from fedlite.model import FedMMX, FedMMXOutput
from fedlite.training import (StepTally, TrainConfig, TrainStats, autocast_for, forward_batch, make_optimizer,
                              set_linear_lr, to_device)

ACCOUNTANT = "rdp"
# Opacus attaches these to modules during a step; an interrupted step can leave them behind.
_MODULE_LEFTOVERS = ("activations", "max_batch_len")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings; the defaults are the paper's σ = 1.5 and C = 1.0."""

    noise_multiplier: float = 1.5
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"must be a positive number, got {value!r}", field=name)
        if not 0 < self.delta < 1:
            raise InputError(f"must lie strictly between 0 and 1, got {self.delta!r}", field="delta",
                             hint="pick δ well below 1 / (cases at the site), e.g. 1e-5")


def _history_from_state(accountant_state: dict | None) -> list[tuple[float, float, int]]:
    if not accountant_state:
        return []
    mechanism = accountant_state.get("mechanism", ACCOUNTANT)
    if mechanism != ACCOUNTANT:
        raise InputError(f"privacy accountant state is for {mechanism!r}, not {ACCOUNTANT!r}",
                         field="mechanism")
    try:
        history = accountant_state.get("history", [])
        return [(float(sigma), float(q), int(steps)) for sigma, q, steps in history]
    except (TypeError, ValueError):
        raise InputError("privacy accountant history must be a list of (noise_multiplier, "
                         "sample_rate, steps) triples", field="history") from None


def _state_from_history(history: list) -> dict:
    return {"mechanism": ACCOUNTANT,
            "history": [[float(sigma), float(q), int(steps)] for sigma, q, steps in history]}


def epsilon(accountant_state: dict | None, delta: float) -> float:
    """ε spent by every step in the history, at this δ (0 for an empty history)."""
    accountant = RDPAccountant()
    accountant.history = _history_from_state(accountant_state)
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


class _CollateOrNone:
    """Poisson sampling can draw no case at all. Opacus' own empty-batch collate cannot rebuild a
    dict batch it has not seen yet (it crashes when the first draw is empty, and each loader worker
    starts unseen), so an empty draw becomes ``None`` and the training loop takes a noise-only step."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, items: list):
        return self.collate(items) if items else None


@dataclass
class PrivateTraining:
    """The site's model with per-case gradient hooks, the noising optimizer, the Poisson loader,
    and the engine whose accountant counts every optimizer step."""

    model: FedMMX
    optimizer: DPOptimizer
    loader: DataLoader
    engine: PrivacyEngine
    hooks: GradSampleHooks

    @property
    def sample_rate(self) -> float:
        return self.loader.sample_rate

    def accountant_state(self) -> dict:
        """JSON-able history of (σ, q, steps), to carry into the next round."""
        return _state_from_history(self.engine.accountant.history)

    def epsilon(self, delta: float) -> float:
        return epsilon(self.accountant_state(), delta)

    def step_without_cases(self) -> None:
        """An empty Poisson draw still takes a step, with noise only: skipping it would reveal that
        the draw was empty, and the accountant must count it either way."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()

    def unwrap(self) -> FedMMX:
        """Remove every Opacus hook and attribute, leaving the plain model (safe to call twice)."""
        self.hooks.cleanup()
        for p in self.model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        for module in self.model.modules():
            for name in _MODULE_LEFTOVERS:
                if name in module.__dict__:
                    delattr(module, name)
        return self.model


def make_private(model: FedMMX, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 config: PrivacyConfig, accountant_state: dict | None = None) -> PrivateTraining:
    """Attach DP-SGD to a model (already on its device) and an optimizer over its trainable
    parameters.

    Hooks are attached to the model instead of wrapping it, so its state_dict keys never change.
    Frozen submodules get no hooks, and only trainable parameters are clipped and noised. The
    sampling rate is ``1 / len(loader)``, i.e. batch_size / cases when batch_size divides the
    number of cases; the Poisson draws come from ``loader``'s generator, so seed it differently
    each round.
    """
    history = _history_from_state(accountant_state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        engine.accountant.history = history
        hooks, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
            poisson_sampling=True, grad_sample_mode="hooks", wrap_model=False,
        )
    dp_loader.collate_fn = _CollateOrNone(loader.collate_fn)
    return PrivateTraining(model=model, optimizer=dp_optimizer, loader=dp_loader, engine=engine, hooks=hooks)


def per_case_multitask_loss(out: FedMMXOutput, leukemia: torch.Tensor, stage: torch.Tensor,
                            gamma: float = 1.0) -> torch.Tensor:
    """mean over cases of CE(leukemia) + γ·[positive]·CE(stage).

    ``multitask_loss`` divides the stage term by the number of positives in the batch, which ties
    each case's gradient to the others' labels; DP-SGD's clipping bounds one case's influence only
    if its gradient is its own, so under DP the stage term is averaged over all cases instead.
    """
    positive = (stage >= 0).to(torch.float32)
    ce_leukemia = F.cross_entropy(out.leukemia_logits.float(), leukemia, reduction="none")
    ce_stage = F.cross_entropy(out.stage_logits.float(), stage.clamp(min=0), reduction="none")
    return (ce_leukemia + gamma * positive * ce_stage).mean()


def _private_step(private: PrivateTraining, batch: dict | None, device: torch.device,
                  gamma: float) -> tuple[torch.Tensor | None, int]:
    """One DP-SGD step; returns the batch's mean loss (None for an empty batch) and its case count."""
    private.optimizer.zero_grad(set_to_none=True)
    if batch is None:
        private.step_without_cases()
        return None, 0
    batch = to_device(batch, device)
    with autocast_for(device):
        out = forward_batch(private.model, batch)
    loss = per_case_multitask_loss(out, batch["leukemia"], batch["stage"], gamma)
    loss.backward()
    private.optimizer.step()
    return loss, len(batch["leukemia"])


def dp_train_local(model: FedMMX, loader: DataLoader, train_config: TrainConfig, device: torch.device,
                   lr_start: float, lr_end: float, privacy: PrivacyConfig,
                   accountant_state: dict | None = None, epochs: int | None = None,
                   progress: bool = False, desc: str = "train (DP)") -> tuple[TrainStats, dict]:
    """``train_local`` under DP-SGD: returns the stats and the accountant state to keep for the
    next round. The model is trained in place and left free of Opacus hooks."""
    if train_config.proximal_mu > 0:
        raise InputError("FedProx's proximal term is not supported with differential privacy",
                         field="proximal_mu",
                         hint="set proximal_mu to 0 (use FedAvg) or train without DP")
    epochs = train_config.epochs if epochs is None else epochs
    model.to(device).train()
    with _batch_norms_fixed(model):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise InputError("the model has no trainable parameters to train under DP")
        private = make_private(model, make_optimizer(params, train_config, lr_start), loader, privacy,
                               accountant_state)
        optimizer = private.optimizer
        total_steps = max(1, epochs * len(private.loader))
        tally = StepTally(total_steps, device, desc, progress)
        with warnings.catch_warnings():
            # Expected with frozen encoders: the fusion layer's inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            try:
                for epoch in range(epochs):
                    if hasattr(loader.dataset, "set_epoch"):
                        loader.dataset.set_epoch(epoch)
                    for batch in private.loader:
                        set_linear_lr(optimizer, lr_start, lr_end, tally.steps, total_steps)
                        tally.add(*_private_step(private, batch, device, train_config.gamma))
            finally:
                stats = tally.close()
                optimizer.zero_grad(set_to_none=True)
                private.unwrap()
    return stats, private.accountant_state()


@contextlib.contextmanager
def _batch_norms_fixed(model: FedMMX):
    """Freeze the scales and shifts of batch norms (MobileNetV2's) for a DP-SGD run, then release them.

    A batch norm mixes the cases of a batch, so Opacus computes no per-case gradient for it. fedlite
    keeps batch-norm statistics fixed anyway (only parameters travel), which makes each one a fixed
    per-channel affine map: frozen as well, it is exact under DP and the rest of the network trains."""
    frozen = [p for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
