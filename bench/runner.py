"""``fedlite bench``: the bundle against the baselines a hospital would otherwise deploy, measured
side by side in one run (each configuration in its own fresh process), accuracy beside every speed.

Baselines built from the teacher checkpoint: the FP32 torch teacher, the teacher exported to ONNX
FP32, and the teacher in ONNX INT8 with ONNX Runtime's fusions and avx512_vnni dynamic quantization
(what optimum's export + ORTOptimizer + ORTQuantizer path gives). The student appears in FP32 (the
bundle's ``-fp32`` sibling from ``fedlite export --keep-fp32``) and INT8 (the bundle). Other bundles
(``--beside``: students of another architecture, e.g. a MobileNetV2 beside ViT students) are timed in
the same run on the same cases, so their ratios are measured side by side.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fedlite.bench.agent_bench import AgentBenchSettings, run_agent_bench
from fedlite.bench.fresh_process import run_probe
from fedlite.bench.machine import machine_info
from fedlite.bench.stats import ratio
from fedlite.data.manifest import read_dataset
from fedlite.data.split import is_split, load_split, pooled_parts
from fedlite.errors import InputError
from fedlite.export.bundle import verify_bundle

log = logging.getLogger(__name__)
HEADLINE = ("accuracy", "auc", "stage_macro_f1", "case_agreement")


@dataclass
class Variant:
    name: str
    kind: str  # "bundle" (ONNX Runtime) or "torch"
    path: Path
    description: str
    disk_bytes: int
    quality: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BenchSettings:
    threads: tuple[int, ...] = (1, 2)
    batches: tuple[int, ...] = (1, 8, 32)
    runs: int = 100
    repeats: int = 3
    warmup: int = 10
    cases: int = 32
    timeout_s: int = 1800


def _quality(parity: dict, name: str) -> dict:
    model = parity.get("models", {}).get(name, {})
    return {k: model[k] for k in HEADLINE if k in model}


def _bundle_bytes(meta: dict) -> int:
    return sum(f["bytes"] for f in meta["files"].values())


def _checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def bundle_variants(bundle: Path, meta: dict, student_fp32: Path | None) -> list[Variant]:
    parity = meta.get("parity", {})
    quant = meta.get("quantization")
    label = "INT8" if quant else "FP32"
    variants = [Variant(f"student-onnx-{label.lower()}", "bundle", bundle, f"the bundle ({meta['preset']}, {label})",
                        _bundle_bytes(meta), _quality(parity, "bundle"))]
    if student_fp32 is not None and student_fp32.is_dir():
        variants.append(Variant("student-onnx-fp32", "bundle", student_fp32, "the same student, FP32 ONNX",
                                _bundle_bytes(verify_bundle(student_fp32)),
                                _quality(parity, "student-onnx-fp32") or _quality(parity, "student")))
    return variants


def beside_variants(bundles: list[Path], taken: set[str]) -> list[Variant]:
    """Other bundles timed in the same run; their quality is their own verification's."""
    variants = []
    for path in bundles:
        meta = verify_bundle(path)
        label = "INT8" if meta.get("quantization") else "FP32"
        name = f"beside-{path.name}"
        if name in taken:
            raise InputError(f"two bundles would both be reported as {name}", path=path,
                             hint="give the bundles --beside names distinct from each other and from BUNDLE")
        taken.add(name)
        parity = meta.get("parity", {})
        # an export's FP32 copy carries the INT8 bundle's report, in which it is the student-onnx-fp32 row
        row = "student-onnx-fp32" if label == "FP32" and "student-onnx-fp32" in parity.get("models", {}) else "bundle"
        variants.append(Variant(name, "bundle", path, f"another bundle ({meta['preset']}, {label})",
                                _bundle_bytes(meta), _quality(parity, row)))
    return variants


def teacher_variants(teacher: Path, work: Path, data: Path | None, bundle_parity: dict) -> list[Variant]:
    """The teacher as torch FP32, and exported as-is (no distillation or pruning) to ONNX FP32 and INT8."""
    from fedlite.export.parity import NO_GATE
    from fedlite.export.pipeline import ExportOptions, export_bundle
    from fedlite.export.prune import PruneConfig

    int8_dir, fp32_dir = work / "teacher-onnx-int8", work / "teacher-onnx-fp32"
    options = ExportOptions(distill=False, prune=PruneConfig(fraction=0.0), int8=True, fp32_copy=fp32_dir,
                            gate=NO_GATE, progress=False)
    log.info("exporting the teacher as-is to ONNX FP32 and INT8 for the baselines")
    result = export_bundle(teacher, int8_dir, options, data=data, force=True)
    parity = result.parity
    torch_quality = _quality(bundle_parity, "teacher") or _quality(parity, "teacher")
    return [
        Variant("teacher-torch-fp32", "torch", teacher, "the teacher checkpoint in torch FP32",
                _checkpoint_bytes(teacher), torch_quality),
        Variant("teacher-onnx-fp32", "bundle", fp32_dir, "the teacher exported to ONNX FP32 with ORT fusions",
                _bundle_bytes(verify_bundle(fp32_dir)), _quality(parity, "student-onnx-fp32")),
        Variant("teacher-onnx-int8", "bundle", int8_dir,
                "the teacher in ONNX INT8 (ORT fusions, avx512_vnni dynamic; optimum's path)",
                _bundle_bytes(result.meta), _quality(parity, "bundle")),
    ]


