"""The exact 256-bin probabilities of a likelihood head, channel by channel: what the coder codes pixels with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dq.nn.heads import (
    HALF_BIN,
    Head,
    ar_means,
    bin_log_prob,
    categorical_logits,
    checked,
    dmol_split,
    fp32,
    targets,
)


@fp32
def dmol_channel_probs(params: Tensor, x: Tensor, channel: int) -> Tensor:
    """The 256 bin probabilities (B, 256, H, W) of `channel` given the true values of the channels before it in x (the
    later ones are not read): CDF differences at the 255 inner edges, the edge bins take the tails, mixed with the
    component posteriors given the earlier channels, as the mixture defines p(R) p(G | R) p(B | R, G)."""
    centres = targets(x, params)  # (B, 3, H, W)
    logits, means, log_scales, coeffs = dmol_split(params)
    mean = ar_means(means, coeffs, centres[:, 0:1], centres[:, 1:2])  # (B, 3, n, H, W)
    weights = F.log_softmax(logits, dim=1)  # (B, n, H, W)
    if channel:
        earlier = bin_log_prob(
            x[:, :channel].unsqueeze(2), centres[:, :channel].unsqueeze(2), mean[:, :channel], log_scales[:, :channel]
        )
        weights = weights + earlier.sum(1)  # (B, n, H, W): posterior log-weights, not normalised
    edges = torch.arange(255, device=params.device) / 127.5 - 1 + HALF_BIN  # upper edges of bins 0..254
    cdf = torch.sigmoid(
        (edges.view(1, 1, -1, 1, 1) - mean[:, channel].unsqueeze(2)) * torch.exp(-log_scales[:, channel]).unsqueeze(2)
    )
    zeros = torch.zeros_like(cdf[:, :, :1])
    bins = torch.cat([zeros, cdf, zeros + 1], dim=2).diff(dim=2)  # (B, n, 256, H, W)
    return (weights.softmax(dim=1).unsqueeze(2) * bins).sum(dim=1)


def head_channel_probs(head: Head, params: Tensor, x: Tensor, channel: int, num_mixtures: int = 10) -> Tensor:
    """The 256 probabilities (B, 256, H, W) of `channel` (0 R, 1 G, 2 B) of every pixel given the earlier channels
    of `x` (the later ones are not read): what a lossless coder codes the pixels with."""
    checked(head, params, num_mixtures)
    if head == "categorical":
        return F.softmax(categorical_logits(params.float())[:, channel], dim=1)
    if head == "mse":
        raise ValueError("head 'mse' is a regression loss with no distribution to code pixels with")
    return dmol_channel_probs(params, x, channel)
