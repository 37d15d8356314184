import json

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch.utils.data import DataLoader, Subset

from fedlite.data.loader import CaseDataset, make_loader
from fedlite.errors import InputError
from fedlite.federated.privacy import PrivacyConfig, dp_train_local, epsilon, make_private
from fedlite.model import build_model
from fedlite.presets import get_preset
from fedlite.text import builtin_tokenizer
from fedlite.training import TrainConfig, make_optimizer

CPU = torch.device("cpu")
CASES, BATCH = 24, 8
PRIVACY = PrivacyConfig()
TRAIN = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-2)


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    from fedlite.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("dp") / "d", n_cases=CASES, workers=1, progress=False)


def _site(data, modality="both", frozen=True, seed=0):
    torch.manual_seed(seed)
    config = get_preset("tiny", modality=modality)
    model = build_model(config)
    model.set_encoders_frozen(frozen)
    cases = CaseDataset(data, builtin_tokenizer() if config.uses_text else None, config.text.max_length,
                        use_image=config.uses_image, train=True)
    return model, make_loader(cases, BATCH, shuffle=True, seed=seed)


def _train_round(data, state=None, seed=0):
    model, loader = _site(data, modality="text", seed=seed)
    _, new_state = dp_train_local(model, loader, TRAIN, CPU, 1e-2, 1e-2, PRIVACY, state)
    return json.loads(json.dumps(new_state))  # what a ClientApp's context.state keeps


def test_epsilon_matches_an_independent_rdp_computation(site_data):
    state = _train_round(site_data)
    q, steps = BATCH / CASES, CASES // BATCH
    assert state["history"] == [[PRIVACY.noise_multiplier, pytest.approx(q), steps]]
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=PRIVACY.noise_multiplier, steps=steps, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=PRIVACY.delta)
    assert epsilon(state, PRIVACY.delta) == pytest.approx(expected, rel=1e-9)


def test_epsilon_accumulates_across_rounds_only_when_the_state_is_carried(site_data):
    first = _train_round(site_data, seed=0)
    carried = _train_round(site_data, first, seed=1)
    restarted = _train_round(site_data, None, seed=1)
    assert carried["history"][0][2] == 2 * first["history"][0][2]
    assert epsilon(restarted, PRIVACY.delta) == pytest.approx(epsilon(first, PRIVACY.delta))
    assert epsilon(carried, PRIVACY.delta) > epsilon(first, PRIVACY.delta) > 0


def test_frozen_encoders_train_only_fusion_and_heads_and_keys_are_unchanged(site_data):
    model, loader = _site(site_data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, _ = dp_train_local(model, loader, TRAIN, CPU, 1e-2, 1e-2, PRIVACY)
    after = model.state_dict()
    assert list(after) == list(before)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fusion", "leukemia_head", "stage_head"}
    assert stats.steps == CASES // BATCH
    opacus_attrs = ("grad_sample", "summed_grad", "_forward_counter")
    assert not [n for n, p in model.named_parameters() if any(hasattr(p, a) for a in opacus_attrs)]
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_full_model_trains_under_dp_with_per_case_gradients(site_data):
    model, loader = _site(site_data, frozen=False)
    # A third of the cases: per-case gradients through a whole ViT are slow on a CPU.
    loader = DataLoader(Subset(loader.dataset, range(8)), batch_size=4, collate_fn=loader.collate_fn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, state = dp_train_local(model, loader, TRAIN, CPU, 1e-2, 1e-2, PRIVACY)
    assert stats.steps == 2 and torch.isfinite(torch.tensor(stats.mean_loss))
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert {"image_encoder", "text_encoder", "fusion"} <= changed
    assert epsilon(state, PRIVACY.delta) > 0


def test_an_empty_poisson_draw_takes_a_counted_noise_only_step(site_data):
    model, loader = _site(site_data, modality="text")
    params = [p for p in model.parameters() if p.requires_grad]
    private = make_private(model, make_optimizer(params, TRAIN, 1e-2), loader, PRIVACY)
    assert private.loader.collate_fn([]) is None
    head = model.leukemia_head.weight.detach().clone()
    private.optimizer.zero_grad()
    private.step_without_cases()
    assert not torch.equal(head, model.leukemia_head.weight)
    assert private.accountant_state()["history"][0][2] == 1
    assert private.unwrap() is model


@pytest.mark.parametrize("kwargs", [{"noise_multiplier": 0.0}, {"noise_multiplier": -1.5},
                                    {"max_grad_norm": 0.0}, {"max_grad_norm": float("nan")},
                                    {"delta": 0.0}, {"delta": 1.0}])
def test_bad_privacy_config_is_refused(kwargs):
    with pytest.raises(InputError):
        PrivacyConfig(**kwargs)


def test_fedprox_under_dp_is_refused(site_data):
    model, loader = _site(site_data, modality="text")
    with pytest.raises(InputError, match="proximal"):
        dp_train_local(model, loader, TrainConfig(proximal_mu=0.01), CPU, 1e-2, 1e-2, PRIVACY)
