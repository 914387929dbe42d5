"""ModelRegistry over a real channel: listing, detail with load state and fingerprints, and
aliases that move new sessions while old ones stay pinned to their version."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import pytest

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import model_registry_pb2 as reg
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.registry import digests
from service.registry.store import ModelStore
from tests.polling import until

from .conftest import TOKEN_CONFIG, ServerFactory, publish_random
from .support import ReferenceSession, assert_matches_reference, expect_status, text


async def _model(client: SeqServeClient, name: str) -> reg.ModelDetail:
    return (await client.registry.GetModel(reg.GetModelRequest(name=name))).model


async def _create(
    client: SeqServeClient, version: str = "", **fields: object
) -> pb.CreateSessionResponse:
    request = pb.CreateSessionRequest(model="tok", version=version, **fields)  # type: ignore[arg-type]
    return await client.sessions.CreateSession(request)


async def test_list_models(client: SeqServeClient, store_root: Path) -> None:
    models = (await client.registry.ListModels(reg.ListModelsRequest())).models
    assert [m.name for m in models] == ["frames", "tok"]
    assert all(list(m.versions) == [1] and m.default_version == 1 and not m.aliases for m in models)

    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=3)
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="canary", version=2))
    models = {m.name: m for m in (await client.registry.ListModels(reg.ListModelsRequest())).models}
    assert list(models["tok"].versions) == [1, 2]
    assert models["tok"].default_version == 2  # no `production`: the latest
    assert dict(models["tok"].aliases) == {"canary": 2}
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="production", version=1))
    models = {m.name: m for m in (await client.registry.ListModels(reg.ListModelsRequest())).models}
    assert models["tok"].default_version == 1


async def test_get_model_reports_manifest_load_state_and_fingerprint(
    client: SeqServeClient, store_root: Path
) -> None:
    tok = await _model(client, "tok")
    assert tok.name == "tok" and tok.default_version == 1
    (v1,) = tok.versions
    assert v1.version == 1 and v1.cell == reg.CELL_TYPE_LSTM
    assert v1.status == reg.VERSION_STATUS_OK and v1.status_reason == ""
    assert v1.loaded and v1.live_sessions == 0  # the default version loads at start-up
    manifest = json.loads(v1.manifest_json)
    assert manifest["name"] == "tok" and manifest["version"] == 1 and manifest["cell"] == "lstm"
    assert manifest["hidden_size"] == TOKEN_CONFIG.hidden_size

    created = await _create(client)
    child = await client.sessions.ForkSession(
        pb.ForkSessionRequest(session_id=created.session.session_id)
    )
    (v1,) = (await _model(client, "tok")).versions
    assert v1.loaded and v1.live_sessions == 2
    assert v1.fingerprint == created.session.fingerprint == child.session.fingerprint

    frames = await _model(client, "frames")
    assert frames.versions[0].cell == reg.CELL_TYPE_GRU
    assert json.loads(frames.versions[0].manifest_json)["reset_after"] is False
    assert frames.versions[0].loaded

    # Published after start-up: listed, not loaded until a session asks for it.
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=3)
    v2 = (await _model(client, "tok")).versions[1]
    assert v2.version == 2 and v2.status == reg.VERSION_STATUS_OK and not v2.loaded


async def test_refused_version_is_listed_with_its_reason(
    client: SeqServeClient, store_root: Path
) -> None:
    bad = store_root / "tok" / "2"
    bad.mkdir()
    (bad / "weights.safetensors").write_bytes(
        (store_root / "tok" / "1" / "weights.safetensors").read_bytes()
    )
    (bad / "manifest.json").write_text("{not json")
    tok = await _model(client, "tok")
    assert [v.version for v in tok.versions] == [1, 2]
    v2 = tok.versions[1]
    assert v2.status == reg.VERSION_STATUS_REFUSED and "manifest.json" in v2.status_reason
    assert v2.manifest_json == "" and v2.fingerprint == "" and not v2.loaded
    assert tok.default_version == 1
    listed = {m.name: m for m in (await client.registry.ListModels(reg.ListModelsRequest())).models}
    assert list(listed["tok"].versions) == [1]  # only servable versions


async def test_set_alias_moves_new_sessions_and_old_ones_stay_pinned(
    client: SeqServeClient, store_root: Path
) -> None:
    old = await _create(client, prefix=text("ab"))
    assert old.session.version == 1
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=3)  # version 2
    aliases = (
        await client.registry.SetAlias(
            reg.SetAliasRequest(name="tok", alias="production", version=1)
        )
    ).aliases
    assert dict(aliases) == {"production": 1}
    assert (await _create(client)).session.version == 1  # production wins over latest

    aliases = (
        await client.registry.SetAlias(
            reg.SetAliasRequest(name="tok", alias="production", version=2)
        )
    ).aliases
    assert dict(aliases) == {"production": 2}
    new = await _create(client, prefix=text("ab"))
    assert new.session.version == 2
    assert new.session.fingerprint != old.session.fingerprint
    assert_matches_reference(
        new.prediction, ReferenceSession(store_root, "tok", 2).feed(list(b"ab"))[-1]
    )

    # The old session still runs on version 1's weights.
    ref_v1 = ReferenceSession(store_root, "tok", 1)
    ref_v1.feed(list(b"ab"))
    step = await client.sessions.Step(
        pb.StepRequest(session_id=old.session.session_id, input=text("c"))
    )
    assert_matches_reference(step.prediction, ref_v1.feed(list(b"c"))[-1])
    info = await client.sessions.GetSession(pb.GetSessionRequest(session_id=old.session.session_id))
    assert info.session.version == 1 and info.session.fingerprint == old.session.fingerprint

    versions = {v.version: v for v in (await _model(client, "tok")).versions}
    assert versions[1].loaded and versions[2].loaded

    # Versions and aliases can also be named explicitly.
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="staging", version=1))
    assert (await _create(client, "staging")).session.version == 1
    assert (await _create(client, "1")).session.version == 1
    assert (await _create(client, "latest")).session.version == 2


async def test_old_version_unloads_after_its_last_session(
    client: SeqServeClient, store_root: Path
) -> None:
    old = await _create(client)
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=3)
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="production", version=2))
    await _create(client)
    versions = {v.version: v for v in (await _model(client, "tok")).versions}
    assert versions[1].loaded and versions[1].live_sessions == 1 and versions[2].loaded

    await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=old.session.session_id))

    async def unloaded() -> dict[int, reg.ModelVersion] | None:
        versions = {v.version: v for v in (await _model(client, "tok")).versions}
        return None if versions[1].loaded else versions

    # The unload runs just after the close returns.
    versions = await until(unloaded, 60, "version 1's unload")
    assert not versions[1].loaded and versions[1].live_sessions == 0
    assert versions[2].loaded  # what new sessions resolve to stays loaded


async def test_delete_alias(client: SeqServeClient, store_root: Path) -> None:
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=3)
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="production", version=1))
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="staging", version=2))
    pinned = await _create(client, "staging")
    aliases = (
        await client.registry.DeleteAlias(reg.DeleteAliasRequest(name="tok", alias="production"))
    ).aliases
    assert dict(aliases) == {"staging": 2}
    assert (await _model(client, "tok")).default_version == 2  # back to the latest
    aliases = (
        await client.registry.DeleteAlias(reg.DeleteAliasRequest(name="tok", alias="staging"))
    ).aliases
    assert dict(aliases) == {}
    await expect_status(_create(client, "staging"), grpc.StatusCode.NOT_FOUND, "staging")
    # A session created through the alias keeps its version.
    info = await client.sessions.GetSession(
        pb.GetSessionRequest(session_id=pinned.session.session_id)
    )
    assert info.session.version == 2
    assert json.loads((store_root / "tok" / "aliases.json").read_text()) == {}


async def test_registry_errors(client: SeqServeClient) -> None:
    nf, invalid = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    registry = client.registry
    await expect_status(registry.GetModel(reg.GetModelRequest(name="nope")), nf, "nope", "tok")
    await expect_status(
        registry.SetAlias(reg.SetAliasRequest(name="nope", alias="a", version=1)), nf, "nope"
    )
    await expect_status(
        registry.SetAlias(reg.SetAliasRequest(name="tok", alias="a", version=9)), nf, "9"
    )
    await expect_status(
        registry.SetAlias(reg.SetAliasRequest(name="tok", alias="7", version=1)), invalid, "'7'"
    )
    await expect_status(
        registry.SetAlias(reg.SetAliasRequest(name="tok", alias="latest", version=1)),
        invalid,
        "reserved",
    )
    await expect_status(
        registry.SetAlias(reg.SetAliasRequest(name="tok", alias="Bad Name", version=1)), invalid
    )
    await expect_status(
        registry.DeleteAlias(reg.DeleteAliasRequest(name="tok", alias="missing")), nf, "missing"
    )
    await expect_status(registry.DeleteAlias(reg.DeleteAliasRequest(name="nope", alias="a")), nf)
    # Nothing was changed by the refused calls.
    assert not (await _model(client, "tok")).aliases


async def test_a_newest_version_failing_its_digest_is_never_reported_as_the_default(
    client: SeqServeClient, store_root: Path
) -> None:
    """ListModels, GetModel and CreateSession share one rule: the newest version's weights
    fail their digest, so all three say version 1, before any session was made and after; once
    the file is whole again all three move to version 2."""
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=3)
    weights = store_root / "tok" / "2" / "weights.safetensors"
    whole = weights.read_bytes()
    damaged = bytearray(whole)
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))

    async def defaults() -> tuple[int, int, int]:
        listed = {
            m.name: m for m in (await client.registry.ListModels(reg.ListModelsRequest())).models
        }
        detail = await _model(client, "tok")
        created = (await _create(client)).session.version
        return listed["tok"].default_version, detail.default_version, created

    assert await defaults() == (1, 1, 1)
    v2 = (await _model(client, "tok")).versions[1]
    assert v2.status == reg.VERSION_STATUS_REFUSED and "sha256 mismatch" in v2.status_reason
    assert await defaults() == (1, 1, 1)  # still, with the verdict remembered

    weights.write_bytes(whole)
    assert await defaults() == (2, 2, 2)
    assert (await _model(client, "tok")).versions[1].status == reg.VERSION_STATUS_OK


async def test_get_model_hashes_every_version_and_refuses_one_failing_its_digest(
    client: SeqServeClient, store_root: Path
) -> None:
    """With `production` on version 1, nothing else ever hashes version 3's weights, yet
    GetModel reports it REFUSED for its digest (no server path in the reason). ListModels,
    GetModel and CreateSession agree on the default: the alias while it is set, else the newest
    version whose weights are whole (2)."""
    store = ModelStore(store_root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=3)
    publish_random(store, "tok", TOKEN_CONFIG, seed=4)
    weights = store_root / "tok" / "3" / "weights.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="production", version=1))

    async def defaults() -> tuple[int, int, int]:
        listed = {
            m.name: m for m in (await client.registry.ListModels(reg.ListModelsRequest())).models
        }
        detail = await _model(client, "tok")
        created = (await _create(client)).session.version
        return listed["tok"].default_version, detail.default_version, created

    detail = await _model(client, "tok")
    statuses = {v.version: (v.status, v.status_reason) for v in detail.versions}
    assert statuses[1] == statuses[2] == (reg.VERSION_STATUS_OK, "")
    status, reason = statuses[3]
    assert status == reg.VERSION_STATUS_REFUSED and "sha256 mismatch" in reason, reason
    assert reason.startswith("tok/3/weights.safetensors") and str(store_root) not in reason
    assert await defaults() == (1, 1, 1)

    await client.registry.DeleteAlias(reg.DeleteAliasRequest(name="tok", alias="production"))
    assert await defaults() == (2, 2, 2)  # the newest whole version, not the broken 3
    await expect_status(_create(client, "3"), grpc.StatusCode.DATA_LOSS, "sha256 mismatch")


async def test_an_aliased_version_stays_loaded_after_its_last_session(
    client: SeqServeClient, store_root: Path
) -> None:
    """New sessions asking for `staging` would load version 2 again: it stays loaded when its
    last session ends. Version 3, which nothing resolves to, is unloaded."""
    store = ModelStore(store_root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=3)
    publish_random(store, "tok", TOKEN_CONFIG, seed=4)
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="production", version=1))
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="staging", version=2))
    for version in ("staging", "3"):
        created = await _create(client, version)
        await client.sessions.CloseSession(
            pb.CloseSessionRequest(session_id=created.session.session_id)
        )

    async def unloaded() -> dict[int, bool] | None:
        loaded = {v.version: v.loaded for v in (await _model(client, "tok")).versions}
        return None if loaded[3] else loaded

    # The unload runs just after the close returns.
    assert await until(unloaded, 60, "version 3's unload") == {1: True, 2: True, 3: False}


def _damage(weights: Path) -> None:
    """Flip the last byte: the file no longer hashes to its manifest's sha256."""
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


