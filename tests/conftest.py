import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset shared by tests that only read it."""
    from fedlite.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "data", n_cases=60, seed=3, workers=1, progress=False)


@pytest.fixture(scope="session")
def synth_split(synth_data):
    from fedlite.data.split import split_dataset

    return split_dataset(synth_data.root, clients=3, alpha=1.0, seed=0)


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A tiny teacher trained briefly on its own synthetic split: better than chance, seconds to make."""
    from fedlite.centralized import train_centralized
    from fedlite.data.split import split_dataset
    from fedlite.data.synth import synthesize
    from fedlite.training import TrainConfig

    root = tmp_path_factory.mktemp("teacher")
    synthesize(root / "data", n_cases=240, seed=5, workers=1, progress=False)
    split = split_dataset(root / "data", clients=3, alpha=1.0, seed=0)
    run = train_centralized(split.out_dir, root / "run", preset="tiny", progress=False,
                            train_config=TrainConfig(epochs=3, batch_size=16, optimizer="adamw", lr=3e-3,
                                                     warmup_fraction=0.05, clip_grad_norm=1.0))
    return run.last_checkpoint, split.out_dir


@pytest.fixture(scope="session")
def teacher_bundle(teacher_run, tmp_path_factory):
    """The tiny teacher exported as-is to an INT8 bundle (no distillation or pruning: quick)."""
    from fedlite.export.parity import NO_GATE
    from fedlite.export.pipeline import ExportOptions, export_bundle
    from fedlite.export.prune import PruneConfig

    checkpoint, split = teacher_run
    options = ExportOptions(distill=False, prune=PruneConfig(fraction=0.0), int8=True, progress=False,
                            gate=NO_GATE, batch_size=16)
    return export_bundle(checkpoint, tmp_path_factory.mktemp("teacher-bundle") / "bundle", options, data=split).bundle


@pytest.fixture
def task_identity():
    """Flower builds messages only inside a run; tests that call ClientApp handlers directly get one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
