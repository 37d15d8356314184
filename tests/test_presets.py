"""Presets: the paper's architecture by name, overrides of a preset's top-level fields, configs that
round-trip through a checkpoint's JSON, and impossible combinations refused before a model is built."""

import json

import pytest

from fedlite.errors import InputError
from fedlite.presets import PRESETS, ModelConfig, get_preset


def test_paper_preset_matches_the_paper_architecture():
    config = PRESETS["paper"]
    assert (config.image.embed_dim, config.image.depth, config.image.patch_size) == (768, 12, 16)
    assert (config.text.vocab_size, config.text.num_layers, config.text.max_length) == (28996, 12, 512)
    assert config.num_stages == 4


def test_the_student_preset_shares_the_teachers_vocabulary_and_window():
    paper, small = PRESETS["paper"], PRESETS["small"]
    assert (small.text.vocab_size, small.text.max_length) == (paper.text.vocab_size, paper.text.max_length)
    assert small.image.timm_name == "vit_small_patch16_224" and small.fusion_dim == small.image.embed_dim


def test_overrides_replace_top_level_fields_and_leave_the_preset_alone():
    gated = get_preset("tiny", fusion="gated", num_stages=3, modality=None)
    assert (gated.fusion, gated.num_stages, gated.modality) == ("gated", 3, "both")  # None: keep the preset's
    assert PRESETS["tiny"].fusion == "concat" and PRESETS["tiny"].num_stages == 4


def test_an_unknown_preset_is_refused_with_the_choices():
    with pytest.raises(InputError, match="unknown preset 'large'.*paper, small, mobile, tiny"):
        get_preset("large")


@pytest.mark.parametrize("overrides,message", [
    ({"fusion": "sum"}, "unknown fusion 'sum'"),
    ({"modality": "audio"}, "unknown modality 'audio'"),
    ({"fusion": "gated", "modality": "text"}, "gated fusion mixes two modalities"),
    ({"num_stages": 1}, "need at least 2 stages"),
])
def test_impossible_configs_are_refused(overrides, message):
    with pytest.raises(InputError, match=message):
        get_preset("tiny", **overrides)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_config_round_trips_through_json(name):
    config = get_preset(name, init={"image": "random"})
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
