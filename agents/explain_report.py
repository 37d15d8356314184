"""Writing one case's explanation for the people at the site: a PNG heatmap over the smear, an HTML
page with the note's words highlighted beside it, and the values as JSON.

These files hold the note and per-case attributions, so they are created owner-only (directory 0700,
files 0600) in the site's report directory and never leave it. A case's report is staged and
renamed into place: a crash never leaves a mix of an old and a new explanation.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path

import numpy as np

from fedlite.agents.explain import CaseExplanation, stage_phrase
from fedlite.atomic import atomic_write_bytes, atomic_write_text, owner_only_dir, staged_dir

OWNER_ONLY = 0o600
PNG, HTML, JSON = "explanation.png", "explanation.html", "explanation.json"
# a modality that moved an output by less than this (in probability) contributed nothing to it
NO_CHANGE = 1e-3


def safe_case_name(case_id: str) -> str:
    """A directory name from a case id: what is not a letter, digit, '-', '_' or '.' becomes '_';
    an id that had to change also gets a short hash of itself, so two ids never share a folder
    ('a/b' and 'a_b')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", case_id).strip(".")
    if name == case_id:
        return name
    return f"{name or 'case'}-{hashlib.sha256(case_id.encode('utf-8')).hexdigest()[:10]}"


def explanation_record(expl: CaseExplanation, case_id: str, bundle_meta: dict, note: str) -> dict:
    """Everything the JSON file holds: values per output, base values, prediction, additivity
    errors, top features, the joint profile and timings."""
    outputs = range(len(expl.output_names))
    weight = expl.settings["modality_weight"]
    words = [{"text": note[w["begin"]: w["end"]], **w} for w in expl.words]
    word_values = [expl.word_values(o) for o in outputs]
    return {
        "case": case_id,
        "bundle": {"version": bundle_meta.get("bundle_version"), "content_sha256": bundle_meta.get("content_sha256"),
                   "preset": bundle_meta.get("preset")},
        "prediction": expl.prediction,
        "output_names": expl.output_names,
        "settings": expl.settings,
        "image": {
            "grid": expl.grid, "patch_size": bundle_meta["model"]["patch_size"],
            "values": [expl.image_map(o).tolist() for o in outputs],
            "base_values": expl.image.base_values.tolist(), "outputs": expl.image.outputs.tolist(),
            "additivity_error": expl.image.additivity_error.tolist(), "evaluations": expl.image.evaluations,
            "top_patches": [[{"row": i // expl.grid, "col": i % expl.grid, "value": float(expl.image.values[i, o])}
                             for i in expl.image.top_features(o)] for o in outputs],
        },
        "text": {
            "tokens": expl.tokens,
            "values": [expl.text.values[:, o].tolist() for o in outputs],
            "words": [{**w, "values": [word_values[o][i] for o in outputs]} for i, w in enumerate(words)],
            "base_values": expl.text.base_values.tolist(), "outputs": expl.text.outputs.tolist(),
            "additivity_error": expl.text.additivity_error.tolist(), "evaluations": expl.text.evaluations,
            "top_tokens": [[{"position": i, "token": expl.tokens[i], "value": float(expl.text.values[i, o])}
                            for i in expl.text.top_features(o)] for o in outputs],
        },
        "modality_changes": [modality_changes(expl, o) for o in outputs],
        "joint_profile": {"lambda": weight, "note": "each modality L2-normalised; not a ranking across modalities",
                          "values": [expl.joint_profile(o, weight).tolist() for o in outputs]},
        "timings": expl.timings,
    }


def modality_changes(expl: CaseExplanation, output: int) -> dict:
    """How far each modality moved the output from its base value (the output with that modality
    masked and the other kept), and its share of the two moves together."""
    change = {name: float(part.outputs[output] - part.base_values[output])
              for name, part in (("image", expl.image), ("text", expl.text))}
    total = sum(abs(v) for v in change.values())
    return {name: {"change": v, "share": abs(v) / total if total > 0 else 0.0, "nothing": abs(v) < NO_CHANGE}
            for name, v in change.items()}


def colour_bound(expl: CaseExplanation, output: int) -> float:
    """One colour scale for both modalities of an output, so a modality that moved it little looks
    pale; never finer than NO_CHANGE, so values that together change nothing never look strong."""
    words = [abs(v) for v in expl.word_values(output)]
    return max(float(np.abs(expl.image.values[:, output]).max(initial=0.0)), max(words, default=0.0), NO_CHANGE)


def render_png(expl: CaseExplanation, smear_rgb: np.ndarray) -> bytes:
    """The smear beside one heatmap of patch values per explained output (red: raises the output)."""
    from fedlite.plots import png_bytes, pyplot

    plt = pyplot()
    n = len(expl.output_names)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * (n + 1), 4.4))
    axes[0].imshow(smear_rgb)
    pred = expl.prediction
    axes[0].set_title(f"{pred['leukemia']} (P = {pred['leukemia_probability']:.2f})", fontsize=10)
    size = smear_rgb.shape[0]
    for o, ax in enumerate(axes[1:]):
        values = expl.image_map(o)
        bound = colour_bound(expl, o)
        ax.imshow(smear_rgb)
        shown = ax.imshow(values, cmap="bwr", vmin=-bound, vmax=bound, alpha=0.55,
                          extent=(0, size, size, 0), interpolation="nearest")
        moved = modality_changes(expl, o)["image"]
        ax.set_title(f"image, {expl.output_names[o]} = {expl.image.outputs[o]:.2f}\n"
                     + ("the image contributed nothing" if moved["nothing"] else
                        f"moved it {moved['change']:+.3f} ({moved['share']:.0%} of the change)"), fontsize=9)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return png_bytes(fig, dpi=100)


