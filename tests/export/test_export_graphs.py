"""Student construction, structured pruning and the ONNX graphs against torch."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedlite.export.graphs import export_graphs
from fedlite.export.prune import PruneConfig, count_parameters, prune_model, score_importance
from fedlite.export.student import kept_layers, make_student, student_config
from fedlite.model import build_model, multitask_loss
from fedlite.presets import get_preset


def _teacher(depth=4, seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    cfg = cfg.__class__(**{**cfg.__dict__, "image": cfg.image.__class__(**{**cfg.image.__dict__, "depth": depth}),
                           "text": cfg.text.__class__(**{**cfg.text.__dict__, "num_layers": depth})})
    return build_model(cfg).eval()


def _batch(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, max(2, length // 2):] = 0  # one padded note per batch
    return {"pixels": torch.randn(n, 3, 224, 224, generator=g),
            "input_ids": torch.randint(5, 1400, (n, length), generator=g), "attention_mask": mask,
            "leukemia": torch.randint(0, 2, (n,), generator=g), "stage": torch.randint(-1, 4, (n,), generator=g)}


def _onnx_outputs(directory, batch):
    sess = {n: ort.InferenceSession(str(directory / f"{n}.onnx"), providers=["CPUExecutionProvider"])
            for n in ("image_encoder", "text_encoder", "head")}
    z = sess["image_encoder"].run(None, {"pixels": batch["pixels"].numpy()})[0]
    h = sess["text_encoder"].run(None, {"input_ids": batch["input_ids"].numpy(),
                                        "attention_mask": batch["attention_mask"].numpy()})[0]
    return z, h, sess["head"].run(None, {"image_embedding": z, "text_embedding": h})


def _torch_outputs(model, batch):
    with torch.no_grad():
        z = model.encode_image(batch["pixels"])
        h = model.encode_text(batch["input_ids"], batch["attention_mask"])
        out = model.classify(z, h)
    return z.numpy(), h.numpy(), [out.leukemia_logits.softmax(-1).numpy(), out.stage_logits.softmax(-1).numpy()]


def test_kept_layers_spread_over_the_teacher():
    assert kept_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert kept_layers(2, 1) == [1]
    assert kept_layers(3, 5) == [0, 1, 2]


def test_half_student_starts_as_every_other_teacher_layer():
    teacher = _teacher(depth=4)
    student, init = make_student(teacher, "half")
    assert init.random == 0 and init.image_layers == [0, 3] and init.text_layers == [0, 3]
    assert torch.equal(student.image_encoder.blocks[1].attn.qkv.weight, teacher.image_encoder.blocks[3].attn.qkv.weight)
    assert torch.equal(student.text_encoder.encoder.layer[1].output.dense.weight,
                       teacher.text_encoder.encoder.layer[3].output.dense.weight)
    assert torch.equal(student.stage_head.weight, teacher.stage_head.weight)
    assert count_parameters(student) < count_parameters(teacher)


def test_preset_student_keeps_the_teachers_vocabulary_and_window():
    teacher_cfg = get_preset("paper")
    cfg = student_config(teacher_cfg, "small")
    assert cfg.text.vocab_size == teacher_cfg.text.vocab_size and cfg.text.max_length == teacher_cfg.text.max_length
    assert cfg.image.embed_dim == 384


@pytest.mark.parametrize("n,length", [(1, 5), (8, 37), (3, 128)])
def test_each_onnx_graph_matches_torch(tmp_path, n, length):
    model = _teacher(depth=2)
    export_graphs(model, tmp_path)
    batch = _batch(n, length, seed=n)
    for got, want in zip(_onnx_outputs(tmp_path, batch)[:2], _torch_outputs(model, batch)[:2]):
        np.testing.assert_allclose(got, want, atol=1e-4)
    for got, want in zip(_onnx_outputs(tmp_path, batch)[2], _torch_outputs(model, batch)[2]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_padding_does_not_change_a_notes_embedding(tmp_path):
    model = _teacher(depth=2)
    export_graphs(model, tmp_path)
    sess = ort.InferenceSession(str(tmp_path / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    ids = np.arange(5, 17, dtype=np.int64)[None]
    alone = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    padded_ids = np.concatenate([ids, np.zeros((1, 20), np.int64)], axis=1)
    mask = np.concatenate([np.ones_like(ids), np.zeros((1, 20), np.int64)], axis=1)
    np.testing.assert_allclose(sess.run(None, {"input_ids": padded_ids, "attention_mask": mask})[0], alone, atol=1e-5)


def _loss_of(model):
    return lambda b: multitask_loss(model(b["pixels"], b["input_ids"], b["attention_mask"]), b["leukemia"], b["stage"])[0]


def test_pruning_removes_weights_and_the_onnx_graphs_shrink(tmp_path):
    student, _ = make_student(_teacher(depth=4), "half")
    ffn = student.config.text.intermediate_size
    export_graphs(student, tmp_path / "before")
    before = {f.name: f.stat().st_size for f in (tmp_path / "before").iterdir()}
    importance = score_importance(student, [_batch(4, 12)], _loss_of(student))
    report = prune_model(student, importance, PruneConfig(fraction=0.5, layers=1))
    assert report.parameters_after < report.parameters_before
    assert [layer["heads"] for layer in report.after["image"]] == [1]
    assert [layer["ffn"] for layer in report.after["text"]] == [ffn // 2]
    assert len(report.layers_removed["image"]) == 1 and len(report.layers_removed["text"]) == 1
    student.eval()
    export_graphs(student, tmp_path / "after")
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        assert (tmp_path / "after" / name).stat().st_size < before[name]
    batch = _batch(8, 21, seed=4)  # the pruned graphs still match the pruned torch model
    for got, want in zip(_onnx_outputs(tmp_path / "after", batch)[:2], _torch_outputs(student, batch)[:2]):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_importance_picks_the_head_that_matters():
    student, _ = make_student(_teacher(depth=2), "half")
    with torch.no_grad():  # silence head 0 of the text layer: its gate gradient must vanish
        dense = student.text_encoder.encoder.layer[0].attention.output.dense
        hd = dense.in_features // 2
        dense.weight[:, :hd] = 0
    importance = score_importance(student, [_batch(4, 12)], _loss_of(student))
    scores = importance.heads["text"][0]
    assert scores[0].item() == pytest.approx(0.0, abs=1e-9) and scores[1].item() > 0
    prune_model(student, importance, PruneConfig(fraction=0.5))
    kept = student.text_encoder.encoder.layer[0].attention.output.dense
    assert torch.equal(kept.weight, dense.weight[:, hd:])


def test_trimming_unreachable_vocabulary_rows_changes_no_output(tmp_path):
    from fedlite.export.prune import trim_vocabulary

    model = _teacher(depth=2)
    batch = _batch(3, 17)  # ids < 1400
    before = _torch_outputs(model, batch)
    assert trim_vocabulary(model, 1400) == {"rows_before": 8192, "rows_after": 1400}
    assert model.text_encoder.embeddings.word_embeddings.weight.shape[0] == 1400
    for got, want in zip(_torch_outputs(model, batch)[:2], before[:2]):
        np.testing.assert_array_equal(got, want)
    export_graphs(model, tmp_path)
    np.testing.assert_allclose(_onnx_outputs(tmp_path, batch)[1], before[1], atol=1e-4)
    assert trim_vocabulary(model, 30000)["rows_after"] == 1400
