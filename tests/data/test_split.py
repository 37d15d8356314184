from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlite.data.manifest import Case, DatasetInfo, read_dataset, write_dataset
from fedlite.data.split import (
    format_split_table,
    load_split,
    partition_dirichlet,
    pooled_parts,
    split_dataset,
    stratified_holdout,
    stratum,
)
from fedlite.errors import InputError

INFO = DatasetInfo()
# Unequal strata, including one too small to split evenly, as in real registries.
STRATUM_SIZES = {0: 150, 1: 60, 2: 45, 3: 30, 4: 7}


def make_cases(image_dir: str = "images") -> list[Case]:
    cases = []
    for s, n in STRATUM_SIZES.items():
        for _ in range(n):
            i = len(cases) + 1
            cases.append(Case(id=f"case-{i:05d}", image=f"{image_dir}/case-{i:05d}.jpg",
                              text=f"note {i}", leukemia=int(s > 0), stage=s - 1 if s else None))
    return cases


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    cases = make_cases()
    absolute = root / "elsewhere" / "case-abs.jpg"
    cases.append(Case(id="case-abs", image=str(absolute), text="note", leukemia=0, stage=None))
    (root / "images").mkdir(parents=True)
    absolute.parent.mkdir()
    absolute.write_bytes(b"\xff\xd8")
    for case in cases:
        (root / case.image).write_bytes(b"\xff\xd8")
    write_dataset(root, INFO, cases)
    return root


def ids(path: Path) -> list[str]:
    return [c.id for c in read_dataset(path).cases]


