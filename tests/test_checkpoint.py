"""The checkpoint, the contract between training and export: it loads back as saved, a crash while
saving keeps the previous one, and a damaged one is refused with what is wrong."""

import pytest
import torch

from fedlite.checkpoint import load_checkpoint, save_checkpoint
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.errors import InputError
from fedlite.model import build_model
from fedlite.presets import get_preset
from fedlite.text import builtin_tokenizer


def _loader(dataset):
    config = get_preset("tiny")
    cases = CaseDataset(dataset, builtin_tokenizer(), config.text.max_length, use_image=True, train=False)
    return make_loader(cases, 8, shuffle=False)


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path, synth_data):
    model = build_model(get_preset("tiny")).eval()
    tok = builtin_tokenizer()
    save_checkpoint(tmp_path / "ckpt", model, tok, ["I", "II", "III", "IV"], ["no", "yes"], metrics={"accuracy": 0.5})
    loaded = load_checkpoint(tmp_path / "ckpt")
    batch = next(iter(_loader(synth_data)))
    with torch.no_grad():
        a = model(batch["pixels"], batch["input_ids"], batch["attention_mask"]).stage_logits
        b = loaded.model.eval()(batch["pixels"], batch["input_ids"], batch["attention_mask"]).stage_logits
    assert torch.equal(a, b)
    assert loaded.meta["metrics"] == {"accuracy": 0.5}
    assert loaded.meta["model"]["init"] == {"image": "random", "text": "random"}
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model(get_preset("tiny"))
    tok = builtin_tokenizer()
    save_checkpoint(tmp_path / "ckpt", model, tok, ["I", "II", "III", "IV"], ["no", "yes"], metrics={"v": 1})
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ckpt", model, tok, ["I", "II", "III", "IV"], ["no", "yes"], metrics={"v": 2})
    assert load_checkpoint(tmp_path / "ckpt").meta["metrics"] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_corrupt_or_incomplete_checkpoints_are_refused(tmp_path):
    model = build_model(get_preset("tiny"))
    save_checkpoint(tmp_path / "ckpt", model, builtin_tokenizer(), ["I", "II", "III", "IV"], ["no", "yes"])
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="corrupt weights"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="lacks tokenizer.json"):
        load_checkpoint(tmp_path / "ckpt")
