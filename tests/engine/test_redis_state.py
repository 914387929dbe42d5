"""The Redis backend's scripts against a real redis-server (its fixture is the engine tests')."""

from __future__ import annotations

from service.sessions.redis_state import RedisState
from service.sessions.shared_tier import Write


def test_the_first_session_made_for_a_request_id_stays_its_answer(redis_url: str) -> None:
    """A create whose answer was lost (Redis did not answer in time) may land after its retry
    made another session, and the same create sent to two replicas at once lands twice: the
    first session made, already given, must stay the request id's, or a later retry would name
    a session the client was never given, and the second is refused (fenced), so the request
    never leaves two live sessions. A session made anew for the id because the one it named
    ended (its prefix's step failed) does take the id."""
    tier = RedisState(redis_url, namespace="made")
    try:
        made_by = "create:r1"
        retry = Write("s-retry", 1, 60_000, "create", [b"x"], made_by=made_by)
        assert tier.append([retry]) == []
        late = Write("s-late", 1, 60_000, "create", [b"x"], made_by=made_by)
        assert tier.append([late]) == ["s-late"]  # the first call's write, landing last
        assert tier.made(made_by) == "s-retry"
        assert tier.epoch_of("s-late") == 0  # nothing of it written
        ended = Write("s-retry", 1, 60_000, "end", [b"closed"])
        assert tier.append([ended]) == []
        anew = Write("s-anew", 1, 60_000, "create", [b"x"], made_by=made_by)
        assert tier.append([anew]) == []  # the one it named ended: made anew, and it counts
        assert tier.made(made_by) == "s-anew"
        assert tier.checkpoint("s-fork", 1, 60_000, b"c", first=True, made_by="fork:r2")
        assert not tier.checkpoint("s-fork2", 1, 60_000, b"c", first=True, made_by="fork:r2")
        assert tier.made("fork:r2") == "s-fork"
        assert tier.epoch_of("s-fork2") == 0
    finally:
        tier.close()