async def test_registry_refusals_name_files_within_the_store(
    client: SeqServeClient, store_root: Path
) -> None:
    """SetAlias and DeleteAlias refusals name the file at fault as GetModel does, within the
    store (`tok/2/weights.safetensors`), never where the store is on the server: a version whose
    weights fail their digest, one without weights, a malformed aliases.json."""
    store = ModelStore(store_root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=3)
    publish_random(store, "tok", TOKEN_CONFIG, seed=4)
    _damage(store_root / "tok" / "2" / "weights.safetensors")
    (store_root / "tok" / "3" / "weights.safetensors").unlink()
    (store_root / "frames" / "aliases.json").write_text("{not json")
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    registry = client.registry

    refusals = [
        await expect_status(
            registry.SetAlias(reg.SetAliasRequest(name="tok", alias="staging", version=2)),
            precondition,
            "version 2 of 'tok' cannot be aliased: tok/2/weights.safetensors: sha256 mismatch",
        ),
        await expect_status(
            registry.SetAlias(reg.SetAliasRequest(name="tok", alias="staging", version=3)),
            precondition,
            "version 3 of 'tok' is unusable: tok/3/weights.safetensors: missing",
        ),
        await expect_status(
            registry.SetAlias(reg.SetAliasRequest(name="frames", alias="staging", version=1)),
            precondition,
            "frames/aliases.json: unreadable: ",
            "fix or remove it first",
        ),
        await expect_status(
            registry.DeleteAlias(reg.DeleteAliasRequest(name="frames", alias="production")),
            precondition,
            "frames/aliases.json: unreadable: ",
        ),
    ]
    for details in refusals:
        assert str(store_root) not in details, details
    assert not (store_root / "tok" / "aliases.json").exists()  # nothing was changed
    assert (store_root / "frames" / "aliases.json").read_text() == "{not json"


