"""Option groups of the long commands, and what their values become: ``fedlite train``'s and
``fedlite export``'s options by section and kind of run, and the one-case-or-a-dataset input that
``predict`` and ``explain`` share.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from fedlite.cli_modes import opt, option_section, option_sections
from fedlite.errors import InputError
from fedlite.federated.config import AGGREGATIONS
from fedlite.presets import FUSIONS, MODALITIES, PRESETS

# fedlite train's kinds of run: the flag that picks each, its name, and why options stay out of it
TRAIN_MODES = {"centralized": ("centralized", "centralized runs (--centralized)", ""),
               "federated": (None, "federated runs", ""),
               "edge": ("edge_bundle", "edge runs (--edge)", ", which train only the bundle's head, on CPU"),
               "resume": ("resume_dir", "resumed runs (--resume)", ", which keep the settings their run recorded")}
CENTRAL, FEDERATED, EDGE = ("centralized",), ("federated",), ("edge",)
_PATH = click.Path(path_type=Path)


train_options = option_sections(
    option_section(
        "Kind of run", (),
        opt("--centralized", is_flag=True,
            help="Train on pooled data (the paper's centralized baseline) instead of federated."),
        opt("--edge", "edge_bundle", type=_PATH, default=None,
            help="Edge fine-tuning: train only this bundle's head on the sites' cached embeddings and write "
                 "the bundle with the averaged head (version + 1) into the run directory."),
        opt("--resume", "resume_dir", type=_PATH, default=None,
            help="Continue a federated run from its last completed round, with its recorded settings."),
        opt("--force", is_flag=True, help="Replace an existing run directory.")),
    option_section(
        "Data and training", CENTRAL + FEDERATED + EDGE,
        opt("--data", "data_dir", type=_PATH,
            help="A split directory from 'fedlite data split' (sites + test/); --centralized also takes "
                 "a plain dataset directory."),
        opt("--out", type=_PATH, default=None, help="Run directory (default: runs/centralized or runs/federated)."),
        opt("--epochs", default=3, show_default=True, help="Epochs (centralized) or local epochs E per round."),
        opt("--batch-size", default=32, show_default=True),
        opt("--lr", default=1e-3, show_default=True, help="Initial learning rate (decays linearly)."),
        opt("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
            help="sgd as in the paper (momentum 0.9, weight decay 5e-4); adamw for randomly initialised encoders."),
        opt("--gamma", default=1.0, show_default=True, help="Weight of the stage loss."),
        opt("--seed", default=0, show_default=True)),
    option_section(
        "Model", CENTRAL + FEDERATED,
        opt("--preset", type=click.Choice(list(PRESETS)), default="small", show_default=True),
        opt("--modality", type=click.Choice(MODALITIES), default="both", show_default=True),
        opt("--fusion", type=click.Choice(FUSIONS), default="concat", show_default=True),
        opt("--image-weights", type=_PATH, default=None, help="A local timm ViT checkpoint file."),
        opt("--text-weights", type=_PATH, default=None, help="A local transformers BERT directory with its tokenizer."),
        opt("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")),
    option_section(
        "Pooled training", CENTRAL,
        opt("--eval-data", type=_PATH, default=None,
            help="Held-out dataset evaluated every epoch (default: the split's test/)."),
        opt("--warmup", default=0.05, show_default=True,
            help="Share of the steps over which the lr ramps up from 0 (at most one epoch)."),
        opt("--clip-grad-norm", default=1.0, show_default=True, help="Clip each step's gradient to this L2 norm, 0 for none."),
        opt("--pretrained-lr-scale", default=0.1, show_default=True,
            help="lr factor for encoders loaded with --image-weights/--text-weights."),
        opt("--workers", default=0, show_default=True, help="Data-loading processes.")),
    option_section(
        "Rounds", FEDERATED + EDGE,
        opt("--rounds", default=10, show_default=True, help="Federated rounds T."),
        opt("--sites-per-round", default=0, show_default=True, help="Sites sampled per round (0: all)."),
        opt("--strategy", type=click.Choice(["fedavg", "fedprox"]), default="fedavg", show_default=True),
        opt("--proximal-mu", default=0.01, show_default=True, help="FedProx's μ (with --strategy fedprox)."),
        opt("--round-timeout", default=0.0, show_default=True,
            help="Seconds a round waits for sites (0: all); late updates are folded in later rounds."),
        opt("--max-staleness", default=2, show_default=True, help="Rounds a late update may lag."),
        opt("--staleness-decay", default=0.5, show_default=True, help="λ in (N_c/N)·e^(−λτ)."),
        opt("--convergence-tol", default=0.0, show_default=True, help="Stop when ‖θ_t+1 − θ_t‖ is below it."),
        opt("--aggregation", type=click.Choice(AGGREGATIONS), default="fedavg", show_default=True,
            help="How the sites' updates are combined; median and trimmed-mean (coordinate-wise) hold against "
                 "a few poisoning sites."),
        opt("--trim-fraction", default=0.1, show_default=True,
            help="trimmed-mean: share of the updates dropped at each end of every coordinate."),
        opt("--site-val-fraction", default=0.2, show_default=True,
            help="Share of each site's cases held out for validation (by case id, per stratum) when the site "
                 "has no val/ directory of its own."),
        opt("--link-mbps", default="", help="Hospital line rates in Mbit/s, e.g. 20,100: each round also records "
            "how long its measured bytes would take on them.")),
    option_section(
        "Privacy and compression", FEDERATED + EDGE,
        opt("--dp", is_flag=True, help="Opacus DP-SGD at every site."),
        opt("--noise-multiplier", default=1.5, show_default=True, help="DP noise σ."),
        opt("--max-grad-norm", default=1.0, show_default=True, help="DP per-case clipping norm C."),
        opt("--dp-delta", default=1e-5, show_default=True, help="DP δ."),
        opt("--compress", is_flag=True, help="Send top-k + int8 updates with error feedback."),
        opt("--topk", default=0.1, show_default=True, help="Share of update entries sent with --compress."),
        opt("--topk-warmup-rounds", default=0, show_default=True,
            help="Over these first rounds the share sent falls geometrically from near 1 to --topk.")),
    option_section(
        "Full-model rounds", FEDERATED,
        opt("--freeze-rounds", default=2, show_default=True,
            help="Rounds with frozen encoders (only fusion and heads train and travel)."),
        opt("--embedding-views", default=3, show_default=True,
            help="In frozen rounds sites train on their cases' embeddings, computed once per augmented view "
                 "and cached in their cache directory; epoch k reads view k mod N (0: no cache, every step "
                 "runs the frozen encoders)."),
        opt("--eval-every", default=1, show_default=True,
            help="Federated evaluation every N rounds (and after the last): sites score the global model on "
                 "their validation parts and send statistics only; best/ is the round they scored best."),
        opt("--server-test", type=_PATH, default=None,
            help="A pooled test set the coordinator scores beside the federated metrics (research protocol; "
                 "default in simulation: SPLIT/test when it exists)."),
        opt("--compress-downlink", is_flag=True, help="Send the global model as top-k + int8 changes since the "
            "version each site holds (error feedback at the coordinator) instead of whole every round.")),
    option_section(
        "Edge fine-tuning", EDGE,
        opt("--sign", "sign_key", type=_PATH, default=None,
            help="Sign the fine-tuned bundle with this Ed25519 private key (PEM); required when the bundle "
                 "is signed.")),
)


def centralized_train_config(o: dict):
    """``TrainConfig`` of a centralized run from train's options."""
    from fedlite.training import TrainConfig

    return TrainConfig(epochs=o["epochs"], batch_size=o["batch_size"], lr=o["lr"], gamma=o["gamma"],
                       optimizer=o["optimizer"], warmup_fraction=o["warmup"], clip_grad_norm=o["clip_grad_norm"],
                       pretrained_lr_scale=o["pretrained_lr_scale"])


