"""Keeping several workers evenly loaded: a worker serving more than its share asks a client to reconnect.

BentoML's workers accept connections from one shared socket, and whichever worker's accept() runs first takes the
connection for its whole keep-alive life: a burst of new connections (a client's pool, a proxy's) can land mostly
on one worker, which is then overloaded while the other idles, and nothing moves them later. So every `every`
answers, a worker compares its share of the requests answered since its last look (the counts every worker keeps
for the statistics extension, service.statistics) with an even share; more than `TOLERANCE` above it, it answers
this request with `Connection: close`, and the client's next connection is accepted by whichever worker gets to it
first. Only a worker above its share closes connections, so connections only ever leave the busier worker and the
load converges to an even split whichever worker tends to win the accept race (with every worker closing every
Nth connection, as nginx's keepalive_requests does, the split would settle wherever that race puts it). An even
split costs nothing beyond the look: no connection is closed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.statistics import requests_by_worker

TOLERANCE = 0.1  # above an even share by this fraction: too busy


class ConnectionRebalancing:
    """ASGI middleware: every `every` answers, a worker of `workers` above its share closes that connection."""

    def __init__(
        self,
        app: ASGIApp,
        workers: int,
        every: int,
        counts: Callable[[], dict[int, int]] = requests_by_worker,
    ) -> None:
        self.app = app
        self.workers = workers
        self.every = every
        self.counts = counts
        self.answered = 0
        self.seen: dict[int, int] = {}  # each worker's count at the last look

    def over_share(self) -> bool:
        """Whether this worker answered more than its share of the requests since the last look."""
        counts = self.counts()
        recent = {pid: max(0, count - self.seen.get(pid, 0)) for pid, count in counts.items()}
        self.seen = counts
        total = sum(recent.values())
        return total > 0 and recent.get(os.getpid(), 0) * self.workers > total * (1 + TOLERANCE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.answered += 1
        if self.answered < self.every:
            await self.app(scope, receive, send)
            return
        self.answered = 0
        if not self.over_share():
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)
