"""The HTTP/JSON routes: each one is a seqserve.v1 method, called through the gRPC servicer with
the body parsed by protobuf's JSON mapping, so one JSON document reads the same over both.

    GET    /v1/models                     ListModels
    GET    /v1/models/{model}             GetModel
    POST   /v1/sessions                   CreateSession   (body: CreateSessionRequest)
    GET    /v1/sessions/{id}              GetSession
    DELETE /v1/sessions/{id}              CloseSession
    POST   /v1/sessions/{id}:fork         ForkSession     (body: ForkSessionRequest)
    POST   /v1/sessions/{id}:step         Step            (body: StepRequest)
    POST   /v1/sessions/{id}:generate     Generate        (body: GenerateRequest) → SSE

A route's path with another method is 405 with `Allow` (the guard answers it), a path no route
takes 404: `/v1/sessions/{id}` is two paths in one route, the session itself (GET, DELETE) and
its custom methods (`{id}:fork` and the others: POST), so its handlers tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import HttpVersion11, hdrs, web
from google.protobuf.message import Message

from service.api.registry_servicer import RegistryServicer
from service.api.session_servicer import SessionServicer
from service.errors import RouteNotFound, SeqServeError, Unauthenticated, Unavailable, quote
from service.http.calls import Calls, HttpContext, error_answer, json_answer, to_json
from service.http.protocol import expect_continue
from service.http.status_map import HttpError
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.security.call_auth import REVOKED_MESSAGE, Grant, current_grant

SESSIONS = "/seqserve.v1.SessionService/"
REGISTRY = "/seqserve.v1.ModelRegistry/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# `POST /v1/sessions/{id}:verb`: the SessionService method each verb calls.
SESSION_VERBS = {"fork": "ForkSession", "step": "Step", "generate": "Generate"}


def _posted_method(request: web.Request) -> str | None:
    """The SessionService method a POST with a body calls (None: no such route)."""
    if request.method != hdrs.METH_POST:
        return None
    if request.path == "/v1/sessions":
        return "CreateSession"
    session_id, colon, verb = request.match_info.get("id", "").rpartition(":")
    return SESSION_VERBS.get(verb) if colon and session_id else None


class Routes:
    def __init__(self, calls: Calls, sessions: SessionServicer, registry: RegistryServicer) -> None:
        self.calls = calls
        self.sessions = sessions
        self.registry = registry
        self._streams: set[asyncio.Task[Any]] = set()  # the generations being sent
        # Those cancelled to end with an error (`end_streams`, a revoked token), and the error.
        self._ended: dict[asyncio.Task[Any], SeqServeError] = {}

    def add_to(self, app: web.Application) -> None:
        router, expect = app.router, self._expect  # JSON, not aiohttp's text 417
        router.add_get("/v1/models", self.list_models, expect_handler=expect)
        router.add_get("/v1/models/{model}", self.get_model, expect_handler=expect)
        router.add_post("/v1/sessions", self.create_session, expect_handler=expect)
        router.add_get("/v1/sessions/{id}", self.get_session, expect_handler=expect)
        router.add_delete("/v1/sessions/{id}", self.close_session, expect_handler=expect)
        # {id}:fork, :step, :generate; then PUT, PATCH, … (405)
        router.add_post("/v1/sessions/{id}", self.session_verb, expect_handler=expect)
        router.add_route("*", "/v1/sessions/{id}", self.other_method, expect_handler=expect)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`expect_continue`, but a call with a body that would be refused before its body is
        read (no or bad credentials, a drain, not ready, over the size limit) gets that final
        answer instead of `100 Continue`, counted as the call, the connection closed."""
        method = _posted_method(request)
        if (
            method is not None
            and request.version == HttpVersion11
            and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
        ):
            refused = self.calls.refusal_before_body(SESSIONS + method, request)
            if refused is not None:
                answer = error_answer(refused)
                answer.force_close()
                return answer
        return await expect_continue(request)

    async def _unary(
        self,
        request: web.Request,
        service: str,
        method: str,
        run: Callable[[HttpContext], Awaitable[Message]],
    ) -> web.Response:
        try:
            async with self.calls.call(service + method, request):
                return json_answer(await run(HttpContext(request)))
        except Exception as exc:
            return error_answer(exc)

    async def list_models(self, request: web.Request) -> web.Response:
        return await self._unary(
            request, REGISTRY, "ListModels",
            lambda ctx: self.registry.ListModels(reg_pb.ListModelsRequest(), ctx),
        )  # fmt: skip

    async def get_model(self, request: web.Request) -> web.Response:
        message = reg_pb.GetModelRequest(name=request.match_info["model"])
        return await self._unary(
            request, REGISTRY, "GetModel", lambda ctx: self.registry.GetModel(message, ctx)
        )

    async def create_session(self, request: web.Request) -> web.Response:
        async def run(ctx: HttpContext) -> Message:
            message = await self.calls.parse(request, pb.CreateSessionRequest())
            return await self.sessions.CreateSession(message, ctx)

        return await self._unary(request, SESSIONS, "CreateSession", run)

    async def get_session(self, request: web.Request) -> web.Response:
        _check_method(request)
        message = pb.GetSessionRequest(session_id=request.match_info["id"])
        return await self._unary(
            request, SESSIONS, "GetSession", lambda ctx: self.sessions.GetSession(message, ctx)
        )

    async def close_session(self, request: web.Request) -> web.Response:
        _check_method(request)
        message = pb.CloseSessionRequest(session_id=request.match_info["id"])
        return await self._unary(
            request, SESSIONS, "CloseSession", lambda ctx: self.sessions.CloseSession(message, ctx)
        )

    async def session_verb(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/sessions/{id}:verb` (a custom method in the AIP-136 style)."""
        session_id, colon, verb = request.match_info["id"].rpartition(":")
        if not colon:  # `POST /v1/sessions/{id}`: the session itself, which takes no POST
            raise web.HTTPMethodNotAllowed(request.method, _session_methods(request))
        if not session_id or verb not in SESSION_VERBS:
            return error_answer(
                RouteNotFound(
                    f"no route POST /v1/sessions/{quote(request.match_info['id'])}: expected "
                    "/v1/sessions/{id}:fork, :step or :generate"
                )
            )
        if verb == "generate":
            return await self.generate(request, session_id)
        if verb == "fork":

            async def fork(ctx: HttpContext) -> Message:
                message = await self.calls.parse(
                    request, pb.ForkSessionRequest(), session_id=session_id
                )
                return await self.sessions.ForkSession(message, ctx)

            return await self._unary(request, SESSIONS, "ForkSession", fork)

        async def step(ctx: HttpContext) -> Message:
            message = await self.calls.parse(request, pb.StepRequest(), session_id=session_id)
            return await self.sessions.Step(message, ctx)

        return await self._unary(request, SESSIONS, "Step", step)

    async def other_method(self, request: web.Request) -> web.StreamResponse:
        """Any other method of `/v1/sessions/{id}` (PUT, PATCH, OPTIONS): 405 with the `Allow`
        of the path it names, not aiohttp's, which would list every method of the route."""
        raise web.HTTPMethodNotAllowed(request.method, _session_methods(request))

    async def generate(self, request: web.Request, session_id: str) -> web.StreamResponse:
        """Server-sent events: `token` per generated token (a GenerateResponse), then `done`
        with the finish reason and position, or `error` if the generation fails after its
        first token (also when it outlives a shutdown's grace period: see `end_streams`). An
        error before the first token is a plain JSON error answer. Closing the connection
        cancels the generation (its tokens so far stay in the session); so does a token
        revoked while it streams (an `error` event, UNAUTHENTICATED): seen before each event,
        and by the revocation watch while the call waits (a client that reads nothing)."""
        response: web.StreamResponse | None = None
        task = asyncio.current_task()
        assert task is not None
        try:
            async with self.calls.call(SESSIONS + "Generate", request, lasting=True):
                with self._drainable(task):
                    message = await self.calls.parse(
                        request, pb.GenerateRequest(), session_id=session_id
                    )
                    grant = current_grant.get()  # taken with the principal (`Calls.call`)
                    if grant is not None:
                        grant.check()  # revoked while the body came: nothing runs
                    tokens = self.sessions.Generate(message, HttpContext(request))
                    with self._watched(grant, task):
                        async with contextlib.aclosing(tokens) as stream:  # type: ignore[type-var]
                            last: pb.GenerateResponse | None = None
                            async for reply in stream:
                                if grant is not None:
                                    grant.check()  # revoked meanwhile: an `error` event
                                if response is None:  # the generation started: commit to SSE
                                    response = await _event_stream(request)
                                await _send(response, "token", to_json(reply))
                                last = reply
                    if response is None:  # max_tokens 0 or the like: nothing generated
                        response = await _event_stream(request)
                    done = {
                        "sessionId": session_id,
                        "position": str(last.position) if last is not None else None,
                        "finishReason": to_json(last.token).get("finishReason")
                        if last is not None
                        else None,
                    }
                # Out of `_drainable`: a generation writing its `done` is left to finish it
                # (a drain or a revocation now would put an `error` after its last token).
                await _send(response, "done", done)
        except ConnectionResetError:  # the client closed the connection: nothing to answer
            return response if response is not None else web.Response(status=499)
        except Exception as exc:
            if response is None:
                return error_answer(exc)
            with contextlib.suppress(ConnectionResetError):
                await _send(response, "error", HttpError(exc).body)
        assert response is not None
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    def end_streams(self) -> None:
        """End every generation still being sent with an `error` event (UNAVAILABLE, DRAINING)
        and a finished body: called when a shutdown's grace period is over, while the
        connections are still open. (The runner would cancel the handlers later and close the
        connections mid-body, leaving each client a broken response and no reason.)"""
        draining = Unavailable(
            "server is draining: the generation ran past the shutdown grace period (its "
            "tokens so far are in the session); retry on another replica"
        )
        for task in self._streams:
            self._end(task, draining)

    def _end(self, task: asyncio.Task[Any], error: SeqServeError) -> bool:
        """Cancel `task`, a generation being sent, to end with `error` (False: it is ending
        already). Only while it is in `_drainable`, where the cancel becomes `error`: the
        revocation watch takes a call's `end` before it runs it, and the call may have finished
        meanwhile; cancelled then, it would lose its body's end, and stay in `_ended` for good."""
        if task not in self._streams or task in self._ended:
            return False
        self._ended[task] = error
        task.cancel()
        return True

    @contextlib.contextmanager
    def _watched(self, grant: Grant | None, task: asyncio.Task[Any]) -> Iterator[None]:
        """While the generation runs, the revocation watch looks at its `grant`: a call that
        waits (its client reads nothing, so its write waits) never reaches its own check."""
        watch = self.calls.revocations
        if grant is None or watch is None:
            yield
            return

        async def end() -> bool:
            return self._end(task, Unauthenticated(REVOKED_MESSAGE))

        watch.watch(grant, end)
        try:
            yield
        finally:
            watch.unwatch(grant)

    @contextlib.contextmanager
    def _drainable(self, task: asyncio.Task[Any]) -> Iterator[None]:
        """A cancellation of `task` by `_end` as the call's error (UNAVAILABLE for a drain,
        UNAUTHENTICATED for a revoked token); any other (the client hung up, the runner gave
        up) goes on as a cancellation. `task` is in `_streams` (one `_end` may end) exactly
        while it is in here."""
        self._streams.add(task)
        try:
            yield
        except asyncio.CancelledError:
            error = self._ended.get(task)
            if error is None:
                raise
            task.uncancel()  # ours, and taken: the call ends with an answer instead
            raise error from None
        finally:
            self._streams.discard(task)
            self._ended.pop(task, None)


def _session_methods(request: web.Request) -> list[str]:
    """The methods of the path `/v1/sessions/{id}` names: POST for `{id}:fork` (`:step`,
    `:generate`); GET (and HEAD) and DELETE for anything else, a session id (no session id has
    a colon, so `{id}:dance` is one no session has, and its POST no route: 404)."""
    session_id, _, verb = request.match_info["id"].rpartition(":")
    if session_id and verb in SESSION_VERBS:
        return ["POST"]
    return ["DELETE", "GET", "HEAD"]


def _check_method(request: web.Request) -> None:
    """A known path with another method is 405 with `Allow` (the guard answers it): a GET or
    DELETE of `{id}:fork` is not "session '{id}:fork' not found", and a POST of `{id}` is not
    "no route"."""
    allowed = _session_methods(request)
    if request.method not in allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)


async def _event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        }
    )
    await response.prepare(request)
    return response


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