def site_dirs(out: Path) -> list[Path]:
    return sorted(out.glob("site-*"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def total_variation(parts: list[np.ndarray], strata: np.ndarray) -> float:
    k = strata.max() + 1
    overall = np.bincount(strata, minlength=k) / len(strata)
    return float(np.mean([0.5 * np.abs(np.bincount(strata[p], minlength=k) / len(p) - overall).sum()
                          for p in parts]))


def test_sites_are_disjoint_and_cover_the_train_split(data_dir: Path):
    summary = split_dataset(data_dir, clients=5, alpha=0.5, seed=1)
    out = data_dir / "split"
    site_ids = [ids(d) for d in site_dirs(out)]
    assert [d.name for d in site_dirs(out)] == summary.sites == [f"site-{i:02d}" for i in range(1, 6)]
    flat = [i for s in site_ids for i in s]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == sorted(ids(out / "train"))
    assert all(site_ids)
    assert summary.size("train") + summary.size("test") == len(read_dataset(data_dir))


def test_a_data_argument_means_a_splits_train_and_test_or_one_dataset(data_dir: Path, tmp_path: Path):
    split_dataset(data_dir, clients=2, seed=0)
    out = data_dir / "split"
    assert pooled_parts(out) == (out / "train", out / "test")
    assert pooled_parts(out, tmp_path / "other") == (out / "train", tmp_path / "other")
    assert pooled_parts(out / "site-01") == (out / "site-01", None)  # a site is one dataset, not a split
    assert pooled_parts(data_dir, out / "test") == (data_dir, out / "test")


def test_cases_carry_their_site(data_dir: Path):
    split_dataset(data_dir, clients=3, seed=0)
    out = data_dir / "split"
    site_of = {}
    for d in site_dirs(out):
        cases = read_dataset(d).cases
        assert {c.site for c in cases} == {d.name}
        site_of.update({c.id: c.site for c in cases})
    assert {c.id: c.site for c in read_dataset(out / "train").cases} == site_of
    assert {c.site for c in read_dataset(out / "test").cases} == {None}


def test_test_split_is_held_out_and_independent_of_the_site_layout(data_dir: Path, tmp_path: Path):
    split_dataset(data_dir, tmp_path / "a", clients=4, alpha=0.1, seed=7)
    split_dataset(data_dir, tmp_path / "b", clients=9, alpha=50.0, seed=7)
    test_a = ids(tmp_path / "a" / "test")
    assert test_a == ids(tmp_path / "b" / "test")
    for d in site_dirs(tmp_path / "a"):
        assert not set(ids(d)) & set(test_a)


def test_holdout_is_stratified_within_rounding():
    cases = make_cases()
    for fraction in (0.1, 0.2, 0.35):
        train, test = stratified_holdout(cases, fraction, np.random.default_rng(0))
        assert len(train) + len(test) == len(cases)
        for s, n in STRATUM_SIZES.items():
            n_test = sum(stratum(c) == s for c in test)
            assert abs(n_test - fraction * n) <= 0.5


def test_same_seed_gives_identical_files_and_another_seed_differs(data_dir: Path, tmp_path: Path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        split_dataset(data_dir, tmp_path / name, clients=4, seed=seed)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a["site-01/manifest.jsonl"] != c["site-01/manifest.jsonl"]
    assert a["test/manifest.jsonl"] != c["test/manifest.jsonl"]


def test_partition_is_reproducible_from_the_seed():
    strata = np.repeat(np.arange(5), 80)
    first = partition_dirichlet(strata, 6, 0.3, np.random.default_rng(11))
    again = partition_dirichlet(strata, 6, 0.3, np.random.default_rng(11))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


@pytest.mark.parametrize("alpha", [0.05, 1.0, 100.0])
def test_client_sizes_stay_within_the_spread(alpha: float):
    rng = np.random.default_rng(5)
    strata = rng.choice(5, size=4320, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    for seed in range(5):
        parts = partition_dirichlet(strata, 10, alpha, np.random.default_rng(seed), size_spread=0.2)
        sizes = np.array([len(p) for p in parts])
        assert np.sort(np.concatenate(parts)).tolist() == list(range(len(strata)))
        assert (np.abs(sizes - 432) <= 0.2 * 432 + 1).all()


def test_every_client_gets_a_case_even_when_there_are_barely_enough():
    strata = np.array([0, 0, 1, 2, 3])
    for seed in range(20):
        parts = partition_dirichlet(strata, 5, 0.01, np.random.default_rng(seed))
        assert sorted(len(p) for p in parts) == [1] * 5


def test_smaller_alpha_gives_more_skew():
    rng = np.random.default_rng(0)
    strata = rng.choice(5, size=2000, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    def mean_skew(alpha: float) -> float:
        return np.mean([total_variation(partition_dirichlet(strata, 10, alpha, np.random.default_rng(s)),
                                        strata) for s in range(5)])

    skew = {alpha: mean_skew(alpha) for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1 < skew[0.1]


def test_image_paths_resolve_from_every_split_directory(data_dir: Path, tmp_path: Path):
    absolute = str(data_dir / "elsewhere" / "case-abs.jpg")
    for out in (None, tmp_path / "deeper" / "out"):
        split_dataset(data_dir, out, clients=3, seed=2)
        out = out or data_dir / "split"
        for d in [*site_dirs(out), out / "train", out / "test"]:
            dataset = read_dataset(d)
            for case in dataset.cases:
                assert dataset.image_path(case).is_file(), (d, case.image)
                if case.id == "case-abs":
                    assert case.image == absolute
                else:
                    assert not Path(case.image).is_absolute()
    images = {c.id: c.image for split in ("train", "test")
              for c in read_dataset(data_dir / "split" / split).cases}
    assert images["case-00001"] == "../../images/case-00001.jpg"


def test_existing_output_raises_unless_forced(data_dir: Path):
    out = data_dir / "split"
    split_dataset(data_dir, clients=3, seed=0)
    (out / "stale.txt").write_text("old")
    with pytest.raises(InputError, match=str(out)):
        split_dataset(data_dir, clients=4, seed=0)
    assert (out / "stale.txt").exists()

    summary = split_dataset(data_dir, clients=4, seed=0, force=True)
    assert not (out / "stale.txt").exists()
    assert len(site_dirs(out)) == 4 and summary.clients == 4
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".split")) == []


def test_force_refuses_to_replace_a_directory_that_is_not_a_split(data_dir: Path, tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(InputError, match="not a split"):
        split_dataset(data_dir, precious, force=True)
    assert (precious / "thesis.tex").exists()
    with pytest.raises(InputError, match="contain the source"):
        split_dataset(data_dir, data_dir.parent, force=True)


def test_a_failed_split_leaves_no_output(data_dir: Path):
    with pytest.raises(InputError):
        split_dataset(data_dir, clients=10_000)
    assert not (data_dir / "split").exists()
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".split")]


@pytest.mark.parametrize("kwargs", [
    {"clients": 0}, {"clients": -2}, {"clients": 10_000}, {"alpha": 0}, {"alpha": -1.0},
    {"alpha": float("nan")}, {"test_fraction": 0}, {"test_fraction": 1.0}, {"seed": -1},
])
def test_bad_arguments_raise_input_error(data_dir: Path, kwargs: dict):
    with pytest.raises(InputError):
        split_dataset(data_dir, **kwargs)


def test_partition_rejects_bad_arguments():
    strata = np.zeros(10, dtype=int)
    rng = np.random.default_rng(0)
    for num_clients, alpha in ((0, 1.0), (11, 1.0), (3, 0.0), (3, -0.5)):
        with pytest.raises(InputError):
            partition_dirichlet(strata, num_clients, alpha, rng)


def test_summary_round_trips_and_counts_match_the_manifests(data_dir: Path):
    summary = split_dataset(data_dir, clients=4, alpha=0.3, test_fraction=0.25, seed=9)
    loaded = load_split(data_dir / "split")
    assert loaded == summary
    assert loaded.source == data_dir.resolve()
    assert (loaded.alpha, loaded.clients, loaded.test_fraction) == (0.3, 4, 0.25)
    assert loaded.stratum_names == ("negative", *INFO.stage_names)
    for name in [*loaded.sites, "train", "test"]:
        cases = read_dataset(data_dir / "split" / name).cases
        expected = np.bincount([stratum(c) for c in cases], minlength=5).tolist()
        assert list(loaded.counts[name].values()) == expected


def test_load_split_reports_a_missing_or_broken_file(tmp_path: Path):
    with pytest.raises(InputError, match="split.json"):
        load_split(tmp_path)
    (tmp_path / "split.json").write_text('{"seed": 1}')
    with pytest.raises(InputError, match="malformed"):
        load_split(tmp_path)


def test_table_lists_every_site_test_and_total(data_dir: Path):
    summary = split_dataset(data_dir, clients=6, seed=0)
    table = format_split_table(summary)
    lines = table.splitlines()
    for name in [*summary.sites, "test", "total"]:
        assert any(line.split()[0] == name for line in lines)
    header = lines[0]
    for column in ("cases", "negative", *INFO.stage_names, "positive %"):
        assert column in header
    assert len({len(line) for line in lines}) == 1
    total_row = next(line for line in lines if line.startswith("total"))
    assert total_row.split()[1] == str(len(read_dataset(data_dir)))
