"""A case's explanation page as a clinician reads it: every highlighted word legible on its colour,
each modality's share of the change stated (and a modality that changed nothing said so), one colour
scale for both modalities, and stage names written once."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fedlite.agents.explain import CaseExplanation, ModalityExplanation
from fedlite.agents.explain_report import (NO_CHANGE, colour_bound, contrast_ratio, modality_changes, text_colour,
                                          write_explanation)

NOTE = "Marked leukocytosis with blasts; fatigue and bruising."
WORDS = [(0, 6), (7, 19), (20, 24), (25, 31), (33, 40), (41, 44), (45, 53)]


def _explanation(image_scale: float, word_scale: float = 1.0) -> CaseExplanation:
    """Image patch values of about ``image_scale``; the note's words carry the rest of the change."""
    rng = np.random.default_rng(0)
    word_values = word_scale * np.array([[0.30, 0.05], [-0.20, 0.02], [0.01, 0.0], [0.15, -0.1], [-0.04, 0.3], [0.0, 0.0],
                            [0.08, 0.01]])
    text_values = np.vstack([np.zeros((1, 2)), word_values, np.zeros((1, 2))])  # [CLS] words [SEP]
    image_values = rng.normal(0, image_scale, (4, 2))
    outputs = np.array([0.9, 0.7])
    return CaseExplanation(
        output_names=["P(leukemia)", "P(Stage II)"],
        prediction={"leukemia": "leukemia", "leukemia_probability": 0.9, "stage": "Stage II",
                    "explained_stage": "Stage II", "stage_probabilities": {"Stage II": 0.7}},
        image=ModalityExplanation(image_values, outputs - image_values.sum(0), outputs, 100, 0.1),
        text=ModalityExplanation(text_values, outputs - text_values.sum(0), outputs, 100, 0.1),
        grid=2, tokens=["[CLS]", *(f"w{i}" for i in range(len(WORDS))), "[SEP]"],
        words=[{"tokens": [i + 1], "begin": b, "end": e} for i, (b, e) in enumerate(WORDS)],
        timings={"total_seconds": 0.2}, settings={"modality_weight": 0.5, "max_evals": 100, "baseline": "mean"})


def _written(expl: CaseExplanation, tmp_path) -> tuple[str, dict]:
    smear = np.full((32, 32, 3), 200, np.uint8)
    paths = write_explanation(expl, "case-1", NOTE, smear, {"bundle_version": 1, "model": {"patch_size": 16}},
                              tmp_path)
    return paths["html"].read_text(), json.loads(paths["json"].read_text())


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_contrast_follows_wcag():
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio((10, 20, 30), (10, 20, 30)) == pytest.approx(1.0)
    assert text_colour((0, 0, 255)) == (255, 255, 255) and text_colour((255, 230, 230)) == (0, 0, 0)


def test_every_highlighted_word_is_legible(tmp_path):
    page, _ = _written(_explanation(0.05), tmp_path)
    spans = re.findall(r'<span style="background:(#[0-9a-f]{6});color:(#[0-9a-f]{6})"[^>]*>([^<]*)</span>', page)
    assert len(spans) == 2 * len(WORDS)  # the note once per output
    assert "#0000ff" in {bg for bg, _, _ in spans} or "#ff0000" in {bg for bg, _, _ in spans}  # full strength
    worst = min(contrast_ratio(_rgb(bg), _rgb(fg)) for bg, fg, _ in spans)
    assert worst >= 4.5, f"a word at contrast {worst:.2f}"


def test_the_page_says_what_each_modality_moved_and_when_one_moved_nothing(tmp_path):
    expl = _explanation(1e-5)
    page, record = _written(expl, tmp_path)
    moved = record["modality_changes"][0]
    assert moved["image"]["nothing"] and not moved["text"]["nothing"]
    assert moved["text"]["share"] > 0.99 and moved["text"]["change"] == pytest.approx(0.30, abs=1e-9)
    assert "the image contributed nothing" in page
    assert re.search(r"the note moved it \+0\.300 \((99|100)% of the change\)", page)
    assert "stage Stage" not in page and "P(Stage II)" in page
    busy, _ = _written(_explanation(0.05), tmp_path / "other")
    assert "the image contributed nothing" not in busy and "the image moved it" in busy


def test_both_modalities_share_one_colour_scale():
    expl = _explanation(1e-5)
    assert colour_bound(expl, 0) == pytest.approx(0.30)  # the strongest word, not the faint patches
    assert modality_changes(expl, 0)["image"]["share"] < 1e-3


def test_values_that_change_nothing_look_pale(tmp_path):
    expl = _explanation(1e-6, word_scale=1e-5)  # the whole note moves the output by about 3e-6
    assert colour_bound(expl, 0) == NO_CHANGE
    page, _ = _written(expl, tmp_path)
    backgrounds = re.findall(r'<span style="background:(#[0-9a-f]{6})', page)
    assert min(min(_rgb(bg)) for bg in backgrounds) >= 250  # all but white
    assert "the note contributed nothing" in page and "the image contributed nothing" in page