async def test_registry_reads_of_a_missing_or_unreadable_store_do_not_name_it(
    client: SeqServeClient, store_root: Path
) -> None:
    """The store renamed away, then its path a file: GetModel and ListModels say so as
    CreateSession does, as "the model store", not by its path on the server."""
    away = store_root.with_name("store.away")
    store_root.rename(away)
    details = await expect_status(
        client.registry.GetModel(reg.GetModelRequest(name="tok")),
        grpc.StatusCode.NOT_FOUND,
        "model 'tok' not found; available: none (the model store is empty or missing)",
    )
    assert str(store_root) not in details, details
    store_root.write_text("not a folder")
    for call in (
        client.registry.ListModels(reg.ListModelsRequest()),
        client.registry.GetModel(reg.GetModelRequest(name="tok")),
    ):
        details = await expect_status(
            call,
            grpc.StatusCode.FAILED_PRECONDITION,
            "the model store is not a readable folder: Not a directory",
        )
        assert str(store_root) not in details, details


async def _listed(client: SeqServeClient) -> dict[str, reg.ModelSummary]:
    models = (await client.registry.ListModels(reg.ListModelsRequest())).models
    return {m.name: m for m in models}


async def test_list_models_lists_only_versions_that_serve(
    client: SeqServeClient, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version whose weights fail their digest is REFUSED in GetModel and refused by
    CreateSession, so ListModels leaves it out, as it leaves out one with a malformed manifest;
    listed again once its weights are whole. Each weights file is hashed once per change, not at
    every listing."""
    store = ModelStore(store_root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=3)
    publish_random(store, "tok", TOKEN_CONFIG, seed=4)
    weights = store_root / "tok" / "2" / "weights.safetensors"
    whole = weights.read_bytes()
    _damage(weights)
    reads: list[Path] = []
    real = digests.read_verified

    def counting(path: Path, expected: str) -> bytes:
        reads.append(path)
        return real(path, expected)

    monkeypatch.setattr(digests, "read_verified", counting)  # the server runs in this process

    for _ in range(3):
        assert list((await _listed(client))["tok"].versions) == [1, 3]
    assert sorted(reads) == sorted(set(reads)), reads  # no file hashed twice
    statuses = {v.version: v.status for v in (await _model(client, "tok")).versions}
    assert statuses == {
        1: reg.VERSION_STATUS_OK,
        2: reg.VERSION_STATUS_REFUSED,
        3: reg.VERSION_STATUS_OK,
    }
    await expect_status(_create(client, "2"), grpc.StatusCode.DATA_LOSS, "sha256 mismatch")

    weights.write_bytes(whole)
    assert list((await _listed(client))["tok"].versions) == [1, 2, 3]
    assert (await _create(client, "2")).session.version == 2


async def test_a_default_that_new_sessions_would_be_refused_on_is_reported_as_0(
    client: SeqServeClient, store_root: Path
) -> None:
    """`production` set, then its version's weights damaged: CreateSession with no version is
    refused (the alias is what was chosen; no other version is served in its place), so
    ListModels and GetModel report default_version 0, as for an alias to a missing version,
    not the alias's version. Whole again, all three say version 2."""
    store = ModelStore(store_root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=3)
    publish_random(store, "tok", TOKEN_CONFIG, seed=4)
    await client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="production", version=2))
    weights = store_root / "tok" / "2" / "weights.safetensors"
    whole = weights.read_bytes()

    async def defaults() -> tuple[int, int]:
        return (await _listed(client))["tok"].default_version, (
            await _model(client, "tok")
        ).default_version

    assert await defaults() == (2, 2)
    _damage(weights)
    assert await defaults() == (0, 0)
    await expect_status(_create(client), grpc.StatusCode.DATA_LOSS, "sha256 mismatch")

    weights.unlink()  # gone: refused too
    assert await defaults() == (0, 0)
    await expect_status(_create(client), grpc.StatusCode.FAILED_PRECONDITION, "missing")

    (store_root / "tok" / "aliases.json").write_text('{"production": 9}')  # not in the store
    assert await defaults() == (0, 0)
    await expect_status(_create(client), grpc.StatusCode.NOT_FOUND, "version 9")

    weights.write_bytes(whole)
    (store_root / "tok" / "aliases.json").write_text('{"production": 2}')
    assert await defaults() == (2, 2)
    assert (await _create(client)).session.version == 2


