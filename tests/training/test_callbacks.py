"""Training-control and reporting pieces under a real fit: `CodebookReset` schedules restarts step by step,
`ImageLogger` writes its grids on the epochs it is asked to, `CodeUsage` counts codes exactly, and the
channels_last memory format changes no number."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from PIL import Image

from lightning_dq.cli import main
from lightning_dq.data import ImageDataModule
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.nn.codebook import Codebook
from lightning_dq.reporting.record import RunRecord
from lightning_dq.training.callbacks import CodebookReset
from lightning_dq.training.metrics import CodeUsage
from lightning_dq.training.modules import AutoEncoderModule
from tests.helpers import config_args

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--trainer.enable_model_summary=false"]


def debug_net(**kwargs) -> HierarchicalAutoEncoder:
    """configs/debug.yaml's network: README code structure (3 levels, M=5, K=32), tiny widths."""
    return HierarchicalAutoEncoder(channels=16, res_blocks=1, res_channels=8, code_dim=4, num_mixtures=3, **kwargs)


# --- CodebookReset ----------------------------------------------------------------------------------------


class RestartRecorder(Callback):
    """Per training step: the `restart_enabled` flag of every codebook as the step runs (recorded after
    `CodebookReset` set it: callbacks run in list order) and the number of codes the step restarted."""

    def __init__(self) -> None:
        self.flags: dict[int, list[bool]] = {}
        self.restarted: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        codebooks = [m for m in pl_module.modules() if isinstance(m, Codebook)]
        self.flags[trainer.global_step] = [cb.restart_enabled for cb in codebooks]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimizer step of this batch has been taken
        self.restarted[step] = sum(float(trainer.callback_metrics[f"train/restarted_l{i}"]) for i in range(3))


@pytest.mark.parametrize(
    "every_n_steps, stop_after_step, expected",
    [(3, 7, {0, 3, 6}), (1, 0, set()), (2, None, {0, 2, 4, 6, 8})],
)
def test_codebook_reset_flag_and_restarts_follow_the_schedule(every_n_steps, stop_after_step, expected):
    torch.manual_seed(0)
    model = AutoEncoderModule(debug_net())
    data = ImageDataModule("synthetic", batch_size=8, num_workers=0, val_size=0, synthetic_train=72)
    recorder = RestartRecorder()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=9,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CodebookReset(every_n_steps, stop_after_step), recorder],
    )
    trainer.fit(model, datamodule=data)
    assert sorted(recorder.flags) == list(range(9))
    for step, flags in recorder.flags.items():
        assert len(flags) == 3 and flags == [step in expected] * 3, step
    # with K=32 codes and 32 top-level vectors per batch some codes are always unused (EMA count < 1 after
    # one update): every enabled step restarts some, no disabled step restarts any
    restarted = {step for step, n in recorder.restarted.items() if n > 0}
    assert restarted == expected


def test_codebook_reset_rejects_a_zero_interval():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        CodebookReset(every_n_steps=0)


# --- through the CLI: the codebook_reset and image_logger config groups -------------------------------------


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory) -> Path:
    """The debug config for 3 epochs of 3 steps: restarts every 3rd step until step 7, images every 2nd epoch."""
    root = tmp_path_factory.mktemp("scheduled")
    main(
        [
            "fit",
            *config_args("base", "debug"),
            f"--trainer.default_root_dir={root}",
            *QUIET,
            "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--codebook_reset.every_n_steps=3",
            "--codebook_reset.stop_after_step=7",
            "--image_logger.every_n_epochs=2",
            "--image_logger.num_images=4",
        ]
    )
    return root


def test_codebook_reset_config_schedules_restarts_in_the_metric_record(scheduled_run):
    rows = [r for r in RunRecord(str(scheduled_run)).read() if "train/restarted_l0" in r]
    restarted = {int(r["step"]): sum(r[f"train/restarted_l{i}"] for i in range(3)) for r in rows}
    assert sorted(restarted) == list(range(9))  # log_every_n_steps: 1 in debug.yaml
    assert {step for step, n in restarted.items() if n > 0} == {0, 3, 6}


