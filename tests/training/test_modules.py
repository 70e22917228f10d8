"""The modules' epoch aggregates and evaluation path, without a Trainer: a NaN never shrinks an average, and
a prior's evaluation encodes every image once."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.nn.prior import CodePrior
from lightning_dq.training.modules import AutoEncoderModule, PriorModule, decoder_figures


def tiny_net() -> HierarchicalAutoEncoder:
    torch.manual_seed(0)
    return HierarchicalAutoEncoder(channels=16, res_blocks=1, res_channels=8, code_dim=4, num_mixtures=3)


def batch(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_a_nan_test_image_stops_the_evaluation_instead_of_being_dropped():
    module = AutoEncoderModule(tiny_net()).eval()
    x = batch()
    with torch.no_grad():
        out = module(x)
    values = decoder_figures(module.net, x, out)
    values["bpd_decoder"][1] = math.nan  # one image of four
    module._update("test", x.shape[-1], values, out.codes)
    with pytest.raises(FloatingPointError, match="test: 1 of 4 images have a non-finite"):
        module._log_epoch("test")
    # the aggregates were reset: the next epoch starts clean
    assert int(module.stage_metrics("test").images.compute()) == 0


def test_uniform_figure_adds_the_exact_code_cost():
    net = tiny_net().eval()
    x = batch(2)
    with torch.no_grad():
        values = decoder_figures(net, x, net(x))
    # README code structure at 32x32: grids 2x2, 4x4, 8x8 with M=5 codebooks of K=32: 84 * 5 * 5 bits / 3072 dims
    assert (values["bpd_uniform"] - values["bpd_decoder"]).tolist() == pytest.approx([84 * 25 / 3072] * 2)


def test_prior_evaluation_encodes_each_image_once():
    module = PriorModule(prior=functools.partial(CodePrior, dim=32, depth=1, heads=4))
    module.attach(tiny_net(), {"path": "in memory"})
    calls = []
    module.autoencoder.encoders[0].register_forward_hook(lambda *args: calls.append(1))
    x = batch()
    module._step(x, "val")
    assert len(calls) == 1  # codes for the prior and the decoder figures come from one pass
    metrics = module.stage_metrics("val")
    a, c = metrics.means["bpd_decoder"].compute(), metrics.means["bpd_prior"].compute()
    prior_cost = metrics.means["bpd_prior_codes"].compute()
    assert float(c) == pytest.approx(float(a + prior_cost)) and float(prior_cost) > 0