@pytest.mark.parametrize("damaged", [False, True])
async def test_an_aliased_version_stays_loaded_when_production_is_refused(
    server_factory: ServerFactory, tmp_path: Path, damaged: bool
) -> None:
    """`staging` names version 1 and `production` version 2. With version 2's weights failing
    their digest (new sessions asking for "" are refused), closing the last session on
    `staging` still leaves version 1 loaded: the alias keeps it (a refused default made the
    unload forget the aliases, and the next `staging` session paid a reload)."""
    root = tmp_path / "aliased"
    store = ModelStore(root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=1)
    publish_random(store, "tok", TOKEN_CONFIG, seed=2)
    store.set_alias("tok", "production", 2)
    store.set_alias("tok", "staging", 1)
    if damaged:
        weights = next((root / "tok" / "2").glob("*.safetensors"))
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    srv = await server_factory(store_root=root)
    async with SeqServeClient(f"127.0.0.1:{srv.port}") as c:
        session = await c.create_session("tok", "staging")
        await session.feed(tokens=[1])
        await session.close()
        await asyncio.sleep(0.5)  # the unload, when there is one, runs just after the close
    assert srv.engine.versions.find("tok", 1) is not None


async def test_an_alias_past_every_version_number_is_a_broken_alias_file(
    client: SeqServeClient, store_root: Path
) -> None:
    """aliases.json naming a version past any folder's (past int64 here) is malformed like any
    other: ListModels still lists every model, GetModel answers, alias writes are refused and
    change nothing, version numbers still serve. The number was copied into the reply's int64
    map, which raised: INTERNAL for the whole listing, and for SetAlias after it had written."""
    body = '{"production": 1, "staging": 99999999999999999999}'
    (store_root / "tok" / "aliases.json").write_text(body)
    models = {m.name: m for m in (await client.registry.ListModels(reg.ListModelsRequest())).models}
    assert sorted(models) == ["frames", "tok"]
    assert not models["tok"].aliases
    tok = await _model(client, "tok")
    assert [v.version for v in tok.versions] == [1]
    for call in (
        client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="canary", version=1)),
        client.registry.DeleteAlias(reg.DeleteAliasRequest(name="tok", alias="staging")),
        _create(client),
    ):
        await expect_status(
            call, grpc.StatusCode.FAILED_PRECONDITION, "tok/aliases.json", "at most 999999999"
        )
    assert (store_root / "tok" / "aliases.json").read_text() == body
    made = await _create(client, version="1")
    assert made.session.version == 1


