"""A CoreServer (the completion-queue front end) on its own event loop in a daemon thread, as
service code runs it: the harness tests of the front end drive."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from service.frontends.core import CoreServer

T = TypeVar("T")
BOUND_S = 10.0  # upper bound for anything that should happen "soon" (a hang guard, not a timing)
# gRPC core hands the server the deadline converted from its monotonic clock to wall time; the
# conversion (and the grpc-timeout header's rounding) can put it a few ms past the client's.
CLOCK_SLACK_S = 0.5


class Harness:
    """A CoreServer on its own event loop in a daemon thread, as service code runs it."""

    def __init__(self, configure: Callable[[CoreServer], None],
                 server: CoreServer | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = server if server is not None else CoreServer()
        configure(self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.stopped = False
        self.call(self.server.start())

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = BOUND_S) -> T:
        return self.submit(coro).result(timeout)

    def barrier(self) -> None:
        """Return once everything scheduled on the loop before this call has had a turn."""

        async def nothing() -> None:
            pass

        self.call(nothing())

    def stop(self, grace: float | None) -> Future[None]:
        self.stopped = True
        return self.submit(self.server.stop(grace))

    def close(self) -> None:
        try:
            if not self.stopped:  # with a grace: stop(0) can crash (see the test below)
                self.stop(1.0).result(BOUND_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(BOUND_S)
            self.loop.close()


