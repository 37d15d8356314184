"""A site's validation part: cases that never train, so the consortium can score its model at the sites.

A site that keeps its own ``val/`` dataset inside its data directory uses it as is. Otherwise a
stratified fraction of its cases is held out, chosen by a hash of each case id: the same cases every
round, every run and every process, whatever the manifest's order, and a case added later does not
move the others between parts.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from fedlite.data.manifest import MANIFEST, Case, Dataset, read_dataset, write_relocated
from fedlite.data.split import stratum
from fedlite.errors import InputError

VAL_DIR = "val"
DEFAULT_VAL_FRACTION = 0.2


@dataclass
class SiteParts:
    train: Dataset
    val: Dataset
    source: str  # "val/" (the site's own) or "held out by case id"


def holdout_by_id(cases: list[Case], fraction: float, salt: str = "") -> tuple[list[Case], list[Case]]:
    """round(fraction × n) cases of every stratum held out, the ones whose (salted) id hashes
    lowest: a smaller fraction holds out a subset of a larger one. Both parts keep the input order."""
    if not 0 <= fraction < 1:
        raise InputError(f"the site validation fraction must be in [0, 1), got {fraction!r}")
    strata: dict[int, list[Case]] = {}
    for case in cases:
        strata.setdefault(stratum(case), []).append(case)
    held = set()
    for members in strata.values():
        n_val = math.floor(fraction * len(members) + 0.5)
        ordered = sorted(members, key=lambda c: hashlib.sha256((salt + c.id).encode()).hexdigest())
        held.update(c.id for c in ordered[:n_val])
    return [c for c in cases if c.id not in held], [c for c in cases if c.id in held]


def site_parts(data_dir: str | Path, val_fraction: float = DEFAULT_VAL_FRACTION) -> SiteParts:
    """The site's training and validation cases."""
    data = read_dataset(data_dir)
    own = Path(data_dir) / VAL_DIR
    if (own / MANIFEST).is_file():
        val = read_dataset(own)
        if list(val.info.stage_names) != list(data.info.stage_names):
            raise InputError(f"the validation part's stages {list(val.info.stage_names)} differ from the site's "
                             f"{list(data.info.stage_names)}", path=own / "dataset.json")
        shared = {c.id for c in data.cases} & {c.id for c in val.cases}
        if shared:
            # no id in the message: a site's errors reach the coordinator
            raise InputError(f"{len(shared)} validation cases are also training cases", path=own / MANIFEST,
                             hint="a case belongs to one part only; `fedlite data check` lists the ids")
        return SiteParts(data, val, f"{VAL_DIR}/")
    train, val = holdout_by_id(data.cases, val_fraction)
    return SiteParts(Dataset(data.root, data.info, train), Dataset(data.root, data.info, val), "held out by case id")


def pooled_site_parts(split_dir: str | Path, sites: list[str], out: str | Path,
                      val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[Path, Path]:
    """``out/train`` and ``out/val``: the sites' training parts and their validation parts pooled, so a
    pooled baseline trains on the cases federated training sees and is scored on those its sites
    score on. A simulation's convenience: in a deployment no one holds these."""
    out = Path(out)
    parts = [site_parts(Path(split_dir) / site, val_fraction) for site in sites]
    write_relocated(out / "train", [p.train for p in parts])
    write_relocated(out / VAL_DIR, [p.val for p in parts])
    return out / "train", out / VAL_DIR
