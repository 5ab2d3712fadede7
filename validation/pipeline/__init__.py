"""Meta-evaluation pipeline: the long result table, its storage, sharded runs and merge."""

from validation.pipeline.table import (
    COLUMNS,
    KEY_COLUMNS,
    PREDICTION_COLUMNS,
    load_predictions,
    load_results,
    merge_run,
)

__all__ = ["COLUMNS", "KEY_COLUMNS", "PREDICTION_COLUMNS", "load_predictions", "load_results", "merge_run"]
