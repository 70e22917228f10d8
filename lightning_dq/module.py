"""LightningModules: `AutoEncoderModule` trains the hierarchical DQ auto-encoder; `PriorModule` trains a
prior over the codes of a frozen auto-encoder and reports the three bits/dim figures.

Every step goes through one shared `_step(batch, stage)`. Epoch values are torchmetrics aggregates over
images (every image counted once, summed over DDP ranks), logged as `stage/name`:

- `{stage}/bpd_decoder`: figure A, -log2 p(x | z(x)) / D. NOT a bound on -log2 p(x): the codes are free.
- `{stage}/bpd_uniform`: figure B, A + the uniform code cost sum_l h*w*M*log2 K / D. A valid bound.
- `{stage}/bpd_prior`: figure C (PriorModule), A - log2 p_prior(z(x)) / D. A valid bound; the headline.

D = 3*H*W sub-pixels. Targets are always the raw uint8 pixels. Train epoch aggregates end in `_epoch`
(per-step values keep the plain key). A run that trains at several image sizes (`resolution_schedule`)
names the size in every train/val epoch key: `val/bpd_decoder_32px`, `train/loss_64px_epoch`, so each size
is its own curve.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric

from lightning_dq.autoencoder import AutoEncoderOutput, HierarchicalAutoEncoder
from lightning_dq.checkpoints import load_checkpoint_file
from lightning_dq.errors import CheckpointError, ConfigError
from lightning_dq.likelihood import bits_per_dim, head_reconstruct, head_sample, uniform_code_bits
from lightning_dq.metrics import CodeUsage
from lightning_dq.prior import CodePrior

STAGES = ("train", "val", "test")


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at lr 2e-4, no weight decay: the paper's official training settings (configs/base.yaml says so
    explicitly; this default serves modules built in Python)."""
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


def decoder_figures(net: HierarchicalAutoEncoder, x: Tensor, out: AutoEncoderOutput) -> dict[str, Tensor]:
    """Per-image figures (B,) of one batch from one auto-encoder pass: A and B in bits/dim, reconstruction MSE
    (or the MSE loss for the "mse" head, which has no bits/dim)."""
    values = {"mse": reconstruction_mse(net.head, out.params, x, net.num_mixtures)}
    if net.head == "mse":
        values["mse_loss"] = out.recon.detach()
        return values
    code_bits = uniform_code_bits(net.code_shapes(x.shape[-1]), tuple(x.shape[-2:]))
    values["bpd_decoder"] = bits_per_dim(out.recon.detach())
    values["bpd_uniform"] = values["bpd_decoder"] + code_bits
    return values


