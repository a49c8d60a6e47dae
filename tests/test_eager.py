"""The worker's handler driver: a real task, and no loop iteration unless the handler waits."""

from __future__ import annotations

import asyncio
import selectors
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from jobyard.queue.eager import EagerLoop


class CountingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    def select(self, timeout=None):
        self.polls += 1
        return super().select(timeout)


@pytest.fixture
def loop():
    selector = CountingSelector()
    loop = EagerLoop(selector)
    yield loop
    loop.close()


async def returns_at_once(value):
    return {"echo": value, "task": asyncio.current_task() is not None}


def test_a_handler_that_never_waits_finishes_without_polling(loop):
    assert loop.run(returns_at_once(1)) == {"echo": 1, "task": True}
    assert loop._selector.polls == 0


async def waits_inside_a_timeout():
    async with asyncio.timeout(2):  # needs a current task from the very first step
        await asyncio.sleep(0.01)
    future = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(future.set_result, "scheduled")
    return await future


def test_a_handler_that_waits_continues_on_the_loop(loop):
    assert loop.run(waits_inside_a_timeout()) == "scheduled"
    assert loop._selector.polls > 0
    assert loop.run(returns_at_once(2))["echo"] == 2  # the loop is reusable afterwards


class Stop(BaseException):
    pass


async def raises(exc):
    await asyncio.sleep(0)
    raise exc


@pytest.mark.parametrize("exc", [ValueError("bad"), Stop("parked")])
def test_errors_reach_the_caller(loop, exc):
    with pytest.raises(type(exc), match=str(exc)):
        loop.run(raises(exc))

    async def raises_at_once():
        raise exc

    with pytest.raises(type(exc)):
        loop.run(raises_at_once())


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


def test_httpx_async_client_works_from_the_first_step(loop):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def fetch():
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"http://127.0.0.1:{server.server_port}/")
            return response.text

    try:
        assert loop.run(fetch()) == "hello"
    finally:
        server.shutdown()