def timing_cases(data: Path, count: int) -> list[dict]:
    """Real cases (image file + note) so note lengths are the data's, spread over the dataset."""
    dataset = read_dataset(data)
    step = max(1, len(dataset) // count)
    chosen = dataset.cases[::step][:count]
    return [{"image": str(dataset.image_path(c)), "text": c.text} for c in chosen]


def measure(variant: Variant, threads: int, cases: list[dict], settings: BenchSettings) -> dict:
    spec = {"kind": variant.kind, "path": str(variant.path), "threads": threads, "cases": cases,
            "runs": settings.runs, "repeats": settings.repeats, "warmup": settings.warmup,
            "batches": list(settings.batches)}
    try:
        return run_probe("fedlite.bench.probe", spec, settings.timeout_s)
    except RuntimeError as exc:
        raise RuntimeError(f"measuring {variant.name} with {threads} threads failed: {exc}") from None


def _default_data(bundle_meta: dict) -> Path | None:
    recorded = bundle_meta.get("parity", {}).get("data")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def headline_ratios(results: dict, threads: int) -> dict:
    """The comparisons a deployment decision rests on, at one thread count."""
    def p50(name):
        entry = results.get(name, {}).get(str(threads))
        return entry["latency_ms"]["p50"] if entry else None

    def disk(name):
        return results.get(name, {}).get("disk_bytes")

    student = "student-onnx-int8"
    return {
        "threads": threads,
        "p50_speedup_vs_teacher_torch_fp32": ratio(p50("teacher-torch-fp32"), p50(student)),
        "p50_speedup_vs_teacher_onnx_int8": ratio(p50("teacher-onnx-int8"), p50(student)),
        "p50_speedup_vs_teacher_onnx_fp32": ratio(p50("teacher-onnx-fp32"), p50(student)),
        "size_ratio_vs_teacher_checkpoint": ratio(disk("teacher-torch-fp32"), disk(student)),
        "student_int8_peak_rss_mb": (results.get(student, {}).get(str(threads)) or {}).get("peak_rss_single_stream_mb"),
    }


def edge_site(data: Path | None, timing_data: Path) -> Path:
    """A site's cases for the edge round: the first site of a split, else the timing dataset."""
    if data is not None and is_split(data):
        sites = load_split(data).sites
        if sites:
            return data / sites[0]
    return timing_data


def run_bench(bundle: str | Path, teacher: str | Path | None = None, student_fp32: str | Path | None = None,
              data: str | Path | None = None, settings: BenchSettings = BenchSettings(),
              work: str | Path = "bench-work", progress: bool = True,
              agent: AgentBenchSettings | None = AgentBenchSettings(), site: str | Path | None = None,
              beside: tuple[str | Path, ...] = ()) -> dict:
    bundle = Path(bundle)
    meta = verify_bundle(bundle)
    if student_fp32 is None and bundle.with_name(bundle.name + "-fp32").is_dir():
        student_fp32 = bundle.with_name(bundle.name + "-fp32")
    variants = bundle_variants(bundle, meta, Path(student_fp32) if student_fp32 else None)
    variants += beside_variants([Path(b) for b in beside], {v.name for v in variants})
    timing_data = Path(data) if data else _default_data(meta)
    if timing_data is not None and is_split(timing_data):
        timing_data = pooled_parts(timing_data)[1]
    if timing_data is None:
        raise InputError("no cases to time: the bundle's verification data is not on this machine",
                         hint="pass --data DIR (a dataset or split directory)")
    if teacher is not None:
        if data is None:  # the baselines are exported and scored on cases someone chose, never assumed
            raise InputError("--teacher needs --data DIR: the teacher's ONNX baselines are verified on its cases",
                             hint="pass the split or held-out dataset the bundle was measured on")
        variants = teacher_variants(Path(teacher), Path(work), Path(data), meta.get("parity", {})) + variants
    cases = timing_cases(timing_data, settings.cases)
    results: dict[str, dict] = {}
    jobs = [(v, t) for v in variants for t in settings.threads]
    for variant, threads in tqdm(jobs, desc="bench", disable=not progress, unit="config"):
        entry = results.setdefault(variant.name, {**asdict(variant), "path": str(variant.path)})
        entry[str(threads)] = measure(variant, threads, cases, settings)
    agent_report = None
    if agent is not None:
        log.info("measuring the agent: explanations, an edge round, memory")
        agent_report = run_agent_bench(bundle, Path(teacher) if teacher else None, cases,
                                       Path(site) if site else edge_site(Path(data) if data else None, timing_data),
                                       max(settings.threads), agent,
                                       teacher_bundle=Path(work) / "teacher-onnx-int8" if teacher else None)
    return {
        "machine": machine_info(),
        "settings": {**asdict(settings), "timing_data": str(timing_data), "cases_timed": len(cases),
                     "session": "intra-op threads as listed, inter-op 1, no spinning, memory arena on"},
        "bundle": {"path": str(bundle), "preset": meta["preset"], "quantization": meta.get("quantization")},
        "variants": results,
        "ratios": [headline_ratios(results, t) for t in settings.threads],
        "agent": agent_report,
    }
