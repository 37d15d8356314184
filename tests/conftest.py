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
