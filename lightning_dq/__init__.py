# lightning_dq
