"""Bytes a round moves, counted from the architecture alone, as the round engine counts them."""

import pytest
from click.testing import CliRunner

from fedlite.bench.link_bytes import link_rows, main, message_bytes, random_update, travelling_shapes
from fedlite.errors import InputError
from fedlite.federated.params import get_arrays, trainable_names
from fedlite.federated.records import to_record
from fedlite.model import build_model
from fedlite.presets import get_preset


@pytest.mark.parametrize("frozen", [False, True])
def test_a_model_without_weights_sends_what_the_built_model_sends(frozen):
    model = build_model(get_preset("tiny"))
    names = trainable_names(model, frozen)
    shapes = travelling_shapes("tiny", frozen)
    assert shapes == {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    assert message_bytes(random_update(shapes), None) == to_record(get_arrays(model, names)).count_bytes()


def test_top_k_shrinks_a_message_about_as_the_codec_says_and_a_round_is_three_messages():
    rows = link_rows(["tiny"], [0.1, 0.01], (20.0, 100.0))
    end_to_end = {r["codec"]: r for r in rows if r["round"] == "end to end"}
    assert list(end_to_end) == ["dense", "top-k 0.1 + int8", "top-k 0.01 + int8"]
    assert 10 < end_to_end["top-k 0.1 + int8"]["ratio"] < 4 / (3 * 0.1)  # 3 bytes an entry, plus names
    assert 50 < end_to_end["top-k 0.01 + int8"]["ratio"] < 4 / (3 * 0.01)
    for row in rows:
        assert row["down_bytes"] == 2 * row["message_bytes"] and row["up_bytes"] == row["message_bytes"]
        assert row["minutes"]["20"] == pytest.approx(5 * row["minutes"]["100"])
    dense = end_to_end["dense"]
    assert dense["minutes"]["20"] == pytest.approx(3 * dense["message_bytes"] * 8 / 20e6 / 60)
    frozen = [r for r in rows if r["round"] == "frozen encoders"]
    assert all(r["parameters"] * 50 < dense["parameters"] for r in frozen)


def test_the_command_names_a_bad_preset_or_share_and_writes_nothing(tmp_path):
    for args in (["--presets", "tiny,huge"], ["--topk", "0.1,2"], ["--topk", "x"], ["--link-mbps", ""]):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
        assert isinstance(result.exception, InputError), (args, result.output)
    assert not (tmp_path / "out").exists()