def _republish(store_root: Path) -> None:
    """`tok` deleted from the store and published again: version 1 once more, other weights."""
    shutil.rmtree(store_root / "tok")
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=5)


async def test_a_version_republished_under_its_number_serves_the_files_on_disk(
    server: SeqServeServer, client: SeqServeClient, store_root: Path
) -> None:
    """Its copy loaded (the default version) and no session on it, `tok` is deleted and
    published again as version 1 (no store polling): GetModel reports the version OK but not
    loaded, since the copy loaded is not these files (it said loaded, with the new fingerprint,
    while every CreateSession was refused), and the next CreateSession gets the new files."""
    first = await _create(client)
    await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=first.session.session_id))
    await server.engine.settle()  # the close's unload check, done before the store changes
    assert server.engine.versions.find("tok", 1) is not None  # the default: kept loaded
    _republish(store_root)
    tok = await _model(client, "tok")
    (v1,) = tok.versions
    assert v1.fingerprint != first.session.fingerprint
    assert (v1.status, v1.loaded, v1.live_sessions) == (reg.VERSION_STATUS_OK, False, 0)
    assert tok.default_version == 1
    assert list((await _listed(client))["tok"].versions) == [1]
    created = await _create(client)
    assert (created.session.version, created.session.fingerprint) == (1, v1.fingerprint)
    (v1,) = (await _model(client, "tok")).versions
    assert (v1.status, v1.loaded, v1.live_sessions) == (reg.VERSION_STATUS_OK, True, 1)


