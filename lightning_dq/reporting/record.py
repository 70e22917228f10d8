"""`RunRecord`: the run directory's `metrics.csv`, a logger that appends (`CSVLogger` deletes it on resume), so a killed
and resumed run has one record of every epoch, minus the rows the killed attempt wrote after its last checkpoint."""

import csv
import math
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightning_dq.errors import disk_full


class RunRecord(Logger):
    """Appends every logged value to `<save_dir>/metrics.csv`, synced at each call (a kill loses nothing).

    Args:
        save_dir: the run directory (configs/base.yaml: `${trainer.default_root_dir}`).
        filename: name of the CSV file in `save_dir`.
    """

    def __init__(self, save_dir: str = ".", filename: str = "metrics.csv") -> None:
        super().__init__()
        self._save_dir = save_dir
        self.path = Path(save_dir) / filename
        self._keys: list[str] | None = None  # the header of the file on disk (read lazily)

    name = version = property(lambda self: "")
    save_dir = root_dir = log_dir = property(lambda self: self._save_dir)

    def read(self) -> list[dict[str, float]]:
        """All rows on disk, as floats (missing cells absent from the row)."""
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]

    def _write(self, rows: list[dict[str, float]], keys: list[str], mode: str) -> None:
        """Append rows (mode "a"), or rewrite the file via a temporary one (mode "w": a full disk keeps the old)."""
        target = self.path if mode == "a" else self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with target.open(mode, newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                if mode == "w":
                    writer.writeheader()
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(target, self.path)  # a no-op rename when appending
        except OSError as err:
            if target != self.path:
                target.unlink(missing_ok=True)
            raise disk_full(err, self.path, "metric record") from err
        self._keys = keys

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Tensor | float], step: int | None = None) -> None:
        row = {k: float(v) for k, v in metrics.items()} | {"step": float(step or 0)}
        if self._keys is None and self.path.is_file():  # a resumed run appends under the existing header
            with self.path.open(newline="") as f:
                self._keys = next(csv.reader(f), [])
        keys = self._keys or []
        if any(k not in keys for k in row) or not self.path.is_file():  # new columns: rewrite with a wider header
            self._write([*self.read(), row], sorted({*keys, *row}), "w")
        else:
            self._write([row], keys, "a")

    @rank_zero_only
    def truncate_after(self, step: int) -> None:
        """Drop the rows logged after `step` (by an attempt killed after its last checkpoint)."""
        rows = self.read()
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) != len(rows):
            self._write(kept, sorted({k for r in rows for k in r}), "w")

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The resolved config is saved as config.yaml next to the record; nothing to do here."""


def epoch_series(rows: list[dict[str, float]], prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """Per key starting with `prefix`: the (epoch, value) points of the rows that carry an epoch, the last per epoch."""
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items() if "epoch" in row else ():
            if key.startswith(prefix) and key not in ("epoch", "step") and math.isfinite(value):
                series.setdefault(key, {})[int(row["epoch"])] = value
    return {k: sorted(v.items()) for k, v in series.items()}