def test_image_logger_writes_grids_on_its_epochs_only(scheduled_run):
    folder = scheduled_run / "images"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{kind}_e{epoch:04d}.png" for kind in ("levels", "recon", "usage") for epoch in (0, 2)
    ]
    cell = 32 + 2  # make_grid: 32x32 images with 2 pixels of padding around each, 4 per row
    for epoch in (0, 2):
        recon = Image.open(folder / f"recon_e{epoch:04d}.png")
        assert recon.size == (4 * cell + 2, 2 * cell + 2)  # originals, then reconstructions
        levels = Image.open(folder / f"levels_e{epoch:04d}.png")
        assert levels.size == (4 * cell + 2, (1 + 3) * cell + 2)  # originals, then one row per level
        usage = Image.open(folder / f"usage_e{epoch:04d}.png")
        assert usage.size == (3 * 4 * 80, 3 * 80)  # one 4x3-inch panel per level at 80 dpi


# --- CodeUsage ----------------------------------------------------------------------------------------------


def test_code_usage_histogram_used_fraction_and_perplexity_by_hand():
    usage = CodeUsage(num_codebooks=2, codebook_size=4)
    # (B=2, M=2, h=1, w=2): codebook 0 sees 0, 1, 0, 1; codebook 1 sees 3, 3, 3, 3
    codes = torch.tensor([[[[0, 1]], [[3, 3]]], [[[0, 1]], [[3, 3]]]])
    usage.update(codes)
    assert usage.hist.tolist() == [[2, 2, 0, 0], [0, 0, 0, 4]]
    out = usage.compute()
    assert out["used"].item() == pytest.approx(3 / 8)  # codes 0, 1 of codebook 0 and code 3 of codebook 1
    assert out["perplexity"].item() == pytest.approx((2 + 1) / 2)  # exp(ln 2) and exp(0), averaged over M
    # a second batch accumulates: codebook 0 now 0,1,0,1,2,3 -> [2,2,1,1]; codebook 1 -> [1,0,0,5]
    usage.update(torch.tensor([[[[2, 3]], [[0, 3]]]]))
    assert usage.hist.tolist() == [[2, 2, 1, 1], [1, 0, 0, 5]]
    out = usage.compute()
    p0, p1 = [2 / 6, 2 / 6, 1 / 6, 1 / 6], [1 / 6, 5 / 6]
    entropy = lambda p: -sum(q * math.log(q) for q in p)  # noqa: E731
    assert out["used"].item() == pytest.approx(6 / 8)
    assert out["perplexity"].item() == pytest.approx((math.exp(entropy(p0)) + math.exp(entropy(p1))) / 2, rel=1e-6)
    usage.reset()
    assert usage.hist.tolist() == [[0] * 4, [0] * 4] and usage.compute()["used"].item() == 0.0


# --- channels_last --------------------------------------------------------------------------------------------


def test_channels_last_changes_layout_not_numbers():
    # init="kaiming" (as the demo): with PyTorch's default init the random net's top-level features nearly
    # coincide, so their codes are decided by near-ties that the rounding of either layout may flip
    torch.manual_seed(0)
    weights = debug_net(init="kaiming").state_dict()
    modules = {}
    for flag in (True, False):
        net = debug_net(init="kaiming")
        net.load_state_dict(weights)
        modules[flag] = AutoEncoderModule(net, channels_last=flag)
    # kernels wider than 1x1 (a 1x1 kernel is contiguous in both layouts)
    convs = {
        flag: [m for m in mod.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        for flag, mod in modules.items()
    }
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs[True])
    assert not any(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs[False])
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    outs, grads = {}, {}
    for flag, module in modules.items():
        evaluated = module.eval()(x)
        torch.manual_seed(2)  # the training pass's data-dependent codebook init and restarts draw from the RNG
        trained = module.train()(x)
        (trained.recon.mean() + module.beta * trained.commitment).backward()
        outs[flag] = (evaluated, trained)
        grads[flag] = {name: p.grad for name, p in module.named_parameters()}
    for a, b in zip(outs[True], outs[False], strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.codes, b.codes, strict=True))
        torch.testing.assert_close(a.params, b.params, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.recon, b.recon, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.commitment, b.commitment, rtol=1e-5, atol=1e-6)
    assert len(grads[True]) == len(grads[False]) > 0
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-6, msg=name)
    for (name, p), (_, q) in zip(modules[True].named_buffers(), modules[False].named_buffers(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)  # the same codebook updates
