"""The HTTP API across the shards of a daemon (``daemon.processes`` > 1).

Every shard accepts API connections on the shared port, but a message lives in one shard's
journal, and an idempotency key in one shard's store. So a request is answered by its owner:

- a request about a message (``GET``, ``PATCH``, ``.../cancel``) by the shard whose index its
  id ends with (a sharded engine writes its index as the id's last three hex digits);
- a send with an ``Idempotency-Key`` by the shard the (customer, key) pair hashes to, so a
  repeat finds the first answer wherever the kernel hands its connection;
- a batch without a key by the shard with the fewest requests in progress: the kernel hands
  a keep-alive connection to whichever shard accepts first, and an application's few pooled
  connections would otherwise all feed one shard (a single email is not worth the hop: it
  costs about as much as the email);
- anything else by the shard that received it.

A shard passes a request it does not own to the owner's private listener (127.0.0.1, its port
on the supervisor's load board) with the same method, path, key and body, plus a token that
the supervisor gave every shard: the owner then neither counts it against the customer's
request rate again nor passes it on.
"""

from __future__ import annotations

import hmac
import zlib

from starlette.requests import Request
from starlette.responses import Response

from ..httpclient import request

__all__ = ["PEER_HEADER", "Peers"]

PEER_HEADER = "x-sender-peer"
FORWARD_TIMEOUT = 30.0
_PASSED_ON = ("authorization", "content-type", "idempotency-key", "x-batch-validation")
_PASSED_BACK = ("content-type", "retry-after", "www-authenticate")


class Peers:
    """This shard's view of its siblings.

    Args:
      index, count: this shard, of how many.
      ports: ``ports(i)`` is shard i's private port (0 until it listens).
      token: the secret the shards share.
      requests: each shard's requests in progress (shared memory: the load board's).
    """

    def __init__(self, index: int, count: int, ports, token: str, requests) -> None:
        self.index, self.count = index, count
        self._ports = ports
        self._token = token.encode()
        self.requests = requests

    def least_busy(self) -> int | None:
        """A sibling with at least two requests fewer in progress than this shard, if any."""
        mine = self.requests[self.index]
        best = min(range(self.count), key=self.requests.__getitem__)
        return best if self.requests[best] < mine - 1 else None

    def owner_of_id(self, msg_id: str) -> int:
        """The shard that holds ``msg_id`` (this one for an id it cannot place)."""
        try:
            owner = int(msg_id[14:], 16) if len(msg_id) == 17 else -1
        except ValueError:
            return self.index
        return owner if 0 <= owner < self.count else self.index

    def owner_of_key(self, customer: str, key: str) -> int:
        return zlib.crc32(f"{customer}\0{key}".encode("utf-8", "surrogatepass")) % self.count

    def from_peer(self, request: Request) -> bool:
        given = request.headers.get(PEER_HEADER, "").encode("utf-8", "surrogateescape")
        return bool(given) and hmac.compare_digest(given, self._token)

    async def forward(self, owner: int, req: Request, body: bytes) -> Response:
        """Have shard ``owner`` answer ``req``; its answer is ours."""
        headers = {k: v for k in _PASSED_ON if (v := req.headers.get(k)) is not None}
        headers[PEER_HEADER] = self._token.decode()
        target = req.url.path + (f"?{req.url.query}" if req.url.query else "")
        answer = await request(req.method, f"http://127.0.0.1:{self._ports(owner)}{target}", headers, body,
                               FORWARD_TIMEOUT, max_body=64 << 20)
        return Response(answer.body, status_code=answer.status,
                        headers={k: v for k, v in answer.headers if k in _PASSED_BACK})
