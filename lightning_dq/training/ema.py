"""`EMA`: an exponential moving average of the trainable parameters, the weights every evaluation uses.

The codebooks are buffers kept by their own EMA: they stay live (Lightning's `WeightAveraging` swaps every buffer,
so validation would see stale or doubly averaged codebooks). Checkpoints follow Lightning's convention: `state_dict`
holds the EMA weights, so `test`, sampling, `encode`, the codec and a prior's auto-encoder read them unchanged; the raw
weights are kept under `ema.raw` for an exact resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.optim.swa_utils import get_ema_multi_avg_fn

from lightning_dq.errors import ConfigError


class EMA(Callback):
    """EMA of the trainable parameters, updated after each optimizer step: ema = decay * ema + (1 - decay) * w.
    Validation during a fit reports the EMA weights as `val/*` and the raw ones as `val_raw/*`.

    Args:
        decay: the EMA decay per optimizer step (0 = off; VDVAE uses 0.9999, a 480-step demo 0.99).
    """

    def __init__(self, decay: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema.decay={decay!r}: must be in [0, 1) (0 turns the EMA off)")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}  # name -> EMA, or the raw weights while `swapped`
        self.swapped = False
        self._last_step = 0

    def trained(self, pl_module: LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.decay and not self.shadow:  # a resume restored it already (`on_load_checkpoint`)
            self.shadow = {name: p.detach().clone() for name, p in self.trained(pl_module).items()}
            self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.shadow and trainer.global_step > self._last_step:  # an optimizer step was taken
            params = self.trained(pl_module)
            get_ema_multi_avg_fn(self.decay)(list(self.shadow.values()), [params[n] for n in self.shadow], None)
            self._last_step = trainer.global_step

    @torch.no_grad()
    def swap(self, pl_module: LightningModule) -> None:
        """Exchange the weights in the model and in `shadow` (EMA in, raw out, or back)."""
        params = self.trained(pl_module)
        for name, kept in self.shadow.items():
            current = params[name].detach().clone()
            params[name].copy_(kept)
            kept.copy_(current)
        self.swapped = not self.swapped

    @contextmanager
    def raw_weights(self, pl_module: LightningModule) -> Iterator[None]:
        """Inside a validation with the EMA swapped in: the raw weights (the codebooks are shared)."""
        self.swap(pl_module)
        try:
            yield
        finally:
            self.swap(pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.shadow and not self.swapped:
            self.swap(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.swapped:
            self.swap(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.shadow and not self.swapped:  # after a fit, the model in memory is the one evaluated
            self.swap(pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if not self.shadow:
            return
        params = self.trained(pl_module)
        ema, raw = (params, self.shadow) if self.swapped else (self.shadow, params)
        checkpoint["ema"] = {"decay": self.decay, "step": self._last_step}
        checkpoint["ema"]["raw"] = {name: raw[name].detach().clone() for name in self.shadow}
        checkpoint["state_dict"].update({name: ema[name].detach().clone() for name in self.shadow})

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get("ema", {"decay": 0.0})
        if trainer.state.fn != "fit":
            return  # evaluation: `state_dict`, loaded already, is the EMA
        if saved["decay"] != self.decay:
            raise ConfigError(
                f"the checkpoint was trained with ema.decay={saved['decay']}, the config says {self.decay}: resume "
                f"with the same decay (--ema.decay={saved['decay']})"
            )
        if self.decay:  # the model holds the EMA (`state_dict`): keep it aside, train on from the raw weights
            params = self.trained(pl_module)
            self.shadow = {name: params[name].detach().clone() for name in saved["raw"]}
            with torch.no_grad():
                for name, value in saved["raw"].items():
                    params[name].copy_(value)
            self._last_step = saved["step"]
