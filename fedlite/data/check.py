"""``fedlite data check``: every problem in a dataset directory, each with file, line and field, so
the whole dataset can be fixed in one pass instead of one error per run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fedlite.data.images import load_image
from fedlite.data.manifest import MANIFEST, Dataset, parse_manifest, read_info
from fedlite.errors import InputError, Problem


@dataclass
class CheckReport:
    root: Path
    cases: int = 0
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(root: str | Path, decode_images: bool = True, progress: bool = False) -> CheckReport:
    """Validate the manifest and (unless told not to) decode every image it points at."""
    root = Path(root)
    report = CheckReport(root=root)
    if not root.is_dir():
        report.problems.append(Problem("dataset directory not found", root))
        return report
    manifest = root / MANIFEST
    if not manifest.is_file():
        report.problems.append(Problem(f"no {MANIFEST} in the dataset directory", root))
        return report
    try:
        info = read_info(root)
    except InputError as exc:
        report.problems.extend(exc.problems)
        return report
    cases, problems = parse_manifest(manifest, info.num_stages)
    report.problems.extend(problems)
    report.cases = len(cases)
    if not cases and not problems:
        report.problems.append(Problem("the manifest holds no cases", manifest))
    dataset = Dataset(root=root, info=info, cases=cases)
    line_of = _line_numbers(manifest)
    for case in tqdm(cases, desc="images", disable=not (progress and decode_images), unit="img"):
        path = dataset.image_path(case)
        if not decode_images:
            if not path.is_file():
                report.problems.append(Problem(f"image file not found: {path}", manifest, line_of.get(case.id), "image"))
            continue
        try:
            load_image(path)
        except InputError as exc:
            for p in exc.problems:
                report.problems.append(Problem(f"{p.message}: {path}", manifest, line_of.get(case.id),
                                               "image", p.hint))
    counts = Counter("negative" if c.leukemia == 0 else info.stage_names[c.stage] for c in cases)
    report.counts = {"negative": counts.get("negative", 0), **{n: counts.get(n, 0) for n in info.stage_names}}
    return report


def _line_numbers(manifest: Path) -> dict[str, int]:
    """id -> line, so image problems point at the manifest line that names the image."""
    import json

    lines: dict[str, int] = {}
    for lineno, raw in enumerate(manifest.read_bytes().split(b"\n"), start=1):
        try:
            record = json.loads(raw.decode("utf-8"))
            lines.setdefault(str(record["id"]), lineno)
        except (ValueError, KeyError, TypeError):
            continue
    return lines


def format_report(report: CheckReport) -> str:
    lines = [f"{report.root}: {report.cases} valid cases"]
    if report.counts:
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in report.counts.items()))
    if report.ok:
        lines.append("no problems found")
    else:
        lines.append(f"{len(report.problems)} problem(s):")
        lines.extend(f"  {p}" for p in report.problems)
    return "\n".join(lines)
