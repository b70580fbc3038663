"""A small HTTP/1.1 client on trio and h11: one request per connection.

Used for webhooks (POST to customers' endpoints) and between the shards of a daemon (a request
for a message another shard owns is passed to it). Everything is bounded: the whole exchange
by ``timeout``, the body read by ``max_body``.
"""

from __future__ import annotations

import ssl
import urllib.parse

import h11
import msgspec
import trio

__all__ = ["Answer", "request"]

_default_context: ssl.SSLContext | None = None


class Answer(msgspec.Struct, frozen=True):
    status: int
    headers: list[tuple[str, str]]      # lower-case names
    body: bytes                         # at most max_body bytes of it


async def request(method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, *,
                  ssl_context: ssl.SSLContext | None = None, max_body: int = 1 << 20) -> Answer:
    """Send one request; returns the answer once its status is in and its body read (up to
    ``max_body`` bytes, within ``timeout``; once the status is in, a failure to read the rest
    only shortens the body).

    Args:
      timeout: seconds for the whole exchange, connect to the status line.
      ssl_context: for https (default: the system's trusted CAs).

    Raises:
      trio.TooSlowError: no status within ``timeout``.
      OSError, trio.BrokenResourceError, h11.ProtocolError: the connection or the answer failed.
      ValueError: ``url`` is not http:// or https://.
    """
    global _default_context
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL: {url!r}")
    tls = parts.scheme == "https"
    host = parts.hostname
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    req = h11.Request(method=method, target=target, headers=[
        ("Host", parts.netloc.rpartition("@")[2]), ("Content-Length", str(len(body))), ("Connection", "close"),
        *headers.items()])
    conn = h11.Connection(h11.CLIENT)
    deadline = trio.current_time() + timeout
    with trio.fail_after(timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    try:
        with trio.fail_at(deadline):
            if tls:
                if ssl_context is None:
                    if _default_context is None:
                        _default_context = ssl.create_default_context()
                    ssl_context = _default_context
                stream = trio.SSLStream(stream, ssl_context, server_hostname=host, https_compatible=True)
            await stream.send_all(conn.send(req) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            response = None
            while response is None:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("connection closed before a response")
        got = bytearray()
        with trio.move_on_at(deadline):
            try:
                while len(got) < max_body:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Data):
                        got += event.data
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
            except (OSError, trio.BrokenResourceError, h11.ProtocolError):
                pass
        return Answer(response.status_code, [(k.decode().lower(), v.decode("latin-1")) for k, v in response.headers],
                      bytes(got[:max_body]))
    finally:
        await trio.aclose_forcefully(stream)
