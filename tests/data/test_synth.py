import collections
import re

import numpy as np
import pytest
from PIL import Image

from fedlite.data.manifest import MANIFEST, read_dataset
from fedlite.data.notes import NUMBER_WORDS, to_roman, write_note
from fedlite.data.smear import render_smear
from fedlite.data.synth import synthesize
from fedlite.errors import InputError

N = 40


def _synth(path, **kwargs):
    options = {"n_cases": N, "seed": 3, "workers": 1, "progress": False}
    options.update(kwargs)
    return synthesize(path, **options)


def _snapshot(root):
    """Every file's bytes, keyed by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _synth(tmp_path_factory.mktemp("synth") / "data")


def test_same_seed_is_byte_identical_across_worker_counts(dataset, tmp_path):
    again = _synth(tmp_path / "again", workers=2)
    assert _snapshot(dataset.root) == _snapshot(again.root)


def test_different_seed_differs(dataset, tmp_path):
    other = _synth(tmp_path / "other", seed=4)
    assert (dataset.root / MANIFEST).read_bytes() != (other.root / MANIFEST).read_bytes()
    first = dataset.cases[0].image
    assert (dataset.root / first).read_bytes() != (other.root / first).read_bytes()


def test_counts_and_stage_balance(dataset):
    positives = [c for c in dataset.cases if c.leukemia == 1]
    assert len(dataset) == N
    assert len(positives) == round(N * 0.55)
    assert all(c.stage is None for c in dataset.cases if c.leukemia == 0)
    stages = collections.Counter(c.stage for c in positives)
    assert set(stages) == {0, 1, 2, 3}
    assert max(stages.values()) - min(stages.values()) <= 1
    assert [c.leukemia for c in dataset.cases] != sorted(c.leukemia for c in dataset.cases)


def test_manifest_reads_back_with_decodable_images(dataset):
    read = read_dataset(dataset.root)
    assert read.cases == dataset.cases
    assert read.info.stage_names == ("Stage I", "Stage II", "Stage III", "Stage IV")
    assert read.info.extra["generator"]["seed"] == 3
    assert [c.id for c in read.cases][:2] == ["case-00001", "case-00002"]
    for case in read.cases:
        assert case.text.strip()
        with Image.open(read.image_path(case)) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (224, 224)
            image.load()


def test_other_stage_counts_get_generic_names(tmp_path):
    data = _synth(tmp_path / "five", n_cases=12, num_stages=5)
    assert data.info.stage_names == tuple(f"Stage {k}" for k in range(1, 6))
    assert read_dataset(data.root).info.num_stages == 5


def _purple_fraction(pixels):
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return float(((r < 160) & (g < 120) & (b > g + 30)).mean())


def test_blast_rich_images_are_more_purple_than_negatives():
    negatives = [_purple_fraction(render_smear(np.random.default_rng([i, 0]), 0, None, None, "clear"))
                 for i in range(6)]
    stage3 = [_purple_fraction(render_smear(np.random.default_rng([i, 1]), 1, 3, "myeloid", "clear"))
              for i in range(6)]
    assert np.mean(stage3) > 3 * np.mean(negatives)


def test_render_shape_for_every_quality():
    for quality in ("clear", "sparse", "noisy"):
        pixels = render_smear(np.random.default_rng(0), 1, 2, "lymphoid", quality)
        assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8


def _mentions_stage(text, stage):
    number = stage + 1
    names = {str(number), to_roman(number), NUMBER_WORDS[number - 1]}
    pattern = r"\b(?:stage|staged as)\s+(" + "|".join(map(re.escape, names)) + r")\b"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_notes_name_their_stage_more_often_than_vague(stage):
    def rate(detail):
        notes = [write_note(np.random.default_rng([i, stage]), 1, stage, "myeloid", detail) for i in range(60)]
        return np.mean([_mentions_stage(n, stage) for n in notes])

    assert rate("full") > 0.4
    assert rate("vague") < rate("full")


def test_notes_stay_in_length_and_negatives_mention_leukemia():
    negatives = []
    for i in range(120):
        detail = ("full", "partial", "vague")[i % 3]
        note = write_note(np.random.default_rng(i), 0, None, None, detail)
        assert 40 <= len(note.split()) <= 150
        assert note.isascii()
        negatives.append(note)
    assert any("leukemia" in n.lower() for n in negatives)


def test_existing_output_directory_is_refused(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="busy"):
        _synth(target, n_cases=3)
    assert (target / "keep.txt").read_text() == "mine"
    _synth(target, n_cases=3, force=True)
    assert not (target / "keep.txt").exists()
    assert len(read_dataset(target)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]


@pytest.mark.parametrize("kwargs", [{"n_cases": 0}, {"positive_fraction": 1.0}, {"positive_fraction": 0},
                                    {"num_stages": 1}, {"seed": -1}])
def test_bad_arguments_raise_input_error(tmp_path, kwargs):
    with pytest.raises(InputError):
        _synth(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_a_crash_leaves_no_partial_dataset(tmp_path, monkeypatch):
    import fedlite.data.synth as synth

    def explode(tasks):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synth, "_make_chunk", explode)
    with pytest.raises(RuntimeError):
        _synth(tmp_path / "never", n_cases=3)
    assert list(tmp_path.iterdir()) == []
