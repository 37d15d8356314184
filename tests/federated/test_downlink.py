"""The global model as compressed changes: every site's copy is the coordinator's reference θ̂ to
float tolerance, whichever rounds it skipped, and θ̂ follows the global model (error feedback)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlite.errors import InputError
from fedlite.federated.config import FederatedConfig
from fedlite.federated.downlink import BASE, FULL, DownlinkStream, apply_downlink, received_parameters
from fedlite.federated.engine import run_rounds
from fedlite.federated.records import to_record
from fake_sites import TARGETS, ReplyingGrid, offline_messages  # noqa: F401 (fixture)
from test_engine import _ToyJob

RNG = np.random.default_rng(0)
SIZE = 3000


def _walk(rounds, names=("a", "b")):
    """A global model that changes every round, as training moves it."""
    model = {n: RNG.standard_normal(SIZE).astype(np.float32) for n in names}
    for _ in range(rounds):
        model = {n: v + 0.05 * RNG.standard_normal(SIZE).astype(np.float32) for n, v in model.items()}
        yield model


class _Site:
    def __init__(self, own=None):
        self.state, self.own = None, own or {}

    def receive(self, stream, node):
        arrays, config = stream.message_for(node)
        self.state = apply_downlink(arrays, config, self.state, lambda names: [{n: self.own[n] for n in names}])
        stream.delivered(node, config["downlink-version"])
        return config


def test_every_sites_copy_is_the_reference_whatever_rounds_it_skipped():
    stream = DownlinkStream(topk_fraction=0.05)
    sites = {1: _Site(), 2: _Site(), 3: _Site()}  # every round; every third round; gone after round 4
    dense = sent = 0  # over site 1's messages after its first
    for step, model in enumerate(_walk(40), 1):
        stream.advance(model)
        for node, site in sites.items():
            if node == 2 and step % 3 or node == 3 and step > 4:
                continue
            if node == 1 and step > 1:
                sent += sum(a.nbytes for a in stream.message_for(node)[0].values())
                dense += sum(a.nbytes for a in model.values())
            site.receive(stream, node)
            version, copy = site.state
            assert version == stream.version
            for name, value in stream.reference.items():
                np.testing.assert_allclose(copy[name], value, rtol=0, atol=1e-6)
        # θ̂ lags the model by what was not sent yet, and that stays bounded
        gap = max(np.abs(model[n] - stream.reference[n]).max() for n in model)
        assert gap < 1.0
    assert dense / sent > 12  # top-k 5 % + int8: 4 / (5 × 0.05) = 16× less the per-tensor headers
    for _ in range(400):  # once the model stops changing, θ̂ reaches it
        stream.advance(model)
    assert max(np.abs(model[n] - stream.reference[n]).max() for n in model) < 1e-3
    # the site that left after round 4 is far behind the kept changes: it gets θ̂ whole
    _, config = stream.message_for(3)
    assert config[BASE] == FULL


def test_an_unknown_site_gets_the_whole_reference_and_one_that_failed_is_forgotten():
    stream = DownlinkStream(topk_fraction=0.1)
    models = _walk(3)
    stream.advance(next(models))
    site = _Site()
    assert site.receive(stream, 7)[BASE] == FULL
    stream.advance(next(models))
    assert stream.message_for(7)[1][BASE] == 1
    stream.forget(7)
    assert stream.message_for(7)[1][BASE] == FULL


def test_a_site_that_lost_its_copy_refuses_a_chain():
    stream = DownlinkStream(topk_fraction=0.1)
    models = _walk(2)
    stream.advance(next(models))
    _Site().receive(stream, 1)
    stream.advance(next(models))
    arrays, config = stream.message_for(1)
    with pytest.raises(InputError, match="holds none of the global model; the message continues from version 1"):
        apply_downlink(arrays, config, None, lambda names: [])


def test_tensors_that_join_are_seeded_from_the_sites_own_values_and_checked():
    stream = DownlinkStream(topk_fraction=0.1)
    models = list(_walk(2))
    encoder = RNG.standard_normal(SIZE).astype(np.float32)
    stream.advance(models[0])
    honest, tampered = _Site(own={"encoder": encoder}), _Site(own={"encoder": encoder + 1e-3})
    honest.receive(stream, 1)
    tampered.receive(stream, 2)
    stream.advance({**models[1], "encoder": encoder})  # the encoders unfreeze
    arrays, config = stream.message_for(1)
    assert not any(key.split("@")[1].startswith("encoder::val") and arrays[key].size == SIZE * 4 for key in arrays)
    honest.receive(stream, 1)
    np.testing.assert_allclose(honest.state[1]["encoder"], stream.reference["encoder"], atol=1e-6)
    with pytest.raises(InputError, match="own values of the tensors that joined"):
        tampered.receive(stream, 2)
    stream.advance(models[1])  # and leave again
    honest.receive(stream, 1)
    assert set(honest.state[1]) == {"a", "b"}


# ----------------------------------------------------------------- through the engine's round loop


class _Context:
    def __init__(self):
        self.state = RecordDict()


class _DownlinkSites(ReplyingGrid):
    """Sites that keep their copy with ``received_parameters`` and move a fifth of the way from it to
    their target (error feedback on the downlink is stable for steps of the order of the top-k share:
    the coordinator's model moves by updates computed on copies that lag it)."""

    def __init__(self):
        super().__init__()
        self.contexts = {node: _Context() for node in TARGETS}
        self.copies = {}

    def answer(self, node, msg):
        site, cases, target = TARGETS[node]
        w = received_parameters(msg, self.contexts[node], lambda names: [])["w"]
        self.copies[node] = w
        return RecordDict({"arrays": to_record({"w": ((target - w) / 5).astype(np.float32)}),
                           "metrics": MetricRecord({"num-examples": cases, "train-loss": 0.0}),
                           "info": ConfigRecord({"site": site})})


class _WideJob(_ToyJob):
    """The engine tests' toy job with a parameter wide enough for top-k to be sparse."""

    def __init__(self, log_path, downlink):
        super().__init__(log_path)
        self.w, self.downlink = np.zeros(SIZE, np.float32), downlink


@pytest.mark.parametrize("compressed", [False, True])
def test_the_loop_sends_changes_and_reaches_the_same_model(tmp_path, compressed):
    cfg = FederatedConfig(rounds=60, min_sites=3, round_timeout=5.0, max_update_ratio=1e6, max_site_share=1.0)
    job, grid = _WideJob(tmp_path / "r.jsonl", DownlinkStream(0.1) if compressed else None), _DownlinkSites()
    rows = run_rounds(grid, job, cfg, range(1, 61), np.random.default_rng(0), tmp_path / "r.jsonl", "toy", False)
    fedavg = sum(c * t for _, c, t in TARGETS.values()) / sum(c for _, c, _ in TARGETS.values())
    assert job.w == pytest.approx(np.full(SIZE, fedavg), abs=1e-2)
    if not compressed:
        assert all(r["downlink_compression_ratio"] == pytest.approx(1.0, rel=0.02) for r in rows)  # record headers
        return
    for node, copy in grid.copies.items():  # what each site trained from is the reference of that round
        np.testing.assert_allclose(copy, job.downlink.reference["w"], atol=1e-6)
    assert rows[0]["downlink_compression_ratio"] == pytest.approx(1.0, rel=0.02)  # first contact: whole
    later = sum(r["bytes_sent"] for r in rows[1:])
    # top-k 10 % + int8 is 8× on the payload; Flower adds ~130 bytes per array, six packed arrays a
    # message, which on this one-tensor toy is 40 % of the 1.5 kB payload
    assert sum(4 * SIZE * 3 for _ in rows[1:]) / later > 4.5


def test_warm_up_sends_more_of_the_early_changes_and_the_copy_still_matches():
    from fedlite.federated.engine import downlink_messages

    cfg = FederatedConfig(topk_fraction=0.01, topk_warmup_rounds=3)
    stream, site = DownlinkStream(cfg.topk_fraction), _Site()
    sent = []
    for server_round, model in enumerate(_walk(6), start=1):
        downlink_messages(stream, model, {**cfg.site_settings(), "server-round": server_round}, [7])
        site.receive(stream, 7)
        if server_round > 1:  # round 1 sends the model whole
            sent.append(stream.changes[-1].packed["codec::idx"].size)
        for name, value in stream.reference.items():
            np.testing.assert_allclose(site.state[1][name], value, atol=1e-6)
    per_round = [cfg.topk_for_round(r) * 2 * SIZE for r in range(2, 7)]
    assert sent == pytest.approx(per_round, rel=0.01)  # 10 %, 3.2 %, then 1 % of each tensor's entries
    assert sent[0] > 9 * sent[-1]
