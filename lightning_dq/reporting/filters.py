"""Known noise from our dependencies, each silenced by exact message and source; any other warning stays."""

import logging
import warnings

LIGHTNING_TIPS = (  # Lightning's ads for its cloud logger and model registry, printed on every run not using them
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
)
# the loggers Lightning's `rank_zero_info` writes through (fabric's and pytorch's both replace the shared one)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_TIPS)


def install_filters() -> None:
    """Silence the known noise (idempotent)."""
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())
    # torch 2.14 deprecates `LeafSpec`; Lightning's own pytree helper (combined data loaders) still builds one
    leaf_spec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    pytree = r"lightning\.pytorch\.utilities\._pytree"
    warnings.filterwarnings("ignore", message=leaf_spec, category=FutureWarning, module=pytree)
    # mixed precision keeps fp32 parameters, so the summary's 32-bit size estimate is exact, not "inaccurate"
    warnings.filterwarnings("ignore", message=r"Precision (bf16|16)-mixed is not supported by the model summary")
