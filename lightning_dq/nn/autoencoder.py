"""`HierarchicalAutoEncoder`, the DQ auto-encoder of the paper's official code (dq.py): L levels, each half the grid of
the one below, quantized top down with the decoded level above (VQ-VAE-2 style), all decoded on the grid H / stride into
a likelihood head's parameters. Fully convolutional (32x32 and 64x64 alike); levels listed TOP FIRST."""

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_dq.errors import ConfigError
from lightning_dq.nn.codebook import CodebookStats
from lightning_dq.nn.codes import CodeGeometry
from lightning_dq.nn.heads import Head, head_channels, head_nll, head_reconstruct, to_unit_range
from lightning_dq.nn.quantizer import DepthwiseQuantizer, QuantizerMode, QuantizerOutput


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): channels -> hidden -> channels (no normalisation, as the paper)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class Encoder(nn.Module):
    """Down-sample by `stride` (2 or 4) with 4x4 stride-2 convs, then residual blocks."""

    def __init__(self, in_ch: int, channels: int, stride: int, res_blocks: int, res_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, channels // 2, 4, 2, 1), nn.ReLU()]
        if stride == 4:
            layers += [nn.Conv2d(channels // 2, channels, 4, 2, 1), nn.ReLU()]
            layers += [nn.Conv2d(channels, channels, 3, padding=1)]
        else:
            layers += [nn.Conv2d(channels // 2, channels, 3, padding=1)]
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)] + [nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """3x3 conv, residual blocks, then up-sample by `stride` (1, 2 or 4) with 4x4 transposed convs."""

    def __init__(self, in_ch: int, out_ch: int, channels: int, stride: int, res_blocks: int, res_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, channels, 3, padding=1)]
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)] + [nn.ReLU()]
        if stride == 4:
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1), nn.ReLU()]
            layers += [nn.ConvTranspose2d(channels // 2, out_ch, 4, 2, 1)]
        elif stride == 2:
            layers.append(nn.ConvTranspose2d(channels, out_ch, 4, 2, 1))
        elif out_ch != channels:  # stride 1: the official code silently ignores out_ch here; we map it
            layers.append(nn.Conv2d(channels, out_ch, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AutoEncoderOutput(NamedTuple):
    """Everything one forward pass produces (per-image values are `(B,)`)."""

    params: Tensor  # (B, head_channels, H, W) parameters of the likelihood head
    codes: list[Tensor]  # per level, top first: (B, M, h_l, w_l) int64
    recon: Tensor  # (B,) decoder NLL in nats per sub-pixel (head "mse": mean squared error, not an NLL)
    commitment: Tensor  # () commitment term summed over levels
    stats: list[CodebookStats]  # per level, top first

    def loss(self, beta: float) -> Tensor:
        """The training loss: reconstruction (nats per sub-pixel, mean over images) + beta * commitment."""
        return self.recon.mean() + beta * self.commitment


class HierarchicalAutoEncoder(nn.Module):
    """Hierarchical auto-encoder with one `DepthwiseQuantizer` per level; the size defaults are the official README
    preset (code grids 2x2, 4x4, 8x8, top first, at 32x32).

    Args:
        channels: C, width of encoders and decoders.
        res_blocks: residual blocks in every encoder and decoder.
        res_channels: hidden width of each residual block.
        coder_blocks: stride-2 stages between the image and the bottom level, counting the first stage (the
            bottom grid is H / (stride * 2 ** (coder_blocks - 1))).
        stride: down-sampling of the first encoder stage; the common decoding grid is H / stride.
        codebook_sizes: K per level, TOP LEVEL FIRST; its length is the number of levels L.
        num_codebooks: M, codebooks per level.
        code_dim: D, dimension of each code.
        mode: "dq" (depthwise split, one slice per codebook) or "vq" (the official VQ baseline).
        head: "mix" (discretized logistic mixture), "categorical" (256-way softmax) or "mse" (a loss only: no bits/dim).
        num_mixtures: logistic components of the "mix" head.
        decay: EMA decay of the codebooks.
        dead_code_threshold: EMA count below which a code is restarted from the batch (0 disables).
        commitment_reduction: commitment summed ("sum", the paper's code) or averaged over the M codebooks.
        init: "default" keeps PyTorch's initialisation (the paper's code); "kaiming": He-normal convolutions and
            zero residual branches, without which the upper levels collapse to a few codes early (docs/results.md).
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
    ) -> None:
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config["codebook_sizes"] = list(codebook_sizes)
        if not codebook_sizes or channels < 2 or channels % 2:
            raise ConfigError(f"need one level or more and an even channels >= 2, got {codebook_sizes=}, {channels=}")
        self.head = head
        self.num_mixtures = num_mixtures
        self.geometry = CodeGeometry(tuple(codebook_sizes), num_codebooks, stride * 2 ** (coder_blocks - 1))
        c, levels, md = channels, len(codebook_sizes), num_codebooks * code_dim
        block = dict(res_blocks=res_blocks, res_channels=res_channels)
        # bottom-up encoders, index 0 = bottom level
        bottom = [Encoder(3, c, stride, **block)] + [Encoder(c, c, 2, **block) for _ in range(coder_blocks - 1)]
        self.encoders = nn.ModuleList([nn.Sequential(*bottom)] + [Encoder(c, c, 2, **block) for _ in range(levels - 1)])
        # quantizers, index 0 = bottom; every level but the top also sees the decoded level above
        upkeep = dict(dead_code_threshold=dead_code_threshold, commitment_reduction=commitment_reduction)
        self.quantizers = nn.ModuleList(
            DepthwiseQuantizer(2 * c if level < levels - 1 else c, num_codebooks, k, code_dim, mode, decay, **upkeep)
            for level, k in enumerate(reversed(codebook_sizes))
        )
        # conditioning decoders: quantized level l+1 -> features on level l's grid
        self.conditioners = nn.ModuleList(Decoder(md, c, c, 2, **block) for _ in range(levels - 1))
        # each level -> the common grid H / stride: level l sits 2^(coder_blocks-1+l) below it (nearest-neighbour
        # up-sampling by 2^(l-1) for l >= 2, then up-sampling decoders: one fewer at the bottom, or a stride-1 one)
        self.upsamplers = nn.ModuleList()
        for level in range(levels):
            nearest = [nn.Upsample(scale_factor=2 ** (level - 1), mode="nearest")] if level > 1 else []
            steps = [Decoder(md if i == 0 else c, c, c, 2, **block) for i in range(coder_blocks - (level == 0))]
            self.upsamplers.append(nn.Sequential(*nearest, *steps) if steps else Decoder(md, c, c, 1, **block))
        decoders = [Decoder(c * levels, c, c, stride, **block), Decoder(c, c, c, 1, **block)]
        self.decoder = nn.Sequential(*decoders, nn.Conv2d(c, head_channels(head, num_mixtures), 3, padding=1))
        if init == "kaiming":
            self._kaiming_init()

    def _kaiming_init(self) -> None:
        """He-normal convolutions, zero biases, and a zero last conv in every residual branch (identity blocks)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                # a transposed conv's weight is (in, out, k, k): its fan-in per output is along dim 0
                fan = "fan_out" if isinstance(module, nn.ConvTranspose2d) else "fan_in"
                nn.init.kaiming_normal_(module.weight, mode=fan, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for module in self.modules():  # after the loop above, which would re-initialise these convs
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.net[-1].weight)

    @property
    def num_levels(self) -> int:
        return self.geometry.num_levels

    def code_shapes(self, resolution: int) -> list[tuple[int, int, int, int]]:  # `CodeGeometry.shapes`
        return self.geometry.shapes(resolution)

    def _quantize(self, x: Tensor) -> list[QuantizerOutput]:
        """Bottom-up encoding, then top-down quantization; the outputs are returned top first."""
        self.geometry.check(x.shape[-1])
        h = to_unit_range(x)  # (B, 3, H, W)
        features = []
        for enc in self.encoders:
            h = enc(h)  # (B, C, h_l, w_l), halving per level
            features.append(h)
        outs, above = [], None
        for level in reversed(range(self.num_levels)):
            inp = features[level]
            if above is not None:
                inp = torch.cat([inp, self.conditioners[level](above)], dim=1)  # (B, 2C, h_l, w_l)
            outs.append(_quantize_eager(self.quantizers[level], inp))
            above = outs[-1].quantized  # (B, M*D, h_l, w_l)
        return outs

    def _decode_quantized(self, quantized: list[Tensor]) -> Tensor:
        """Quantized tensors per level (top first) -> head parameters (B, head_channels, H, W)."""
        levels = list(reversed(range(self.num_levels)))  # module lists are bottom first
        grids = [self.upsamplers[level](q) for level, q in zip(levels, quantized, strict=True)]
        return self.decoder(torch.cat(grids, dim=1))  # (B, C*L, H/s, W/s) -> (B, P, H, W)

    @torch.no_grad()
    def encode(self, x: Tensor) -> list[Tensor]:
        """uint8 images (B, 3, H, W) -> codes per level, top first, each (B, M, h_l, w_l) int64, in eval mode whatever
        the network's mode: encoding never changes a codebook."""
        training = self.training
        self.eval()
        try:
            return [out.codes for out in self._quantize(x)]
        finally:
            self.train(training)

    def decode(self, codes: Sequence[Tensor], keep_levels: Sequence[int] | None = None) -> Tensor:
        """Codes per level (top first) -> head parameters (B, head_channels, H, W); with `keep_levels` (indices, 0 =
        top), the other levels are replaced by zeros (the "what each level encodes" figure)."""
        self.geometry.check_codes(codes)
        keep = set(range(self.num_levels)) if keep_levels is None else set(keep_levels)
        if not keep <= set(range(self.num_levels)):
            raise ValueError(f"keep_levels must be within 0..{self.num_levels - 1}, got {sorted(keep)}")
        quantized = []
        for i, c in enumerate(codes):
            q = self.quantizers[self.num_levels - 1 - i].embed_codes(c)  # (B, M*D, h_l, w_l)
            quantized.append(q if i in keep else torch.zeros_like(q))
        return self._decode_quantized(quantized)

    @torch.no_grad()
    def reconstruct(self, codes: Sequence[Tensor]) -> Tensor:
        """Codes per level (top first) -> the head's deterministic reconstruction, uint8 (B, 3, H, W)."""
        return head_reconstruct(self.head, self.decode(codes), self.num_mixtures)

    def forward(self, x: Tensor) -> AutoEncoderOutput:
        """uint8 images (B, 3, H, W) -> head parameters, codes, per-image reconstruction NLL, commitment."""
        outs = self._quantize(x)
        params = self._decode_quantized([o.quantized for o in outs])  # (B, P, H, W)
        recon = head_nll(self.head, params, x, self.num_mixtures)  # (B,) nats per sub-pixel
        commitment = torch.stack([o.commitment for o in outs]).sum()
        return AutoEncoderOutput(params, [o.codes for o in outs], recon, commitment, [o.stats for o in outs])


@torch.compiler.disable
def _quantize_eager(quantizer: DepthwiseQuantizer, x: Tensor) -> QuantizerOutput:
    """A quantizer outside torch.compile: its codebook upkeep (init, restarts, collectives) does not trace."""
    return quantizer(x)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (codebooks are buffers and are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
