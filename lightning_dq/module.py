"""LightningModules: `AutoEncoderModule` trains the hierarchical DQ auto-encoder; `PriorModule` trains a
prior over the codes of a frozen auto-encoder and reports the three bits/dim figures.

Every step goes through one shared `_step(batch, stage)` and logs `stage/metric` keys. Epoch values are
torchmetrics aggregates over images (every image counted once, summed over DDP ranks):

- `{stage}/bpd_decoder`: figure A, -log2 p(x | z(x)) / D. NOT a bound on -log2 p(x): the codes are free.
- `{stage}/bpd_uniform`: figure B, A + the uniform code cost sum_l h*w*M*log2 K / D. A valid bound.
- `{stage}/bpd_prior`: figure C (PriorModule), A - log2 p_prior(z(x)) / D. A valid bound; the headline.

D = 3*H*W sub-pixels. Targets are always the raw uint8 pixels.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric

from lightning_dq.autoencoder import HierarchicalAutoEncoder
from lightning_dq.likelihood import bits_per_dim, head_reconstruct, head_sample, uniform_code_bits
from lightning_dq.metrics import CodeUsage
from lightning_dq.prior import CodePrior

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
STAGES = ("train", "val", "test")


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at lr 2e-4, no weight decay: the paper's official training settings."""
    return torch.optim.Adam(params, lr=2e-4)


def save_config(module: LightningModule, injected: list[str]) -> None:
    """Save the calling `__init__`'s arguments as hyperparameters.

    Under LightningCLI the hyperparameters are the parsed config (class paths of the injected network
    and optimizer included), so `load_from_checkpoint` rebuilds the module with no arguments. Built in
    Python, the injected objects are not hyperparameters: pass them again to `load_from_checkpoint`.
    """
    from_cli = _given_hyperparameters.get() is not None  # set by LightningCLI while it instantiates
    module.save_hyperparameters(ignore=None if from_cli else injected, frame=inspect.currentframe().f_back)


def reconstruction_mse(head: str, params: Tensor, x: Tensor, num_mixtures: int) -> Tensor:
    """Per-image mean squared error of the head's deterministic reconstruction, in [0, 1] pixel units."""
    recon = head_reconstruct(head, params.detach(), num_mixtures)  # (B, 3, H, W) uint8
    return ((recon.float() - x.float()) / 255.0).pow(2).mean(dim=(1, 2, 3))  # (B,)


class StageMetrics(nn.Module):
    """Epoch aggregates of one stage: per-image means, the image count and per-level code usage."""

    def __init__(self, names: list[str], code_specs: list[tuple[int, int]]) -> None:
        super().__init__()
        self.means = nn.ModuleDict({n: MeanMetric() for n in names})
        self.images = SumMetric()
        self.usage = nn.ModuleList(CodeUsage(m, k) for m, k in code_specs)

    def update(self, values: dict[str, Tensor], codes: list[Tensor]) -> None:
        """values: per-image tensors (B,); codes: per level (B, M, h, w)."""
        for name, v in values.items():
            self.means[name].update(v)
        batch = next(iter(values.values()))
        self.images.update(torch.tensor(float(batch.shape[0]), device=batch.device))
        for usage, c in zip(self.usage, codes, strict=True):
            usage.update(c)


