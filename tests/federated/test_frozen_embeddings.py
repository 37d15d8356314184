"""Frozen rounds on cached embeddings (fedlite.federated.frozen_embeddings): a site embeds its cases
once per augmented view, reads them back in later rounds, scores its validation part on them, and
recomputes them when the encoders or its data change."""

from __future__ import annotations

import json
import shutil
import stat

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from wire import sent_tensor_names

from fedlite.eval_stats import EvalStats
from fedlite.federated.config import FederatedConfig
from fedlite.federated.frozen_embeddings import EmbeddingWork, embedded_part
from fedlite.federated.params import frozen_fingerprint, get_arrays, trainable_names
from fedlite.federated.records import from_record, to_record
from fedlite.federated.site_training import evaluate_site, train_site
from fedlite.federated.task import build_initial_model, cached_dataset


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Messages can only be built inside a run; give the direct calls below one."""


def _message(model, cfg, server_round, message_type="train"):
    trainable = trainable_names(model, cfg.encoders_frozen(server_round))
    flat = {**cfg.site_settings(), "server-round": server_round, "num-stages": 4,
            "frozen-fingerprint": frozen_fingerprint(model, trainable)}
    content = RecordDict({"arrays": to_record(get_arrays(model, trainable)), "config": ConfigRecord(flat)})
    return Message(content, dst_node_id=1, message_type=message_type), trainable


def _context(data_dir, cache_dir=None):
    node = {"data-dir": str(data_dir), **({"cache-dir": str(cache_dir)} if cache_dir else {})}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def test_frozen_rounds_embed_each_view_once_and_read_it_back(synth_split, tmp_path):
    cfg = FederatedConfig(preset="tiny", rounds=4, freeze_rounds=3, local_epochs=2, batch_size=8, embedding_views=3)
    model = build_initial_model(cfg, 4)
    cache = tmp_path / "cache"
    context = _context(synth_split.out_dir / "site-01", cache)
    seen = []
    for server_round in (1, 2, 3, 4):
        msg, trainable = _message(model, cfg, server_round)
        reply = train_site(msg, context)
        assert sent_tensor_names(reply.content["arrays"]) == set(trainable)  # parameters only
        metrics = dict(reply.content["metrics"])
        seen.append((metrics.get("embeddings-cached"), len(list(cache.glob("frozen-*.npz")))))
        if server_round < 4:
            assert metrics["embed-seconds"] >= 0 and metrics["num-examples"] > 0
    # run epochs 0..5 read views 0 1 | 2 0 | 1 2: the notes and views 0 and 1 are embedded in round 1,
    # view 2 in round 2, and round 3 reads them all; round 4 trains the encoders, so it embeds nothing
    assert seen == [(0, 3), (0, 4), (1, 4), (None, 4)]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in cache.glob("frozen-*.npz"))


def test_cached_embeddings_are_what_the_frozen_encoders_compute(synth_split, tmp_path):
    cfg = FederatedConfig(preset="tiny", batch_size=8)
    model = build_initial_model(cfg, 4)
    dataset = cached_dataset(synth_split.out_dir / "site-02", cfg, model, "train")
    dataset.seed = cfg.seed
    images, texts = embedded_part(model, dataset, "encoders", tmp_path, [1], 8, torch.device("cpu"), EmbeddingWork())
    dataset.set_epoch(1)  # view 1: the augmentation the uncached path would draw in epoch 1
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        image = model.encode_image(batch["pixels"]).numpy()
        text = model.encode_text(batch["input_ids"], batch["attention_mask"]).numpy()
    np.testing.assert_allclose(images[1], image, atol=1e-5)
    np.testing.assert_allclose(texts, text, atol=1e-5)
    dataset.set_epoch(0)
    other = dataset.collate([dataset[0]])["pixels"]
    assert not torch.equal(other[0], batch["pixels"][0])  # another view is another augmentation


def test_the_cache_is_recomputed_when_the_encoders_or_the_data_change(synth_split, tmp_path):
    shutil.copytree(synth_split.out_dir.parent, tmp_path / "data")  # the cases and their images
    site = tmp_path / "data" / synth_split.out_dir.name / "site-03"
    cfg = FederatedConfig(preset="tiny", batch_size=8)
    model = build_initial_model(cfg, 4)

    def computed(encoders="encoders A"):
        from fedlite.federated import task

        task._DATASETS.clear()  # the site reads its cases afresh, as a new message's process does
        dataset = cached_dataset(site, cfg, model, "train")
        work = EmbeddingWork()
        embedded_part(model, dataset, encoders, tmp_path / "cache", [0], 8, torch.device("cpu"), work)
        return work.computed  # arrays: view 0 of the images, and the notes

    assert computed() == 2
    assert computed() == 0  # read back
    assert computed("encoders B") == 2  # other frozen encoders
    case = json.loads((site / "manifest.jsonl").read_text().splitlines()[0])
    image = site / case["image"]
    image.write_bytes(image.read_bytes() + b"\0")  # an image replaced
    assert computed() == 2
    lines = (site / "manifest.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "text": json.loads(lines[0])["text"] + " Repeat smear."})
    (site / "manifest.jsonl").write_text("\n".join(lines) + "\n")  # a note changed
    assert computed() == 2
    assert computed() == 0


def test_a_frozen_round_scores_its_validation_part_on_cached_embeddings_as_on_images(synth_split, tmp_path):
    cfg = FederatedConfig(preset="tiny", rounds=2, freeze_rounds=1, batch_size=8, site_val_fraction=0.4)
    model = build_initial_model(cfg, 4)
    msg, _ = _message(model, cfg, 1, "evaluate")
    site = synth_split.out_dir / "site-01"
    cached = evaluate_site(msg, _context(site, tmp_path / "cache"))
    direct = evaluate_site(msg, _context(site))
    assert len(list((tmp_path / "cache").glob("frozen-*.npz"))) == 2  # the images (one view) and the notes
    a, b = (EvalStats.from_arrays(from_record(r.content["stats"]), 4) for r in (cached, direct))
    assert a.cases == b.cases > 0
    np.testing.assert_array_equal(a.leukemia_confusion, b.leukemia_confusion)
    np.testing.assert_array_equal(a.stage_confusion, b.stage_confusion)
    np.testing.assert_allclose(a.loss_sums, b.loss_sums, rtol=1e-4)


def test_a_dp_site_trains_its_frozen_round_on_cached_embeddings(synth_split, tmp_path):
    cfg = FederatedConfig(preset="tiny", rounds=2, freeze_rounds=2, local_epochs=1, batch_size=8, dp=True,
                          embedding_views=1)
    model = build_initial_model(cfg, 4)
    context = _context(synth_split.out_dir / "site-02", tmp_path / "cache")
    epsilons = []
    for server_round in (1, 2):
        msg, _ = _message(model, cfg, server_round)
        metrics = dict(train_site(msg, context).content["metrics"])
        epsilons.append(metrics["epsilon"])
        assert metrics["embeddings-cached"] == (server_round == 2)
    assert 0 < epsilons[0] < epsilons[1]
