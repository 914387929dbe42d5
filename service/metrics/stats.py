"""Plain records the engine produces for the metrics logger.

The engine never touches a metric object: each batched step hands one `StepStats` to a
callback, and `service.metrics.prometheus_metrics.Metrics` turns it into series. Keeping the
boundary a dataclass keeps the hot path free of Prometheus and lets tests assert on numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepStats:
    """What one batched step of one model version did, and where its time went."""

    model: str
    """Model name as served (a store directory name: bounded)."""
    version: str
    """Exact version number the step ran, as a string (the Prometheus label value)."""
    rows: int
    """Sessions in the batch: feeds plus running generations."""
    tokens_in: int
    """Inputs consumed from clients this step (tokens or frames), over all feed rows."""
    tokens_generated: int
    """Tokens sampled this step (one per generating row)."""
    queue_wait_seconds: list[float] = field(default_factory=list)
    """For each feed row, enqueue → step start. Generations in the running batch do not wait."""
    gather_seconds: float = 0.0
    """Copying the rows' hidden state out of the state pool."""
    forward_seconds: float = 0.0
    """The recurrent step (and head) over the batch."""
    scatter_seconds: float = 0.0
    """Writing the new hidden state back into the pool."""
    sample_seconds: float = 0.0
    """Top-k / sampling over the logits."""
    total_seconds: float = 0.0
    """Step start → results ready, as the scheduler sees it (includes the thread hop)."""
    cpu_seconds: float = 0.0
    """CPU time the step itself took on the thread that ran it (the phases are wall time:
    on a busy core they include time other threads ran meanwhile)."""
