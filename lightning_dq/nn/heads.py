"""Likelihood heads over 8-bit RGB (B, 3, H, W): "mix" (discretized logistic mixture, channel-autoregressive means as
PixelCNN++/VDVAE), "categorical" (256-way softmax), "mse" (a loss, NOT a likelihood). NLLs in nats per sub-pixel, fp32
with autocast off: bf16 rounds a log-probability near -2.5 nats by up to ~0.01, moving bits/dim in the 2nd decimal."""

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Head = Literal["mix", "categorical", "mse"]
LOG_SCALE_MIN = -7.0  # as VDVAE: bounds the sharpness of a logistic to ~4.3 scales per half-bin
HALF_BIN = 1.0 / 255.0  # half-width of one of the 256 bins on the [-1, 1] scale


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 pixels (B, 3, H, W) -> their bin centres k / 127.5 - 1 in [-1, 1]: the only place images become
    floats (the encoder's input and the heads' targets)."""
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be a uint8 tensor of shape (B, 3, H, W), got {_describe(x)}")
    return x.float() / 127.5 - 1.0


def fp32(fn):
    """Run `fn(params, ...)` with params in fp32 and autocast off."""

    @functools.wraps(fn)
    def wrapper(params: Tensor, *args, **kwargs) -> Tensor:
        if not isinstance(params, Tensor) or not params.is_floating_point():
            raise ValueError(f"params must be a floating-point tensor, got {_describe(params)}")
        with torch.autocast(params.device.type, enabled=False):
            return fn(params.float(), *args, **kwargs)

    return wrapper


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _check_params(params: Tensor, channels: int, head: str) -> None:
    if params.dim() != 4 or params.shape[1] != channels:
        raise ValueError(f"params must have shape (B, {channels}, H, W) for head {head!r}, got {_describe(params)}")


def targets(x: Tensor, params: Tensor) -> Tensor:
    """Checked bin centres (B, 3, H, W) of the uint8 targets `x`, which must match `params` in B, H, W."""
    centres = to_unit_range(x)
    if x.shape[0] != params.shape[0] or x.shape[2:] != params.shape[2:]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match params of shape {tuple(params.shape)}")
    return centres


def dmol_split(params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, 10n, H, W) -> logits (B, n, H, W) and means, log-scales, coeffs, each (B, 3, n, H, W). Channel order: n
    mixture logits, then 3n means, 3n log-scales, 3n coefficients, each block channel-major (index c*n + k for channel
    c of component k). Coefficients are (R->G, R->B, G->B)."""
    if params.dim() != 4 or params.shape[1] == 0 or params.shape[1] % 10:
        raise ValueError(f"params must have shape (B, 10*num_mixtures, H, W), got {_describe(params)}")
    b, ch, h, w = params.shape
    n = ch // 10
    means, log_scales, coeffs = params[:, n:].reshape(b, 3, 3, n, h, w).unbind(1)
    return params[:, :n], means, log_scales.clamp(min=LOG_SCALE_MIN), torch.tanh(coeffs)


def ar_means(means: Tensor, coeffs: Tensor, r: Tensor, g: Tensor) -> Tensor:
    """Means of R, G | R, B | R, G (B, 3, n, H, W) given the R and G bin centres r, g (B, 1, H, W)."""
    green = means[:, 1] + coeffs[:, 0] * r
    blue = means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g
    return torch.stack([means[:, 0], green, blue], dim=1)


