"""The three bits/dim figures on cases with known answers (the end-to-end recomputation from a trained prior is in
tests/reporting/test_evaluation.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dq.nn.codes import CodeGeometry
from lightning_dq.nn.figures import likelihood_figures, reconstruction_mse, uniform_code_bits


def test_a_b_c_exact_for_chosen_nll_and_log_prob():
    geometry = CodeGeometry((32, 32, 32), 5, 4)  # the README preset: grids 2x2, 4x4, 8x8 at 32x32, D = 3072
    shapes = geometry.shapes(32)
    nll = torch.tensor([3.0, 5.0]) * math.log(2)  # nats per sub-pixel: A = 3 and 5 bits/dim
    log_prob = -torch.tensor([3072.0, 6144.0]) * math.log(2)  # nats per image: 1 and 2 bits per sub-pixel
    figures = likelihood_figures(nll, shapes, (32, 32), log_prob)
    code_bits = (4 + 16 + 64) * 5 * 5 / 3072  # h*w*M*log2(K) summed over levels, per sub-pixel
    assert figures["bpd_decoder"].tolist() == pytest.approx([3.0, 5.0], abs=1e-6)
    assert figures["bpd_uniform"].tolist() == pytest.approx([3 + code_bits, 5 + code_bits], abs=1e-6)
    assert figures["bpd_prior_codes"].tolist() == pytest.approx([1.0, 2.0], abs=1e-6)
    assert figures["bpd_prior"].tolist() == pytest.approx([4.0, 7.0], abs=1e-6)
    assert uniform_code_bits(shapes, (32, 32)) == pytest.approx(0.68359375)  # README: 0.684 bits/dim
    assert "bpd_prior" not in likelihood_figures(nll, shapes, (32, 32))


def test_reconstruction_mse_in_unit_pixel_range():
    x = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    recon = x.clone()
    recon[1] = 255  # one image entirely wrong by the full range: MSE 1
    assert reconstruction_mse(recon, x).tolist() == [0.0, 1.0]
