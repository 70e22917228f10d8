"""Learning-rate schedules usable from a config (`model.init_args.lr_scheduler`), stepped every optimizer step."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_dq.errors import ConfigError


class WarmupCosine(LRScheduler):
    """Linear warm-up from 0 to the optimizer's lr over `warmup_steps`, then a cosine decay to `final_lr_fraction` *
    lr at `total_steps`, constant after that (the README's "Optimizer" shows the command-line form).

    Args:
        optimizer: the optimizer whose learning rate is scheduled (passed by the module).
        warmup_steps: optimizer steps of linear warm-up (0 = none).
        total_steps: optimizer step at which the cosine reaches its floor.
        final_lr_fraction: the floor, as a fraction of the peak learning rate.
        last_epoch: index of the last step (-1 = start; Lightning restores it on resume).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        final_lr_fraction: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
            raise ConfigError(
                f"WarmupCosine needs 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                f"warmup_steps={warmup_steps}, total_steps={total_steps}"
            )
        if not 0.0 <= final_lr_fraction <= 1.0:
            raise ConfigError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_lr_fraction = final_lr_fraction
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_lr_fraction + (1 - self.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
