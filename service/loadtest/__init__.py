"""A session-aware load generator for seqserve (`seqserve loadtest`).

Importable on its own: `await run_load(LoadConfig(target=...))` returns a `LoadReport`.
"""

from service.loadtest.config import LoadConfig
from service.loadtest.load_generator import run_load
from service.loadtest.report import LatencySummary, LoadReport
from service.loadtest.target import TargetError

__all__ = ["LatencySummary", "LoadConfig", "LoadReport", "TargetError", "run_load"]
