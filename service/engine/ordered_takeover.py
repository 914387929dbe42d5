"""Taking a request's sessions over from the shared state tier, in its line's order.

With a shared tier a feed first takes its sessions over (`Takeover.ensure`: an await on the
tier) and only then takes their leases. A line's requests (a Stream's items) must still take
their leases in arrival order, not in the order those awaits end: so a request enters its line
before it awaits (`enter`), and takes its leases at its turn (`Entry.turn`). A Stream message's
feeds are taken over each on its own: a session the tier refuses (unreachable, moving) refuses
its feeds alone. Without a shared tier nothing awaits before the leases, and this only feeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from service.engine.feed import Feed, FeedOutcome
from service.engine.session_feeder import SessionFeeder
from service.engine.session_line import Entry, Line
from service.engine.takeover import Takeover
from service.errors import SeqServeError


class OrderedTakeover:
    def __init__(self, takeover: Takeover, feeder: SessionFeeder) -> None:
        self._takeover = takeover
        self._feeder = feeder

    def enter(self, line: Line | None, session_ids: Iterable[str]) -> Entry | None:
        """The request's place in its line, where it awaits the shared tier (a quota charge, a
        takeover) before it takes its leases: so its leases are taken in the line's order, not
        in the order those awaits end (`Line`). None otherwise: nothing awaits before them."""
        return line.enter(session_ids) if line is not None and self._takeover.shared else None

    async def feed(self, feed: Feed, line: Line | None, entry: Entry | None) -> FeedOutcome:
        """Take the feed's session over, wait for its turn in the line, then feed it."""
        await self._takeover.ensure(feed.session_id, feed.expected_position)
        if entry is not None:
            await entry.turn()
        return await self._feeder.feed(feed, line)

    async def feed_many(
        self, feeds: Sequence[Feed], line: Line | None, entry: Entry | None
    ) -> list[FeedOutcome | SeqServeError]:
        """Take each session of `feeds` over, wait for the turn, then feed them: the feeds of a
        session the tier refused are refused with its error, the others run."""
        if not self._takeover.shared:
            return await self._feeder.feed_many(feeds, line)
        refused: dict[str, SeqServeError] = {}
        expected = {f.session_id: f.expected_position for f in reversed(feeds)}  # the first's
        for session_id in dict.fromkeys(f.session_id for f in feeds):  # in the items' order
            try:
                await self._takeover.ensure(session_id, expected[session_id])
            except SeqServeError as exc:  # the tier is unreachable, or the session is moving
                refused[session_id] = exc.detached()
        if entry is not None:
            await entry.turn()
        if not refused:
            return await self._feeder.feed_many(feeds, line)
        going = [f for f in feeds if f.session_id not in refused]
        done = iter(await self._feeder.feed_many(going, line) if going else [])
        return [refused.get(f.session_id) or next(done) for f in feeds]
