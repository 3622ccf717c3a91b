"""The HTTP listener's transport gathers a response's writes into one: over a real socket pair, what is
written in one turn of the event loop leaves in one write, in order; closing writes what is gathered
first; aborting drops it; and pdp's listener answers through it, keep-alive and all."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest

from pdp.service.coalescing import CoalescingH11Protocol, CoalescingTransport


class _Reader(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _pair() -> tuple[Any, list[bytes], _Reader]:
    """A real transport on one end of a socket pair (its writes recorded) and a reader on the other."""
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=left)
    written: list[bytes] = []
    real_write = transport.write

    def recording(data: bytes) -> None:
        written.append(bytes(data))
        real_write(data)

    transport.write = recording
    _, reader = await loop.create_connection(_Reader, sock=right)
    return transport, written, reader


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_writes_in_one_turn_leave_in_one_write_in_order() -> None:
    async def run() -> tuple[list[bytes], bytes]:
        transport, written, reader = await _pair()
        coalescing = CoalescingTransport(transport)
        coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        coalescing.write(b"")
        coalescing.writelines([bytearray(b"o"), memoryview(b"k")])
        assert written == [] and coalescing.get_write_buffer_size() == 40
        await _settle()
        coalescing.write(b"next")
        await _settle()
        coalescing.close()
        await asyncio.wait_for(reader.closed, 5)
        return written, bytes(reader.data)

    written, received = asyncio.run(run())
    assert written == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"next"]
    assert received == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\noknext"


def test_close_writes_what_is_gathered_and_abort_drops_it() -> None:
    async def run(end: str) -> tuple[bytes, bool]:
        transport, _, reader = await _pair()
        coalescing = CoalescingTransport(transport)
        coalescing.write(b"last words")
        getattr(coalescing, end)()
        coalescing.write(b"after the end")  # never sent, never an error
        await asyncio.wait_for(reader.closed, 5)
        await _settle()
        return bytes(reader.data), coalescing.is_closing()

    assert asyncio.run(run("close")) == (b"last words", True)
    assert asyncio.run(run("abort")) == (b"", True)


@pytest.mark.integration
def test_the_listener_answers_through_it_on_kept_connections(write_setup) -> None:
    from servers import serve_pdp

    from pdp.config import load_config
    from pdp.service.server import uvicorn_options

    config = load_config(write_setup())
    assert uvicorn_options(config)["http"] is CoalescingH11Protocol
    with serve_pdp(config) as (url, _), httpx.Client(base_url=url) as client:
        for _ in range(3):  # one connection, kept: every answer whole and in its place
            answer = client.post("/v1/check", json={"method": "GET", "path": "/public/x"})
            assert answer.status_code == 200 and answer.json()["allowed"] is True
            assert client.get("/healthz").status_code == 200
