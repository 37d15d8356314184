"""The dataset format: a directory with ``manifest.jsonl`` (one case per line), ``dataset.json``
(label and stage names) and the image files the manifest points at.

Reading validates every record and reports *all* problems at once with file, line and field, so a
user can fix a manifest in one pass. Nothing is dropped: a bad record fails the read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fedlite.atomic import atomic_write_text
from fedlite.errors import InputError, Problem

MANIFEST = "manifest.jsonl"
DATASET_INFO = "dataset.json"
FORMAT = "fedlite-dataset/1"
DEFAULT_STAGE_NAMES = ("Stage I", "Stage II", "Stage III", "Stage IV")
LABEL_NAMES = ("no leukemia", "leukemia")
# A clinical note is a few hundred words; a note this long is almost certainly a wrong field or a
# pasted record, and truncating it to the model's window would silently discard most of it.
MAX_NOTE_CHARS = 20_000
REQUIRED_FIELDS = ("id", "image", "text", "leukemia", "stage")


@dataclass(frozen=True)
class Case:
    """One patient case: a smear image and the clinical note, with labels."""

    id: str
    image: str
    text: str
    leukemia: int
    stage: int | None
    site: str | None = None

    def to_record(self) -> dict:
        record = asdict(self)
        if record["site"] is None:
            del record["site"]
        return record


@dataclass(frozen=True)
class DatasetInfo:
    """What the labels mean; stored beside the manifest so a dataset is self-describing."""

    stage_names: tuple[str, ...] = DEFAULT_STAGE_NAMES
    label_names: tuple[str, ...] = LABEL_NAMES
    extra: dict = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    @property
    def image_dirs(self) -> list[str]:
        """Directories outside the dataset's own that its manifest may name images in, as dataset.json
        declares them (relative to the dataset directory, or absolute): a split's sites name the
        images of the dataset they were split from. Any other path leaving the directory is refused."""
        return list(self.extra.get("image_dirs", []))

    def to_json(self) -> dict:
        return {"format": FORMAT, "label_names": list(self.label_names),
                "stage_names": list(self.stage_names), **self.extra}


@dataclass
class Dataset:
    """A validated dataset directory: where it is, what its labels mean, and its cases."""

    root: Path
    info: DatasetInfo
    cases: list[Case]

    def image_path(self, case: Case) -> Path:
        return (self.root / case.image).resolve() if not os.path.isabs(case.image) else Path(case.image).resolve()

    def __len__(self) -> int:
        return len(self.cases)


def read_info(root: Path) -> DatasetInfo:
    path = root / DATASET_INFO
    if not path.exists():
        return DatasetInfo()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid UTF-8 JSON: {exc}", path=path) from None
    stage_names = raw.get("stage_names", list(DEFAULT_STAGE_NAMES))
    if (not isinstance(stage_names, list) or len(stage_names) < 1
            or not all(isinstance(s, str) and s for s in stage_names)):
        raise InputError("must be a non-empty list of names", path=path, field="stage_names")
    extra = {k: v for k, v in raw.items() if k not in ("format", "label_names", "stage_names")}
    dirs = extra.get("image_dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) and d.strip() for d in dirs):
        raise InputError("must be a list of directory paths", path=path, field="image_dirs")
    return DatasetInfo(stage_names=tuple(stage_names), extra=extra)


def image_roots(root: Path, info: DatasetInfo) -> list[Path]:
    """Where a dataset's images may be: its own directory and the ones dataset.json declares."""
    return [root.resolve(), *((root / d).resolve() for d in info.image_dirs)]


def _confinement_problems(dataset: "Dataset", manifest: Path) -> list[Problem]:
    roots = image_roots(dataset.root, dataset.info)
    problems = []
    for case in dataset.cases:
        path = dataset.image_path(case)
        if not any(path.is_relative_to(r) for r in roots):
            problems.append(Problem(f"image path {case.image!r} leaves the dataset directory", manifest,
                                    field="image", hint="keep images inside the dataset directory, or declare "
                                    "their directory in dataset.json's \"image_dirs\""))
    return problems


