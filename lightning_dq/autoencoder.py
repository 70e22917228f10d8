"""The hierarchical DQ auto-encoder (the architecture of the paper's official code, dq.py).

Bottom-up encoders produce features at L levels (each level halves the grid of the one below); levels
are quantized top-down, each lower level quantizing its own features concatenated with a 2x
up-sampling decoder applied to the quantized level above (VQ-VAE-2 style); every level's quantized
tensor is brought to a common grid (H / stride) and the concatenation is decoded into the parameters of
a per-sub-pixel likelihood head. Fully convolutional: the same weights run on 32x32 and 64x64 images.

Conventions: lists of levels are ordered TOP LEVEL FIRST (coarsest grid first), matching `encode`,
`codebook_sizes` and the prior's token order. Images enter as uint8 `(B, 3, H, W)`; `normalize` is the
only place they become floats, and likelihood targets are the raw uint8 pixels.

No Lightning code here: the model runs in a notebook without a Trainer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_dq.errors import ConfigError
from lightning_dq.likelihood import head_channels, head_nll
from lightning_dq.quantize import CodebookStats, DepthwiseQuantizer, QuantizerMode

Head = Literal["mix", "categorical", "mse"]


_NATIVE_BF16: dict[str, bool] = {}  # per device type; a plain dict, which torch.compile reads without warnings


def _bf16_native(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":  # oneDNN's bf16 kernels need AVX512-BF16 or AMX; AVX2 CPUs emulate bf16
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def bf16_is_native(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 convolutions and matmuls in hardware (CUDA: compute capability 8.0+;
    CPU: AVX512-BF16 or AMX). Elsewhere bf16 is emulated: on an AVX2 CPU a bf16 convolution measured 6-50x
    slower than the same fp32 one (docs/benchmarks.md)."""
    kind = torch.device(device).type
    if kind not in _NATIVE_BF16:
        _NATIVE_BF16[kind] = _bf16_native(kind)
    return _NATIVE_BF16[kind]


@torch.compiler.disable
def _quantize_eager(quantizer: DepthwiseQuantizer, x: Tensor):
    """Call a quantizer outside torch.compile: its codebook upkeep (data-dependent init, dead-code restarts
    from a seeded generator, collectives) does not trace, and its maths is small next to the convolutions."""
    return quantizer(x)


@torch.compiler.disable
def _warn_emulated_bf16(device_type: str) -> None:
    warnings.warn(
        f"bf16 autocast on a {device_type} without native bf16 (no AVX512-BF16/AMX): the auto-encoder runs its "
        "convolutions in fp32, several times faster there (set emulated_bf16=True to force bf16)",
        stacklevel=3,
    )

# ---------------------------------------------------------------------------------------------------
# building blocks (no normalisation layers anywhere, as in the official code)
# ---------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): channels -> hidden -> channels."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class Encoder(nn.Module):
    """Down-sample by `stride` (2 or 4) with 4x4 stride-2 convs, then residual blocks."""

    def __init__(self, in_ch: int, channels: int, stride: int, res_blocks: int, res_channels: int) -> None:
        super().__init__()
        if stride == 2:
            layers = [
                nn.Conv2d(in_ch, channels // 2, 4, 2, 1), nn.ReLU(),
                nn.Conv2d(channels // 2, channels, 3, padding=1),
            ]  # fmt: skip
        elif stride == 4:
            layers = [
                nn.Conv2d(in_ch, channels // 2, 4, 2, 1), nn.ReLU(),
                nn.Conv2d(channels // 2, channels, 4, 2, 1), nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
            ]  # fmt: skip
        else:
            raise ValueError(f"Encoder stride must be 2 or 4, got stride={stride!r}")
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)] + [nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """3x3 conv, residual blocks, then up-sample by `stride` (1, 2 or 4) with 4x4 transposed convs."""

    def __init__(
        self, in_ch: int, out_ch: int, channels: int, stride: int, res_blocks: int, res_channels: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, channels, 3, padding=1)]
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)] + [nn.ReLU()]
        if stride == 2:
            layers.append(nn.ConvTranspose2d(channels, out_ch, 4, 2, 1))
        elif stride == 4:
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1), nn.ReLU(),
                nn.ConvTranspose2d(channels // 2, out_ch, 4, 2, 1),
            ]  # fmt: skip
        elif stride == 1:
            if out_ch != channels:  # the official code silently ignores out_ch here; we map it
                layers.append(nn.Conv2d(channels, out_ch, 1))
        else:
            raise ValueError(f"Decoder stride must be 1, 2 or 4, got stride={stride!r}")
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------