class CodeModelModule(LightningModule):
    """Shared plumbing: steps routed to `_step(batch, stage)`, epoch aggregates logged as `stage/name`."""

    def _init_metrics(self, net: HierarchicalAutoEncoder, names: list[str]) -> None:
        specs = [(q.num_codebooks, q.codebook_size) for q in reversed(net.quantizers)]  # top first
        for stage in STAGES:  # attributes, not a ModuleDict: "train" would shadow nn.Module.train
            setattr(self, f"{stage}_metrics", StageMetrics(names, specs))

    def stage_metrics(self, stage: str) -> StageMetrics:
        return getattr(self, f"{stage}_metrics")

    @property
    def code_net(self) -> HierarchicalAutoEncoder:
        """The auto-encoder whose codes this module works on."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Fail before training when the data's image size does not fit the model's down-sampling."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        resolution = getattr(datamodule, "resolution", None)
        if resolution is not None:
            try:
                self.code_net.check_resolution(resolution)
            except ValueError as err:
                raise ValueError(f"data.init_args.resolution={resolution} does not fit the model: {err}") from None

    def _step(self, batch: Tensor, stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        """Compute (all-reducing under DDP), log and reset the stage's epoch aggregates."""
        metrics, suffix = self.stage_metrics(stage), "_epoch" if stage == "train" else ""
        for name, metric in metrics.means.items():
            if metric.update_called:
                on_bar = stage == "val" and name.startswith("bpd")
                self.log(f"{stage}/{name}{suffix}", metric.compute(), prog_bar=on_bar)
            metric.reset()
        if metrics.images.update_called:
            self.log(f"{stage}/num_images{suffix}", metrics.images.compute())
        metrics.images.reset()
        for i, usage in enumerate(metrics.usage):
            if usage.update_called:
                for key, value in usage.compute().items():
                    self.log(f"{stage}/codes_{key}_l{i}{suffix}", value)
            usage.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