def federated_config(o: dict):
    """``FederatedConfig`` of a federated or edge run from train's options."""
    from fedlite.federated.config import FederatedConfig

    same = ("preset", "modality", "fusion", "rounds", "sites_per_round", "freeze_rounds", "embedding_views",
            "convergence_tol", "round_timeout", "max_staleness", "eval_every", "site_val_fraction", "staleness_decay",
            "aggregation", "trim_fraction", "batch_size", "lr", "optimizer", "gamma", "dp", "noise_multiplier",
            "max_grad_norm", "dp_delta", "compress", "compress_downlink", "topk_warmup_rounds", "link_mbps", "seed",
            "device")
    paths = {name: str(o[name].resolve() if name in ("edge_bundle", "sign_key") else o[name]) if o[name] else ""
             for name in ("server_test", "image_weights", "text_weights", "edge_bundle", "sign_key")}
    return FederatedConfig(
        **{name: o[name] for name in same}, **paths, split_dir=str(o["data_dir"]),
        out=str(o["out"] or Path("runs/federated")), local_epochs=o["epochs"], topk_fraction=o["topk"],
        proximal_mu=o["proximal_mu"] if o["strategy"] == "fedprox" else 0.0)


# fedlite export's kinds of run: on cases at the coordinator, or each step at the sites (--sites)
EXPORT_MODES = {"pooled": (None, "exports on cases at the coordinator", ""),
                "federated": ("sites_split", "exports at the sites (--sites)", ", which use only the sites' own cases")}


