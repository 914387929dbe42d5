"""Every JSON route over a real socket, each answer compared with gRPC's for the same inputs."""

from __future__ import annotations

import aiohttp
import grpc
import jsonschema
import pytest

from service.api.server import SeqServeServer
from service.http.calls import to_json
from service.http.openapi import ERROR_SCHEMA
from service.http.status_map import HTTP_STATUS
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as reg_grpc
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types

# Fields that differ between two sessions made alike (ids and clocks).
_VOLATILE = ("sessionId", "createdAt", "expiresAt", "parentSessionId")


def _stable(session: dict) -> dict:
    return {k: v for k, v in session.items() if k not in _VOLATILE}


async def _json(response: aiohttp.ClientResponse, status: int = 200) -> dict:
    body = await response.json()
    assert response.status == status, body
    return body


async def test_models_read_the_same_as_over_grpc(
    http: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    stub = reg_grpc.ModelRegistryStub(channel)
    listed = await _json(await http.get("/v1/models"))
    assert listed == to_json(await stub.ListModels(reg_pb.ListModelsRequest()))
    assert {m["name"] for m in listed["models"]} == {"tok", "frames"}
    detail = await _json(await http.get("/v1/models/tok"))
    assert detail == to_json(await stub.GetModel(reg_pb.GetModelRequest(name="tok")))
    assert detail["model"]["versions"][0]["version"] == "1"  # int64: a string in JSON


async def test_a_session_lives_over_http_as_over_grpc(
    http: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    """Create (with a prefix), step, fork, step the fork, get, close: each JSON answer equals
    the gRPC answer for a twin session fed the same inputs."""
    stub = pb_grpc.SessionServiceStub(channel)
    create = {"model": "tok", "seed": "7", "prefix": {"tokens": {"ids": [1, 2, 3]}},
              "options": {"topK": 4}}  # fmt: skip
    made = await _json(await http.post("/v1/sessions", json=create))
    twin = await stub.CreateSession(
        pb.CreateSessionRequest(
            model="tok", seed=7, prefix=types.Input(tokens=types.Tokens(ids=[1, 2, 3])),
            options=types.PredictionOptions(top_k=4),
        )
    )  # fmt: skip
    sid, twin_id = made["session"]["sessionId"], twin.session.session_id
    expected = to_json(twin)
    assert _stable(made.pop("session")) == _stable(expected.pop("session"))
    assert made == expected and made["prediction"]["tokens"]["top"]

    step = {"input": {"text": "hi"}, "expectedPosition": "3", "requestId": "r1",
            "options": {"topK": 3, "perPosition": True}}  # fmt: skip
    stepped = await _json(await http.post(f"/v1/sessions/{sid}:step", json=step))
    twin_step = await stub.Step(
        pb.StepRequest(
            session_id=twin_id, input=types.Input(text="hi"), expected_position=3,
            request_id="r1", options=types.PredictionOptions(top_k=3, per_position=True),
        )
    )  # fmt: skip
    assert stepped == {**to_json(twin_step), "sessionId": sid}
    assert stepped["position"] == "5" and len(stepped["perPosition"]) == 2

    fork = await _json(await http.post(f"/v1/sessions/{sid}:fork", json={"seed": "9"}))
    child = fork["session"]
    assert child["parentSessionId"] == sid and child["position"] == "5"
    fed = await _json(
        await http.post(f"/v1/sessions/{child['sessionId']}:step", json={"input": {"text": "!"}})
    )
    twin_fed = await stub.Step(pb.StepRequest(session_id=twin_id, input=types.Input(text="!")))
    assert fed["prediction"] == to_json(twin_fed)["prediction"]

    got = await _json(await http.get(f"/v1/sessions/{sid}"))
    twin_got = await stub.GetSession(pb.GetSessionRequest(session_id=twin_id))
    assert got["session"]["position"] == "5"  # the fork's step did not move the parent
    assert _stable(got["session"]) | {"position": "6"} == _stable(to_json(twin_got)["session"])

    closed = await _json(await http.delete(f"/v1/sessions/{sid}"))
    assert closed["session"]["state"] == "SESSION_STATE_CLOSED"
    gone = await _json(await http.get(f"/v1/sessions/{sid}"), 400)  # FAILED_PRECONDITION
    assert gone["error"]["status"] == "FAILED_PRECONDITION"


async def test_frames_and_regression_over_http(
    http: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.SessionServiceStub(channel)
    sid = (await _json(await http.post("/v1/sessions", json={"model": "frames"})))["session"][
        "sessionId"
    ]
    twin = (await stub.CreateSession(pb.CreateSessionRequest(model="frames"))).session.session_id
    values = [0.5, -1.0, 2.0, 0.25, 0.0, 1.5]  # two frames of three
    stepped = await _json(
        await http.post(f"/v1/sessions/{sid}:step", json={"input": {"frames": {"values": values}}})
    )
    twin_step = await stub.Step(
        pb.StepRequest(session_id=twin, input=types.Input(frames=types.Frames(values=values)))
    )
    assert stepped["prediction"] == to_json(twin_step)["prediction"]
    assert len(stepped["prediction"]["regression"]["values"]) == 2


async def test_the_route_key_header_is_embedded_in_the_id(http: aiohttp.ClientSession) -> None:
    made = await _json(
        await http.post(
            "/v1/sessions", json={"model": "tok"}, headers={"x-seqserve-route": "user-42"}
        )
    )
    assert made["session"]["sessionId"].startswith("s_user-42.")


async def test_the_openapi_document_covers_every_route(
    http: aiohttp.ClientSession, http_server: SeqServeServer
) -> None:
    doc = await _json(await http.get("/v1/openapi.json"))
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    routes = {
        (r.method, r.resource.canonical)
        for r in http_server.parts.http.app.router.routes()
        if r.resource is not None and r.resource.canonical.startswith("/v1/")
        and r.method not in ("HEAD", "*")  # "*": the 405s of /v1/sessions/{id}
    }  # fmt: skip
    for method, path in routes:
        if path == "/v1/openapi.json":
            continue
        if path == "/v1/sessions/{id}" and method == "POST":  # the :verb routes
            for verb in ("fork", "step", "generate"):
                assert "post" in paths[f"/v1/sessions/{{id}}:{verb}"]
            continue
        assert method.lower() in paths[path], (method, path)
    schemas = doc["components"]["schemas"]

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        kind, name = ref.removeprefix("#/components/").split("/", 1)
        assert name in doc["components"][kind], ref
    step = schemas["seqserve.v1.StepRequest"]["properties"]
    assert {"sessionId", "requestId", "input", "options", "expectedPosition"} <= set(step)


def _resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        kind, name = node["$ref"].removeprefix("#/components/").split("/", 1)
        node = doc["components"][kind][name]
    return node


async def test_the_openapi_document_lists_every_error_status_the_server_gives(
    http: aiohttp.ClientSession, http_server: SeqServeServer
) -> None:
    """Every operation lists every status the gRPC → HTTP mapping answers errors with (the
    error body's schema with it), and each error provoked here, 405s included, is one its
    operation lists, its body valid by that schema."""
    doc = await _json(await http.get("/v1/openapi.json"))
    operations = {(m, path): op for path, item in doc["paths"].items() for m, op in item.items()}
    error_schema = ERROR_SCHEMA
    jsonschema.Draft202012Validator.check_schema(error_schema)
    for (method, path), op in operations.items():
        for status in set(HTTP_STATUS.values()) - {200}:
            response = _resolve(doc, op["responses"].get(str(status), {"missing": True}))
            assert "missing" not in response, (method, path, status)
            if status != 499:  # the client is gone: no body
                schema = _resolve(doc, response["content"]["application/json"]["schema"])
                assert schema == error_schema, (method, path, status)
    sid = (await _json(await http.post("/v1/sessions", json={"model": "tok"})))["session"][
        "sessionId"
    ]
    provoked = [
        ("get", "/v1/models/{model}", "GET", "/v1/models/nope", None),
        ("post", "/v1/sessions", "POST", "/v1/sessions", {"model": "nope"}),
        ("post", "/v1/sessions", "POST", "/v1/sessions", {"color": "red"}),
        ("get", "/v1/sessions/{id}", "GET", "/v1/sessions/s_gone", None),
        ("get", "/v1/sessions/{id}", "GET", f"/v1/sessions/{sid}:fork", None),
        ("delete", "/v1/sessions/{id}", "DELETE", f"/v1/sessions/{sid}:step", None),
        ("post", "/v1/sessions/{id}:fork", "POST", "/v1/sessions/s_gone:fork", {}),
        ("post", "/v1/sessions/{id}:step", "POST", f"/v1/sessions/{sid}:step",
         {"input": {"tokens": {"ids": [10**6]}}}),
        ("post", "/v1/sessions/{id}:step", "POST", f"/v1/sessions/{sid}:step",
         {"input": {"text": "a"}, "expectedPosition": "99"}),
        ("post", "/v1/sessions/{id}:generate", "POST", f"/v1/sessions/{sid}:generate", []),
    ]  # fmt: skip
    seen = set()
    for method, path, verb, url, body in provoked:
        answer = await http.request(verb, url, json=body)
        assert answer.status >= 400, (verb, url)
        assert str(answer.status) in operations[(method, path)]["responses"], (verb, url)
        jsonschema.validate(await answer.json(), error_schema)
        seen.add(answer.status)
    http_server.parts.http.begin_draining()  # every operation: 503
    for method, path, verb, url, body in provoked:
        answer = await http.request(verb, url, json=body)
        if answer.status != 405:  # the guard's, before any call
            assert answer.status == 503, (verb, url)
            assert "503" in operations[(method, path)]["responses"]
        jsonschema.validate(await answer.json(), error_schema)
    assert {400, 404, 405} <= seen, seen


@pytest.mark.parametrize(
    "path",
    ["/nope", "/v1/sessions/s_x:dance", "/v1/models/tok/extra", "/static/", "/static/nope.js",
     "/static/../index.html", "/static/index.html/x"],
)  # fmt: skip
async def test_unknown_routes_are_404(http: aiohttp.ClientSession, path: str) -> None:
    response = await http.post(path, json={}) if ":" in path else await http.get(path)
    assert response.status == 404
    error = (await response.json())["error"]  # the JSON error body, as for any other answer
    assert error["details"][0]["reason"] == "ROUTE_NOT_FOUND", error


async def test_the_playground_page_and_its_files_are_served(http: aiohttp.ClientSession) -> None:
    page = await http.get("/")
    assert page.status == 200 and "text/html" in page.headers["content-type"]
    html = await page.text()
    for asset in ("/static/playground.js", "/static/playground.css"):
        assert asset in html
        response = await http.get(asset)
        assert response.status == 200, asset
    assert "https://" not in html  # nothing from a CDN: it works offline
