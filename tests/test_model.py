import json

import pytest
import torch

from fedlite.errors import InputError
from fedlite.model import FedMMX, FedMMXOutput, build_model, multitask_loss
from fedlite.presets import get_preset


def _inputs(config, batch=2, seq=12):
    pixels = torch.randn(batch, 3, config.image.img_size, config.image.img_size)
    ids = torch.randint(0, 100, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0
    return pixels, ids, mask


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
@pytest.mark.parametrize("fusion", ["concat", "gated", "none"])
def test_output_shapes_for_each_preset_and_fusion(preset, fusion):
    torch.manual_seed(0)
    config = get_preset(preset, fusion=fusion)
    model = FedMMX(config).eval()
    pixels, ids, mask = _inputs(config, batch=2, seq=8)
    with torch.no_grad():
        z = model.encode_image(pixels)
        h = model.encode_text(ids, mask)
        out = model(pixels, ids, mask)
    assert z.shape == (2, config.image.embed_dim)
    assert h.shape == (2, config.text.hidden_size)
    assert out.leukemia_logits.shape == (2, 2)
    assert out.stage_logits.shape == (2, config.num_stages)
    assert torch.isfinite(out.leukemia_logits).all()


@pytest.mark.parametrize("modality", ["image", "text"])
def test_unimodal_models_have_only_their_encoder(modality):
    config = get_preset("tiny", modality=modality)
    model = FedMMX(config).eval()
    assert (model.image_encoder is None) == (modality == "text")
    assert (model.text_encoder is None) == (modality == "image")
    pixels, ids, mask = _inputs(config)
    with torch.no_grad():
        out = model(pixels if modality == "image" else None, ids if modality == "text" else None,
                    mask if modality == "text" else None)
    assert out.stage_logits.shape == (2, 4)


def test_gated_fusion_is_a_convex_mix_of_projected_embeddings():
    model = FedMMX(get_preset("tiny", fusion="gated")).eval()
    z, h = torch.randn(3, 64), torch.randn(3, 64)
    r = model.fusion([z, h])
    lo, hi = torch.minimum(z, h), torch.maximum(z, h)
    assert ((r >= lo - 1e-6) & (r <= hi + 1e-6)).all()


def test_gated_fusion_projects_when_widths_differ():
    config = get_preset("tiny", fusion="gated")
    from dataclasses import replace

    config = replace(config, text=replace(config.text, hidden_size=32, num_heads=2, intermediate_size=64))
    model = FedMMX(config).eval()
    pixels, ids, mask = _inputs(config)
    with torch.no_grad():
        out = model(pixels, ids, mask)
    assert out.leukemia_logits.shape == (2, 2)


def test_gated_fusion_rejects_unimodal():
    with pytest.raises(InputError, match="gated fusion"):
        get_preset("tiny", fusion="gated", modality="image")


def test_concat_fusion_uses_xavier_uniform_init():
    model = FedMMX(get_preset("tiny"))
    w = model.fusion.proj.weight
    fan_out, fan_in = w.shape
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.8 * bound


def test_freezing_switch_leaves_only_fusion_and_heads_trainable():
    model = FedMMX(get_preset("tiny"))
    model.set_encoders_frozen(True)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fusion", "leukemia_head", "stage_head"}
    model.set_encoders_frozen(False)
    assert all(p.requires_grad for p in model.parameters())


def test_loss_ignores_stage_of_negatives():
    leukemia_logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    stage_logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = FedMMXOutput(leukemia_logits, stage_logits)
    # case 0 is negative: its (wildly wrong if counted) stage logits must not matter
    loss_a, parts_a = multitask_loss(out, torch.tensor([0, 1]), torch.tensor([-1, 2]), gamma=1.0)
    out_b = FedMMXOutput(leukemia_logits, torch.tensor([[0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0]]))
    loss_b, _ = multitask_loss(out_b, torch.tensor([0, 1]), torch.tensor([-1, 2]), gamma=1.0)
    assert torch.allclose(loss_a, loss_b)
    assert torch.allclose(parts_a["stage"], torch.log(torch.tensor(4.0)))  # uniform over 4 stages
    assert torch.allclose(parts_a["leukemia"], torch.log(torch.tensor(2.0)))


def test_loss_weights_stage_term_by_gamma_and_handles_all_negative_batches():
    out = FedMMXOutput(torch.zeros(2, 2, requires_grad=True), torch.zeros(2, 4, requires_grad=True))
    loss1, _ = multitask_loss(out, torch.tensor([1, 1]), torch.tensor([0, 3]), gamma=1.0)
    loss2, _ = multitask_loss(out, torch.tensor([1, 1]), torch.tensor([0, 3]), gamma=0.5)
    assert torch.allclose(loss1 - loss2, 0.5 * torch.log(torch.tensor(4.0)))
    loss_neg, parts = multitask_loss(out, torch.tensor([0, 0]), torch.tensor([-1, -1]))
    assert torch.isfinite(loss_neg) and parts["stage"] == 0
    loss_neg.backward()
    assert out.stage_logits.grad is not None  # the stage head still receives a (zero) gradient


def test_build_model_records_random_init():
    model = build_model(get_preset("tiny"))
    assert model.config.init == {"image": "random", "text": "random"}


def test_image_weights_load_from_a_local_timm_checkpoint(tmp_path):
    source = build_model(get_preset("tiny"))
    state = {f"{k}": v for k, v in source.image_encoder.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 64)  # a classifier head is dropped, not an error
    torch.save(state, tmp_path / "vit.pth")
    model = build_model(get_preset("tiny"), image_weights=tmp_path / "vit.pth")
    assert torch.equal(model.image_encoder.pos_embed, source.image_encoder.pos_embed)
    assert model.config.init["image"] == "pretrained:vit.pth"


def test_image_weights_of_the_wrong_architecture_are_refused(tmp_path):
    small = build_model(get_preset("tiny"))
    state = small.image_encoder.state_dict()
    state["pos_embed"] = torch.zeros(1, 10, 64)
    torch.save(state, tmp_path / "vit.pth")
    with pytest.raises(InputError, match="do not fit the image encoder"):
        build_model(get_preset("tiny"), image_weights=tmp_path / "vit.pth")
    with pytest.raises(InputError, match="not found"):
        build_model(get_preset("tiny"), image_weights=tmp_path / "missing.pth")


def test_text_weights_load_from_a_local_transformers_directory(tmp_path):
    from importlib import resources

    from transformers import BertConfig, BertModel

    from fedlite.text import load_tokenizer

    bert = BertModel(BertConfig(vocab_size=1490, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=96, max_position_embeddings=64), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    vocab = json.loads(resources.files("fedlite.resources").joinpath("clinical_wordpiece_vocab.json").read_text())
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = build_model(get_preset("tiny"), text_weights=tmp_path / "bert")
    assert model.config.text.hidden_size == 48 and model.config.text.max_length == 64
    assert torch.equal(model.text_encoder.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert model.config.init["text"] == "pretrained:bert"
    tok = load_tokenizer(tmp_path / "bert")
    assert tok.encode("WBC 30").tokens[0] == "[CLS]"
    with pytest.raises(InputError, match="not a BERT model directory"):
        build_model(get_preset("tiny"), text_weights=tmp_path / "missing")


@pytest.mark.parametrize("modality", ["both", "image", "text"])
def test_without_a_fusion_layer_the_heads_read_the_embeddings_themselves(modality):
    model = FedMMX(get_preset("tiny", fusion="none", modality=modality)).eval()
    z = torch.randn(3, 64) if modality != "text" else None
    h = torch.randn(3, 64) if modality != "image" else None
    out = model.classify(z, h)
    joined = torch.cat([e for e in (z, h) if e is not None], dim=-1)
    assert torch.equal(out.fused, joined) and not list(model.fusion.parameters())
    assert torch.allclose(out.leukemia_logits, model.leukemia_head(joined))