export_options = option_sections(
    option_section(
        "Student and distillation", (),
        opt("--student", default=None, help="'half' (every other teacher layer) or a preset; default: small "
            "for the paper teacher, half otherwise."),
        opt("--student-image-weights", type=_PATH, default=None, help="A local checkpoint the student's image "
            "encoder starts from when it is not the teacher's (e.g. ImageNet MobileNetV2 for --student mobile)."),
        opt("--no-distill", is_flag=True, help="Export the teacher itself (pruning and INT8 still apply)."),
        opt("--distill-epochs", default=15, show_default=True),
        opt("--lr", default=3e-4, show_default=True, help="AdamW learning rate for distillation and recovery."),
        opt("--alpha", default=0.0, show_default=True, help="Weight of the label loss against the teacher's "
            "soft targets (0: the student learns the teacher's calls only, which the gate checks)."),
        opt("--temperature", default=2.0, show_default=True, help="Softens both models' outputs in the "
            "distillation loss."),
        opt("--feature-weight", default=0.0, show_default=True, help="β of the fused-representation MSE term."),
        opt("--prune", "prune_fraction", default=0.3, show_default=True,
            help="Share of each layer's attention heads and FFN channels removed (0: no pruning)."),
        opt("--prune-layers", default=0, show_default=True, help="Whole layers removed from each encoder."),
        opt("--recovery-epochs", default=1, show_default=True, help="With --no-distill: distillation epochs "
            "after pruning the teacher (a new student is pruned first and its distillation recovers).")),
    option_section(
        "Quantization", (),
        opt("--int8", is_flag=True, help="Quantize the encoder graphs to INT8 (default: FP32)."),
        opt("--quantize", "quant_mode", type=click.Choice(["dynamic", "static"]), default="dynamic",
            show_default=True),
        opt("--isa", type=click.Choice(["avx512_vnni", "avx2", "arm64"]), default="avx512_vnni", show_default=True,
            help="Instruction set of the hospitals' CPUs: avx512_vnni needs VNNI (it saturates on "
                 "plain AVX2/AVX-512); avx2 runs exactly on any x86 CPU."),
        opt("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per channel."),
        opt("--quantize-embeddings", is_flag=True, help="Also store the word-embedding table in INT8 "
            "(worth it with large vocabularies; fedlite's built-in one is trimmed to 1490 rows anyway)."),
        opt("--quantize-all-convs", is_flag=True, help="With --quantize static, also a MobileNetV2's depthwise "
            "convolutions and stem (kept in float by default: most of its INT8 error, little of its compute)."),
        opt("--calibration-cases", default=64, show_default=True),
        opt("--no-fuse", is_flag=True, help="Skip ONNX Runtime's transformer fusions.")),
    option_section(
        "Cases at the coordinator", ("pooled",),
        opt("--data", "data_dir", type=_PATH, default=None,
            help="Pooled cases: a split directory (distill on train/, verify on test/) or a dataset (then "
                 "--eval-data). One of --sites, --data or --proxy-data is required."),
        opt("--proxy-data", type=_PATH, default=None,
            help="Non-patient data (public or synthetic; a dataset, or a split directory's train/) to distill, "
                 "prune-score and calibrate on at the coordinator; needs --eval-data."),
        opt("--eval-data", type=_PATH, default=None,
            help="Held-out cases the bundle is verified on (default with --data: the split's test/)."),
        opt("--calibration", type=_PATH, default=None,
            help="Dataset for static calibration and fusion checks (default: the distillation cases)."),
        opt("--keep-fp32", is_flag=True, help="With --int8, also write the student's FP32 graphs as "
            "a bundle beside it (OUT-fp32), e.g. for `fedlite bench`.")),
    option_section(
        "At the sites", ("federated",),
        opt("--sites", "sites_split", type=_PATH, default=None,
            help="Export at the sites of this split, simulated here: distillation, pruning scores, "
                 "calibration and verification run at each site on its own cases; only parameters and "
                 "statistics travel. (Deployed: `flwr run . --run-config 'export-checkpoint=\"CKPT\"'`.)"),
        opt("--site-epochs", default=3, show_default=True,
            help="Local epochs of each distillation round at the sites: --distill-epochs passes over the "
                 "consortium's cases make ceil(epochs / site-epochs) rounds."),
        opt("--site-val-fraction", default=0.2, show_default=True,
            help="Share of each site's cases it verifies on, when it has no val/ directory.")),
    option_section(
        "Parity gate", (),
        opt("--max-accuracy-drop", default=1.0, show_default=True, help="Points below the teacher allowed."),
        opt("--max-auc-drop", default=0.01, show_default=True),
        opt("--max-stage-f1-drop", default=0.02, show_default=True, help="Stage macro-F1 below the teacher's allowed."),
        opt("--min-agreement", default=0.9, show_default=True,
            help="Share of held-out cases with the teacher's calls: same leukemia call and, where both "
                 "call leukemia, same stage."),
        opt("--min-leukemia-agreement", default=0.97, show_default=True,
            help="Share of held-out cases with the teacher's leukemia call."),
        opt("--min-auc", default=0.5, show_default=True,
            help="The bundle's AUC must be above this, whatever the teacher's (0.5: chance; 0: no floor).")),
    option_section(
        "Output", (),
        opt("--out", type=_PATH, default=None, help="Default: a 'bundle' directory beside CHECKPOINT."),
        opt("--sign", "sign_key", type=_PATH, default=None,
            help="Sign the bundle with this Ed25519 private key (PEM; `fedlite export keygen` makes a pair)."),
        opt("--batch-size", default=32, show_default=True),
        opt("--device", default="auto", show_default=True, help="Where distillation runs."),
        opt("--seed", default=0, show_default=True),
        opt("--force", is_flag=True, help="Replace an existing bundle."),
        opt("--json", "as_json", is_flag=True, help="Print bundle.json when done.")),
)


