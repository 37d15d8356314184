"""A site's validation part: stratified, chosen by case id, stable, never overlapping its training part."""

import random
from collections import Counter

import pytest

from fedlite.data.holdout import holdout_by_id, site_parts
from fedlite.data.manifest import Case, DatasetInfo, read_dataset, write_dataset
from fedlite.data.split import stratum
from fedlite.errors import InputError


def _cases(n):
    rng = random.Random(0)
    out = []
    for i in range(n):
        positive = rng.random() < 0.6
        out.append(Case(f"case-{i:04d}", f"images/{i}.png", "note", int(positive), rng.randrange(4) if positive else None))
    return out


def test_holdout_is_stratified_disjoint_and_independent_of_order():
    cases = _cases(500)
    train, val = holdout_by_id(cases, 0.2)
    assert {c.id for c in train}.isdisjoint({c.id for c in val}) and len(train) + len(val) == len(cases)
    total, held = Counter(map(stratum, cases)), Counter(map(stratum, val))
    for s, n in total.items():
        assert held[s] == int(0.2 * n + 0.5)
    shuffled = cases[:]
    random.Random(1).shuffle(shuffled)
    assert {c.id for c in holdout_by_id(shuffled, 0.2)[1]} == {c.id for c in val}
    # a case added later leaves the others where they were, apart from its stratum's count moving by one
    grown = holdout_by_id(cases + [Case("case-9999", "x.png", "note", 0, None)], 0.2)[1]
    assert len({c.id for c in val} ^ {c.id for c in grown}) <= 2


def test_a_fraction_outside_zero_to_one_is_refused():
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        holdout_by_id(_cases(10), 1.0)


def test_a_sites_own_val_directory_is_used_and_must_not_overlap(synth_split, tmp_path):
    site = read_dataset(synth_split.out_dir / "site-01")
    root = tmp_path / "site"
    write_dataset(root, site.info, [c for c in site.cases])
    write_dataset(root / "val", site.info, [c for c in site.cases[:3]])
    with pytest.raises(InputError, match="3 validation cases are also training cases"):
        site_parts(root)
    write_dataset(root, site.info, site.cases[3:])
    parts = site_parts(root)
    assert parts.source == "val/" and [c.id for c in parts.val.cases] == [c.id for c in site.cases[:3]]
    assert len(parts.train) == len(site) - 3
    write_dataset(root / "val", DatasetInfo(stage_names=("A", "B", "C", "D"), extra=site.info.extra), site.cases[:3])
    with pytest.raises(InputError, match="stages"):
        site_parts(root)
