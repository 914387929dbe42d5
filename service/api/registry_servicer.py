"""gRPC glue for `seqserve.v1.ModelRegistry`: what the store holds and what is loaded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TypeVar

from service.engine.served_versions import ServedVersions
from service.errors import SeqServeError
from service.pb.seqserve.v1 import model_registry_pb2 as pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as pb_grpc
from service.registry.snapshot import ModelEntry

_CELL = {"lstm": pb.CELL_TYPE_LSTM, "gru": pb.CELL_TYPE_GRU}

T = TypeVar("T")


class RegistryServicer(pb_grpc.ModelRegistryServicer):
    def __init__(self, versions: ServedVersions) -> None:
        self.versions = versions
        self.store = versions.store
        self.rule = versions.rule

    async def _blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` (store or rule work: file reads, maybe hashing) on a thread. Every store
        error these RPCs answer passes through here: the files it names are named within the
        store (`tok/2/weights.safetensors`), the store as "the model store", never where it is
        on this server."""
        try:
            return await asyncio.to_thread(fn, *args)
        except SeqServeError as exc:
            self.store.name_within(exc)
            raise

    def _default_version(self, entry: ModelEntry) -> int:
        """What `CreateSession` with no version gets now (the store's one rule), or 0 when it
        would be refused (no servable version; `production` on a missing or refused one; a
        version whose loaded copy is outdated while sessions run on it); blocking."""
        try:
            version = self.rule.version_for(entry, "")
        except SeqServeError:  # refused: report 0 rather than fail the listing
            return 0
        return 0 if self.versions.held_refusal(entry, version) is not None else version

    def _summary(self, entry: ModelEntry) -> pb.ModelSummary:
        """Blocking: hashes weights not hashed since they changed (once per change)."""
        return pb.ModelSummary(
            name=entry.name,
            versions=[
                v
                for v in self.rule.servable_versions(entry)
                if self.versions.held_refusal(entry, v) is None
            ],
            aliases=dict(entry.aliases),
            default_version=self._default_version(entry),
        )

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        snapshot = await self._blocking(self.store.snapshot)
        models = sorted(snapshot.models.values(), key=lambda e: e.name)
        return pb.ListModelsResponse(
            models=await self._blocking(lambda: [self._summary(e) for e in models])
        )

    def _problem(self, entry: ModelEntry, version: int) -> str | None:
        """Why `version` takes no new sessions (a bad manifest, missing weights, weights that
        fail their digest; its loaded copy outdated while sessions run on it), or None;
        blocking: hashes weights not hashed since they changed. Paths in it are relative to
        the store (a client never sees the server's paths)."""
        problem = self.rule.refusal(entry, version)
        if problem is None:
            return self.versions.held_refusal(entry, version)
        return self.store.within(problem)

    async def GetModel(self, request, context):  # type: ignore[no-untyped-def]
        entry = await self._blocking(self.store.model, request.name)
        default = await self._blocking(self._default_version, entry)
        problems = await self._blocking(
            lambda: [self._problem(entry, v.version) for v in entry.versions]
        )
        versions = []
        for v, problem in zip(entry.versions, problems, strict=True):
            lv = self.versions.find(entry.name, v.version)
            if lv is not None and self.versions.outdated(entry, v.version) is lv:
                lv = None  # an older copy is loaded, not these files (see `_problem`)
            manifest = v.manifest
            versions.append(
                pb.ModelVersion(
                    version=v.version,
                    manifest_json=json.dumps(manifest.model_dump(mode="json")) if manifest else "",
                    fingerprint=manifest.fingerprint() if manifest else "",
                    cell=_CELL.get(manifest.cell, pb.CELL_TYPE_UNSPECIFIED)
                    if manifest
                    else pb.CELL_TYPE_UNSPECIFIED,
                    loaded=lv is not None,
                    live_sessions=self.versions.pinned(entry.name, v.version),  # spilled too
                    status=pb.VERSION_STATUS_OK if problem is None else pb.VERSION_STATUS_REFUSED,
                    status_reason=problem or "",
                )
            )
        return pb.GetModelResponse(
            model=pb.ModelDetail(
                name=entry.name,
                versions=versions,
                aliases=dict(entry.aliases),
                default_version=default,
            )
        )

    async def SetAlias(self, request, context):  # type: ignore[no-untyped-def]
        await self._blocking(self.store.set_alias, request.name, request.alias, request.version)
        entry = await self._blocking(self.store.model, request.name)
        return pb.SetAliasResponse(aliases=dict(entry.aliases))

    async def DeleteAlias(self, request, context):  # type: ignore[no-untyped-def]
        await self._blocking(self.store.delete_alias, request.name, request.alias)
        entry = await self._blocking(self.store.model, request.name)
        return pb.DeleteAliasResponse(aliases=dict(entry.aliases))