def export_pipeline_options(o: dict, out: Path):
    """``ExportOptions`` from export's options, for a bundle written to ``out``."""
    from fedlite.export.distill import DistillConfig
    from fedlite.export.parity import Gate
    from fedlite.export.pipeline import ExportOptions
    from fedlite.export.prune import PruneConfig
    from fedlite.export.quantize import QuantSettings

    if not 0 <= o["prune_fraction"] < 1:
        raise InputError(f"--prune must be in [0, 1), got {o['prune_fraction']}")
    if o["keep_fp32"] and not o["int8"]:
        raise InputError("--keep-fp32 keeps an FP32 copy beside an INT8 bundle", hint="add --int8 or drop --keep-fp32")
    return ExportOptions(
        student=o["student"], student_image_weights=o["student_image_weights"], distill=not o["no_distill"],
        distill_config=DistillConfig(epochs=o["distill_epochs"], lr=o["lr"], alpha=o["alpha"],
                                     temperature=o["temperature"], feature_weight=o["feature_weight"],
                                     batch_size=o["batch_size"]),
        prune=PruneConfig(fraction=o["prune_fraction"], layers=o["prune_layers"]),
        recovery_epochs=o["recovery_epochs"], int8=o["int8"],
        quant=QuantSettings(mode=o["quant_mode"], isa=o["isa"], per_channel=not o["per_tensor"],
                            embeddings=o["quantize_embeddings"], all_convs=o["quantize_all_convs"]),
        calibration_cases=o["calibration_cases"], fuse=not o["no_fuse"],
        gate=Gate(max_accuracy_drop=o["max_accuracy_drop"], max_auc_drop=o["max_auc_drop"],
                  max_stage_f1_drop=o["max_stage_f1_drop"], min_case_agreement=o["min_agreement"],
                  min_leukemia_agreement=o["min_leukemia_agreement"], min_auc=o["min_auc"]),
        batch_size=o["batch_size"], device=o["device"], seed=o["seed"], progress=not o["as_json"],
        signing_key=o["sign_key"], fp32_copy=out.with_name(out.name + "-fp32") if o["keep_fp32"] else None)


def case_options(data_help: str) -> Callable:
    """One case (--image with --text or --text-file) or a dataset (--data): predict's and explain's input."""
    def apply(command: Callable) -> Callable:
        for decls, kwargs in reversed((
                opt("--image", type=_PATH, default=None, help="The smear image of one case."),
                opt("--text", default=None, help="The case's clinical note."),
                opt("--text-file", type=_PATH, default=None, help="The note, from a UTF-8 file."),
                opt("--data", "data_dir", type=_PATH, default=None, help=data_help))):
            command = click.option(*decls, **kwargs)(command)
        return command
    return apply


def case_input(image: Path | None, text: str | None, text_file: Path | None,
               data_dir: Path | None) -> tuple[Path, str] | None:
    """The one case the options name (its image and checked note), or None for a dataset; refuses
    anything else before a bundle is loaded."""
    single = image is not None or text is not None or text_file is not None
    if single == (data_dir is not None):
        raise InputError("give one case (--image and --text/--text-file) or a dataset (--data)")
    if not single:
        return None
    if image is None or (text is None) == (text_file is None):
        raise InputError("one case needs --image and exactly one of --text, --text-file")
    from fedlite.agents.predict import check_note, read_note_file

    return image, check_note(text, "--text") if text is not None else read_note_file(text_file)