def _colour(value: float, bound: float) -> tuple[int, int, int]:
    strength = min(1.0, abs(value) / bound) if bound > 0 else 0.0
    fade = int(round(255 * (1 - strength)))
    return (255, fade, fade) if value > 0 else (fade, fade, 255)


def _luminance(rgb: tuple[int, int, int]) -> float:
    linear = [c / 255 / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast_ratio(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours (1 to 21; 4.5 is the floor for body text)."""
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on the background."""
    return max(((0, 0, 0), (255, 255, 255)), key=lambda c: contrast_ratio(c, background))


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def _moves(record: dict, o: int) -> str:
    name = html.escape(record["output_names"][o])
    said = []
    for modality, label in (("image", "the image"), ("text", "the note")):
        moved = record["modality_changes"][o][modality]
        said.append(f"{label} contributed nothing (moved it {moved['change']:+.4f})" if moved["nothing"] else
                    f"{label} moved it {moved['change']:+.3f} ({moved['share']:.0%} of the change)")
    return f"<p class=moves>{name}: {'; '.join(said)}.</p>"


def render_html(record: dict, note: str, png: bytes, bounds: list[float]) -> str:
    """One self-contained page: the heatmaps and, beside them, the note once per explained output,
    each word on its colour with the text colour that stays legible; ``bounds``: each output's colour
    scale, shared with the heatmaps."""
    parts = []
    for o, name in enumerate(record["output_names"]):
        values = [w["values"][o] for w in record["text"]["words"]]
        spans, cursor = [], 0
        for word, value in zip(record["text"]["words"], values):
            begin, end = word["begin"], word["end"]
            background = _colour(value, bounds[o])
            spans.append(html.escape(note[cursor:begin]))
            spans.append(f'<span style="background:{_hex(background)};color:{_hex(text_colour(background))}" '
                         f'title="{value:+.4f}">{html.escape(note[begin:end])}</span>')
            cursor = end
        spans.append(html.escape(note[cursor:]))
        err = record["text"]["additivity_error"][o]
        parts.append(f"<h3>{html.escape(name)}: note</h3>{_moves(record, o)}<p class=note>{''.join(spans)}</p>"
                     f"<p class=small>note: base {record['text']['base_values'][o]:.3f} → "
                     f"{record['text']['outputs'][o]:.3f}; additivity error {err:.1e}</p>")
    pred = record["prediction"]
    summary = (f"{html.escape(pred['leukemia'])}: P(leukemia) = {pred['leukemia_probability']:.3f}"
               + (f", {html.escape(stage_phrase(pred['stage']))}" if pred["stage"] else ""))
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedlite explanation: {html.escape(record['case'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#111;background:#fff}} .row{{display:flex;gap:2em;flex-wrap:wrap}}
.note{{line-height:1.8;max-width:48em}} .note span{{padding:0 .1em;border-radius:.2em}} .small{{color:#555;font-size:.85em}}
.moves{{font-weight:bold}} img{{max-width:100%}}</style></head>
<body><h2>Case {html.escape(record['case'])}</h2><p>{summary}</p>
<p class=small>Red raises the output, blue lowers it. Each output's image patches and note words share one colour
scale, so a pale modality moved the prediction little; each modality is explained with the other kept as it is.</p>
<div class=row><div><img src="data:image/png;base64,{image}" alt="SHAP heatmaps over the smear"></div>
<div>{''.join(parts)}</div></div>
<p class=small>bundle version {record['bundle']['version']}, max_evals {record['settings']['max_evals']} per modality,
baseline {html.escape(record['settings']['baseline'])}; {record['timings']['total_seconds']:.2f} s</p>
</body></html>
"""


def write_explanation(expl: CaseExplanation, case_id: str, note: str, smear_rgb: np.ndarray, bundle_meta: dict,
                      report_dir: str | Path) -> dict[str, Path]:
    """Write PNG, HTML and JSON into ``report_dir/<case>/``, owner-only; returns their paths."""
    report_dir = Path(report_dir)
    owner_only_dir(report_dir)
    final = report_dir / safe_case_name(case_id)
    record = explanation_record(expl, case_id, bundle_meta, note)
    png = render_png(expl, smear_rgb)
    with staged_dir(final, force=True, what="explanation") as staged:  # mkdtemp: 0700
        atomic_write_bytes(staged / PNG, png, OWNER_ONLY)
        bounds = [colour_bound(expl, o) for o in range(len(expl.output_names))]
        atomic_write_text(staged / HTML, render_html(record, note, png, bounds), OWNER_ONLY)
        atomic_write_text(staged / JSON, json.dumps(record, indent=2) + "\n", OWNER_ONLY)
    return {"png": final / PNG, "html": final / HTML, "json": final / JSON}
