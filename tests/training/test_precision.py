"""lightning_dq.training.precision: one precision per run, from the device unless the config sets one (bf16-mixed
only where bf16 is fast), shown in the saved config and run by the whole model; and the numerics of bf16 autocast
with channels_last: the fp32 loss within 1%."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from lightning_dq.cli import main
from lightning_dq.data.images import synthetic_images
from lightning_dq.training import precision
from lightning_dq.training.modules import AutoEncoderModule
from tests.helpers import config_args, debug_net


def batch(n: int = 8, side: int = 16) -> torch.Tensor:
    return torch.from_numpy(synthetic_images(n, side, seed=3))  # (n, 3, side, side) uint8


def trained_pair():
    """Two nets with the same weights and codebooks (initialised from data by one fp32 training pass)."""
    ref = debug_net(num_codebooks=2, codebook_sizes=[8, 8], num_mixtures=2, init="kaiming")
    ref(batch())  # training mode: data-dependent codebook init + one EMA step
    other = debug_net(num_codebooks=2, codebook_sizes=[8, 8], num_mixtures=2, init="kaiming")
    other.load_state_dict(ref.state_dict())
    return ref.eval(), other.eval()


@pytest.mark.parametrize(
    "flags, accelerator, set_to, expected",
    [
        ({"avx2"}, "auto", None, "32-true"),  # emulated bf16: 6-50x slower
        ({"avx512f", "avx512_bf16"}, "cpu", None, "32-true"),  # native but 2x slower than fp32 (measured)
        ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "auto", None, "bf16-mixed"),
        ({"avx2"}, "cpu", "bf16-mixed", "bf16-mixed"),  # what the user sets is kept
        ({"amx_bf16"}, "cpu", "32-true", "32-true"),
    ],
)
def test_precision_follows_the_device_unless_the_config_sets_it(monkeypatch, flags, accelerator, set_to, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve_precision(set_to, accelerator)[0] == expected


def test_cpu_flags_are_the_kernel_report():
    flags = precision.cpu_flags()
    with open("/proc/cpuinfo") as f:
        first = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    assert set(first) <= flags and ("avx2" in flags) == ("avx2" in first)


def test_without_fast_bf16_the_whole_prior_step_runs_in_fp32(tmp_path, monkeypatch, capsys):
    """configs/base.yaml leaves precision to the device: without AMX the run is 32-true, the saved config says so,
    one console line says why, and the prior's Transformer computes in fp32 (it has no fallback of its own)."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    ae = tmp_path / "ae"
    common = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
    ]
    base = [*config_args("base", "debug"), "--trainer.precision=null"]
    main(["fit", *base, *common, f"--trainer.default_root_dir={ae}"])
    assert yaml.safe_load((ae / "config.yaml").read_text())["trainer"]["precision"] == "32-true"
    captured = capsys.readouterr()
    assert "precision: 32-true (auto: bf16 would be slower than fp32 on this cpu" in captured.out + captured.err
    dtypes = tmp_path / "dtypes.txt"
    prior = [*config_args("prior_demo"), f"--model.init_args.autoencoder_ckpt={ae / 'checkpoints' / 'last.ckpt'}"]
    monkeypatch.setenv("DTYPES_FILE", str(dtypes))
    probe = "--trainer.callbacks+=tests.training.test_precision.DtypeProbe"
    main(["fit", *base, *prior, *common, f"--trainer.default_root_dir={tmp_path / 'prior'}", probe])
    assert set(dtypes.read_text().split()) == {"torch.float32"}


class DtypeProbe(Callback):
    """Writes the dtype of every output of the prior's linear layers during training to $DTYPES_FILE."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        def record(module, args, output):
            with open(os.environ["DTYPES_FILE"], "a") as f:
                f.write(f"{output.dtype}\n")

        for module in pl_module.prior.modules():
            if isinstance(module, torch.nn.Linear) and not module._forward_hooks:
                module.register_forward_hook(record)


@torch.no_grad()
def test_bf16_channels_last_loss_within_one_percent_of_fp32():
    ref, fast = trained_pair()
    fast.to(memory_format=torch.channels_last)
    x = batch()
    expected = ref(x).loss(0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert out.params.dtype == torch.bfloat16  # the convolutions really ran in bf16
    assert out.recon.dtype == torch.float32  # the likelihood did not
    got = out.loss(0.25)
    assert abs(got - expected) <= 0.01 * abs(expected), (got.item(), expected.item())
    assert not torch.equal(got, expected)  # bf16 changed the numbers: this compares two paths


def test_module_training_step_under_autocast_matches_fp32_within_one_percent():
    """AutoEncoderModule's default (channels_last) under bf16 autocast, as `precision: bf16-mixed` runs it: one
    training loss within 1% of the fp32 contiguous loss, gradients finite."""
    ref, fast_net = trained_pair()
    ref_module = AutoEncoderModule(ref.train(), channels_last=False)
    fast_module = AutoEncoderModule(fast_net.train())  # channels_last=True by default
    x = batch()
    expected = ref_module(x).loss(0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast_module(x).loss(0.25)
    got.backward()
    assert abs(got.item() - expected.item()) <= 0.01 * abs(expected.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast_module.parameters() if p.requires_grad)
