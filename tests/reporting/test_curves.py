"""`bpd_curve.png` draws epoch aggregates only: train and val, and the raw weights' val beside the EMA's."""

from lightning_dq.reporting.curves import is_epoch_bpd


def test_the_curve_plots_epoch_aggregates_of_train_val_and_raw_weights_only():
    keys = [
        "train/bpd_decoder",  # per-step values: a noisy cloud beside the epoch points, not drawn
        "train/bpd_decoder_epoch",
        "val/bpd_decoder",
        "val_raw/bpd_decoder",  # the raw weights when EMA is on
        "val/loss",
        "train/lr",
        "test/bpd_prior",
    ]
    assert [key for key in keys if is_epoch_bpd(key)] == [
        "train/bpd_decoder_epoch",
        "val/bpd_decoder",
        "val_raw/bpd_decoder",
    ]
