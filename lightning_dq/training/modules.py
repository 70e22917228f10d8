"""`AutoEncoderModule` trains the auto-encoder, `PriorModule` a prior over a frozen one's codes (reporting A, B, C).
Epoch values: aggregates over images (each once, summed over ranks) logged as `{stage}/{name}` (train: `..._epoch`;
`ResolutionSchedule` may add a size). Checkpoints hold the networks' arguments: `load_from_checkpoint` suffices."""

from __future__ import annotations  # `PriorModule.train` returns its own class

from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_dq.codec.codes import check_codes_match
from lightning_dq.errors import CheckpointError, ConfigError
from lightning_dq.nn.autoencoder import AutoEncoderOutput, HierarchicalAutoEncoder
from lightning_dq.nn.figures import bits_per_dim, likelihood_figures, reconstruction_mse
from lightning_dq.nn.heads import head_reconstruct, head_sample
from lightning_dq.nn.prior import CodePrior, PriorFactory
from lightning_dq.training.checkpoints import load_checkpoint_file
from lightning_dq.training.ema import EMA
from lightning_dq.training.metrics import StageMetrics

STAGES = ("train", "val", "val_raw", "test")  # val_raw: the raw weights, beside an EMA's `val`
INJECTED = ["net", "prior", "optimizer", "lr_scheduler"]  # objects, not hyperparameters: see the module docstring


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at lr 2e-4, no weight decay: the paper's official training settings."""
    return torch.optim.Adam(params, lr=2e-4)


def decoder_figures(net: HierarchicalAutoEncoder, x: Tensor, out: AutoEncoderOutput, prior_log_prob=None) -> dict:
    """Per-image values (B,) of one pass: A, B (C with `prior_log_prob`) and the MSE ("mse" head: its loss instead)."""
    recon = head_reconstruct(net.head, out.params.detach(), net.num_mixtures)  # (B, 3, H, W) uint8
    values = {"mse": reconstruction_mse(recon, x)}
    if net.head == "mse":
        return values | {"mse_loss": out.recon.detach()}
    shapes = net.code_shapes(x.shape[-1])
    return values | likelihood_figures(out.recon.detach(), shapes, tuple(x.shape[-2:]), prior_log_prob)


