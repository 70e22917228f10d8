"""The networks: torch only (no Lightning, data or training code); they run in a notebook without a Trainer."""
