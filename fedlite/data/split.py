"""Split a dataset into federated hospital sites plus a held-out global test split.

Real hospitals differ in case mix (a referral centre sees advanced disease, a screening clinic
mostly negatives and early stages) but not wildly in size, so the sites get label/stage skew from a
Dirichlet draw per stratum while their sizes stay within a set spread of the mean. The test split
is drawn first from its own random stream, so it is the same whatever the site layout: results for
different client counts or skews are measured on the same cases.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedlite.atomic import staged_dir
from fedlite.data.manifest import Case, DatasetInfo, image_roots, read_dataset, write_dataset
from fedlite.errors import InputError

SPLIT_FILE = "split.json"
SPLIT_FORMAT = "fedlite-split/1"
TRAIN = "train"
TEST = "test"
NEGATIVE = "negative"


@dataclass
class SplitSummary:
    """What a split holds, per split name ("site-01".., "train", "test") and stratum name."""

    out_dir: Path
    source: Path
    seed: int
    alpha: float
    clients: int
    test_fraction: float
    stratum_names: tuple[str, ...]
    counts: dict[str, dict[str, int]]

    @property
    def sites(self) -> list[str]:
        return [name for name in self.counts if name not in (TRAIN, TEST)]

    def size(self, split: str) -> int:
        return sum(self.counts[split].values())


def stratum(case: Case) -> int:
    """Negatives are stratum 0 and each stage its own stratum, so skew can act on stage mix too."""
    return 0 if case.leukemia == 0 else 1 + case.stage


def site_name(index: int, clients: int) -> str:
    """1-based and zero-padded so site directories sort in order."""
    return f"site-{index + 1:0{max(2, len(str(clients)))}d}"


def stratified_holdout(cases: list[Case], fraction: float, rng) -> tuple[list[Case], list[Case]]:
    """Hold out round(fraction * n) cases of every stratum, so the test mix matches the data.

    Both lists keep the input order; only membership is random.
    """
    if not _is_real(fraction) or not 0 <= fraction < 1:
        raise InputError(f"the test fraction must be in [0, 1), got {fraction!r}")
    rng = np.random.default_rng(rng)
    strata = np.array([stratum(c) for c in cases], dtype=np.int64)
    is_test = np.zeros(len(cases), dtype=bool)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        n_test = math.floor(fraction * len(members) + 0.5)
        is_test[rng.permutation(members)[:n_test]] = True
    train = [c for c, t in zip(cases, is_test) if not t]
    test = [c for c, t in zip(cases, is_test) if t]
    return train, test


def partition_dirichlet(strata: np.ndarray, num_clients: int, alpha: float, rng,
                        size_spread: float = 0.2) -> list[np.ndarray]:
    """Assign every index to one client: stratum mix skewed by Dirichlet(alpha), sizes balanced.

    Capacities come first (mean N/num_clients, each within size_spread of it, +-1 for rounding);
    each stratum then fills them by its own Dirichlet proportions weighted by the room each client
    has left. Strata are filled in random order so no stratum is always the one squeezed into
    whatever room is left.
    """
    strata = np.asarray(strata)
    if strata.ndim != 1 or (strata.size and not np.issubdtype(strata.dtype, np.integer)):
        raise InputError("strata must be a 1-D array of integers")
    if not _is_int(num_clients) or num_clients < 1:
        raise InputError(f"the number of clients must be a positive integer, got {num_clients!r}")
    if num_clients > len(strata):
        raise InputError(f"{num_clients} clients but only {len(strata)} training cases",
                         hint="every client needs at least one case")
    if not _is_real(alpha) or not 0 < alpha < math.inf:
        raise InputError(f"alpha must be a positive number, got {alpha!r}",
                         hint="smaller is more skewed; 0.5 is typical")
    if not _is_real(size_spread) or not 0 <= size_spread < 1:
        raise InputError(f"the size spread must be in [0, 1), got {size_spread!r}")
    rng = np.random.default_rng(rng)
    k = int(num_clients)

    room = _client_capacities(len(strata), k, size_spread, rng)
    members_of = {int(s): np.flatnonzero(strata == s) for s in np.unique(strata)}
    assigned: list[list[np.ndarray]] = [[] for _ in range(k)]
    for s in rng.permutation(sorted(members_of)):
        members = rng.permutation(members_of[int(s)])
        counts = _fill(len(members), _dirichlet(alpha, k, rng), room)
        room -= counts
        for client, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            assigned[client].append(chunk)
    return [np.sort(np.concatenate(parts)) for parts in assigned]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _client_capacities(total: int, k: int, size_spread: float, rng) -> np.ndarray:
    """Sizes summing to total, each within size_spread of the mean (before integer rounding)."""
    deviation = rng.uniform(-size_spread, size_spread, size=k)
    deviation -= deviation.mean()  # centred, so the sizes add up to total before rounding
    largest = np.abs(deviation).max()
    if largest > size_spread:
        deviation *= size_spread / largest
    capacity = _apportion(total, 1.0 + deviation)
    while (capacity == 0).any():  # only when there are barely more cases than clients
        capacity[np.argmax(capacity)] -= 1
        capacity[np.flatnonzero(capacity == 0)[0]] += 1
    return capacity


def _dirichlet(alpha: float, k: int, rng) -> np.ndarray:
    proportions = rng.dirichlet(np.full(k, float(alpha)))
    if not np.isfinite(proportions).all() or proportions.sum() <= 0:
        proportions = np.zeros(k)
        proportions[rng.integers(k)] = 1.0
    return proportions


def _fill(n: int, proportions: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Split n by proportions times room, never past room; overflow goes to clients with room.

    Scaling by room makes a flat draw (large alpha) give every client the overall mix instead of
    leaving the last stratum to fill whatever the earlier ones left unevenly.
    """
    weights = proportions * room
    if weights.sum() <= 0:  # all the mass fell on clients that are already full
        weights = room.astype(float)
    counts = np.minimum(_apportion(n, weights), room)
    while (left := n - counts.sum()) > 0:
        space = room - counts
        open_weights = np.where(space > 0, weights, 0.0)
        if open_weights.sum() <= 0:
            open_weights = space.astype(float)
        counts += np.minimum(_apportion(left, open_weights), space)
    return counts


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding: integers summing to total, each within 1 of its exact share."""
    weights = np.asarray(weights, dtype=float)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def split_dataset(data_dir: str | Path, out_dir: str | Path | None = None, clients: int = 10,
                  alpha: float = 1.0, test_fraction: float = 0.2, seed: int = 0,
                  force: bool = False) -> SplitSummary:
    """Write test/, train/, site-NN/ and split.json under out_dir (default data_dir/split).

    Everything is written to a hidden sibling first and renamed into place, so out_dir is never
    half-written and, with force, the old split survives until the new one is complete.
    """
    data_dir = Path(data_dir)
    out_dir = data_dir / "split" if out_dir is None else Path(out_dir)
    if not _is_int(seed) or seed < 0:
        raise InputError(f"the seed must be a non-negative integer, got {seed!r}")
    if not _is_real(test_fraction) or not 0 < test_fraction < 1:
        raise InputError(f"the test fraction must be between 0 and 1, got {test_fraction!r}")
    _check_out_dir(data_dir, out_dir, force)
    dataset = read_dataset(data_dir)

    # Separate streams: the test split depends on the seed alone, not on clients or alpha.
    holdout_seed, partition_seed = np.random.SeedSequence(int(seed)).spawn(2)
    holdout_rng, partition_rng = np.random.default_rng(holdout_seed), np.random.default_rng(partition_seed)
    train, test = stratified_holdout(dataset.cases, test_fraction, holdout_rng)
    if not test:
        raise InputError(f"a test fraction of {test_fraction} holds out no case of {len(dataset)}",
                         path=data_dir)
    strata = np.array([stratum(c) for c in train], dtype=np.int64)
    parts = partition_dirichlet(strata, clients, alpha, partition_rng)

    sites = [site_name(i, clients) for i in range(clients)]
    site_of = np.empty(len(train), dtype=object)
    for name, indices in zip(sites, parts):
        site_of[indices] = name
    train = [replace(c, site=site) for c, site in zip(train, site_of)]
    test = [replace(c, site=None) for c in test]
    splits = {name: [train[i] for i in indices] for name, indices in zip(sites, parts)}
    splits[TRAIN] = train
    splits[TEST] = test

    stratum_names = (NEGATIVE, *dataset.info.stage_names)
    summary = SplitSummary(
        out_dir=out_dir, source=data_dir.resolve(), seed=int(seed), alpha=float(alpha),
        clients=int(clients), test_fraction=float(test_fraction), stratum_names=stratum_names,
        counts={name: count_strata(cases, stratum_names) for name, cases in splits.items()})
    _write_split(dataset.root, dataset.info, splits, summary)
    return summary


def _check_out_dir(data_dir: Path, out_dir: Path, force: bool) -> None:
    out_real, data_real = out_dir.resolve(), data_dir.resolve()
    if out_real == data_real or out_real in data_real.parents:
        raise InputError("the output directory would contain the source dataset", path=out_dir,
                         hint="pick a directory outside it, e.g. the default DATA/split")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise InputError("the output directory already exists", path=out_dir,
                         hint="use --force to replace it")
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / SPLIT_FILE).is_file()):
        raise InputError(f"exists and is not a split directory (no {SPLIT_FILE}); refusing to "
                         "replace it", path=out_dir, hint="pick another output directory")


def count_strata(cases: list[Case], stratum_names: tuple[str, ...]) -> dict[str, int]:
    counts = np.bincount([stratum(c) for c in cases], minlength=len(stratum_names))
    return {name: int(n) for name, n in zip(stratum_names, counts)}


def _relative_image(case: Case, source_root: Path, split_dir: Path) -> Case:
    """Point the image path from the split directory back at the source file, not a copy."""
    if os.path.isabs(case.image):
        return case
    target = source_root / case.image
    try:
        return replace(case, image=Path(os.path.relpath(target, split_dir)).as_posix())
    except ValueError:  # different drives on Windows: no relative path exists
        return replace(case, image=str(target))


def _write_split(source: Path, info: DatasetInfo, splits: dict[str, list[Case]],
                 summary: SplitSummary) -> None:
    out_dir = summary.out_dir
    # Resolve both sides so '..' in the written paths walks the same directories the OS will.
    source_root, final_root = source.resolve(), out_dir.resolve()
    with staged_dir(final_root, force=True, what="split") as staging:
        for name, cases in splits.items():
            # the sites name the source's images (and those the source itself may name), not copies
            dirs = [_relative_path(d, final_root / name) for d in image_roots(source_root, info)]
            site_info = replace(info, extra={**info.extra, "image_dirs": dirs})
            write_dataset(staging / name, site_info,
                          [_relative_image(c, source_root, final_root / name) for c in cases])
        record = {
            "format": SPLIT_FORMAT,
            "source": _relative_path(source_root, final_root),
            "seed": summary.seed, "alpha": summary.alpha, "clients": summary.clients,
            "test_fraction": summary.test_fraction,
            "strata": list(summary.stratum_names),
            "counts": summary.counts,
        }
        (staging / SPLIT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _relative_path(target: Path, start: Path) -> str:
    """Relative so a split stays valid when the whole data tree is moved."""
    try:
        return Path(os.path.relpath(target, start)).as_posix()
    except ValueError:
        return str(target)


def is_split(path: str | Path) -> bool:
    return (Path(path) / SPLIT_FILE).is_file()


def pooled_parts(data: str | Path, eval_data: str | Path | None = None) -> tuple[Path, Path | None]:
    """Where a command that reads pooled cases finds them: a split directory (``fedlite data
    split``) means its ``train/`` and its held-out ``test/``; any other directory is one dataset,
    held out against ``eval_data`` if given. The one place a data argument is resolved."""
    data = Path(data)
    if is_split(data):
        return data / TRAIN, Path(eval_data) if eval_data else data / TEST
    return data, Path(eval_data) if eval_data else None


def load_split(out_dir: str | Path) -> SplitSummary:
    """Read split.json back, e.g. to print the table or find the sites of an existing split."""
    out_dir = Path(out_dir)
    path = out_dir / SPLIT_FILE
    if not path.is_file():
        raise InputError(f"no {SPLIT_FILE} here; is this a split directory?", path=out_dir,
                         hint="create one with 'fedlite data split DATA'")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        source = Path(raw["source"])
        summary = SplitSummary(
            out_dir=out_dir, source=source if source.is_absolute() else (out_dir / source).resolve(),
            seed=int(raw["seed"]), alpha=float(raw["alpha"]), clients=int(raw["clients"]),
            test_fraction=float(raw["test_fraction"]), stratum_names=tuple(raw["strata"]),
            counts={split: {name: int(counts[name]) for name in raw["strata"]}
                    for split, counts in raw["counts"].items()})
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid UTF-8 JSON: {exc}", path=path) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"malformed split file ({type(exc).__name__}: {exc})", path=path,
                         hint="re-create it with 'fedlite data split --force'") from None
    return summary


def format_split_table(summary: SplitSummary) -> str:
    """Per-site case mix at a glance: one row per site, then the test split and the total."""
    names = summary.stratum_names
    total = {name: summary.counts[TRAIN][name] + summary.counts[TEST][name] for name in names}
    rows = [(site, summary.counts[site]) for site in summary.sites]
    rows += [(TEST, summary.counts[TEST]), ("total", total)]

    header = ["split", "cases", *names, "positive %"]
    body = []
    for label, counts in rows:
        cases = sum(counts.values())
        positive = f"{100 * (cases - counts[NEGATIVE]) / cases:.1f}" if cases else "-"
        body.append([label, str(cases), *(str(counts[n]) for n in names), positive])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    rule = "-" * len(line(header))
    n_sites = len(summary.sites)
    return "\n".join([line(header), rule, *(line(r) for r in body[:n_sites]), rule,
                      *(line(r) for r in body[n_sites:])])
