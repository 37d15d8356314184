"""Writing a benchmark: ``bench.json`` (everything), ``bench.md`` (tables a person reads) and
``bench.png`` (latency against accuracy, marker size by disk size). Written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from fedlite.atomic import atomic_write_text
from fedlite.bench.agent_bench import markdown as agent_markdown

TARGETS = {
    "p50_speedup_vs_teacher_torch_fp32": ("≥ 10×", 10.0),
    "p50_speedup_vs_teacher_onnx_int8": ("≥ 3×", 3.0),
    "size_ratio_vs_teacher_checkpoint": ("≥ 8×", 8.0),
}
RSS_TARGET_MB = 400


def _fmt(value, spec: str = ".1f", unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def _quality(q: dict) -> str:
    acc = _fmt(q.get("accuracy") and q["accuracy"] * 100, ".2f", " %") if "accuracy" in q else "–"
    return (f"{acc} | {_fmt(q.get('auc'), '.4f')} | {_fmt(q.get('stage_macro_f1'), '.3f')} | "
            f"{_fmt(q.get('case_agreement') and q['case_agreement'] * 100, '.1f', ' %')}")


def markdown(report: dict) -> str:
    m = report["machine"]
    threads = [int(t) for t in report["settings"]["threads"]]
    lines = [
        "# fedlite bench",
        "",
        f"Machine: {m['cpu']} ({m['architecture']}), {m['logical_cores']} logical / {m['physical_cores']} physical "
        f"cores, {m['memory_gb']} GB; INT8 instruction sets: {', '.join(m['int8_instruction_sets']) or 'none'}; "
        f"onnxruntime {m['versions']['onnxruntime']}, torch {m['versions']['torch']}.",
        f"Single stream: one case (image file + note) at a time, {report['settings']['runs']} timed runs × "
        f"{report['settings']['repeats']} repeats after {report['settings']['warmup']} warm-up runs, over "
        f"{report['settings']['cases_timed']} real cases from {report['settings']['timing_data']}. "
        f"Each configuration runs in its own fresh process; peak RSS covers loading and running, "
        f"first through the single-stream runs (batch 1), then including the throughput batches (all). "
        f"Session: {report['settings']['session']}.",
        "",
    ]
    for t in threads:
        lines += [f"## Latency per case, {t} thread{'s' if t > 1 else ''}", "",
                  "| model | p50 ms | p90 | p95 | p99 | mean ± std | load s | peak RSS MB, batch 1 / all | disk MB | "
                  "accuracy | AUC | stage F1 | agreement |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in report["variants"].items():
            r = v.get(str(t))
            if not r:
                continue
            lat = r["latency_ms"]
            lines.append(f"| {name} | {lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | "
                         f"{lat['mean']:.1f} ± {lat['std']:.1f} | {r['load_seconds']:.2f} | "
                         f"{r['peak_rss_single_stream_mb']:.0f} / {r['peak_rss_mb']:.0f} | "
                         f"{v['disk_bytes'] / 1e6:.1f} | {_quality(v['quality'])} |")
        lines.append("")
    top = str(max(threads))
    lines += [f"## Stages (p50 ms, {top} threads)", "",
              "| model | preprocess | tokenize | image encoder | text encoder | head |", "|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        s = v[top]["stage_latency_ms"]
        lines.append(f"| {name} | " + " | ".join(f"{s[k]['p50']:.2f}" for k in
                                                  ("preprocess", "tokenize", "image_encoder", "text_encoder", "head")) + " |")
    batches = report["settings"]["batches"]
    lines += ["", f"## Throughput (cases/s, encoders + head, {top} threads)", "",
              "| model | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for name, v in report["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{x['cases_per_second']:.1f}" for x in v[top]["throughput"]) + " |")
    lines += ["", "## Ratios (measured side by side in this run)", "", "| threads | comparison | measured | target |",
              "|---|---|---|---|"]
    for r in report["ratios"]:
        for key, (label, _) in TARGETS.items():
            lines.append(f"| {r['threads']} | {key.replace('_', ' ')} | {_fmt(r[key], '.1f', '×')} | {label} |")
        lines.append(f"| {r['threads']} | student INT8 peak RSS, single stream | "
                     f"{_fmt(r['student_int8_peak_rss_mb'], '.0f', ' MB')} | "
                     f"≤ {RSS_TARGET_MB} MB |")
    if report.get("agent"):
        lines += [""] + agent_markdown(report["agent"])
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from fedlite.plots import pyplot, save_figure

    plt = pyplot()

    top = str(max(int(t) for t in report["settings"]["threads"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in report["variants"].items():
        acc = v["quality"].get("accuracy")
        if acc is None:
            continue
        x = v[top]["latency_ms"]["p50"]
        ax.scatter([x], [acc * 100], s=max(20.0, v["disk_bytes"] / 1e6 * 3), alpha=0.6,
                   label=f"{name}: {x:.1f} ms, {v['disk_bytes'] / 1e6:.0f} MB")
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency per case, ms ({top} threads, log scale)")
    ax.set_ylabel("held-out accuracy, %")
    ax.set_title("latency vs accuracy (marker area ∝ size on disk)")
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8, loc="best", markerscale=0.5)
    for handle in legend.legend_handles:  # equal-size legend markers; the plot's areas carry the size
        handle.set_sizes([30])
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["markdown"], markdown(report))
    plot(report, paths["plot"])
    return paths