def _validate_record(raw: object, num_stages: int) -> tuple[Case | None, list[tuple[str | None, str, str | None]]]:
    """Check one parsed line; returns the case (if valid) and (field, message, hint) problems."""
    if not isinstance(raw, dict):
        return None, [(None, "each line must be a JSON object", None)]
    issues: list[tuple[str | None, str, str | None]] = []
    for name in REQUIRED_FIELDS:
        if name not in raw:
            hint = "use null for negatives" if name == "stage" else None
            issues.append((name, "missing", hint))
    if issues:
        return None, issues
    case_id, image, text = raw["id"], raw["image"], raw["text"]
    leukemia, stage, site = raw["leukemia"], raw["stage"], raw.get("site")
    if isinstance(case_id, int) and not isinstance(case_id, bool):
        case_id = str(case_id)
    if not isinstance(case_id, str) or not case_id.strip():
        issues.append(("id", "must be a non-empty string", None))
    if not isinstance(image, str) or not image.strip():
        issues.append(("image", "must be a non-empty path relative to the dataset directory", None))
    if not isinstance(text, str):
        issues.append(("text", f"must be a string, got {type(text).__name__}", None))
    elif not text.strip():
        issues.append(("text", "the clinical note is empty", "every case needs its note"))
    elif len(text) > MAX_NOTE_CHARS:
        issues.append(("text", f"the note is {len(text):,} characters, far past the {MAX_NOTE_CHARS:,} "
                       "a clinical note can have", "check that the right field was exported"))
    if isinstance(leukemia, bool) or leukemia not in (0, 1):
        issues.append(("leukemia", f"must be 0 or 1, got {leukemia!r}", None))
    if leukemia == 1 and not isinstance(leukemia, bool):
        if stage is None:
            issues.append(("stage", "positive cases need a stage", f"an integer 0..{num_stages - 1}"))
        elif isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages:
            issues.append(("stage", f"must be an integer 0..{num_stages - 1}, got {stage!r}",
                           f"{DATASET_INFO} names {num_stages} stages"))
    elif leukemia == 0 and stage is not None:
        issues.append(("stage", f"negative cases carry no stage, got {stage!r}", "use null"))
    if site is not None and not isinstance(site, str):
        issues.append(("site", "must be a string or absent", None))
    if issues:
        return None, issues
    return Case(id=case_id, image=image, text=text, leukemia=leukemia, stage=stage, site=site), []


def parse_manifest(path: Path, num_stages: int) -> tuple[list[Case], list[Problem]]:
    """Parse and validate every line; returns the good cases and every problem found."""
    cases: list[Case] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    data = path.read_bytes()
    for lineno, raw_line in enumerate(data.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(f"not valid UTF-8 at byte {exc.start}", path, lineno,
                                    hint="re-export the manifest as UTF-8"))
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"not valid JSON: {exc.msg} (column {exc.colno})", path, lineno))
            continue
        case, issues = _validate_record(raw, num_stages)
        for name, message, hint in issues:
            problems.append(Problem(message, path, lineno, name, hint))
        if case is None:
            continue
        if case.id in seen:
            problems.append(Problem(f"duplicate id {case.id!r}, first seen on line {seen[case.id]}",
                                    path, lineno, "id", "ids must be unique"))
            continue
        seen[case.id] = lineno
        cases.append(case)
    return cases, problems


def read_dataset(root: str | Path) -> Dataset:
    """Read and validate a dataset directory; raises InputError listing every problem."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset directory not found", path=root,
                         hint="create one with 'fedlite data synth DIR'")
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise InputError(f"no {MANIFEST} in the dataset directory", path=root)
    info = read_info(root)
    cases, problems = parse_manifest(manifest, info.num_stages)
    if problems:
        raise InputError(problems)
    if not cases:
        raise InputError("the manifest holds no cases", path=manifest)
    dataset = Dataset(root=root, info=info, cases=cases)
    problems = _confinement_problems(dataset, manifest)
    if problems:
        raise InputError(problems)
    return dataset


def write_dataset(root: str | Path, info: DatasetInfo, cases: list[Case]) -> None:
    """Write manifest and info atomically: a reader never sees a half-written manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / DATASET_INFO, json.dumps(info.to_json(), indent=2) + "\n")
    lines = "".join(json.dumps(c.to_record(), ensure_ascii=False) + "\n" for c in cases)
    atomic_write_text(root / MANIFEST, lines)


def write_relocated(root: str | Path, parts: list[Dataset]) -> None:
    """The cases of ``parts`` (datasets with the same labels, e.g. a split's sites or a subset of
    one) written as one dataset elsewhere: images stay where they are, named by absolute path, and
    their directories are declared."""
    dirs = list(dict.fromkeys(str(r) for part in parts for r in image_roots(part.root, part.info)))
    info = replace(parts[0].info, extra={**parts[0].info.extra, "image_dirs": dirs})
    write_dataset(root, info, [replace(c, image=str(part.image_path(c))) for part in parts for c in part.cases])
