"""The report as a reader gets it: one HTML page with its figures inlined (it opens offline and can
be attached to a protocol as it is), the same content as Markdown, and the numbers as JSON.

The content is built once as a list of blocks (headings, paragraphs, tables, figures) and written in
both formats, so the page and the Markdown never say different things."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from fedlite.atomic import atomic_write_bytes, atomic_write_text, json_text
from fedlite.plots import png_bytes, pyplot

HEADLINE = (("accuracy", "accuracy"), ("auc", "AUC"), ("stage_macro_f1", "stage macro-F1"))
COLOURS = {"model": "#1f5fa8", "bundle": "#d2691e"}


def _pct(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.1f} %"


def _num(value: float, spec: str = ".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _holds(flag: bool) -> str:
    return "holds" if flag else "does not hold"


def ordering_sentences(report: dict) -> list[str]:
    """The paper's claims checked on this report, stated plainly with their numbers."""
    m, o = report["models"], report["ordering"]
    lines = []
    for key, label in HEADLINE:
        fused, late = m["Fed-MMX centralized"][key], m["late fusion"][key]
        text, image = m["text only"][key], m["image only"][key]
        lines.append(f"On {label}, fused > late fusion {_holds(o[key]['fused_over_late_fusion'])} "
                     f"({_num(fused)} against {_num(late)}) and late fusion > each unimodal model "
                     f"{_holds(o[key]['late_fusion_over_unimodal'])} ({_num(late)} against text {_num(text)}, "
                     f"image {_num(image)}).")
    for key, label in HEADLINE:
        gap = o[key]["federated_minus_centralized"]
        lines.append(f"Federated minus centralized on {label}: {gap:+.3f} (the claim allows {-o[key]['tolerance']:.2f}"
                     f"): {'within' if o[key]['federated_within_tolerance'] else 'outside'} that distance.")
    return lines