def read_autoencoder(path: str | Path) -> tuple[HierarchicalAutoEncoder, dict]:
    """The network of an `AutoEncoderModule` checkpoint (its stored config and weights) and its path, epoch, step."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"auto-encoder checkpoint {str(path)!r} does not exist; train one first (`make demo`, `make "
            f"train-cifar10`) or set model.init_args.autoencoder_ckpt"
        )
    checkpoint = load_checkpoint_file(path)
    if "net_config" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not an AutoEncoderModule checkpoint of this version (no 'net_config')")
    net = HierarchicalAutoEncoder(**checkpoint["net_config"])
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    source = {"path": str(path.resolve()), "epoch": checkpoint.get("epoch"), "global_step": checkpoint["global_step"]}
    return net, source


class CodeModelModule(LightningModule):
    """Shared plumbing: steps routed to `_step(batch, stage)`, epoch aggregates logged at epoch end."""

    epoch_key_suffix = ""  # set by ResolutionSchedule: the image size of this epoch, in a fit at several sizes

    def _init_metrics(self, net: HierarchicalAutoEncoder, names: dict[str, list[str]]) -> None:
        """The aggregates of each stage: `names` (metric names per stage) and the code usage of `net`'s levels."""
        code_specs = [(m, k) for _, _, m, k in net.code_shapes(net.geometry.factor)]  # (M, K) per level, top first
        for stage in STAGES:  # attributes, not a ModuleDict: "train" would shadow nn.Module.train
            setattr(self, f"{stage}_metrics", StageMetrics(names[stage], code_specs))
        self._sides: dict[str, int] = {}  # image side of the current epoch per stage

    def stage_metrics(self, stage: str) -> StageMetrics:
        return getattr(self, f"{stage}_metrics")

    def metric_key(self, stage: str, name: str) -> str:
        """The logged key of an epoch aggregate; test keys never carry a size."""
        suffix = self.epoch_key_suffix if stage != "test" else ""
        return f"{stage}/{name}{suffix}" + ("_epoch" if stage == "train" else "")

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._step(batch, "val")
        for ema in self._emas():
            if ema.swapped:  # the EMA weights gave `val`; the raw weights' figures go beside them
                with ema.raw_weights(self):
                    self._step(batch, "val_raw")

    def _emas(self) -> list[EMA]:
        return [c for c in self.trainer.callbacks if isinstance(c, EMA) and c.shadow]

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._step(batch, "test")

    def _update(self, stage: str, side: int, values: dict[str, Tensor], codes: list[Tensor]) -> None:
        self._sides[stage] = side
        self.stage_metrics(stage).update(values, codes)
        if stage == "train":  # step-level curves; epoch aggregates are logged at epoch end
            step = {f"train/{n}": v.mean() for n, v in values.items()} | {"train/resolution": float(side)}
            step["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]  # the lr of this step's update
            self.log_dict(step, batch_size=len(codes[0]))

    def _log_epoch(self, stage: str) -> None:
        """Compute (all-reducing), log and reset the stage's aggregates; every branch reads values summed over ranks,
        so no rank skips a collective."""
        metrics = self.stage_metrics(stage)
        images = int(metrics.images.compute())  # collective
        nonfinite = int(metrics.nonfinite.compute()) if images else 0  # collective
        if nonfinite and stage != "train":  # an average over fewer images than counted would be a false figure
            metrics.reset()
            raise FloatingPointError(
                f"{stage}: {nonfinite} of {images} images have a non-finite bits/dim or loss; the {stage} figures "
                f"would not cover every image. Check the checkpoint (NaN weights?) and the data."
            )
        means = {name: metric for name, metric in metrics.means.items() if metric.update_called}  # code batches: no A
        logged = {self.metric_key(stage, name): metric.compute() for name, metric in means.items()}
        logged[self.metric_key(stage, "num_images")] = float(images)
        for i, usage in enumerate(metrics.usage):
            for key, value in usage.compute().items():
                logged[self.metric_key(stage, f"codes_{key}_l{i}")] = value
        logged[f"{stage}/resolution" + ("_epoch" if stage == "train" else "")] = float(self._sides.get(stage, 0))
        if nonfinite:  # train: the non-finite guard skipped those steps; say how many images were affected
            logged[self.metric_key(stage, "nonfinite_images")] = float(nonfinite)
        for key, value in logged.items() if images else ():  # already summed over ranks: no second sync
            self.log(key, value, prog_bar=stage == "val" and "/bpd" in key, sync_dist=False, rank_zero_only=False)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        if self._emas():  # a fit with an EMA (every rank alike)
            self._log_epoch("val_raw")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        """The optimizer over the trained parameters (not a prior's frozen auto-encoder); the schedule: per step."""
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AutoEncoderModule(CodeModelModule):
    """Trains `HierarchicalAutoEncoder` with loss = reconstruction NLL (nats/dim) + beta * commitment (gradient
    clipping and precision are Trainer settings).

    Args:
        net: the auto-encoder (config: class_path/init_args); None rebuilds it from the checkpoint being loaded.
        beta: weight of the commitment term (0.25 in the paper's code).
        optimizer: callable from parameters to an optimizer (config: class_path/init_args); default Adam, lr 2e-4.
        lr_scheduler: optional callable from the optimizer to a learning-rate schedule, stepped every optimizer
            step (e.g. `lightning_dq.training.schedules.WarmupCosine`); None keeps the lr constant.
        channels_last: run the convolutions in channels_last memory format.
        compile: run the network's forward through `torch.compile` (weights and checkpoints unchanged). Off by
            default: not shown to win yet (docs/benchmarks.md).
    """

    def __init__(
        self,
        net: HierarchicalAutoEncoder | None = None,
        beta: float = 0.25,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=INJECTED, logger=False)
        self.beta = beta
        self.channels_last = channels_last
        self.compile = compile
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.net: HierarchicalAutoEncoder | None = None
        if net is not None:
            self._attach(net)

    def _attach(self, net: HierarchicalAutoEncoder) -> None:
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        names = ["loss", "commitment", "mse"] + (["mse_loss"] if net.head == "mse" else ["bpd_decoder", "bpd_uniform"])
        self._init_metrics(net, dict.fromkeys(STAGES, names))
        # a compiled bound method, not a module: the state dict keeps its keys (no `_orig_mod.` prefix)
        self._compiled_forward = torch.compile(self.net.forward) if self.compile else None

    @property
    def code_net(self) -> HierarchicalAutoEncoder | None:
        """The auto-encoder whose codes this module works on."""
        return self.net

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["net_config"] = self.net.config  # a prior (or a notebook) rebuilds the network from this file

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.net is None:
            self._attach(HierarchicalAutoEncoder(**checkpoint["net_config"]))

    def forward(self, x: Tensor) -> AutoEncoderOutput:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiled_forward(x) if self._compiled_forward is not None else self.net(x)

    def _step(self, x: Tensor, stage: str) -> Tensor:
        out = self(x)  # x: (B, 3, H, W) uint8
        loss = out.loss(self.beta)
        values = decoder_figures(self.net, x, out)
        values["loss"] = loss.detach().expand(x.shape[0])
        values["commitment"] = out.commitment.detach().expand(x.shape[0])
        self._update(stage, x.shape[-1], values, out.codes)
        if stage == "train":
            for i, s in enumerate(out.stats):
                stats = {"perplexity": s.perplexity.mean(), "dead_fraction": s.dead_fraction.mean()}
                stats["restarted"] = s.restarted.sum()
                self.log_dict({f"train/{k}_l{i}": v for k, v in stats.items()}, batch_size=x.shape[0])
        return loss


class PriorModule(CodeModelModule):
    """Trains a `CodePrior` (loss: -log p_prior(z(x)) in nats per code) on the codes of a frozen auto-encoder, and
    reports A, B and C from one auto-encoder pass per image. The auto-encoder is read from `autoencoder_ckpt` when
    training starts and is then part of every prior checkpoint (evaluating or resuming never reads the file again).

    Args:
        prior: the prior's hyperparameters (config: class_path `lightning_dq.nn.CodePrior` and its init_args but
            `geometry`, which comes from the auto-encoder); None rebuilds it from a checkpoint.
        autoencoder_ckpt: path of a trained `AutoEncoderModule` checkpoint; read only when training starts.
        optimizer: callable from parameters to an optimizer; default Adam, lr 2e-4.
        lr_scheduler: optional callable from the optimizer to a learning-rate schedule (per step).
    """

    def __init__(
        self,
        prior: PriorFactory | None = None,
        autoencoder_ckpt: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=INJECTED, logger=False)
        self.prior_factory = prior
        self.autoencoder_ckpt = autoencoder_ckpt
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.autoencoder: HierarchicalAutoEncoder | None = None
        self.prior: CodePrior | None = None
        self.autoencoder_source: dict = {}

    @property
    def code_net(self) -> HierarchicalAutoEncoder | None:
        return self.autoencoder

    def attach(self, net: HierarchicalAutoEncoder, source: dict, prior_config: dict | None = None) -> None:
        """Freeze `net` as the auto-encoder and build the prior for its codes from `prior_config` or the factory."""
        if net.head == "mse":
            raise CheckpointError(f"auto-encoder {source.get('path')!r} has head 'mse', which has no likelihood")
        if prior_config is None and self.prior_factory is None:
            raise ConfigError("PriorModule needs model.init_args.prior (class_path lightning_dq.nn.CodePrior)")
        self.autoencoder = net.requires_grad_(False).eval().to(self.device)
        self.autoencoder_source = source
        make = self.prior_factory if prior_config is None else lambda g: CodePrior(g, **prior_config)
        self.prior = make(net.geometry).to(self.device)
        train = ["loss", "prior_bits_per_code", "bpd_prior_codes"]
        evaluate = train + ["bpd_decoder", "bpd_uniform", "bpd_prior", "mse"]
        self._init_metrics(net, {"train": train, "val": evaluate, "val_raw": evaluate, "test": evaluate})

    def setup(self, stage: str) -> None:
        # A checkpoint restored after this hook brings its own auto-encoder (on_load_checkpoint); a fit reads
        # `autoencoder_ckpt` when the file is there (a resume whose file has moved takes the checkpoint's).
        readable = bool(self.autoencoder_ckpt) and Path(self.autoencoder_ckpt).exists()
        if self.autoencoder is None and stage == "fit" and readable:
            self.attach(*read_autoencoder(self.autoencoder_ckpt))

    def _require_autoencoder(self) -> None:
        if self.autoencoder is None and self.trainer.state.fn != "fit":
            raise CheckpointError(
                f"{self.trainer.state.fn.value} needs a trained prior: pass --ckpt_path=<prior checkpoint>"
            )
        if self.autoencoder is None:
            read_autoencoder(self.autoencoder_ckpt or "")  # raises, naming the missing file
        if getattr(self.trainer.datamodule, "codes", None):  # code files of another auto-encoder are refused
            check_codes_match(self.trainer.datamodule.codes, self.autoencoder)

    on_fit_start = on_validation_start = on_test_start = _require_autoencoder

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["autoencoder"] = {"config": self.autoencoder.config, "source": self.autoencoder_source}
        checkpoint["prior_config"] = self.prior.config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "autoencoder" not in checkpoint or "prior_config" not in checkpoint:
            raise CheckpointError("not a PriorModule checkpoint of this version (no 'autoencoder' or 'prior_config')")
        stored = checkpoint["autoencoder"]
        if self.autoencoder is None:  # the weights follow from the checkpoint's state_dict
            self.attach(HierarchicalAutoEncoder(**stored["config"]), stored["source"], checkpoint["prior_config"])
        elif self.autoencoder.config != stored["config"]:
            raise CheckpointError(
                f"the prior checkpoint was trained on a different auto-encoder: {stored['config']} vs "
                f"{self.autoencoder.config}"
            )

    def train(self, mode: bool = True) -> PriorModule:
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()  # frozen: its codebooks must not update
        return self

    def _step(self, batch: Tensor, stage: str) -> Tensor:
        out = None
        if batch.dtype == torch.int64:  # flat codes (B, T) of a code dataset: no auto-encoder pass
            side = self.trainer.datamodule.resolution
            codes = self.autoencoder.geometry.unflatten(batch, side)
        else:  # uint8 images (B, 3, H, W): one auto-encoder pass gives the codes and, in evaluation, A and B
            side = batch.shape[-1]
            with torch.no_grad():
                out = self.autoencoder(batch) if stage != "train" else None
                codes = out.codes if out is not None else self.autoencoder.encode(batch)
        nats = -self.prior.log_prob(codes)  # (B,) for all codes of an image
        tokens = sum(c.shape[1:].numel() for c in codes)
        loss = nats.mean() / tokens
        values = {"loss": loss.detach().expand(len(batch)), "prior_bits_per_code": bits_per_dim(nats.detach() / tokens)}
        if out is None:
            values["bpd_prior_codes"] = bits_per_dim(nats.detach()) / (3 * side**2)
        else:  # A, B, C and the prior's code cost, from the same auto-encoder pass
            values |= decoder_figures(self.autoencoder, batch, out, -nats.detach())
        self._update(stage, side, values, codes)
        return loss

    @torch.no_grad()
    def sample(self, n: int, resolution: int, temperature: float = 1.0) -> Tensor:
        """n images (n, 3, resolution, resolution) uint8: codes from the prior, pixels from the decoder head."""
        net = self.autoencoder
        codes = self.prior.sample(n, resolution, temperature=temperature)
        return head_sample(net.head, net.decode(codes), net.num_mixtures, temperature)
