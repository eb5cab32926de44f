"""Tests of service.connections: a worker above its share of the requests asks clients to reconnect, and a real
server with two workers spreads one client pool's keep-alive connections over both."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from inference.imaging import encode_png
from service.app import asgi_middlewares
from service.auth import AccessControl
from service.connections import ConnectionRebalancing
from service.settings import ServiceSettings, SettingsError
from service.statistics import requests_by_worker, server_folder
from tests.support.color_package import color_pixels, make_color_package
from tests.support.servers import SERVICE_TEST_SETTINGS, start_server, stop_server, wait_until, workers

OTHER = os.getpid() + 1  # another worker's process id


def plain_app() -> Starlette:
    return Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok", headers={"x-kept": "1"}))])


def closes(middleware: ConnectionRebalancing, answers: int) -> list[bool]:
    """Which of `answers` GET requests through `middleware` were answered with Connection: close."""

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get("/") for _ in range(answers)]

    responses = asyncio.run(run())
    assert all(response.text == "ok" and response.headers["x-kept"] == "1" for response in responses)
    return [response.headers.get("connection") == "close" for response in responses]


def test_a_worker_above_its_share_closes_the_connection_at_each_look():
    # Between looks this worker answered 30 and the other 10: 75% of the requests, above an even 50%.
    looks = iter([{os.getpid(): 30, OTHER: 10}, {os.getpid(): 60, OTHER: 20}])
    middleware = ConnectionRebalancing(plain_app(), workers=2, every=3, counts=lambda: next(looks))
    assert closes(middleware, 6) == [False, False, True, False, False, True]


def test_a_worker_at_or_below_its_share_keeps_every_connection():
    looks = iter([{os.getpid(): 10, OTHER: 10}, {os.getpid(): 21, OTHER: 20}, {os.getpid(): 22, OTHER: 40}])
    middleware = ConnectionRebalancing(plain_app(), workers=2, every=2, counts=lambda: next(looks))
    assert closes(middleware, 6) == [False] * 6  # 50%, then 52% (within the tolerance), then 5%


def test_only_the_requests_since_the_last_look_count():
    # Far ahead in total, but level since the last look: no reason to move a connection.
    looks = iter([{os.getpid(): 1000, OTHER: 10}, {os.getpid(): 1010, OTHER: 20}])
    middleware = ConnectionRebalancing(plain_app(), workers=2, every=1, counts=lambda: next(looks))
    assert closes(middleware, 2) == [True, False]


def test_only_several_workers_rebalance_and_zero_turns_it_off():
    def rebalancing(**settings) -> list[dict]:
        middlewares = asgi_middlewares(ServiceSettings(**settings), AccessControl())
        return [options for cls, options in middlewares if cls is ConnectionRebalancing]

    assert rebalancing(workers=2) == [{"workers": 2, "every": 50}]
    assert rebalancing(workers=3, rebalance_every=7) == [{"workers": 3, "every": 7}]
    assert rebalancing(workers=1) == []
    assert rebalancing(workers=2, rebalance_every=0) == []
    with pytest.raises(SettingsError, match="REBALANCE_EVERY must be >= 0"):
        ServiceSettings(rebalance_every=-1)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_pool_opened_at_once_ends_up_served_by_both_workers(tmp_path):
    # One client's 16 keep-alive connections, opened together, often land mostly on one worker; rebalancing every
    # 5 answers moves them until both workers serve about half.
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_WORKERS": "2", "VISIONSERVE_REBALANCE_EVERY": "5"}
    server = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    folder = server_folder(tmp_path / "bentoml")
    png = encode_png(color_pixels("blue")[0])

    async def load(client: httpx.AsyncClient, requests: int) -> None:
        answers = await asyncio.gather(
            *(client.post("/classify", content=png, headers={"content-type": "image/png"}) for _ in range(requests))
        )
        assert all(answer.status_code == 200 for answer in answers)

    async def run() -> dict[int, int]:
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            await load(client, 1500)  # time to move connections
            before = requests_by_worker(folder)
            await load(client, 1000)
        after = requests_by_worker(folder)
        return {pid: after[pid] - before.get(pid, 0) for pid in after}

    try:
        wait_until(lambda: len(workers(server.process.pid)) == 2 and len(requests_by_worker(folder)) == 2, "2 workers")
        recent = asyncio.run(run())
    finally:
        stop_server(server)
    assert sum(recent.values()) == 1000 and min(recent.values()) >= 300, recent