def bin_log_prob(k: Tensor, centre: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(bin k) of a logistic; bin k spans centre +- HALF_BIN, the edge bins take the tails."""
    inv_s = torch.exp(-log_scale)
    upper = inv_s * (centre - mean + HALF_BIN)  # standardised bin edges
    lower = inv_s * (centre - mean - HALF_BIN)
    # the width is computed directly (no cancellation); the clamp keeps log() finite for an absurdly wide
    # logistic (log-scale > ~64) instead of producing -inf and NaN gradients
    width = (inv_s * 2 * HALF_BIN).clamp(min=1e-30)
    # sigmoid(u) - sigmoid(l) = sigmoid(u) * sigmoid(-l) * (1 - exp(-(u - l))) exactly, each factor in log space:
    # every bin keeps full relative precision, tails included, and the 256 bins telescope to 1. VDVAE
    # subtracts two fp32 sigmoids and below a mass of 1e-5 switches to density x width, which underestimates
    # a sharp logistic's tail bin ~8x (2 nats), discontinuously at the threshold.
    interior = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-width))
    # edges are chosen by the integer value, not by float thresholds like VDVAE's x < -0.999
    return torch.where(k == 0, F.logsigmoid(upper), torch.where(k == 255, F.logsigmoid(-lower), interior))


@fp32
def dmol_nll(params: Tensor, x: Tensor) -> Tensor:
    """Per-image NLL (B,) in nats per sub-pixel of uint8 images x (B, 3, H, W) under the mixture."""
    centres = targets(x, params)  # (B, 3, H, W)
    logits, means, log_scales, coeffs = dmol_split(params)
    mean = ar_means(means, coeffs, centres[:, 0:1], centres[:, 1:2])  # teacher-forced on the true R, G
    logp = bin_log_prob(x.unsqueeze(2), centres.unsqueeze(2), mean, log_scales)  # (B, 3, n, H, W)
    per_pixel = torch.logsumexp(F.log_softmax(logits, dim=1) + logp.sum(1), dim=1)  # (B, H, W)
    return -per_pixel.mean(dim=(1, 2)) / 3.0


def _dmol_draw(params: Tensor, temperature: float, component: Tensor) -> Tensor:
    """Draw R, then G | R, then B | R, G from one chosen component per pixel (B, 1, H, W); uint8 out."""
    _, means, log_scales, coeffs = dmol_split(params)
    pick = component.unsqueeze(1).expand(-1, 3, -1, -1, -1)  # (B, 3, 1, H, W)
    means, log_scales, coeffs = (t.gather(2, pick).squeeze(2) for t in (means, log_scales, coeffs))
    values, centres = [], []
    for c in range(3):
        mean = means[:, c]  # (B, H, W)
        if c >= 1:
            mean = mean + coeffs[:, c - 1] * centres[0]  # R->G for G, R->B for B
        if c == 2:
            mean = mean + coeffs[:, 2] * centres[1]
        if temperature > 0:  # inverse-CDF logistic noise; u > 0 keeps log(u) finite
            u = torch.rand_like(mean).clamp(min=torch.finfo(mean.dtype).tiny)
            mean = mean + temperature * log_scales[:, c].exp() * (torch.log(u) - torch.log1p(-u))
        # rounding the clamped draw to the nearest centre gives exactly the bin masses of `dmol_nll` (edge
        # bins take the tails); the next channel conditions on the bin centre, as the NLL does
        k = torch.round((mean.clamp(-1, 1) + 1) * 127.5)  # (B, H, W) in 0..255
        values.append(k)
        centres.append(k / 127.5 - 1)
    return torch.stack(values, dim=1).to(torch.uint8)  # (B, 3, H, W)


@fp32
def dmol_sample(params: Tensor, temperature: float = 1.0) -> Tensor:
    """Sample uint8 images (B, 3, H, W); temperature scales the logistic scales, not the mixture weights."""
    logits = dmol_split(params)[0]  # (B, n, H, W)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(min=torch.finfo(logits.dtype).tiny)))
    return _dmol_draw(params, temperature, (logits + gumbel).argmax(1, keepdim=True))


@fp32
def dmol_reconstruct(params: Tensor) -> Tensor:
    """Deterministic image: the autoregressive mean of each pixel's most probable component, rounded (not the mode)."""
    return _dmol_draw(params, 0.0, dmol_split(params)[0].argmax(1, keepdim=True))


def categorical_logits(params: Tensor) -> Tensor:
    """(B, 768, H, W) -> (B, 3, 256, H, W): channel c*256 + k is the logit of value k in channel c."""
    _check_params(params, 3 * 256, "categorical")
    b, _, h, w = params.shape
    return params.reshape(b, 3, 256, h, w)


@fp32
def categorical_nll(params: Tensor, x: Tensor) -> Tensor:
    """Per-image NLL (B,) in nats per sub-pixel under a 256-way softmax per sub-pixel."""
    targets(x, params)
    logp = F.log_softmax(categorical_logits(params), dim=2)  # (B, 3, 256, H, W)
    return -logp.gather(2, x.long().unsqueeze(2)).mean(dim=(1, 2, 3, 4))


@fp32
def categorical_sample(params: Tensor, temperature: float = 1.0) -> Tensor:
    """Sample uint8 images (B, 3, H, W) from softmax(logits / temperature); temperature 0 is the argmax."""
    logits = categorical_logits(params)
    u = torch.rand_like(logits).clamp(min=torch.finfo(logits.dtype).tiny)
    # Gumbel-max: argmax(logits / T + g) == argmax(logits + T * g), which stays defined at T = 0
    return (logits - temperature * torch.log(-torch.log(u))).argmax(2).to(torch.uint8)


@fp32
def categorical_reconstruct(params: Tensor) -> Tensor:
    """The most probable value of every sub-pixel, uint8 (B, 3, H, W)."""
    return categorical_logits(params).argmax(2).to(torch.uint8)


@fp32
def mse_loss(params: Tensor, x: Tensor) -> Tensor:
    """Per-image mean squared error (B,) between params and x in [-1, 1]: a loss, NOT a likelihood."""
    _check_params(params, 3, "mse")
    return (params - targets(x, params)).pow(2).mean(dim=(1, 2, 3))


@fp32
def mse_reconstruct(params: Tensor) -> Tensor:
    """Clamp params (B, 3, H, W) to [-1, 1] and round back to uint8."""
    _check_params(params, 3, "mse")
    return torch.round((params.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)


_NLL = {"mix": dmol_nll, "categorical": categorical_nll, "mse": mse_loss}
_SAMPLE = {"mix": dmol_sample, "categorical": categorical_sample}
_RECONSTRUCT = {"mix": dmol_reconstruct, "categorical": categorical_reconstruct, "mse": mse_reconstruct}


def head_channels(head: Head, num_mixtures: int = 10) -> int:
    """Number of parameter channels the decoder must output for `head`."""
    if head not in _NLL:
        raise ValueError(f"head must be one of {tuple(_NLL)}, got {head!r}")
    if not (isinstance(num_mixtures, int) and num_mixtures >= 1):
        raise ValueError(f"num_mixtures must be a positive integer, got {num_mixtures!r}")
    return {"mix": 10 * num_mixtures, "categorical": 3 * 256, "mse": 3}[head]


def checked(head: Head, params: Tensor, num_mixtures: int) -> None:
    channels = head_channels(head, num_mixtures)
    if isinstance(params, Tensor):  # non-tensors are rejected by `fp32`
        _check_params(params, channels, head)


def head_nll(head: Head, params: Tensor, x: Tensor, num_mixtures: int = 10) -> Tensor:
    """Per-image reconstruction loss (B,): the NLL in nats per sub-pixel ("mix", "categorical"), or the MSE
    in [-1, 1] units ("mse": not a likelihood, never convert it to bits/dim)."""
    checked(head, params, num_mixtures)
    return _NLL[head](params, x)


def head_sample(head: Head, params: Tensor, num_mixtures: int = 10, temperature: float = 1.0) -> Tensor:
    """Sample uint8 images (B, 3, H, W) from a likelihood head; "mse" has no distribution and raises."""
    if head == "mse":
        raise ValueError("head 'mse' is a regression loss with no distribution to sample: use head_reconstruct")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    checked(head, params, num_mixtures)
    return _SAMPLE[head](params, temperature)


def head_reconstruct(head: Head, params: Tensor, num_mixtures: int = 10) -> Tensor:
    """Deterministic uint8 reconstruction (B, 3, H, W) from the head's parameters."""
    checked(head, params, num_mixtures)
    return _RECONSTRUCT[head](params)