def _models_figure(models: dict) -> bytes:
    plt = pyplot()
    names = list(models)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.27
    for i, (key, label) in enumerate(HEADLINE):
        ax.bar([x + (i - 1) * width for x in range(len(names))], [models[n][key] for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(ncol=3, loc="upper left", fontsize=8)
    ax.set_title("held-out metrics per model")
    fig.tight_layout()
    return png_bytes(fig)


def _confusion_figure(models: dict, stage_names: list[str]) -> bytes:
    plt = pyplot()
    names = list(models)
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        cm = models[name]["stage_confusion"]
        ax.imshow(cm, cmap="Blues")
        peak = max(max(r) for r in cm) or 1
        for i, row in enumerate(cm):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
        ax.set_xticks(range(len(stage_names)), [s.replace("Stage ", "") for s in stage_names], fontsize=7)
        ax.set_yticks(range(len(stage_names)), [s.replace("Stage ", "") for s in stage_names], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return png_bytes(fig)


def _robustness_figure(robustness: dict) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 * len(robustness), figsize=(4 * len(robustness) * 2, 3.2), squeeze=False)
    axes = list(axes.flat)
    for k, (kind, rows) in enumerate(robustness.items()):
        xs = [r["strength"] for r in rows]
        for m, (key, label) in enumerate(HEADLINE[:2]):
            ax = axes[2 * k + m]
            for who in ("model", "bundle"):
                if who in rows[0]:
                    ax.plot(xs, [r[who][key] for r in rows], marker="o", color=COLOURS[who],
                            label="federated model" if who == "model" else "INT8 bundle")
            ax.set_ylim(0, 1)
            ax.set_xlabel(f"{kind} σ" + (" (pixels)" if kind == "blur" else " (0-255)"))
            ax.set_title(f"{label} under {kind}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def _share_figure(shares: list[dict]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    xs = [s["share"] * 100 for s in shares]
    for key, label in HEADLINE:
        ax.plot(xs, [s[key] for s in shares], marker="o", label=label)
    ax.set_xlabel("share of the training cases (%)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("federated model against training data", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def report_blocks(report: dict) -> list[tuple]:
    """The report's content: ("h", text) | ("p", text) | ("table", header, rows) | ("figure", name, png)."""
    m, stages, st = report["models"], report["stage_names"], report["settings"]
    blocks: list[tuple] = [
        ("h", "fedlite report: the paper's comparisons on this split"),
        ("p", f"{report['evaluation_cases']} evaluation cases ({report['evaluated_on']}), "
              f"{len(report['sites'])} sites; this page took {report['seconds']['total'] / 60:.1f} min on "
              f"{report['machine']['cpu']} ({report['machine']['logical_cores']} cores), its runs, exports and "
              f"corrupted copies {report['seconds']['runs as built'] / 60:.1f} min when they were built."),
        ("h2", "What holds here"),
        *[("p", line) for line in ordering_sentences(report)],
        ("h2", "Models"),
        ("p", f"Each model as it stands after its last epoch or round: the pooled runs train {st['epochs']} epochs "
              f"on the sites' training parts (the cases federated training sees), Fed-MMX federated {st['rounds']} "
              f"rounds of one local epoch at each site. Late fusion averages the image-only and text-only models' "
              f"probabilities; 'no fusion layer' feeds both embeddings straight into the heads."),
        ("table", ["model", "accuracy", "AUC", "stage macro-F1", *[f"F1 {s}" for s in stages]],
         [[name, _pct(v["accuracy"]), _num(v["auc"]), _num(v["stage_macro_f1"]),
           *[_num(f) for f in v["stage_per_class_f1"]]] for name, v in m.items()]),
        ("figure", "models.png", _models_figure(m)),
        ("h2", "Stage confusion (positives only; rows true, columns predicted)"),
        ("figure", "stage-confusion.png", _confusion_figure(m, stages)),
        ("h2", "Robustness: blurred and noisy slides"),
    ]
    if report["bundle_refused"]:
        blocks.append(("p", "The INT8 bundle was refused by the export gate, so only the model is shown: "
                            + "; ".join(report["bundle_refused"])))
    for kind, rows in report["robustness"].items():
        has_bundle = "bundle" in rows[0]
        blocks.append(("table", [f"{kind} σ", "model accuracy", "model AUC"]
                       + (["bundle accuracy", "bundle AUC"] if has_bundle else []),
                       [[f"{r['strength']:g}", _pct(r["model"]["accuracy"]), _num(r["model"]["auc"])]
                        + ([_pct(r["bundle"]["accuracy"]), _num(r["bundle"]["auc"])] if has_bundle else [])
                        for r in rows]))
    blocks.append(("figure", "robustness.png", _robustness_figure(report["robustness"])))
    blocks += [
        ("h2", "Fewer training cases"),
        ("p", "Each site keeps the given share of its training cases (per stage, the same cases at every share); "
              "its validation part and the test cases do not change."),
        ("table", ["share", "accuracy", "AUC", "stage macro-F1"],
         [[f"{s['share']:.0%}", _pct(s["accuracy"]), _num(s["auc"]), _num(s["stage_macro_f1"])]
          for s in report["training_share"]]),
        ("figure", "training-share.png", _share_figure(report["training_share"])),
    ]
    e = report["explanations"]
    if not e:
        blocks += [("h2", "Explanations (SHAP, image patches and note tokens)"),
                   ("p", "Not measured: there is no bundle to explain (see the export gate above).")]
    else:
        rows = []
        for who in ("bundle", "teacher"):
            for output in ("leukemia", "stage"):
                image, text = e[who][output]["image"], e[who][output]["text"]
                rows.append([who, output, _pct(image["consistency"]), f"{image['sparsity']:.1f} / {image['features']}",
                             _pct(text["consistency"]), f"{text['sparsity']:.1f} / {text['mean_tokens']:.0f}"])
        overlap = e["top_k_overlap"]
        blocks += [
            ("h2", "Explanations (SHAP, image patches and note tokens)"),
            ("p", f"{e['cases']} evaluation cases explained with the INT8 bundle and with its teacher exported as "
                  f"it is (FP32, same explainer), {e['seconds_per_case']:.1f} s per case for the bundle. "
                  f"Consistency: top-{e['top_k']} features stable under bootstrap resampling of the cases; "
                  f"sparsity: features per case above 1 % of its largest value."),
            ("table", ["model", "output", "image consistency", "image sparsity", "note consistency",
                       "note sparsity"], rows),
            ("p", f"Top-{e['top_k']} overlap, bundle against teacher, per case: leukemia patches "
                  f"{_pct(overlap['leukemia']['image'])}, words {_pct(overlap['leukemia']['text'])}; stage "
                  f"patches {_pct(overlap['stage']['image'])}, words {_pct(overlap['stage']['text'])}."),
        ]
    s, mach = report["settings"], report["machine"]
    blocks += [
        ("h2", "Settings and machine"),
        ("table", ["setting", "value"],
         [[k, ", ".join(f"{x:g}" for x in v) if isinstance(v, (list, tuple)) else str(v)] for k, v in s.items()]
         + [["sites (cases)", ", ".join(f"{k} {v}" for k, v in report["sites"].items())],
            ["split", report["split"]]]),
        ("table", ["machine", "value"],
         [["CPU", mach["cpu"]], ["cores (logical / physical)", f"{mach['logical_cores']} / {mach['physical_cores']}"],
          ["memory", f"{mach['memory_gb']} GB"], ["INT8 instruction sets", ", ".join(mach["int8_instruction_sets"])],
          ["python", mach["python"]], *[[k, str(v)] for k, v in mach["versions"].items()]]),
        ("table", ["step", "minutes"], [[k, f"{v / 60:.1f}"] for k, v in report["seconds"].items()]),
        ("p", f"Created {report['created']}."),
    ]
    return blocks


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(f"{block[1]}\n")
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                 + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n")
        elif kind == "figure":
            out.append(f"![{block[1]}](figures/{block[1]})\n")
    return "\n".join(out)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#111}"
         "table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #bbb;padding:.25rem .6rem;"
         "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#eef2f7}"
         "img{max-width:100%}h2{margin-top:2rem;border-bottom:1px solid #ddd}")


def to_html(blocks: list[tuple]) -> str:
    out = ["<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedlite report</title>"
           f"<style>{STYLE}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h", "h2"):
            out.append(f"<{'h1' if kind == 'h' else 'h2'}>{html.escape(block[1])}</{'h1' if kind == 'h' else 'h2'}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in block[2])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "figure":
            data = base64.b64encode(block[2]).decode()
            out.append(f"<p><img alt=\"{html.escape(block[1])}\" src=\"data:image/png;base64,{data}\"></p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """report.html (figures inlined), report.md with figures/*.png beside it, report.json."""
    out = Path(out)
    blocks = report_blocks(report)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for block in blocks:
        if block[0] == "figure":
            atomic_write_bytes(out / "figures" / block[1], block[2])
    paths = {"html": out / "report.html", "markdown": out / "report.md", "json": out / "report.json"}
    atomic_write_text(paths["html"], to_html(blocks))
    atomic_write_text(paths["markdown"], to_markdown(blocks))
    atomic_write_text(paths["json"], json_text({**report, "files": {k: str(v) for k, v in paths.items()}}, indent=2)
                      + "\n")
    return paths
