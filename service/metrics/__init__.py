"""Metrics: plain stats records from the engine, and the Prometheus logger that records them."""

from service.metrics.prometheus_metrics import Metrics
from service.metrics.stats import StepStats

__all__ = ["Metrics", "StepStats"]
