"""`EvaluationReport`: the test figures of a run as `evaluation.json` and a markdown row `evaluation.md`."""

import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_dq.codec import compress
from lightning_dq.codec.container import write_atomic
from lightning_dq.nn.figures import FIGURES
from lightning_dq.reporting.wandb import wandb_loggers

COLUMNS = {"A bpd_decoder": "A decoder-only (not a bound)", "B bpd_uniform": "B uniform codes"}
COLUMNS |= {"C bpd_prior": "C learned prior", "mse": "MSE", "C coded": "C coded (bits written)"}


class EvaluationReport(Callback):
    """After `test`, writes its figures to `evaluation.json`, `evaluation.md` and W&B's `test/evaluation`. The
    figures of `COLUMNS`, how many test images were evaluated (PARTIAL when not all), the data and the checkpoints.

    Args:
        coded_images: also compress the first N test images losslessly (`lightning_dq.codec`) and report the bits
            written per dim, `bpd_coded`, next to figure C of the same images (-1: the whole split; 0: no coding);
            the file is `test_coded.ldq` in the run directory (images `test_00000`, ... for `lightning-dq decompress`).
    """

    def __init__(self, coded_images: int = 0) -> None:
        self.coded_images = coded_images
        self._loaded: dict = {}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._loaded = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        num_images = int(metrics.get("test/num_images", 0))
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        split_size = sum(len(dl.dataset) for dl in loaders if dl is not None and hasattr(dl.dataset, "__len__"))
        if num_images != split_size:  # e.g. trainer.limit_test_batches < 1.0: not a whole-split figure
            partial = f"evaluated {num_images} of the {split_size} test images"
            rank_zero_warn(f"{partial}: the figures do not cover the whole split (check trainer.limit_test_batches)")
        evaluated = {"path": trainer.ckpt_path, **self._loaded}  # the checkpoint passed to `test`
        prior = getattr(pl_module, "prior", None)
        figures = {f"{letter} {name}": metrics.get(f"test/{name}") for letter, name in FIGURES}
        figures["mse"] = metrics.get("test/mse")
        report = {
            "figures": figures,
            "num_images": num_images,
            "split_size": split_size,
            "whole_split": num_images == split_size,
            "data": getattr(trainer.datamodule, "data_description", type(trainer.datamodule).__name__),
            "resolution": getattr(trainer.datamodule, "resolution", None),
            "autoencoder_parameters": sum(p.numel() for p in pl_module.code_net.parameters()),
            "prior_parameters": sum(p.numel() for p in prior.parameters()) if prior is not None else None,
            "checkpoint": trainer.ckpt_path,
            "prior": evaluated if prior is not None else None,
            "autoencoder": getattr(pl_module, "autoencoder_source", None) if prior is not None else evaluated,
            "all_metrics": metrics,
        }
        if self.coded_images and getattr(pl_module, "autoencoder", None) is not None:  # figure C in real bytes
            dataset = loaders[0].dataset
            count = len(dataset) if self.coded_images < 0 else min(self.coded_images, len(dataset))
            batch = list(dataset[list(range(count))])
            names = [f"test_{i:05d}" for i in range(count)]
            args = dict(resolution=report["resolution"], checkpoint=str(trainer.ckpt_path or ""))
            coded = compress(batch, pl_module.autoencoder, prior, names, **args)
            bits = {"bpd_coded": coded.bits_per_dim, "bpd_estimated": coded.estimated_bits_per_dim}
            report["coded"] = {"images": count, **bits, "bytes": len(coded.data), "stream_bits": coded.payload_bits}
            figures["C coded"] = coded.bits_per_dim
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        if "coded" in report:  # the file itself: `lightning-dq decompress` gives the test images back
            write_atomic(root / "test_coded.ldq", coded.data, "compressed file")
            report["coded"]["file"] = str(root / "test_coded.ldq")
        (root / "evaluation.json").write_text(json.dumps(report, indent=1))
        images = f"{num_images}" if report["whole_split"] else f"{num_images} of {split_size} (PARTIAL)"
        cells = ["n/a" if v is None else f"{v:.4f}" for v in figures.values()]
        row = f"| {report['data']} | {report['resolution']} | {images} | " + " | ".join(cells) + " |"
        header = "| data | resolution | test images | " + " | ".join(COLUMNS[k] for k in figures) + " |\n"
        header += "| --- |" + " ---: |" * (len(figures) + 2) + "\n"
        (root / "evaluation.md").write_text(header + row + "\n")
        for logger in wandb_loggers(trainer):
            columns = ["data", "resolution", "test images", "whole split", *figures]
            values = [report["data"], report["resolution"], num_images, report["whole_split"], *figures.values()]
            logger.log_table(key="test/evaluation", columns=columns, data=[values])
        print(f"evaluation written to {root / 'evaluation.json'}\n{header}{row}")