def read_autoencoder(path: str | Path) -> tuple[HierarchicalAutoEncoder, dict]:
    """The network of an `AutoEncoderModule` checkpoint (built from the config stored in it, weights loaded)
    and where it came from: {"path", "epoch", "global_step"}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"auto-encoder checkpoint {str(path)!r} does not exist; train one first (`make demo`, "
            f"`make train-cifar10`) or set model.init_args.autoencoder_ckpt"
        )
    checkpoint = load_checkpoint_file(path)  # weights_only; a truncated or corrupt file is a CheckpointError
    if "net_config" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not an AutoEncoderModule checkpoint of this version "
                              f"(no 'net_config' entry)")  # fmt: skip
    net = HierarchicalAutoEncoder(**checkpoint["net_config"])
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    source = {"path": str(path.resolve()), "epoch": checkpoint.get("epoch"), "global_step": checkpoint["global_step"]}
    return net, source


class StageMetrics(nn.Module):
    """Epoch aggregates of one stage: per-image means, the image count, the count of images with a non-finite
    value, and per-level code usage. NaNs are kept in the means (and counted), never silently dropped."""

    def __init__(self, names: list[str], code_specs: list[tuple[int, int]]) -> None:
        super().__init__()
        self.means = nn.ModuleDict({n: MeanMetric(nan_strategy="disable") for n in names})
        # no NaN check in the sums: it would sync the host every step, and they are counts
        self.images, self.nonfinite = SumMetric(nan_strategy="disable"), SumMetric(nan_strategy="disable")
        self.usage = nn.ModuleList(CodeUsage(m, k) for m, k in code_specs)

    def update(self, values: dict[str, Tensor], codes: list[Tensor]) -> None:
        """values: per-image tensors (B,); codes: per level (B, M, h, w)."""
        finite = torch.stack([torch.isfinite(v) for v in values.values()]).all(dim=0)  # (B,)
        for name, v in values.items():
            self.means[name].update(v)
        self.images.update(torch.tensor(float(finite.shape[0]), device=finite.device))
        self.nonfinite.update((~finite).sum().float())
        for usage, c in zip(self.usage, codes, strict=True):
            usage.update(c)

    def reset(self) -> None:
        for metric in [*self.means.values(), self.images, self.nonfinite, *self.usage]:
            metric.reset()


class CodeModelModule(LightningModule):
    """Shared plumbing: steps routed to `_step(batch, stage)`, epoch aggregates logged as `stage/name`.

    `size_in_keys` (set by `ResolutionSchedule` when a fit trains at several sizes) adds `_{side}px` to
    every train/val epoch key.
    """

    size_in_keys: bool = False

    def _init_metrics(self, code_specs: list[tuple[int, int]], names: dict[str, list[str]]) -> None:
        """code_specs: (M, K) per level, top first; names: metric names per stage."""
        for stage in STAGES:  # attributes, not a ModuleDict: "train" would shadow nn.Module.train
            setattr(self, f"{stage}_metrics", StageMetrics(names[stage], code_specs))
        self._sides: dict[str, int] = {}  # image side of the current epoch per stage

    def stage_metrics(self, stage: str) -> StageMetrics:
        return getattr(self, f"{stage}_metrics")

    @property
    def code_net(self) -> HierarchicalAutoEncoder | None:
        """The auto-encoder whose codes this module works on."""
        raise NotImplementedError

    def metric_key(self, stage: str, name: str, side: int | None = None) -> str:
        """The logged key of an epoch aggregate (see the module docstring)."""
        size = f"_{side}px" if self.size_in_keys and stage != "test" and side else ""
        return f"{stage}/{name}{size}" + ("_epoch" if stage == "train" else "")

    def check_resolution(self) -> None:
        """Fail before training when the data's image size does not fit the model's down-sampling."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        resolution = getattr(datamodule, "resolution", None)
        if resolution is not None and self.code_net is not None:
            try:
                self.code_net.check_resolution(resolution)
            except ValueError as err:
                raise ConfigError(f"data.init_args.resolution={resolution} does not fit the model: {err}") from None

    def setup(self, stage: str) -> None:
        self.check_resolution()

    def _step(self, batch: Tensor, stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._step(batch, "test")

    def _update(self, stage: str, x: Tensor, values: dict[str, Tensor], codes: list[Tensor]) -> None:
        self._sides[stage] = x.shape[-1]
        self.stage_metrics(stage).update(values, codes)

    def _log_epoch(self, stage: str) -> None:
        """Compute (all-reducing under DDP), log and reset the stage's epoch aggregates.

        Every rank takes the same branches: each decision reads a value that is already summed over ranks,
        so a rank that saw no batch still joins every collective (none hangs)."""
        metrics = self.stage_metrics(stage)
        images = int(metrics.images.compute())  # collective
        if images == 0:
            metrics.reset()
            return
        nonfinite = int(metrics.nonfinite.compute())  # collective
        if nonfinite and stage != "train":  # an average over fewer images than counted would be a false figure
            metrics.reset()
            raise FloatingPointError(
                f"{stage}: {nonfinite} of {images} images have a non-finite bits/dim or loss; the {stage} "
                f"figures would not cover every image. Check the checkpoint (NaN weights?) and the data."
            )
        side = self._sides.get(stage)
        logged = {self.metric_key(stage, name, side): metric.compute() for name, metric in metrics.means.items()}
        logged[self.metric_key(stage, "num_images", side)] = float(images)
        for i, usage in enumerate(metrics.usage):
            for key, value in usage.compute().items():
                logged[self.metric_key(stage, f"codes_{key}_l{i}", side)] = value
        if side is not None:
            logged[f"{stage}/resolution" + ("_epoch" if stage == "train" else "")] = float(side)
        if nonfinite:  # train: the faults callback skipped those steps; say how many images were affected
            logged[self.metric_key(stage, "nonfinite_images", side)] = float(nonfinite)
        for key, value in logged.items():  # already summed over ranks: no second sync
            on_bar = stage == "val" and "/bpd" in key
            self.log(key, value, prog_bar=on_bar, sync_dist=False, rank_zero_only=False)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _optimizers(self, params: Iterable[nn.Parameter]):
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AutoEncoderModule(CodeModelModule):
    """Trains `HierarchicalAutoEncoder` with loss = reconstruction NLL (nats/dim) + beta * commitment.

    Gradient clipping (2.0 in the paper's code) and precision are Trainer settings in the config.

    Args:
        net: the auto-encoder (injected from the config as class_path/init_args).
        beta: weight of the commitment term (0.25 in the paper's code).
        optimizer: callable from parameters to an optimizer (config: class_path/init_args); default
            Adam, lr 2e-4.
        lr_scheduler: optional callable from the optimizer to a learning-rate schedule, stepped every
            optimizer step (e.g. `lightning_dq.schedules.WarmupCosine`); None keeps the lr constant.
        channels_last: run the convolutions in channels_last memory format (faster on CPUs and GPUs
            with bf16 autocast).
        compile: run the network's forward through `torch.compile` (weights and checkpoints unchanged). Off
            by default: not shown to win yet (docs/benchmarks.md; `benchmarks/train_step.py` measures it).
    """

    def __init__(
        self,
        net: HierarchicalAutoEncoder,
        beta: float = 0.25,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        save_config(self, ["net", "optimizer", "lr_scheduler"])
        self.net, self.beta, self.channels_last = net, beta, channels_last
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        names = ["loss", "commitment", "mse"] + (["mse_loss"] if net.head == "mse" else ["bpd_decoder", "bpd_uniform"])
        specs = [(q.num_codebooks, q.codebook_size) for q in reversed(net.quantizers)]  # top first
        self._init_metrics(specs, dict.fromkeys(STAGES, names))
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # a compiled bound method, not a module: the state dict keeps its keys (no `_orig_mod.` prefix)
        self._compiled_forward = torch.compile(self.net.forward) if compile else None

    @property
    def code_net(self) -> HierarchicalAutoEncoder:
        return self.net

    def configure_optimizers(self):
        return self._optimizers(self.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the network's constructor arguments: a prior (or a notebook) rebuilds it from this file alone
        checkpoint["net_config"] = self.net.config

    def forward(self, x: Tensor) -> AutoEncoderOutput:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiled_forward(x) if self._compiled_forward is not None else self.net(x)

    def _step(self, batch: Tensor, stage: str) -> Tensor:
        x = batch  # (B, 3, H, W) uint8
        out = self(x)
        loss = out.recon.mean() + self.beta * out.commitment
        b = x.shape[0]
        values = decoder_figures(self.net, x, out)
        values["loss"] = loss.detach().expand(b)
        values["commitment"] = out.commitment.detach().expand(b)
        self._update(stage, x, values, out.codes)
        if stage == "train":  # step-level curves; epoch aggregates are logged at epoch end
            self.log_dict({f"train/{n}": v.mean() for n, v in values.items()}, batch_size=b)
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

    The auto-encoder's network is read once from `autoencoder_ckpt`, when training of the prior starts;
    from then on it is part of this module: its config and weights are saved in every prior checkpoint,
    so evaluating or resuming a prior never reads `autoencoder_ckpt` again (the file may move or change).
    It stays in eval mode (its codebooks no longer change) and is never optimised. Loss: -log p_prior(z(x))
    in nats per code. Evaluation encodes each image once: the prior's codes and the decoder figures come
    from the same auto-encoder pass.

    Args:
        prior: the prior (injected from the config); its codebook sizes, M and down-sampling must match
            the auto-encoder's.
        autoencoder_ckpt: path of a trained `AutoEncoderModule` checkpoint; read only when a prior's
            training starts from scratch.
        optimizer: callable from parameters to an optimizer; default Adam, lr 2e-4.
        lr_scheduler: optional callable from the optimizer to a learning-rate schedule (per step).
    """

    def __init__(
        self,
        prior: CodePrior,
        autoencoder_ckpt: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        save_config(self, ["prior", "optimizer", "lr_scheduler"])
        self.prior, self.autoencoder_ckpt = prior, autoencoder_ckpt
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.autoencoder: HierarchicalAutoEncoder | None = None
        self.autoencoder_source: dict = {}
        train = ["loss", "prior_bits_per_code", "bpd_prior_codes"]
        evaluate = train + ["bpd_decoder", "bpd_uniform", "bpd_prior", "mse"]
        specs = [(prior.num_codebooks, k) for k in prior.codebook_sizes]  # top first
        self._init_metrics(specs, {"train": train, "val": evaluate, "test": evaluate})

    @property
    def code_net(self) -> HierarchicalAutoEncoder | None:
        return self.autoencoder

    def attach_autoencoder(self, net: HierarchicalAutoEncoder, source: dict) -> None:
        """Make `net` this prior's frozen auto-encoder (checks that the prior fits its codes)."""
        where = source.get("path", "the checkpoint")
        if net.head == "mse":
            raise CheckpointError(f"auto-encoder {where!r} has head 'mse', which has no likelihood")
        expected = {"codebook_sizes": net.codebook_sizes, "num_codebooks": net.quantizers[0].num_codebooks,
                    "downsample": net.downsample}  # fmt: skip
        for key, value in expected.items():
            if getattr(self.prior, key) != value:
                raise CheckpointError(
                    f"model.init_args.prior.init_args.{key}={getattr(self.prior, key)!r} does not match the "
                    f"auto-encoder in {where!r} ({key}={value!r})"
                )
        net.requires_grad_(False)
        self.autoencoder, self.autoencoder_source = net.eval().to(self.device), source

    def setup(self, stage: str) -> None:
        # Lightning restores a checkpoint after this hook, and does not say here whether it will: a prior
        # checkpoint brings its own auto-encoder (on_load_checkpoint). A fit reads `autoencoder_ckpt` when the
        # file is there; a resume whose file has moved gets the network from the prior checkpoint instead.
        readable = bool(self.autoencoder_ckpt) and Path(self.autoencoder_ckpt).exists()
        if self.autoencoder is None and stage == "fit" and readable:
            self.attach_autoencoder(*read_autoencoder(self.autoencoder_ckpt))
        super().setup(stage)

    def _require_autoencoder(self) -> None:
        if self.autoencoder is None:
            if self.trainer.state.fn != "fit":
                stage = self.trainer.state.fn.value
                raise CheckpointError(f"{stage} needs a trained prior: pass --ckpt_path=<prior checkpoint>")
            read_autoencoder(self.autoencoder_ckpt or "")  # raises, naming the missing file

    def on_fit_start(self) -> None:
        self._require_autoencoder()

    def on_validation_start(self) -> None:
        self._require_autoencoder()

    def on_test_start(self) -> None:
        self._require_autoencoder()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["autoencoder"] = {"config": self.autoencoder.config, "source": self.autoencoder_source}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "autoencoder" not in checkpoint:
            raise CheckpointError("not a PriorModule checkpoint of this version (no 'autoencoder' entry)")
        stored = checkpoint["autoencoder"]
        if self.autoencoder is None:  # weights follow from the checkpoint's state_dict
            self.attach_autoencoder(HierarchicalAutoEncoder(**stored["config"]), stored["source"])
        elif self.autoencoder.config != stored["config"]:
            raise CheckpointError(f"the prior checkpoint was trained on a different auto-encoder: "
                                  f"{stored['config']} vs {self.autoencoder.config}")  # fmt: skip
        self.check_resolution()

    def train(self, mode: bool = True) -> PriorModule:
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()  # frozen: codebooks must not update
        return self

    def configure_optimizers(self):
        return self._optimizers(self.prior.parameters())

    def _step(self, batch: Tensor, stage: str) -> Tensor:
        x = batch  # (B, 3, H, W) uint8
        b, dims = x.shape[0], x.shape[1:].numel()  # shapes, not x[0]: a DDP rank may get an empty batch
        with torch.no_grad():  # one auto-encoder pass: codes for the prior, and the decoder figures in evaluation
            out = self.autoencoder(x) if stage != "train" else None
            codes = out.codes if out is not None else self.autoencoder.encode(x)
        nats = -self.prior.log_prob(codes)  # (B,) nats for all codes of an image
        tokens = sum(c.shape[1:].numel() for c in codes)
        loss = nats.mean() / tokens
        values = {"loss": loss.detach().expand(b), "prior_bits_per_code": nats.detach() / tokens / math.log(2),
                  "bpd_prior_codes": nats.detach() / dims / math.log(2)}  # fmt: skip
        if out is not None:  # C = A + the prior's code cost; C >= A since -log2 p(z) >= 0
            values |= decoder_figures(self.autoencoder, x, out)
            values["bpd_prior"] = values["bpd_decoder"] + values["bpd_prior_codes"]
        self._update(stage, x, values, codes)
        if stage == "train":
            self.log_dict({f"train/{n}": v.mean() for n, v in values.items()}, batch_size=b)
        return loss

    @torch.no_grad()
    def sample(self, n: int, resolution: int, temperature: float = 1.0) -> Tensor:
        """n images (n, 3, resolution, resolution) uint8: codes from the prior, pixels from the decoder head."""
        net = self.autoencoder
        codes = self.prior.sample(n, resolution, temperature=temperature)
        return head_sample(net.head, net.decode(codes), net.num_mixtures, temperature)
