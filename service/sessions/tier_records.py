"""A session's journal as the shared tier holds it (`shared_tier.py`): one record an entry.

Each entry was written whole by one atomic write (a Lua script, a SQLite transaction) before
its step was acknowledged, so unlike a segment's end none is a crash's torn write or a power
loss's unsynced one: an entry that is not one whole record is a lost step wherever it stands,
and its session is refused (SessionLost, DATA_LOSS) rather than brought back short of it. An
entry a newer seqserve wrote (in a rolling upgrade) is whole, but not this server's to apply:
the takeover is refused (WrittenByNewer, FAILED_PRECONDITION) and the session left as it is,
for a replica of that version; so is a checkpoint of a newer format (`newer_checkpoint`).
"""

from __future__ import annotations

from service.errors import SessionLost, WrittenByNewer, quote
from service.sessions.journal_record import CREATE, JournalRecord
from service.sessions.journal_scan import DAMAGED, NEWER, Unreadable, read_stream
from service.sessions.spill_record import SpillRecord


def read(
    session_id: str, entries: list[bytes], checkpoint: SpillRecord | None
) -> tuple[list[JournalRecord], list[Unreadable]]:
    """The records, and in place of each entry that is not one whole record what reading it
    found. Raises WrittenByNewer for an entry a newer server wrote (skipped, it would bring
    the session back short of that step; where it stood last, nothing would even show it),
    naming the session's owner where `checkpoint` or its creation record does."""
    decoded: list[JournalRecord] = []
    damaged: list[Unreadable] = []
    for entry in entries:
        items = list(read_stream(bytes(entry)))
        if len(items) == 1 and isinstance(items[0], JournalRecord):
            decoded.append(items[0])
            continue
        bad = [i for i in items if isinstance(i, Unreadable)] or [Unreadable(0, DAMAGED)]
        if len(items) == 1 and bad[0].what == NEWER:
            what = "its journal in the state tier holds a record a newer seqserve wrote"
            raise _newer(session_id, what, _owner(checkpoint, decoded))
        damaged.append(bad[0])
    return decoded, damaged


def newer_checkpoint(session_id: str, owner: str) -> WrittenByNewer:
    """The error that refuses a session whose checkpoint in the tier a newer seqserve wrote (a
    later format version, whole: `spill_record.newer`), naming `owner`, as its record says."""
    return _newer(session_id, "its checkpoint in the state tier is a newer seqserve's", owner)


def _newer(session_id: str, what: str, owner: str) -> WrittenByNewer:
    error = WrittenByNewer(
        f"session {quote(session_id)} cannot be taken over here: {what}; use a replica of "
        "that version"
    )
    error.owner = owner  # only the owner hears it
    return error


def lost(
    session_id: str,
    checkpoint: SpillRecord | None,
    decoded: list[JournalRecord],
    damaged: list[Unreadable],
) -> SessionLost:
    """The error that refuses a session whose journal holds `damaged` entries, naming its
    owner where its checkpoint or creation record still does (only the owner hears it)."""
    owner = _owner(checkpoint, decoded)
    at = f" (at position {damaged[0].position})" if damaged[0].session_id else ""
    error = SessionLost(
        f"session {quote(session_id)} cannot be taken over: a record of its journal in the "
        f"state tier{at} is damaged; what it recorded was acknowledged and is lost"
    )
    error.owner = owner
    return error


def _owner(checkpoint: SpillRecord | None, decoded: list[JournalRecord]) -> str:
    """The session's owner as its checkpoint or its creation record names it ("" if neither)."""
    if checkpoint is not None and checkpoint.header.owner:
        return checkpoint.header.owner
    for r in decoded:
        if r.kind == CREATE and r.meta is not None:
            return str(r.meta.get("owner", ""))
    return ""
