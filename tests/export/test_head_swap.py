"""A bundle's head rebuilt from its weights computes what the model's fusion layer and heads computed,
for every kind of fusion, including none."""

import numpy as np
import pytest
import torch

from fedlite.export.head_swap import fusion_head_from_weights
from fedlite.model import FedMMX
from fedlite.presets import FUSIONS, get_preset


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_head_rebuilt_from_its_weights_matches_the_model(fusion):
    torch.manual_seed(0)
    model = FedMMX(get_preset("tiny", fusion=fusion)).eval()
    weights = {k: v.numpy() for k, v in model.state_dict().items()
               if k.startswith(("fusion.", "leukemia_head.", "stage_head."))}
    meta = {"model": {"fusion": fusion, "image_embedding": 64, "text_embedding": 64, "num_stages": 4}}
    head = fusion_head_from_weights(meta, weights)
    z, h = torch.randn(5, 64), torch.randn(5, 64)
    with torch.no_grad():
        want, got = model.classify(z, h), head.classify(z, h)
    np.testing.assert_allclose(got.stage_logits.numpy(), want.stage_logits.numpy(), atol=1e-6)
    np.testing.assert_allclose(got.leukemia_logits.numpy(), want.leukemia_logits.numpy(), atol=1e-6)
