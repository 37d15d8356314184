"""Edge fine-tuning of a bundle's head: cached embeddings, what a site sends, the new bundle."""

import json
import os
import shutil
import stat

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from wire import sent_arrays

from fedlite.agents.edge_client import edge_evaluate, edge_train
from fedlite.agents.embedding_cache import site_embeddings
from fedlite.agents.runtime import BundleRuntime
from fedlite.data.holdout import site_parts
from fedlite.data.manifest import read_dataset
from fedlite.errors import InputError
from fedlite.eval_stats import EvalStats
from fedlite.export.bundle import encoder_fingerprint, verify_bundle
from fedlite.export.head_swap import read_head_weights, write_bundle_with_head
from fedlite.federated.compress import decode_update, is_encoded
from fedlite.federated.config import FederatedConfig
from fedlite.federated.records import from_record, to_record


def test_embeddings_are_cached_per_encoder_version_and_data(teacher_bundle, teacher_run, tmp_path):
    _, split = teacher_run
    runtime = BundleRuntime(teacher_bundle)
    dataset = read_dataset(split / "site-01")
    first = site_embeddings(runtime, dataset, tmp_path / "cache")
    assert not first.cached and first.image.shape == (len(dataset), runtime.meta["model"]["image_embedding"])
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    again = site_embeddings(runtime, dataset, tmp_path / "cache")
    assert again.cached
    np.testing.assert_array_equal(again.text, first.text)
    pixels = runtime.load_images([dataset.image_path(dataset.cases[0])])
    ids, mask, _ = runtime.tokenize([dataset.cases[0].text])
    # dynamic INT8 scales activations per batch, so a case embedded alone differs slightly
    np.testing.assert_allclose(first.image[0], runtime.embed_images(pixels)[0], atol=0.02)
    np.testing.assert_allclose(first.text[0], runtime.embed_texts(ids, mask)[0], atol=0.02)
    image = dataset.image_path(dataset.cases[0])
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # an image changed
    assert not site_embeddings(runtime, dataset, tmp_path / "cache").cached


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Messages can only be built inside a run; give the direct calls below one."""


def _train_message(bundle, cfg: FederatedConfig, server_round: int = 1, fingerprint: str | None = None):
    meta = verify_bundle(bundle)
    config = {**cfg.site_settings(), "mode": "edge", "server-round": server_round,
              "encoder-fingerprint": fingerprint or encoder_fingerprint(meta), "bundle-version": 1}
    content = RecordDict({"arrays": to_record(read_head_weights(bundle)), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type="train")


def _context(split, bundle, tmp_path):
    return Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                   node_config={"data-dir": str(split / "site-01"), "bundle": str(bundle),
                                "cache-dir": str(tmp_path / "cache")})


def test_a_site_sends_only_a_compressed_head_update_and_aggregates(teacher_bundle, teacher_run, tmp_path):
    _, split = teacher_run
    cfg = FederatedConfig(local_epochs=2, batch_size=16, optimizer="adamw", lr=1e-3, compress=True, edge_bundle="x")
    context = _context(split, teacher_bundle, tmp_path)
    reply = edge_train(_train_message(teacher_bundle, cfg), context, None, {})
    assert set(reply.content.keys()) == {"arrays", "metrics", "info"}
    assert dict(reply.content["info"]) == {"site": "site-01", "compressed": True}
    metrics = dict(reply.content["metrics"])
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # aggregates only, no per-case values
    parts = site_parts(split / "site-01")
    assert metrics["num-examples"] == len(parts.train)  # the validation part never trains
    arrays = sent_arrays(reply.content["arrays"])
    assert is_encoded(arrays)
    weights = read_head_weights(teacher_bundle)
    delta = decode_update(arrays, {n: v.shape for n, v in weights.items()})
    assert set(delta) == set(weights) and any(np.abs(d).max() > 0 for d in delta.values())
    assert "fedlite-residual" in context.state  # error feedback kept at the site for the next round
    dense = sum(v.size for v in weights.values()) * 4
    student = verify_bundle(teacher_bundle)["model"]["parameters"] * 4
    sent = reply.content["arrays"].count_bytes()
    assert sent < dense and student / sent >= 100

    evaluation = edge_evaluate(_train_message(teacher_bundle, cfg), context, None, {})
    assert set(evaluation.content.keys()) == {"stats", "metrics", "info"}
    assert dict(evaluation.content["metrics"])["num-examples"] == len(parts.val) > 0
    stats = EvalStats.from_arrays(from_record(evaluation.content["stats"]), num_stages=4)  # counts only
    assert stats.cases == len(parts.val) and stats.positives == sum(c.leukemia for c in parts.val.cases)


def test_a_site_trains_its_head_under_dp_and_accounts_epsilon(teacher_bundle, teacher_run, tmp_path):
    _, split = teacher_run
    cfg = FederatedConfig(local_epochs=1, batch_size=8, dp=True, edge_bundle="x")
    context = _context(split, teacher_bundle, tmp_path)
    first = dict(edge_train(_train_message(teacher_bundle, cfg), context, None, {}).content["metrics"])
    second = dict(edge_train(_train_message(teacher_bundle, cfg, 2), context, None, {}).content["metrics"])
    assert 0 < first["epsilon"] < second["epsilon"]  # the site's accountant carries over rounds


def test_a_site_refuses_a_coordinator_with_other_encoders(teacher_bundle, teacher_run, tmp_path):
    _, split = teacher_run
    cfg = FederatedConfig(edge_bundle="x")
    with pytest.raises(InputError, match="other encoders"):
        edge_train(_train_message(teacher_bundle, cfg, fingerprint="0" * 64), _context(split, teacher_bundle, tmp_path),
                   None, {})


def _signed_copy(bundle, tmp_path):
    from fedlite.export.bundle import seal_bundle
    from fedlite.export.signing import generate_key_pair, load_private_key

    generate_key_pair(tmp_path / "k.pem", tmp_path / "k.pub")
    signed = tmp_path / "signed"
    shutil.copytree(bundle, signed)
    meta = json.loads((signed / "bundle.json").read_text())
    seal_bundle(signed, {k: v for k, v in meta.items() if k not in ("files", "content_sha256")},
                signing_key=load_private_key(tmp_path / "k.pem"))
    return signed


def test_edge_simulation_improves_local_loss_and_writes_a_new_signed_bundle(teacher_bundle, teacher_run, tmp_path):
    from click.testing import CliRunner

    from fedlite.cli import main

    _, split = teacher_run
    signed = _signed_copy(teacher_bundle, tmp_path)
    result = CliRunner().invoke(main, ["train", "--edge", str(signed), "--data", str(split), "--rounds", "2",
                                       "--epochs", "2", "--batch-size", "16", "--lr", "5e-3", "--compress",
                                       "--sign", str(tmp_path / "k.pem"), "--out", str(tmp_path / "edge")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "edge" / "summary.json").read_text())
    assert "held-out cases at 3 sites" in result.output and f"version {summary['bundle_version']}" in result.output
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert summary["after"]["accuracy"] >= summary["before"]["accuracy"] - 0.02
    new = verify_bundle(summary["bundle"], tmp_path / "k.pub")  # signed by the consortium's key
    assert new["bundle_version"] == verify_bundle(teacher_bundle)["bundle_version"] + 1
    assert new["head_updates"][-1]["validation_after"] == summary["after"]
    assert sum(new["head_updates"][-1]["validation_cases"].values()) == sum(
        len(site_parts(split / site).val) for site in ("site-01", "site-02", "site-03"))
    old_head, new_head = read_head_weights(teacher_bundle), read_head_weights(summary["bundle"])
    assert any(not np.array_equal(old_head[k], new_head[k]) for k in old_head)
    assert new["files"]["image_encoder.onnx"] == verify_bundle(teacher_bundle)["files"]["image_encoder.onnx"]
    rows = [json.loads(line) for line in (tmp_path / "edge" / "edge_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert len(row["bytes_received"]) == 3 and row["student_to_update_ratio"] >= 100
        assert row["compression_ratio"] > 1
    # the new bundle predicts with its new head
    runtime = BundleRuntime(summary["bundle"])
    test = read_dataset(split / "test")
    assert runtime.predict_dataset(test).leukemia_prob.shape == (len(test), 2)


def test_new_head_weights_must_fit_the_bundle(teacher_bundle, tmp_path):
    weights = read_head_weights(teacher_bundle)
    name = next(iter(weights))
    with pytest.raises(InputError, match="differently"):
        write_bundle_with_head(teacher_bundle, tmp_path / "a", {**weights, "extra.weight": weights[name]}, {})
    with pytest.raises(InputError, match="shape"):
        write_bundle_with_head(teacher_bundle, tmp_path / "b", {**weights, name: weights[name][:1]}, {})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_edge_training_refuses_a_tampered_bundle(teacher_bundle, teacher_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from fedlite.cli import main

    tampered = tmp_path / "bundle"
    shutil.copytree(teacher_bundle, tampered)
    with (tampered / "head.onnx").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01")
    result = CliRunner().invoke(main, ["train", "--edge", str(tampered), "--data", str(teacher_run[1]),
                                       "--out", str(tmp_path / "edge")])
    assert result.exit_code == 2 and "head.onnx" in result.output and "SHA-256" in result.output
    assert not (tmp_path / "edge").exists()


def test_a_signed_bundle_is_not_fine_tuned_into_an_unsigned_one(teacher_bundle, teacher_run, tmp_path):
    from click.testing import CliRunner

    from fedlite.cli import main

    signed = _signed_copy(teacher_bundle, tmp_path)
    refused = CliRunner().invoke(main, ["train", "--edge", str(signed), "--data", str(teacher_run[1]),
                                        "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "sign the fine-tuned bundle too" in refused.output
    assert not (tmp_path / "a").exists()  # refused before any site was asked for anything
