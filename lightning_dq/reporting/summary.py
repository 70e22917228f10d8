"""`ModelSize`: the model summary a user needs. Lightning's table adds a FLOPs column that is always 0 here (it
counts FLOPs only by running an `example_input_array`, which would initialise our codebooks from a dummy input)."""

from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count


class ModelSize(ModelSummary):
    """Total, trainable and frozen parameters, the size in MB, and the parameter count of each top-level module.

    Args:
        max_depth: module nesting shown (1 = the LightningModule's direct children; 0 = no summary).
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)

    @staticmethod
    def summarize(
        summary_data, total_parameters: int, trainable_parameters: int, model_size: float, *args, **kwargs: Any
    ) -> None:
        def count(n: int | str) -> str:  # Lightning's counts are padded ("0  ", "1.8 M")
            return get_human_readable_count(int(n)).strip() if isinstance(n, int) else n.strip()

        parameters = f"{count(trainable_parameters)} trainable, {count(total_parameters - trainable_parameters)} frozen"
        lines = [f"model: {count(total_parameters)} parameters ({parameters}), {model_size:.1f} MB"]
        columns = dict(summary_data)
        for name, kind, params in zip(columns["Name"], columns["Type"], columns["Params"], strict=True):
            if count(params) != "0":  # skip the metric containers
                lines.append(f"  {name}: {kind}, {count(params)}")
        print("\n".join(lines), flush=True)
