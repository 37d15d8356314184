"""A reduced split: a share of each site's training cases, nested across shares, while every
evaluation case (test/, each site's validation part) stays the same."""

import pytest

from fedlite.data.holdout import pooled_site_parts, site_parts
from fedlite.data.manifest import read_dataset
from fedlite.data.split import load_split
from fedlite.data.train_share import keep_share, reduced_split
from fedlite.errors import InputError


def _ids(dataset):
    return {c.id for c in dataset.cases}


def test_a_reduced_split_keeps_every_evaluation_case_and_nests_its_shares(synth_split, tmp_path):
    half = reduced_split(synth_split.out_dir, tmp_path / "half", 0.5)
    quarter = reduced_split(synth_split.out_dir, tmp_path / "quarter", 0.25)
    assert half.sites == synth_split.sites
    assert _ids(read_dataset(half.out_dir / "test")) == _ids(read_dataset(synth_split.out_dir / "test"))
    for site in synth_split.sites:
        whole = site_parts(synth_split.out_dir / site)
        halved, quartered = site_parts(half.out_dir / site), site_parts(quarter.out_dir / site)
        assert halved.source == "val/" and _ids(halved.val) == _ids(whole.val) == _ids(quartered.val)
        assert _ids(quartered.train) <= _ids(halved.train) < _ids(whole.train)
        assert len(halved.train) < len(whole.train)
        for case in halved.train.cases:  # the images are the original files, read where they are
            assert halved.train.image_path(case).is_file()
    assert load_split(half.out_dir).size("train") < synth_split.size("train")


def test_keep_share_refuses_shares_outside_zero_to_one(synth_split, tmp_path):
    for share in (0.0, 1.5, -0.1):
        with pytest.raises(InputError, match="share"):
            keep_share([], share)
    with pytest.raises(InputError, match="share"):
        reduced_split(synth_split.out_dir, tmp_path / "none", 0.0)
    assert not (tmp_path / "none").exists()


def test_pooled_site_parts_are_the_sites_training_and_validation_parts(synth_split, tmp_path):
    train, val = pooled_site_parts(synth_split.out_dir, synth_split.sites, tmp_path / "pooled")
    parts = [site_parts(synth_split.out_dir / site) for site in synth_split.sites]
    assert _ids(read_dataset(val)) == set().union(*(_ids(p.val) for p in parts))
    assert _ids(read_dataset(train)) == set().union(*(_ids(p.train) for p in parts))
    assert _ids(read_dataset(train)).isdisjoint(_ids(read_dataset(val)))


def test_data_pool_writes_the_pooled_parts_from_a_relative_path_and_keeps_an_existing_one(synth_split, tmp_path,
                                                                                        monkeypatch):
    from click.testing import CliRunner

    from fedlite.cli import main

    monkeypatch.chdir(synth_split.out_dir.parent)
    split = synth_split.out_dir.name
    out = tmp_path / "pooled"
    result = CliRunner().invoke(main, ["data", "pool", split, str(out)])
    assert result.exit_code == 0, result.output
    train = read_dataset(out / "train")
    assert len(train) == sum(len(site_parts(synth_split.out_dir / s).train) for s in synth_split.sites)
    monkeypatch.chdir(tmp_path)  # the pooled cases name their images wherever they are read from
    assert all(train.image_path(case).is_file() for case in train.cases)
    before = (out / "train" / "manifest.jsonl").read_bytes()
    refused = CliRunner().invoke(main, ["data", "pool", str(synth_split.out_dir), str(out)])
    assert refused.exit_code != 0 and "already exists" in refused.output
    assert (out / "train" / "manifest.jsonl").read_bytes() == before
    forced = CliRunner().invoke(main, ["data", "pool", str(synth_split.out_dir), str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "train" / "manifest.jsonl").read_bytes() == before