class AutoEncoderOutput(NamedTuple):
    """Everything one forward pass produces (per-image values are `(B,)`)."""

    params: Tensor  # (B, head_channels, H, W) parameters of the likelihood head
    codes: list[Tensor]  # per level, top first: (B, M, h_l, w_l) int64
    recon: Tensor  # (B,) decoder NLL in nats per sub-pixel (head "mse": mean squared error, not an NLL)
    commitment: Tensor  # () commitment term summed over levels
    stats: list[CodebookStats]  # per level, top first


class HierarchicalAutoEncoder(nn.Module):
    """Hierarchical auto-encoder with one `DepthwiseQuantizer` per level.

    README preset of the official code: channels=256, res_blocks=3, res_channels=256, coder_blocks=2,
    stride=2, code_dim=64, num_codebooks=5, codebook_sizes=[32, 32, 32]; code grids 2x2, 4x4, 8x8 (top
    first) at 32x32 input and 4x4, 8x8, 16x16 at 64x64.

    Args:
        channels: C, width of encoders and decoders.
        res_blocks: residual blocks in every encoder and decoder.
        res_channels: hidden width of each residual block.
        coder_blocks: stride-2 stages between the image and the bottom level, counting the first
            stage (the bottom level's grid is H / (stride * 2 ** (coder_blocks - 1))).
        stride: down-sampling of the first encoder stage (2 or 4); the common decoding grid is H / stride.
        codebook_sizes: K per level, TOP LEVEL FIRST; its length is the number of levels L.
        num_codebooks: M, codebooks per level.
        code_dim: D, dimension of each code.
        mode: "dq" (depthwise split, one slice per codebook) or "vq" (the official VQ baseline).
        head: likelihood head: "mix" (discretized logistic mixture), "categorical" (256-way softmax) or
            "mse" (a training loss only: it has no bits/dim).
        num_mixtures: logistic components of the "mix" head.
        decay: EMA decay of the codebooks.
        dead_code_threshold: EMA count below which a code is restarted from the batch (0 disables).
        commitment_reduction: commitment summed ("sum", the paper's code) or averaged over the M codebooks.
        init: "default" keeps PyTorch's initialisation (the paper's code). "kaiming": He-normal convolutions
            and zero-initialised residual branches. With "default" the deep decoder starts almost blind to
            its input (its output moves ~3e-4 of its spread when the codes change, vs 0.66), so the
            commitment term shrinks the features and the upper levels collapse to a few codes before the
            decoder learns to use them; "kaiming" keeps them in use (docs/results.md).
        emulated_bf16: inside a bf16 autocast region on a device without native bf16 (`bf16_is_native`),
            False (default) runs the convolutions in fp32 (the fast path there: emulated bf16 is several
            times slower); True keeps bf16 anyway (to study its numerics).
    """

    def __init__(
        self,
        channels: int = 256,
        res_blocks: int = 3,
        res_channels: int = 256,
        coder_blocks: int = 2,
        stride: Literal[2, 4] = 2,
        codebook_sizes: Sequence[int] = (32, 32, 32),
        num_codebooks: int = 5,
        code_dim: int = 64,
        mode: QuantizerMode = "dq",
        head: Head = "mix",
        num_mixtures: int = 10,
        decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        commitment_reduction: Literal["sum", "mean"] = "sum",
        init: Literal["default", "kaiming"] = "default",
        emulated_bf16: bool = False,
    ) -> None:
        super().__init__()
        # the constructor arguments: checkpoints store them so the network can be rebuilt from the file alone
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config["codebook_sizes"] = list(codebook_sizes)
        for name, value in [("channels", channels), ("coder_blocks", coder_blocks), ("res_channels", res_channels)]:
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {name}={value!r}")
        if channels % 2:
            raise ConfigError(f"channels must be even (encoders use channels // 2), got channels={channels}")
        if stride not in (2, 4):
            raise ConfigError(f"stride must be 2 or 4, got stride={stride!r}")
        if len(codebook_sizes) < 1:
            raise ConfigError("codebook_sizes needs at least one level, got an empty list")
        self.codebook_sizes = list(codebook_sizes)
        self.num_levels = len(self.codebook_sizes)
        self.stride, self.coder_blocks, self.head, self.num_mixtures = stride, coder_blocks, head, num_mixtures
        self.emulated_bf16 = emulated_bf16
        c, L, md = channels, self.num_levels, num_codebooks * code_dim
        block = dict(res_blocks=res_blocks, res_channels=res_channels)

        # bottom-up encoders, index 0 = bottom level
        bottom = [Encoder(3, c, stride, **block)] + [Encoder(c, c, 2, **block) for _ in range(coder_blocks - 1)]
        self.encoders = nn.ModuleList([nn.Sequential(*bottom)] + [Encoder(c, c, 2, **block) for _ in range(L - 1)])
        # quantizers, index 0 = bottom; every level but the top also sees the decoded level above
        self.quantizers = nn.ModuleList(
            DepthwiseQuantizer(
                c if level == L - 1 else 2 * c, num_codebooks, self.codebook_sizes[L - 1 - level], code_dim,
                mode, decay, dead_code_threshold=dead_code_threshold, commitment_reduction=commitment_reduction,
            )
            for level in range(L)
        )  # fmt: skip
        # conditioning decoders: quantized level l+1 -> features on level l's grid
        self.conditioners = nn.ModuleList(Decoder(md, c, c, 2, **block) for _ in range(L - 1))
        # each level's quantized tensor -> the common grid H / stride with C channels
        self.upsamplers = nn.ModuleList(self._upsampler(level, md, c, block) for level in range(L))
        self.decoder = nn.Sequential(
            Decoder(c * L, c, c, stride, **block),
            Decoder(c, c, c, 1, **block),
            nn.Conv2d(c, head_channels(head, num_mixtures), 3, padding=1),
        )
        if init == "kaiming":
            self._kaiming_init()
        elif init != "default":
            raise ConfigError(f"init must be 'default' or 'kaiming', got init={init!r}")

    def _kaiming_init(self) -> None:
        """He-normal weights for the ReLU convolutions (variance-preserving), zero biases, and a zero last
        conv in every residual branch so each block starts as the identity (quantizer projections
        included; the codebooks are initialised from data)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                # a transposed conv's weight is (in, out, k, k): its fan-in per output is along dim 0
                mode = "fan_out" if isinstance(module, nn.ConvTranspose2d) else "fan_in"
                nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.net[-1].weight)

    def _upsampler(self, level: int, md: int, c: int, block: dict) -> nn.Module:
        """Level l sits 2 ** (coder_blocks - 1 + l) below the common grid: nearest-neighbour up-sampling
        by 2 ** (l - 1) for l >= 1, then up-sampling decoders (the official layout for coder_blocks=2)."""
        if level == 0:
            steps = self.coder_blocks - 1
            stages = [Decoder(md, c, c, 2, **block)] + [Decoder(c, c, c, 2, **block) for _ in range(steps - 1)]
            return nn.Sequential(*stages) if steps else Decoder(md, c, c, 1, **block)
        stages = [Decoder(md if i == 0 else c, c, c, 2, **block) for i in range(self.coder_blocks)]
        nearest = [nn.Upsample(scale_factor=2 ** (level - 1), mode="nearest")] if level > 1 else []
        return nn.Sequential(*nearest, *stages)

    # -- geometry --------------------------------------------------------------------------------

    @property
    def downsample(self) -> int:
        """Image side / bottom level's grid side."""
        return self.stride * 2 ** (self.coder_blocks - 1)

    def check_resolution(self, resolution: int) -> None:
        """Raise ValueError unless images of side `resolution` give an integer grid at every level."""
        factor = self.downsample * 2 ** (self.num_levels - 1)
        if resolution < factor or resolution % factor:
            raise ConfigError(
                f"resolution={resolution} is not a multiple of {factor}, the model's total down-sampling "
                f"(stride {self.stride} x 2^{self.coder_blocks - 1} coder blocks x 2^{self.num_levels - 1} levels)"
            )

    def code_shapes(self, resolution: int) -> list[tuple[int, int, int, int]]:
        """(h, w, M, K) of each level's codes, top first, for square images of side `resolution`."""
        self.check_resolution(resolution)
        shapes = []
        for level in reversed(range(self.num_levels)):
            side = resolution // (self.downsample * 2**level)
            q = self.quantizers[level]
            shapes.append((side, side, q.num_codebooks, q.codebook_size))
        return shapes

    # -- encode / decode ---------------------------------------------------------------------------

    @staticmethod
    def normalize(x: Tensor) -> Tensor:
        """uint8 pixels (B, 3, H, W) -> floats in [-1, 1]: the only place images become floats."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        return x.float() / 127.5 - 1.0

    def _precision(self, x: Tensor) -> contextlib.AbstractContextManager:
        """Autocast off where bf16 autocast is on but `x`'s device only emulates bf16 (see `emulated_bf16`)."""
        kind = x.device.type
        if (self.emulated_bf16 or not torch.is_autocast_enabled(kind)
                or torch.get_autocast_dtype(kind) != torch.bfloat16 or bf16_is_native(kind)):
            return contextlib.nullcontext()
        _warn_emulated_bf16(kind)
        return torch.autocast(kind, enabled=False)

    def _quantize(self, x: Tensor):
        """Bottom-up encoding, then top-down quantization; lists are returned top first."""
        with self._precision(x):
            return self._quantize_levels(x)

    def _quantize_levels(self, x: Tensor):
        self.check_resolution(x.shape[-1])
        h = self.normalize(x)  # (B, 3, H, W)
        features = []
        for encoder in self.encoders:
            h = encoder(h)  # (B, C, h_l, w_l), halving per level
            features.append(h)
        outs, above = [], None
        for level in reversed(range(self.num_levels)):
            inp = features[level]
            if above is not None:
                inp = torch.cat([inp, self.conditioners[level](above)], dim=1)  # (B, 2C, h_l, w_l)
            out = _quantize_eager(self.quantizers[level], inp)
            outs.append(out)
            above = out.quantized  # (B, M*D, h_l, w_l)
        return outs

    def _decode_quantized(self, quantized: list[Tensor]) -> Tensor:
        """Quantized tensors per level (top first) -> head parameters (B, head_channels, H, W)."""
        # quantized is top first; module lists are bottom first. A list: a `reversed` iterator lost its
        # position across torch.compile's graph break at the `with` below (zip raised)
        levels = list(reversed(range(self.num_levels)))
        with self._precision(quantized[0]):
            grids = [self.upsamplers[level](q) for level, q in zip(levels, quantized, strict=True)]
            return self.decoder(torch.cat(grids, dim=1))  # (B, C*L, H/s, W/s) -> (B, P, H, W)

    @torch.no_grad()
    def encode(self, x: Tensor) -> list[Tensor]:
        """uint8 images (B, 3, H, W) -> codes per level, top first, each (B, M, h_l, w_l) int64.

        Call in eval mode: in training mode the quantizers update their codebooks.
        """
        return [out.codes for out in self._quantize(x)]

    def decode(self, codes: Sequence[Tensor], keep_levels: Sequence[int] | None = None) -> Tensor:
        """Codes per level (top first) -> head parameters (B, head_channels, H, W).

        keep_levels: indices (0 = top) of levels to use; the others are replaced by zeros (the
        "what each level encodes" figure). None keeps all levels.
        """
        if len(codes) != self.num_levels:
            raise ValueError(f"decode expects {self.num_levels} code tensors (top first), got {len(codes)}")
        keep = set(range(self.num_levels)) if keep_levels is None else set(keep_levels)
        if not keep <= set(range(self.num_levels)):
            raise ValueError(f"keep_levels must be within 0..{self.num_levels - 1}, got {sorted(keep)}")
        quantized = []
        for i, c in enumerate(codes):
            q = self.quantizers[self.num_levels - 1 - i].embed_codes(c)  # (B, M*D, h_l, w_l)
            quantized.append(q if i in keep else torch.zeros_like(q))
        return self._decode_quantized(quantized)

    def forward(self, x: Tensor) -> AutoEncoderOutput:
        """uint8 images (B, 3, H, W) -> head parameters, codes, per-image reconstruction NLL, commitment."""
        outs = self._quantize(x)
        params = self._decode_quantized([o.quantized for o in outs])  # (B, P, H, W)
        recon = head_nll(self.head, params, x, self.num_mixtures)  # (B,) nats per sub-pixel
        commitment = torch.stack([o.commitment for o in outs]).sum()
        return AutoEncoderOutput(params, [o.codes for o in outs], recon, commitment, [o.stats for o in outs])


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (codebooks are buffers and are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)



