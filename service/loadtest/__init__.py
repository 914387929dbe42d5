"""A session-aware load generator for seqserve (`seqserve loadtest`).

Importable on its own: `await run_load(LoadConfig(target=...))` returns a `LoadReport`.
The names below are imported when first used, so that `seqserve --help` (which reads
`LoadConfig`'s defaults) does not import numpy with the report.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.loadtest.config import LoadConfig
    from service.loadtest.load_generator import run_load
    from service.loadtest.report import LatencySummary, LoadReport
    from service.loadtest.target import TargetError

__all__ = ["LatencySummary", "LoadConfig", "LoadReport", "TargetError", "run_load"]

_HOMES = {
    "LoadConfig": "service.loadtest.config",
    "run_load": "service.loadtest.load_generator",
    "LatencySummary": "service.loadtest.report",
    "LoadReport": "service.loadtest.report",
    "TargetError": "service.loadtest.target",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
