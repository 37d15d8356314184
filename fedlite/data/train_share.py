"""A split with only a share of each site's training cases, to measure how a model degrades with
fewer cases (the reduced-training-data comparison of the seed literature) on exactly the same
evaluation cases: the held-out test split and every site's validation part stay as they are.

Kept cases are chosen per site and stratum by a salted hash of the case id, so smaller shares are
subsets of larger ones and the choice does not depend on the manifest's order.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fedlite.atomic import staged_dir
from fedlite.data.holdout import DEFAULT_VAL_FRACTION, VAL_DIR, holdout_by_id, site_parts
from fedlite.data.manifest import Case, read_dataset, write_relocated
from fedlite.data.split import SPLIT_FILE, TEST, TRAIN, SplitSummary, count_strata, load_split
from fedlite.errors import InputError

SALT = "train-share:"


def keep_share(cases: list[Case], share: float) -> list[Case]:
    """round(share × n) cases of every stratum, in input order; all of them at a share of 1."""
    if not 0 < share <= 1:
        raise InputError(f"a share of training cases must be in (0, 1], got {share!r}")
    return cases if share == 1 else holdout_by_id(cases, share, salt=SALT)[1]


def reduced_split(split_dir: str | Path, out: str | Path, share: float,
                  val_fraction: float = DEFAULT_VAL_FRACTION, force: bool = False) -> SplitSummary:
    """``out``: the split with ``share`` of every site's training part. Each site's validation part
    is written as its own ``val/`` and test/ is kept, so every share is scored on the same cases."""
    keep_share([], share)  # the share is checked before anything is read
    source = load_split(split_dir)
    split_dir = Path(split_dir)
    counts: dict[str, dict[str, int]] = {}
    with staged_dir(out, force=force, what="reduced split") as staged:
        pooled = []
        for site in source.sites:
            parts = site_parts(split_dir / site, val_fraction)
            kept = replace(parts.train, cases=keep_share(parts.train.cases, share))
            write_relocated(staged / site, [kept])
            write_relocated(staged / site / VAL_DIR, [parts.val])
            pooled += [kept, parts.val]
            counts[site] = count_strata(kept.cases + parts.val.cases, source.stratum_names)
        write_relocated(staged / TRAIN, pooled)
        counts[TRAIN] = count_strata([c for part in pooled for c in part.cases], source.stratum_names)
        if (split_dir / TEST).is_dir():
            test = read_dataset(split_dir / TEST)
            write_relocated(staged / TEST, [test])
            counts[TEST] = count_strata(test.cases, source.stratum_names)
        record = json.loads((split_dir / SPLIT_FILE).read_text(encoding="utf-8"))
        record.update(source=str(source.source), counts=counts, train_share=share,
                      reduced_from=str(split_dir.resolve()))
        (staged / SPLIT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return load_split(out)
