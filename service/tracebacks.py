"""Forgetting an exception's tracebacks once nothing will log them.

An error kept as a value (a refused item's outcome, answered later) or raised again where a
frame of its traceback holds it is a reference cycle through that frame, left to the cycle
collector; dropping the tracebacks breaks it. `SeqServeError.detached` and the API layer's
status conversion use this.
"""

from __future__ import annotations


def drop_tracebacks(exc: BaseException) -> None:
    """Forget the tracebacks of `exc` and of the exceptions it chains (`__cause__`,
    `__context__`, even one hidden by `from None`), once nothing will log them. A traceback
    keeps its frames, and each frame its caller's (`f_back`) and their locals: an error kept
    or raised where one of those frames holds it (a step's rows hold its error, a generation
    raises the error its channel held) is a reference cycle, left to the cycle collector."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += (current.__cause__, current.__context__)
