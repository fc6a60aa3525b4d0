"""Tables, aggregates, figures and the HTML report from the result store."""

from .aggregate import Group, aggregate, detection_table, false_positive_rates, wilson
from .html import build_report, write_report
from .leaderboard import build_leaderboard
from .table import aggregate_table, results_table

__all__ = ["Group", "aggregate", "aggregate_table", "build_leaderboard", "build_report", "detection_table",
           "false_positive_rates", "results_table", "wilson", "write_report"]
