"""The load of the churn benchmarks: sessions created and fed one token each, over gRPC, from
child processes (`make_sessions`): as the Python client does it (request ids, a routing key,
the expected position), or in one call with a one-token prefix. Used by `benchmarks.memory`,
`benchmarks.churn` and `benchmarks.shutdown`.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import secrets
import time

ROUTE = "x-seqserve-route"


async def _make_sessions(target: str, model: str, count: int, workers: int, prefix: bool) -> int:
    """`count` sessions, each created and fed one token; returns the errors."""
    import grpc

    from service.pb.seqserve.v1 import session_service_pb2 as pb
    from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
    from service.pb.seqserve.v1 import types_pb2 as types

    one = types.Input(tokens=types.Tokens(ids=[101]))
    errors, left = 0, count
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionServiceStub(channel)

        async def worker() -> None:
            nonlocal errors, left
            while left > 0:
                left -= 1
                route = secrets.token_urlsafe(6)
                request = pb.CreateSessionRequest(model=model, request_id=secrets.token_hex(8))
                if prefix:
                    request.prefix.CopyFrom(one)
                try:
                    made = await stub.CreateSession(request, metadata=((ROUTE, route),))
                    if not prefix:
                        step = pb.StepRequest(
                            session_id=made.session.session_id, request_id=secrets.token_hex(8),
                            input=one, expected_position=0,
                        )  # fmt: skip
                        await stub.Step(step, metadata=((ROUTE, route),))
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    return errors


def _client_main(target: str, model: str, count: int, workers: int, prefix: bool, go, out) -> None:  # type: ignore[no-untyped-def]
    go.wait()
    started = time.time()
    try:
        errors = asyncio.run(_make_sessions(target, model, count, workers, prefix))
    except BaseException:
        out.put((started, time.time(), -1))  # never leave the parent waiting
        raise
    out.put((started, time.time(), errors))


def make_sessions(
    target: str, model: str, count: int, concurrency: int, clients: int, prefix: bool = False
) -> dict[str, float]:
    """Create + first feed `count` sessions from `clients` processes; rate and errors."""
    ctx = mp.get_context("spawn")  # no inherited gRPC state
    go, out = ctx.Event(), ctx.Queue()
    shares = [count // clients + (i < count % clients) for i in range(clients)]
    workers = [concurrency // clients + (i < concurrency % clients) for i in range(clients)]
    procs = [
        ctx.Process(target=_client_main, args=(target, model, n, w, prefix, go, out))
        for n, w in zip(shares, workers, strict=True)
    ]
    for proc in procs:
        proc.start()
    time.sleep(3.0)  # imports done before the clock starts
    load = os.getloadavg()[0]
    go.set()
    results: list[tuple[float, float, int]] = []  # (started, ended, errors) per process
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=5.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a load process failed") from None
    for proc in procs:
        proc.join()
    if any(r[2] < 0 for r in results):
        raise RuntimeError("a load process failed")
    seconds = max(r[1] for r in results) - min(r[0] for r in results)
    return {
        "sessions": count,
        "seconds": seconds,
        "sessions_per_second": count / seconds,
        "errors": sum(r[2] for r in results),
        "load_average_1m_before": load,
    }
