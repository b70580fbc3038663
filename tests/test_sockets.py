"""FastStream on the edge-triggered poller: big transfers, many connections, closing and
cancelling while a task waits.

(trio's ``check_half_closeable_stream`` does not apply: a FastStream send that the kernel
takes at once returns without a schedule point, on purpose.)"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from sender.smtp.sockets import FastStream


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


async def stream_pair() -> tuple[FastStream, FastStream]:
    a, b = tcp_pair()
    return FastStream(a), FastStream(b)


async def test_transfer_bigger_than_one_read_and_than_the_socket_buffers():
    left, right = await stream_pair()
    payload = bytes(range(256)) * 8192                # 2 MiB: many full reads, blocked sends
    got = bytearray()

    async def receive():
        while len(got) < len(payload):
            got.extend(await right.receive_some())

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(receive)
            await left.send_all(payload)
    assert bytes(got) == payload
    await left.aclose()
    assert await right.receive_some() == b""
    await right.aclose()


async def test_many_request_reply_rounds_over_many_connections():
    pairs = [await stream_pair() for _ in range(20)]

    async def ping(s: FastStream, rounds: int):
        for i in range(rounds):
            await s.send_all(b"%d\r\n" % i)
            assert await s.receive_some() == b"ok %d\r\n" % i

    async def pong(s: FastStream, rounds: int):
        for _ in range(rounds):
            line = await s.receive_some()
            await s.send_all(b"ok " + line)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for a, b in pairs:
                n.start_soon(ping, a, 200)
                n.start_soon(pong, b, 200)
    for a, b in pairs:
        await a.aclose()
        await b.aclose()


async def test_closing_wakes_a_waiting_receiver_and_cancel_leaves_no_waiter():
    left, right = await stream_pair()
    with trio.move_on_after(0.05):           # cancelled while waiting: nothing stays registered
        await right.receive_some()
    await left.send_all(b"after cancel")
    assert await right.receive_some() == b"after cancel"

    async def waiter():
        with pytest.raises(trio.ClosedResourceError):
            await right.receive_some()

    with trio.fail_after(5):                   # a waiter nobody wakes would hang here
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await right.aclose()
    await left.aclose()


async def test_two_receivers_on_one_stream_are_refused():
    left, right = await stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(right.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await right.receive_some()
            await left.send_all(b"x")
    await left.aclose()
    await right.aclose()
