"""One W&B run per experiment (run directory), its id kept in `<run dir>/wandb_run_id`: a resumed fit continues it, and
`test` and sampling attach to it. Name = the run directory's name, group = the dataset, job_type = the subcommand."""

import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

RUN_ID_FILE = "wandb_run_id"


def wandb_run_id(root: Path, new: bool) -> str:
    """The W&B run id of run directory `root`: new for a fresh fit (rank 0 writes it), else the stored one."""
    path = root / RUN_ID_FILE
    if path.is_file() and (not new or rank_zero_only.rank != 0):  # other ranks read what rank 0 wrote
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 characters of [0-9a-z]
    if rank_zero_only.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def fill_identity(args: Any, root: Path, subcommand: str, dataset: str | None, new: bool) -> None:
    """Fill in a WandbLogger's save_dir, id, name, group and job_type unless set; `WANDB_MODE=online` streams."""
    if args.get("save_dir") in (None, "", ".") and not args.get("dir"):
        args.save_dir = str(root)
    if not args.get("id") and not args.get("version"):
        args.id = wandb_run_id(root, new)
    args.name = args.get("name") or root.name
    args.group = args.get("group") or dataset
    args.job_type = args.get("job_type") or subcommand
    if os.environ.get("WANDB_MODE") == "online":
        args.offline = False


def prepare_wandb(logger: WandbLogger) -> None:
    """Create a W&B logger's folder first: W&B looks for the git repository there ("git root ... does not exist")."""
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
