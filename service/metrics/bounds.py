"""The bounds of seqserve's metrics: the values each label may take (which keeps every
family's series count fixed) and the histograms' buckets."""

from __future__ import annotations

# 50 µs (a batched step at small batch) … 10 s (a long prompt under load).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Loading and verifying weights: milliseconds for the bundled models, minutes at worst.
MODEL_LOAD_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Rows per batched step: powers of two up past any sane `max_batch_size`.
BATCH_ROWS_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(13))  # 1 … 4096

SESSION_EVENTS = (
    "created", "closed", "expired", "evicted", "restored", "forked", "taken_over", "moved",
)  # fmt: skip
TIERS = ("memory", "spilled")
# Sessions also count by "replaying": recovered, their journaled steps not yet replayed.
SESSION_TIERS = (*TIERS, "replaying")
GC_GENERATIONS = ("0", "1", "2")
# seqserve_state_write_failures_total's `kind`
WRITE_FAILURE_KINDS = ("journal", "end", "checkpoint")
# seqserve_state_damaged_records_total's `kind`
DAMAGED_RECORD_KINDS = ("journal", "checkpoint")
PHASES = ("gather", "forward", "scatter", "sample")
# google.rpc.Code names: the `code` label may only take these, which keeps it bounded.
GRPC_CODES = frozenset(
    (
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    )
)  # fmt: skip
# The `protocol` label of call durations: gRPC, or the HTTP/JSON API.
PROTOCOLS = ("grpc", "http")
# The `reason` label of seqserve_refusals_total: the ErrorInfo reasons of RESOURCE_EXHAUSTED
# (`service.errors.REASONS`). The server out of capacity (a session cap, a full queue, a full
# state pool or spill tier) is an operator's problem; QUOTA_EXCEEDED is one principal over its
# own share, which must page no one. OTHER: a refusal that carried none of these.
CAPACITY_REASONS = ("SESSION_LIMIT", "QUEUE_FULL", "MEMORY_EXHAUSTED")
QUOTA_REASON = "QUOTA_EXCEEDED"
REFUSAL_REASONS = (*CAPACITY_REASONS, QUOTA_REASON, "OTHER")


def check_tier(tier: str, tiers: tuple[str, ...] = TIERS) -> str:
    if tier not in tiers:
        raise ValueError(f"unknown tier {tier!r}; expected one of {tiers}")
    return tier
