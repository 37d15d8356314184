"""Corruptions for the robustness comparison: deterministic, unchanged at strength 0, further from
the original the stronger they are, and a corrupted copy keeps every case and label."""

import numpy as np
import pytest

from fedlite.data.corruption import CORRUPTIONS, corrupt, corrupted_copy
from fedlite.data.images import load_image
from fedlite.data.manifest import read_dataset
from fedlite.errors import InputError


@pytest.fixture(scope="module")
def smear(synth_data):
    dataset = read_dataset(synth_data.root)
    return load_image(dataset.image_path(dataset.cases[0]))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corruption_is_deterministic_and_grows_with_its_strength(kind, smear):
    strengths = [0.0, 0.5, 1.0, 2.0, 4.0] if kind == "blur" else [0.0, 0.02, 0.05, 0.1, 0.2]
    distances = [np.abs(corrupt(smear, kind, s, seed=1).astype(float) - smear).mean() for s in strengths]
    assert distances[0] == 0
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert np.array_equal(corrupt(smear, kind, strengths[2], seed=1), corrupt(smear, kind, strengths[2], seed=1))
    assert corrupt(smear, kind, strengths[2]).dtype == np.uint8


def test_bad_corruptions_are_refused(smear):
    with pytest.raises(InputError, match="unknown corruption 'fog'"):
        corrupt(smear, "fog", 1.0)
    with pytest.raises(InputError, match="strength must be >= 0"):
        corrupt(smear, "noise", -0.1)


def test_a_corrupted_copy_keeps_every_case_and_label(synth_data, tmp_path):
    source = read_dataset(synth_data.root)
    copy = corrupted_copy(synth_data.root, tmp_path / "noisy", "noise", 0.1, progress=False)
    assert [(c.id, c.text, c.leukemia, c.stage) for c in copy.cases] == \
           [(c.id, c.text, c.leukemia, c.stage) for c in source.cases]
    assert copy.info.extra["corruption"]["kind"] == "noise" and copy.info.stage_names == source.info.stage_names
    again = corrupted_copy(synth_data.root, tmp_path / "again", "noise", 0.1, progress=False)
    first = copy.cases[3]
    assert np.array_equal(load_image(copy.image_path(first)), load_image(again.image_path(again.cases[3])))
    assert not np.array_equal(load_image(copy.image_path(first)), load_image(source.image_path(source.cases[3])))
    with pytest.raises(InputError, match="already exists"):
        corrupted_copy(synth_data.root, tmp_path / "noisy", "blur", 1.0, progress=False)


def test_the_cli_writes_a_corrupted_copy(synth_data, tmp_path):
    from click.testing import CliRunner

    from fedlite.cli import main

    result = CliRunner().invoke(main, ["data", "corrupt", str(synth_data.root), str(tmp_path / "blurred"),
                                       "--kind", "blur", "--strength", "2"])
    assert result.exit_code == 0, result.output
    assert f"wrote {len(read_dataset(synth_data.root))} cases with blur 2" in result.output
    assert read_dataset(tmp_path / "blurred").info.extra["corruption"]["strength"] == 2.0
