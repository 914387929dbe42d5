"""Sessions a newer seqserve wrote, as recovery meets them in the local journal and spill
directory: refused, and kept whole for a server of that version.

A downgrade leaves records of a later format than this server reads. Such a record is whole
(its checksum is good) and its head still names its session (`journal_record`), so skipping it
would bring the session back short of the steps it recorded, answering as if nothing had
happened. Instead the session is refused as the shared tier refuses one (WrittenByNewer:
FAILED_PRECONDITION, VERSION_UNAVAILABLE; only its owner hears it, where its checkpoint or
creation record names one), and nothing of it is lost: its checkpoint stays, and its records
(the newer frames as they were written, the readable ones re-encoded as held records are) are
kept in the journal's held segment (`Journal.hold`), at every start, so this server's trimming
never takes them; a server of the newer version, started on the directory again, reads them
and serves the session whole.

A session whose checkpoint a newer seqserve wrote (refused so by `SessionResidency.open`) stays
refused, its journal records kept the same way, unless the journal holds its whole history in
records this server reads (its creation, every step since, none a newer server's): then it is
rebuilt from that, as a session whose checkpoint is damaged is (`Recovery`).

A newer record older than the session's checkpoint (from a segment a crash left undeleted) is
in that checkpoint already: ignored, as a damaged one there is. A session whose last record
read is an END ended: nothing is refused. One refused for good before the journal was read (its
checkpoint damaged) stays so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from service.engine.recovery_plan import Plan, encode_record, encoded
from service.engine.served_versions import ServedVersions
from service.errors import WrittenByNewer
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
from service.sessions.session import Session
from service.sessions.session_store import SessionStore

log = logging.getLogger(__name__)

JOURNALED = (
    "its journal holds a record a newer seqserve wrote, in a format this server does not "
    "read; a server of that version resumes it"
)
CHECKPOINTED = (
    "its spill record was written by a newer seqserve, in a format this server does not "
    "read; a server of that version resumes it"
)


class NewerRecords:
    def __init__(self, sessions: SessionStore) -> None:
        self._sessions = sessions
        gone = sessions.gone
        # Refused before the journal is read: for a newer checkpoint, and for good (damaged).
        self._newer_checkpoint = {
            s for s in sessions.broken if gone.refused_as(s) is WrittenByNewer
        }
        self._for_good = {s for s in sessions.broken if sessions.refused_for_good(s)}
        # session → its records, in the journal's order, each once (a dict keeps both)
        self._kept: dict[str, dict[bytes, None]] = {}
        self._has_newer: set[str] = set()  # sessions with a newer record (not in a checkpoint)
        self._ended: set[str] = set()  # sessions whose last record read is an END

    def __contains__(self, session_id: str) -> bool:
        """Whether the session is refused for a newer server's record or checkpoint, so far."""
        return session_id in self._kept or session_id in self._newer_checkpoint

    def newer(
        self, record: js.Unreadable, known: dict[str, Session], plans: dict[str, Plan]
    ) -> None:
        """A record a newer server wrote (NEWER), after the sessions `known` so far (from a
        checkpoint or a creation) and their `plans` so far."""
        sid = record.session_id
        if not sid:
            return  # its head names none: skipped (logged by `Journal.open`)
        if sid not in self._kept:
            base, plan = known.get(sid), plans.get(sid)
            if base is not None and record.position < base.position:
                return  # older than its checkpoint: in it already
            self._kept[sid] = {}
            for earlier in encoded(plan) if plan is not None else []:
                self._keep(sid, earlier)
        self._has_newer.add(sid)
        self._keep(sid, record.raw)
        self._ended.discard(sid)

    def follow(self, record: jr.JournalRecord) -> None:
        """A readable record: kept, in order, for a session refused so far."""
        sid = record.session_id
        if sid not in self:
            return
        self._keep(sid, encode_record(record))
        if record.kind == jr.END:
            self._ended.add(sid)
        else:
            self._ended.discard(sid)

    def _keep(self, session_id: str, record: bytes) -> None:
        """Keep `record` of the session, unless a copy of it is kept already: a held segment
        read with the segments it was copied from (a crash before they were trimmed) holds
        each record twice, and copying both would double them at every such start."""
        self._kept.setdefault(session_id, {})[record] = None

    def refuse(
        self, plans: dict[str, Plan], known: dict[str, Session], versions: ServedVersions
    ) -> None:
        """Once the journal is read: refuse the sessions a newer server wrote (`refused`),
        dropping their `plans`; one adopted from its checkpoint leaves the store, its version
        unpinned."""
        for sid, why in list(self.refused(plans)):
            plans.pop(sid, None)
            session = known.get(sid)
            if refuse(self._sessions, sid, session, why) and session is not None:
                versions.unpin(session.model, session.version)

    def refused(self, plans: dict[str, Plan]) -> Iterator[tuple[str, str]]:
        """The sessions to refuse once the journal is read (`plans`), and why: not ended, nor
        refused for good already, nor to be rebuilt from their creation record."""
        for sid in self._kept.keys() | self._newer_checkpoint:
            if sid in self._ended or sid in self._for_good:
                continue
            if sid not in self._newer_checkpoint:
                yield sid, JOURNALED
                continue
            plan = plans.get(sid)
            if sid in self._has_newer or plan is None or not plan.fresh:
                yield sid, CHECKPOINTED

    def held(self) -> dict[str, list[bytes]]:
        """The records to keep (`Journal.hold`): those of every session refused as a newer
        server's once recovery is done."""
        sessions = self._sessions
        return {
            sid: list(records)
            for sid, records in self._kept.items()
            if sessions.gone.refused_as(sid) is WrittenByNewer and not sessions.contains(sid)
        }


def refuse(sessions: SessionStore, session_id: str, session: Session | None, why: str) -> bool:
    """Refuse a session a newer server wrote (WrittenByNewer, naming `why`), keeping its
    checkpoint: a live one adopted from that checkpoint leaves the store (its version unpinned
    by the caller when this returns True)."""
    if sessions.gone.refused_as(session_id) is not WrittenByNewer:  # its checkpoint's: logged
        log.warning("session %s was written by a newer seqserve: refused, what it is made of "
                    "kept for a server of that version", session_id)  # fmt: skip
    owner = session.owner if session is not None else ""
    adopted = session is not None and sessions.contains(session_id)
    if adopted:
        assert session is not None
        sessions.remove(session, "lost")
    sessions.mark_broken(session_id, why, WrittenByNewer, owner=owner)
    return adopted
