"""Tables (and, with later work, plots and HTML) from the result store."""

from .table import aggregate_table, results_table

__all__ = ["aggregate_table", "results_table"]