class AutoEncoderModule(CodeModelModule):
    """Trains `HierarchicalAutoEncoder` with loss = reconstruction NLL (nats/dim) + beta * commitment.

    Gradient clipping (2.0 in the paper's code) and precision are Trainer settings in the config.

    Args:
        net: the auto-encoder (injected from the config as class_path/init_args).
        beta: weight of the commitment term (0.25 in the paper's code).
        optimizer: callable from parameters to an optimizer; default Adam, lr 2e-4.
        channels_last: run the convolutions in channels_last memory format (faster on CPUs and GPUs
            with bf16 autocast).
    """

    def __init__(
        self,
        net: HierarchicalAutoEncoder,
        beta: float = 0.25,
        optimizer: OptimizerFactory = default_optimizer,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        save_config(self, ["net", "optimizer"])
        self.net, self.beta, self.optimizer_factory, self.channels_last = net, beta, optimizer, channels_last
        self.likelihood = net.head != "mse"
        names = ["loss", "commitment", "mse"] + (["bpd_decoder", "bpd_uniform"] if self.likelihood else ["mse_loss"])
        self._init_metrics(net, names)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    @property
    def code_net(self) -> HierarchicalAutoEncoder:
        return self.net

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    def forward(self, x: Tensor):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def per_image(self, x: Tensor, out) -> dict[str, Tensor]:
        """Per-image figures (B,) of one batch: A and B in bits/dim, reconstruction MSE."""
        values = {"mse": reconstruction_mse(self.net.head, out.params, x, self.net.num_mixtures)}
        if self.likelihood:
            code_bits = uniform_code_bits(self.net.code_shapes(x.shape[-1]), tuple(x.shape[-2:]))
            values["bpd_decoder"] = bits_per_dim(out.recon.detach())
            values["bpd_uniform"] = values["bpd_decoder"] + code_bits
        else:
            values["mse_loss"] = out.recon.detach()
        return values

    def _step(self, batch: Tensor, stage: str) -> Tensor:
        x = batch  # (B, 3, H, W) uint8
        out = self(x)
        loss = out.recon.mean() + self.beta * out.commitment
        b = x.shape[0]
        values = self.per_image(x, out)
        values["loss"] = loss.detach().expand(b)
        values["commitment"] = out.commitment.detach().expand(b)
        self.stage_metrics(stage).update(values, out.codes)
        if stage == "train":  # step-level curves; epoch aggregates are logged at epoch end
            self.log_dict({f"train/{n}": v.mean() for n, v in values.items()}, batch_size=b, prog_bar=False)
            for i, s in enumerate(out.stats):
                self.log_dict(
                    {f"train/perplexity_l{i}": s.perplexity.mean(), f"train/dead_fraction_l{i}": s.dead_fraction.mean(),
                     f"train/restarted_l{i}": s.restarted.sum()},
                    batch_size=b,
                )  # fmt: skip
            self.log("train/resolution", float(x.shape[-1]), batch_size=b)
        return loss


class PriorModule(CodeModelModule):
    """Trains a `CodePrior` on the codes of a frozen, trained auto-encoder; reports A, B and C.

    The auto-encoder is loaded from `autoencoder_ckpt`, kept in eval mode (its codebooks no longer
    change) and never optimised. Loss: -log p_prior(z(x)) in nats per code.

    Args:
        autoencoder_ckpt: path of a trained `AutoEncoderModule` checkpoint.
        prior: the prior (injected from the config); its codebook sizes, M and down-sampling must match
            the auto-encoder's.
        optimizer: callable from parameters to an optimizer; default Adam, lr 2e-4.
    """

    def __init__(
        self,
        autoencoder_ckpt: str,
        prior: CodePrior,
        optimizer: OptimizerFactory = default_optimizer,
    ) -> None:
        super().__init__()
        save_config(self, ["prior", "optimizer"])
        self.autoencoder = AutoEncoderModule.load_from_checkpoint(autoencoder_ckpt, map_location="cpu")
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()
        self.prior, self.optimizer_factory = prior, optimizer
        net = self.autoencoder.net
        if net.head == "mse":
            raise ValueError(f"autoencoder_ckpt={autoencoder_ckpt!r} has head 'mse', which has no likelihood")
        expected = {"codebook_sizes": net.codebook_sizes, "num_codebooks": net.quantizers[0].num_codebooks,
                    "downsample": net.downsample}  # fmt: skip
        for key, value in expected.items():
            if getattr(prior, key) != value:
                raise ValueError(
                    f"model.init_args.prior.init_args.{key}={getattr(prior, key)!r} does not match the "
                    f"auto-encoder in {autoencoder_ckpt!r} ({key}={value!r})"
                )
        names = ["loss", "prior_bits_per_code", "bpd_prior_codes", "bpd_decoder", "bpd_uniform", "bpd_prior", "mse"]
        self._init_metrics(net, names)

    def train(self, mode: bool = True) -> PriorModule:
        super().train(mode)
        self.autoencoder.eval()  # frozen: codebooks must not update
        return self

    @property
    def code_net(self) -> HierarchicalAutoEncoder:
        return self.autoencoder.net

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.prior.parameters())

    def _step(self, batch: Tensor, stage: str) -> Tensor:
        x = batch  # (B, 3, H, W) uint8
        b, dims = x.shape[0], x[0].numel()
        with torch.no_grad():
            codes = self.autoencoder.net.encode(x)
        nats = -self.prior.log_prob(codes)  # (B,) nats for all codes of an image
        tokens = sum(c[0].numel() for c in codes)
        loss = nats.mean() / tokens
        values = {"loss": loss.detach().expand(b), "prior_bits_per_code": nats.detach() / tokens / math.log(2),
                  "bpd_prior_codes": nats.detach() / dims / math.log(2)}  # fmt: skip
        if stage != "train":  # the decoder figures need a full auto-encoder pass: evaluation only
            with torch.no_grad():
                out = self.autoencoder(x)
            values |= self.autoencoder.per_image(x, out)
            values["bpd_prior"] = values["bpd_decoder"] + values["bpd_prior_codes"]
            # -log2 p(z) >= 0 for a normalised discrete prior, so C >= A always
            assert bool((values["bpd_prior"] >= values["bpd_decoder"]).all()), "figure C below figure A"
        self.stage_metrics(stage).update(values, codes)
        if stage == "train":
            self.log_dict({f"train/{n}": v.mean() for n, v in values.items()}, batch_size=b)
        return loss

    @torch.no_grad()
    def sample(self, n: int, resolution: int, temperature: float = 1.0) -> Tensor:
        """n images (n, 3, resolution, resolution) uint8: codes from the prior, pixels from the decoder head."""
        net = self.autoencoder.net
        codes = self.prior.sample(n, resolution, temperature=temperature)
        return head_sample(net.head, net.decode(codes), net.num_mixtures, temperature)
