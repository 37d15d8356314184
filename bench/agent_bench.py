"""The agent's costs beside the inference benchmark: explanations against naive shap on the teacher,
an edge round (embedding a site's cases, training the head, bytes sent), and peak memory of the
agent's heavy path against a server's RAM. Every measurement runs in a fresh process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlite.bench.fresh_process import run_probe
from fedlite.bench.stats import ratio

SERVERS_GB = (8, 16)


@dataclass(frozen=True)
class AgentBenchSettings:
    explain_cases: int = 3
    max_evals: int = 500
    edge_epochs: int = 3
    edge_lr: float = 5e-3
    topk: float = 0.1
    ram_budget_bytes: int | None = None
    timeout_s: int = 3600


def _overlap(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / max(1, len(a))


def top10_overlap(ours: list[dict], reference: list[dict]) -> dict:
    """Mean share of the reference's top-10 patches and tokens that the bundle's explanation also
    ranks top-10, per explained output (0: leukemia, 1: predicted stage)."""
    out = {}
    for key in ("top_patches", "top_tokens"):
        out[key] = [float(np.mean([_overlap(o[key][k], r[key][k]) for o, r in zip(ours, reference)]))
                    for k in range(len(ours[0][key]))]
    return out


def _mean(cases: list[dict], key: str) -> float:
    return float(np.mean([c[key] for c in cases]))


def run_agent_bench(bundle: Path, teacher: Path | None, cases: list[dict], site: Path | None, threads: int,
                    settings: AgentBenchSettings, teacher_bundle: Path | None = None) -> dict:
    """``teacher_bundle``: the teacher exported as-is to INT8; its explanations against the naive
    reference separate what the fast path changes from what distillation changes."""
    module = "fedlite.bench.agent_probe"
    report: dict = {"threads": threads, "max_evals": settings.max_evals}
    if settings.explain_cases > 0:
        chosen = cases[:settings.explain_cases]
        spec = {"path": str(bundle), "threads": threads, "max_evals": settings.max_evals, "cases": chosen}
        ours = run_probe(module, {**spec, "kind": "explain"}, settings.timeout_s)
        explain = {"cases": len(chosen), "bundle": ours, "seconds_per_case": _mean(ours["cases"], "seconds")}
        if teacher is not None:
            ref = run_probe(module, {**spec, "kind": "explain-reference", "path": str(teacher)}, settings.timeout_s)
            explain.update(reference=ref, reference_seconds_per_case=_mean(ref["cases"], "seconds"),
                           speedup_vs_reference=ratio(_mean(ref["cases"], "seconds"), explain["seconds_per_case"]),
                           top10_overlap=top10_overlap(ours["cases"], ref["cases"]))
            if teacher_bundle is not None:
                same = run_probe(module, {**spec, "kind": "explain", "path": str(teacher_bundle)}, settings.timeout_s)
                explain.update(teacher_bundle=same, teacher_bundle_top10_overlap=top10_overlap(same["cases"],
                                                                                             ref["cases"]))
        report["explain"] = explain
    if site is not None:
        edge = run_probe(module, {"kind": "edge", "path": str(bundle), "site": str(site), "threads": threads,
                                  "epochs": settings.edge_epochs, "lr": settings.edge_lr, "topk": settings.topk,
                                  "max_evals": settings.max_evals}, settings.timeout_s)
        train = edge["stages"]["train_round"]
        edge["student_to_update_ratio"] = ratio(train["student_fp32_bytes"], train["update_bytes"])
        edge["site"] = str(site)
        report["edge"] = edge
        peak = edge["peak_rss_mb"]
        budgets = {f"{gb} GB server": gb * 1024 for gb in SERVERS_GB}
        if settings.ram_budget_bytes:
            budgets["--ram-budget"] = settings.ram_budget_bytes / 2**20
        report["memory"] = {"heavy_path_peak_rss_mb": peak,
                            "headroom_mb": {name: mb - peak for name, mb in budgets.items()},
                            "fits_budget": all(mb > peak for mb in budgets.values())}
    return report


def markdown(agent: dict) -> list[str]:
    lines = []
    explain = agent.get("explain")
    if explain:
        lines += ["## Explanation cost (SHAP Partition, both modalities, one case)", "",
                  f"{explain['cases']} cases, max_evals {agent['max_evals']} per modality, {agent['threads']} threads; "
                  f"shap's import ({explain['bundle']['shap_import_seconds']:.1f} s, once per process) not included.",
                  "", "| explainer | seconds per case | image s | note s | largest additivity error |", "|---|---|---|---|---|"]
        rows = [("fedlite explain (bundle, cached embeddings)", explain["bundle"])]
        if "teacher_bundle" in explain:
            rows.append(("fedlite explain on the teacher in ONNX INT8", explain["teacher_bundle"]))
        if "reference" in explain:
            rows.append(("naive shap on the torch FP32 teacher", explain["reference"]))
        for name, result in rows:
            cases = result["cases"]
            lines.append(f"| {name} | {_mean(cases, 'seconds'):.2f} | {_mean(cases, 'image_seconds'):.2f} | "
                         f"{_mean(cases, 'text_seconds'):.2f} | "
                         f"{max(c['additivity_error'] for c in cases):.1e} |")
        if "reference" in explain:
            ov = explain["top10_overlap"]
            lines += ["", f"Speed-up over the naive reference: {explain['speedup_vs_reference']:.1f}× (target ≥ 20×; "
                      f"≤ 5 s per case). Top-10 overlap with the reference, leukemia / stage: patches "
                      f"{ov['top_patches'][0]:.0%} / {ov['top_patches'][1]:.0%}, tokens "
                      f"{ov['top_tokens'][0]:.0%} / {ov['top_tokens'][1]:.0%} (the student is another model than "
                      f"the teacher)."]
            if "teacher_bundle_top10_overlap" in explain:
                ov = explain["teacher_bundle_top10_overlap"]
                lines.append(f"The same teacher through fedlite's path (split graphs, cached embedding, INT8) against "
                             f"the naive reference: patches {ov['top_patches'][0]:.0%} / {ov['top_patches'][1]:.0%}, "
                             f"tokens {ov['top_tokens'][0]:.0%} / {ov['top_tokens'][1]:.0%}.")
        lines.append("")
    edge = agent.get("edge")
    if edge:
        s = edge["stages"]
        t = s["train_round"]
        lines += ["## Edge round (one site, fresh process)", "", "| step | seconds | peak RSS MB | notes |",
                  "|---|---|---|---|",
                  f"| embed the site's cases | {s['embed']['seconds']:.2f} | {s['embed']['peak_rss_mb']:.0f} | "
                  f"{s['embed']['cases']} cases, INT8 encoders; from the cache next time: "
                  f"{s['embed_cached']['seconds']:.3f} s |",
                  f"| train the head, encode the update | {t['seconds']:.2f} | {t['peak_rss_mb']:.0f} | {t['epochs']} "
                  f"epochs; local loss {t['local_loss_before']:.3f} → {t['local_loss_after']:.3f}; update "
                  f"{t['update_bytes'] / 1e3:.1f} kB vs {t['student_fp32_bytes'] / 1e6:.1f} MB dense FP32 student "
                  f"({edge['student_to_update_ratio']:.0f}×, target ≥ 100×) |",
                  f"| explain one case | {s['explain']['seconds']:.2f} | {s['explain']['peak_rss_mb']:.0f} | "
                  f"after importing shap ({s['explain']['shap_import_seconds']:.1f} s) |", ""]
    memory = agent.get("memory")
    if memory:
        lines += [f"Peak RSS of the agent's heavy path (embed, train a round, explain): "
                  f"{memory['heavy_path_peak_rss_mb']:.0f} MB; headroom: " +
                  ", ".join(f"{name} {mb / 1024:.1f} GB" for name, mb in memory["headroom_mb"].items()) + ".", ""]
    return lines
