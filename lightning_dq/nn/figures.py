"""The three bits/dim figures, image by image, the one place they are computed (D = 3*H*W, codes z(x)): A
`bpd_decoder` = -log2 p(x | z(x)) / D (NOT a bound: the codes are free); B `bpd_uniform` = A + sum_l h*w*M*log2 K / D
(a bound); C `bpd_prior` = A - log2 p_prior(z(x)) / D (a bound, the headline)."""

import math
from collections.abc import Sequence

from torch import Tensor

FIGURES = (("A", "bpd_decoder"), ("B", "bpd_uniform"), ("C", "bpd_prior"))  # letter, metric name


def bits_per_dim(nats_per_dim: Tensor | float) -> Tensor | float:
    return nats_per_dim / math.log(2.0)


def uniform_code_bits(code_shapes: Sequence[tuple[int, int, int, int]], image_hw: tuple[int, int]) -> float:
    """Cost of the codes under a uniform prior in bits per image dim: sum h*w*M*log2(K) / (3*H*W), from (h, w, M, K)
    per level (code grid, number of codebooks, codebook size) and the (H, W) of the image the codes describe."""
    if any(len(shape) != 4 or min(shape) < 1 for shape in code_shapes) or min(image_hw) < 1:
        raise ValueError(f"need (h, w, M, K) per level and a positive (H, W), got {code_shapes}, {image_hw}")
    return sum(h * w * m * math.log2(k) for h, w, m, k in code_shapes) / (3 * image_hw[0] * image_hw[1])


def likelihood_figures(
    nll: Tensor,
    code_shapes: Sequence[tuple[int, int, int, int]],
    image_hw: tuple[int, int],
    prior_log_prob: Tensor | None = None,
) -> dict[str, Tensor]:
    """A and B, and with a prior C and its code cost `bpd_prior_codes`, per image (each (B,)), from the decoder's
    `nll` per image in nats per sub-pixel (B,), (h, w, M, K) per level (`CodeGeometry.shapes`), the images' (H, W) and
    log p_prior(z(x)) per image in nats, summed over all codes (B,)."""
    a = bits_per_dim(nll)
    figures = {"bpd_decoder": a, "bpd_uniform": a + uniform_code_bits(code_shapes, image_hw)}
    if prior_log_prob is not None:  # C >= A since -log2 p(z) >= 0 for a normalised prior
        figures["bpd_prior_codes"] = bits_per_dim(-prior_log_prob) / (3 * image_hw[0] * image_hw[1])
        figures["bpd_prior"] = a + figures["bpd_prior_codes"]
    return figures


def reconstruction_mse(recon: Tensor, x: Tensor) -> Tensor:
    """Per-image mean squared error (B,) between two uint8 batches (B, 3, H, W), in [0, 1] pixel units."""
    return ((recon.float() - x.float()) / 255.0).pow(2).mean(dim=(1, 2, 3))
