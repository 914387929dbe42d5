"""TtlIndex: the shortest TTL held, as sessions come and go."""

from __future__ import annotations

from service.sessions.ttl_index import TtlIndex


def test_the_shortest_ttl_follows_the_sessions_that_hold_it() -> None:
    ttls = TtlIndex()
    assert ttls.shortest() == 0.0
    for ttl in (600.0, 60.0, 60.0, 3600.0):
        ttls.add(ttl)
    assert ttls.shortest() == 60.0
    ttls.remove(60.0)
    assert ttls.shortest() == 60.0  # one session still holds it
    ttls.remove(60.0)
    assert ttls.shortest() == 600.0
    ttls.add(30.0)
    assert ttls.shortest() == 30.0