async def test_a_republished_version_whose_old_copy_has_sessions_is_reported_refused(
    client: SeqServeClient, store_root: Path
) -> None:
    """A session runs on the copy loaded when `tok` is published again as version 1: new
    sessions are refused, and the registry says so (REFUSED with the reason, not loaded,
    default 0, not listed) instead of reporting the new fingerprint loaded and OK. Once the
    session is closed the version is OK again and the next session gets the new files."""
    running = await _create(client)
    _republish(store_root)
    await expect_status(
        _create(client), grpc.StatusCode.FAILED_PRECONDITION, "manifest on disk changed"
    )
    tok = await _model(client, "tok")
    (v1,) = tok.versions
    assert v1.fingerprint != running.session.fingerprint
    assert (v1.status, v1.loaded, v1.live_sessions) == (reg.VERSION_STATUS_REFUSED, False, 1)
    assert "manifest on disk changed" in v1.status_reason
    assert running.session.fingerprint in v1.status_reason  # the copy the session runs on
    assert tok.default_version == 0
    listed = (await _listed(client))["tok"]
    assert (list(listed.versions), listed.default_version) == ([], 0)
    await client.sessions.CloseSession(
        pb.CloseSessionRequest(session_id=running.session.session_id)
    )
    tok = await _model(client, "tok")
    (v1,) = tok.versions
    assert (v1.status, v1.live_sessions, tok.default_version) == (reg.VERSION_STATUS_OK, 0, 1)
    created = await _create(client)
    assert (created.session.version, created.session.fingerprint) == (1, v1.fingerprint)
    (v1,) = (await _model(client, "tok")).versions
    assert v1.loaded and v1.live_sessions == 1
