"""Settings of a federated run, as plain data that travels in Flower's run config and messages.

Flower configs hold only flat scalars, so the dataclass converts to and from a flat
``{"kebab-case-key": value}`` dict; the same keys appear in pyproject's ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedlite.atomic import atomic_write_text

from fedlite.data.holdout import DEFAULT_VAL_FRACTION
from fedlite.data.manifest import DEFAULT_STAGE_NAMES
from fedlite.errors import InputError
from fedlite.federated.compress import warmed_topk
from fedlite.federated.link_model import parse_link_mbps

AGGREGATIONS = ("fedavg", "median", "trimmed-mean")
RUN_CONFIG = "run_config.json"  # a run directory's settings, so ``--resume`` continues exactly that run


@dataclass(frozen=True)
class FederatedConfig:
    # data and outputs (the server's view; sites find their own data through node config)
    split_dir: str = ""  # simulation only: the split whose sites the simulated nodes are
    out: str = "runs/federated"
    server_test: str = ""  # an optional pooled test set on the coordinator ("" = none: sites evaluate)
    stage_names: str = ",".join(DEFAULT_STAGE_NAMES)  # comma-separated; every site's data must name the same
    # model
    preset: str = "small"
    modality: str = "both"
    fusion: str = "concat"
    image_weights: str = ""  # local files every site has too ("" = random init, seeded alike everywhere)
    text_weights: str = ""
    # rounds
    rounds: int = 10
    sites_per_round: int = 0  # 0: every connected site
    min_sites: int = 1
    freeze_rounds: int = 2
    embedding_views: int = 3  # frozen rounds train on cached embeddings of this many augmented views (0: no cache)
    convergence_tol: float = 0.0  # stop when ‖θ_{t+1} − θ_t‖₂ falls below it (0: never)
    round_timeout: float = 0.0  # seconds; 0: wait for every sampled site
    max_staleness: int = 2  # late updates older than this many rounds are dropped (and logged)
    staleness_decay: float = 0.5  # λ in (N_c/N)·e^{−λτ}
    # screening and aggregation of the sites' updates (fedlite.federated.aggregate)
    aggregation: str = "fedavg"  # or "median", "trimmed-mean": coordinate-wise, robust to a few bad sites
    trim_fraction: float = 0.1  # trimmed mean: share of the updates dropped at each end, per coordinate
    max_update_ratio: float = 1.0  # an update longer than this × the norm of what it updates is refused
    max_site_share: float = 0.5  # with 3+ sites, no site's FedAvg weight above this share
    eval_every: int = 1
    site_val_fraction: float = DEFAULT_VAL_FRACTION  # held out at each site that has no val/ of its own
    # local training
    local_epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "sgd"
    gamma: float = 1.0
    proximal_mu: float = 0.0  # > 0: FedProx
    # privacy
    dp: bool = False
    noise_multiplier: float = 1.5
    max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    # update compression
    compress: bool = False
    topk_fraction: float = 0.1
    topk_warmup_rounds: int = 0  # the fraction falls from near 1 to topk_fraction over these first rounds
    compress_downlink: bool = False  # the global model travels as compressed changes since each site's copy
    # edge fine-tuning: train only the head of this bundle on the sites' cached embeddings
    edge_bundle: str = ""
    sign_key: str = ""  # the coordinator's Ed25519 private key: the fine-tuned bundle is signed with it
    # the round records' link model: transfer time of the measured bytes at these rates ("20,100" Mbit/s)
    link_mbps: str = ""
    # misc
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise InputError(f"need at least one round, got {self.rounds}")
        if self.freeze_rounds < 0 or self.local_epochs < 1 or self.batch_size < 1:
            raise InputError("freeze rounds must be >= 0, local epochs and batch size >= 1")
        if self.embedding_views < 0:
            raise InputError(f"--embedding-views must be >= 0 (0: no embedding cache), got {self.embedding_views}")
        if not 0 < self.topk_fraction <= 1:
            raise InputError(f"top-k fraction must be in (0, 1], got {self.topk_fraction}")
        if self.topk_warmup_rounds < 0:
            raise InputError(f"--topk-warmup-rounds must be >= 0, got {self.topk_warmup_rounds}")
        if self.aggregation not in AGGREGATIONS:
            raise InputError(f"unknown aggregation {self.aggregation!r}", hint=f"one of {', '.join(AGGREGATIONS)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise InputError(f"the trim fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.max_update_ratio <= 0 or not 0 < self.max_site_share <= 1:
            raise InputError("the update ratio bound must be > 0 and the site share cap in (0, 1], got "
                             f"{self.max_update_ratio} and {self.max_site_share}")
        if self.eval_every < 1:
            raise InputError(f"--eval-every must be at least 1, got {self.eval_every}")
        if not 0 <= self.site_val_fraction < 1:
            raise InputError(f"the site validation fraction must be in [0, 1), got {self.site_val_fraction}")
        if not all(self.stages):
            raise InputError(f"stage names must be non-empty and comma-separated, got {self.stage_names!r}")
        parse_link_mbps(self.link_mbps)
        if self.dp and self.proximal_mu > 0:
            raise InputError("FedProx's proximal term is not supported together with DP-SGD",
                             hint="drop --proximal-mu or --dp")

    @property
    def link_rates(self) -> tuple[float, ...]:
        return parse_link_mbps(self.link_mbps)

    @property
    def stages(self) -> list[str]:
        return [name.strip() for name in self.stage_names.split(",")]

    def lr_for_round(self, server_round: int) -> float:
        """Linear decay with the global round (paper): full lr in round 1, lr/T in round T."""
        return self.lr * (1 - (server_round - 1) / self.rounds)

    def topk_for_round(self, server_round: int) -> float:
        return warmed_topk(self.topk_fraction, self.topk_warmup_rounds, server_round)

    def encoders_frozen(self, server_round: int) -> bool:
        return server_round <= self.freeze_rounds

    def to_flat(self) -> dict:
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}

    def site_settings(self) -> dict:
        """The settings sites need; the coordinator's own paths stay with it."""
        return {k: v for k, v in self.to_flat().items()
                if k not in ("split-dir", "out", "server-test", "sign-key", "link-mbps")}

    def write_run_config(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / RUN_CONFIG, json.dumps(self.to_flat(), indent=2) + "\n")

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> "FederatedConfig":
        path = Path(run_dir) / RUN_CONFIG
        if not path.is_file():
            raise InputError(f"not a federated run directory (no {RUN_CONFIG})", path=run_dir)
        return cls.from_flat({**json.loads(path.read_text()), "out": str(run_dir)})

    @classmethod
    def from_flat(cls, flat: dict) -> "FederatedConfig":
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in flat.items():
            name = key.replace("-", "_")
            if name not in known:
                continue  # other apps' keys share the run config
            default = known[name].default
            values[name] = type(default)(value) if default is not None else value
        return cls(**values)
