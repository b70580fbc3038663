"""The Resend-compatible HTTP API: apps hand messages to the engine with ``POST /emails``.

A request carries ``Authorization: Bearer KEY``; the key names the customer (``[[customer]]``
in the config). A message is answered ``200 {"id": ...}`` only once the engine has made it
durable; the id is the queue id. Errors have Resend's shape,
``{"statusCode": 422, "name": "validation_error", "message": "to[0]: ..."}``, so Resend's SDKs
raise their own error classes for them.

Served by hypercorn's trio worker until cancelled.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hmac
import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable

import hypercorn.config
import hypercorn.trio
import msgspec
import orjson
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..config import Config, ConfigError, Rate, parse_duration, parse_hostport, parse_rate
from ..engine import (PURGE_FIELDS, Blocked, Engine, NotFound, NotScheduled, QuotaExceeded, SpoolFull, Submission,
                      Suppressed, TooManyRecipients)
from ..errors import UsageError
from ..idempotency import KeyInFlight, KeyInvalid, KeyReused, digest
from ..mime import Built, MimeError, build_message
from ..scheduler import TokenBucket
from ..controls import LIMIT_SCOPES, REROUTE_SCOPES, SCOPES, ControlError
from ..dashboard import routes as dashboard_routes
from ..explain import explain_live
from ..metrics import CONTENT_TYPE as METRICS_TYPE
from ..status import Email, iso_utc
from .peers import Peers

__all__ = ["ApiError", "bind_http", "create_app", "serve_http"]

log = logging.getLogger("sender.http")

MAX_BATCH = 100


class ApiError(Exception):
    """An error answered to the client in Resend's shape."""

    def __init__(self, status: int, name: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.name = name
        self.message = message
        self.headers = headers or {}


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


def _error(e: ApiError) -> Response:
    return _json(e.status, {"statusCode": e.status, "name": e.name, "message": e.message}, e.headers)


_ADMIN = object()                   # the owner of an admin key


class _Keys:
    """API key -> customer id, or admin. Every lookup compares against every key in constant
    time, so neither the answer's timing nor its content tells how much of a key was right.
    A wrong key is 401 (RFC 9110: the credentials are not valid; Resend itself says 403), and
    so is a key of the wrong kind: customers' keys do not reach /admin, admin keys send no mail."""

    def __init__(self, config: Config) -> None:
        self._keys: list[tuple[bytes, object]] = [(key.encode(), c.id) for c in config.customer
                                                  for key in c.api_keys]
        self._keys += [(key.encode(), _ADMIN) for key in config.listen.admin_keys]

    def _owner(self, request: Request, basic: bool = False) -> object:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if basic and scheme.lower() == "basic" and key:
            # A browser's login (any user name, the key as password); see admin().
            try:
                key = base64.b64decode(key, validate=True).decode("utf-8", "surrogateescape").partition(":")[2]
            except (binascii.Error, ValueError):
                raise _invalid_key("Malformed Basic credentials") from None
            scheme = "bearer"
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "missing_api_key", "Missing API key in the authorization header. "
                                                   "Include the following header in the request: "
                                                   "Authorization: Bearer YOUR_API_KEY", headers=_CHALLENGE)
        given = key.encode("utf-8", "surrogateescape")
        found = None
        for known, owner in self._keys:
            if hmac.compare_digest(given, known):
                found = owner
        if found is None:
            raise _invalid_key("API key is invalid")
        return found

    def customer(self, request: Request) -> str:
        owner = self._owner(request)
        if owner is _ADMIN:
            raise _invalid_key("An admin key reaches only the /admin endpoints")
        assert isinstance(owner, str)
        return owner

    def admin(self, request: Request) -> None:
        """An admin key as a Bearer token, or, for reading (GET, HEAD: the dashboard in a
        browser), as the password of HTTP Basic auth. Never Basic for a change: a browser
        sends saved Basic credentials along with any other site's form post."""
        if self._owner(request, basic=request.method in ("GET", "HEAD")) is not _ADMIN:
            raise _invalid_key("The /admin endpoints need an admin key (listen.admin_keys)")


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _invalid_key(message: str) -> ApiError:
    return ApiError(401, "invalid_api_key", message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


async def _read_body(request: Request, limit: int) -> bytes:
    size = int(request.headers.get("content-length") or 0)
    if size > limit:
        raise ApiError(413, "validation_error", f"request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "validation_error", f"request body is over {limit} bytes")
    return bytes(body)


async def _read_json(request: Request, limit: int) -> object:
    body = await _read_body(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(422, "validation_error", f"invalid JSON: {e}") from None


def _validation(message: str) -> ApiError:
    return ApiError(422, "validation_error", message)


def _spool_full() -> ApiError:
    return ApiError(429, "rate_limit_exceeded", "The queue is full; try again later.", headers={"Retry-After": "1"})


MAX_SCHEDULE = 30 * 86400.0
_IN = re.compile(r"in\s+(\d+)\s*(second|sec|minute|min|hour|hr|day)s?", re.I)
_UNIT = {"second": 1, "sec": 1, "minute": 60, "min": 60, "hour": 3600, "hr": 3600, "day": 86400}


def scheduled_at(payload: object, now: float) -> float:
    """``scheduled_at`` of an email as wall-clock seconds (0.0: send now): ISO 8601 (without a
    zone: UTC) or "in N minutes|hours|days"; at most 30 days ahead."""
    value = payload.get("scheduled_at") if isinstance(payload, dict) else None
    if value is None:
        return 0.0
    if not isinstance(value, str):
        raise _validation("scheduled_at: expected a string (ISO 8601 or \"in 1 hour\")")
    m = _IN.fullmatch(value.strip())
    if m:
        when = now + int(m.group(1)) * _UNIT[m.group(2).lower()]
    else:
        try:
            dt = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise _validation(f"scheduled_at: expected ISO 8601 like \"2026-11-24T09:00:00Z\" or "
                              f"\"in 1 hour\", got {value!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.timezone.utc)
        when = dt.timestamp()
    if when - now > MAX_SCHEDULE:
        raise _validation("scheduled_at: at most 30 days ahead")
    return when if when > now else 0.0


class _Limits:
    """Per customer: the request rate (a token bucket, Resend's ``ratelimit-*`` headers and 429
    rate_limit_exceeded). Each of ``shards`` processes takes its share, like every other limit
    of a sharded daemon. The hourly and daily quotas of messages are the engine's, for every
    way in (see :func:`_over_quota`)."""

    def __init__(self, config: Config, shards: int = 1) -> None:
        self.rates = {c.id: _share(parse_rate(c.api_rate_limit, "api_rate_limit"), shards) for c in config.customer
                      if c.api_rate_limit}
        self.buckets: dict[str, TokenBucket] = {}

    def admit(self, customer: str) -> dict[str, str]:
        """Take a request token; returns the rate-limit headers for the answer.

        Raises:
          ApiError: 429 rate_limit_exceeded, with those headers and Retry-After.
        """
        rate = self.rates.get(customer)
        if rate is None:
            return {}
        now = trio.current_time()
        bucket = self.buckets.get(customer)
        if bucket is None:
            bucket = self.buckets[customer] = TokenBucket(rate.per_second, rate.burst, now)
        allowed = bucket.try_take(now)
        tokens = bucket.tokens(now)
        headers = {"ratelimit-limit": str(max(1, int(rate.burst))),
                   "ratelimit-remaining": str(max(0, int(tokens))),
                   "ratelimit-reset": str(math.ceil((rate.burst - tokens) / rate.per_second))}
        if not allowed:
            headers["retry-after"] = str(max(1, math.ceil(bucket.delay(now))))
            raise ApiError(429, "rate_limit_exceeded", "Too many requests. You can only make "
                           f"{rate.per_second:g} requests per second.", headers=headers)
        return headers


def _over_quota(e: QuotaExceeded, now: float) -> ApiError:
    """429 in Resend's shape (its ``daily_quota_exceeded``; ``hourly_quota_exceeded`` named
    alike), with Retry-After: the seconds until the quota resets."""
    period = "today" if e.quota == "daily" else "this hour"
    return ApiError(429, f"{e.quota}_quota_exceeded", f"You have reached your {e.quota} email sending quota "
                    f"({e.limit:,}); {e.left:,} left {period}. It resets at {iso_utc(e.retry_at)}.",
                    headers={"Retry-After": str(max(1, math.ceil(e.retry_at - now)))})


def _share(rate: Rate, shards: int) -> Rate:
    return msgspec.structs.replace(rate, per_second=rate.per_second / shards, burst=max(1.0, rate.burst / shards))


def create_app(engine: Engine, peers: Peers | None = None) -> Starlette:
    """The ASGI app over ``engine``; its customers and keys come from ``engine.config``.

    Args:
      peers: this shard's siblings, in a sharded daemon (see :mod:`sender.inject.peers`).
    """
    config = engine.config
    keys = _Keys(config)
    limits = _Limits(config, peers.count if peers is not None else 1)
    max_size = int(config.listen.max_message_size)
    # Attachments arrive base64-encoded inside JSON: allow for the growth.
    body_limit = max_size * 4 // 3 + 64 * 1024

    def build(payload: object, where: str = "") -> Built:
        try:
            return build_message(payload, message_id_domain=config.listen.hostname, max_bytes=max_size,
                                 attachment_folder=config.listen.attachment_folder or None)
        except MimeError as e:
            raise _validation(f"{where}{e}") from None

    async def submit(built: Built, customer: str, not_before: float = 0.0) -> str:
        try:
            return await engine.submit(built.sender, built.rcpts, built.message, customer=customer,
                                       not_before=not_before, tags=built.tags)
        except SpoolFull:
            raise _spool_full() from None
        except QuotaExceeded as e:
            raise _over_quota(e, engine.now()) from None
        except (Suppressed, Blocked, TooManyRecipients) as e:
            raise _validation(f"to: {e}") from None
        except UsageError as e:
            raise _validation(str(e)) from None

    async def idempotent(request: Request, customer: str, payload: object,
                         answer: Callable[[], Awaitable[Response]]) -> Response:
        """Answer once per Idempotency-Key: a repeat gets the stored answer (see
        :mod:`sender.idempotency`)."""
        key = request.headers.get("idempotency-key")
        if key is None:
            return await answer()
        store = engine.idempotency
        request_digest = digest(request.url.path.encode(), request.headers.get("x-batch-validation", "").encode(),
                                orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
        try:
            stored = store.begin(customer, key, request_digest, engine.now())
        except KeyInvalid as e:
            raise ApiError(400, "invalid_idempotency_key", str(e)) from None
        except KeyReused as e:
            raise ApiError(409, "invalid_idempotent_request", str(e)) from None
        except KeyInFlight as e:
            raise ApiError(409, "concurrent_idempotent_requests", str(e)) from None
        if stored is not None:
            status, body = stored
            return Response(body, status_code=status, media_type="application/json")
        try:
            response = await answer()
        except BaseException:
            store.abandon(customer, key)
            raise
        await store.finish(customer, key, request_digest, response.status_code, bytes(response.body).decode(),
                           engine.now())
        return response

    def refuse_if_draining() -> None:
        if engine.draining is not None:
            raise ApiError(503, "service_unavailable", "The daemon is draining for shutdown; send again later",
                           headers={"Retry-After": "60"})

    async def send_email(request: Request, customer: str) -> Response:
        refuse_if_draining()
        payload = await _read_json(request, body_limit)

        async def answer() -> Response:
            built = build(payload)
            when = scheduled_at(payload, engine.now())
            return _json(200, {"id": await submit(built, customer, when)})

        return await idempotent(request, customer, payload, answer)

    async def send_batch(request: Request, customer: str) -> Response:
        refuse_if_draining()
        mode = request.headers.get("x-batch-validation", "strict").lower()
        if mode not in ("strict", "permissive"):
            raise _validation(f"x-batch-validation: expected \"strict\" or \"permissive\", got {mode!r}")
        payloads = await _read_json(request, body_limit * MAX_BATCH)
        return await idempotent(request, customer, payloads, lambda: batch(customer, mode, payloads))

    async def cancel_email(request: Request, customer: str) -> Response:
        msg_id = request.path_params["id"]
        with _not_found_or_unscheduled():
            await engine.cancel(msg_id, customer)
        return _json(200, {"object": "email", "id": msg_id})

    async def update_email(request: Request, customer: str) -> Response:
        msg_id = request.path_params["id"]
        payload = await _read_json(request, 64 * 1024)
        if not isinstance(payload, dict) or "scheduled_at" not in payload:
            raise ApiError(422, "missing_required_field", "scheduled_at: is required")
        when = scheduled_at(payload, engine.now()) or engine.now()
        with _not_found_or_unscheduled():
            await engine.reschedule(msg_id, customer, when)
        return _json(200, {"object": "email", "id": msg_id})

    async def get_email(request: Request, customer: str) -> Response:
        email = engine.email(request.path_params["id"])
        if email is None or email.customer != customer:
            raise ApiError(404, "not_found", "Email not found")
        return _json(200, _email_body(email))

    async def admin_get_email(request: Request) -> Response:
        email = engine.email(request.path_params["id"])
        if email is None:
            raise ApiError(404, "not_found", "Email not found")
        return _json(200, {**_email_body(email), "customer": email.customer})

    async def admin_stats(request: Request) -> Response:
        stats = msgspec.to_builtins(engine.statistics())
        if peers is not None:
            stats["shard"] = f"{peers.index}/{peers.count}"     # this shard's figures only
        return _json(200, stats)

    async def admin_explain(request: Request) -> Response:
        msg_id = request.path_params["id"]
        engine.events.flush()
        queued = engine.where(msg_id)           # here, on the loop; the files in a thread
        story = await trio.to_thread.run_sync(explain_live, msg_id, engine.events.folder, queued)
        return Response(msgspec.json.encode(story), media_type="application/json")

    async def admin_payload(request: Request) -> tuple[bytes, dict]:
        body = await _read_body(request, 64 * 1024)
        try:
            payload = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as e:
            raise _validation(f"invalid JSON: {e}") from None
        if not isinstance(payload, dict):
            raise _validation("the body must be an object")
        for field in ("reason", "who"):
            if not isinstance(payload.get(field, ""), str):
                raise _validation(f"{field}: must be a string")
        return body, payload

    async def on_every_shard(request: Request, body: bytes) -> list[dict]:
        """Make an operator's change on the sibling shards too (when it came from a client);
        their answers, as JSON (those that refused it included)."""
        answers = []
        if peers is not None and not peers.from_peer(request):
            for shard in range(peers.count):
                if shard != peers.index:
                    answer = await peers.forward(shard, request, body)
                    answers.append({"status": answer.status_code, **orjson.loads(answer.body)})
        return answers

    async def admin_control(request: Request) -> Response:
        """``POST /admin/pause``, ``/admin/resume`` (one of customer, domain, provider,
        source, pool), ``/admin/reroute`` (domain or provider, and ``pool``),
        ``/admin/unroute``, ``/admin/limit`` (customer, domain, provider or source, and
        ``rate`` and/or a provider's ``connections``), ``/admin/unlimit``; each with
        ``reason`` and ``who``. On a sharded daemon every shard makes the change."""
        body, payload = await admin_payload(request)
        action = request.url.path.rsplit("/", 1)[1]
        scopes = _SCOPES_OF[action]
        extra = {"reroute": ("pool",), "limit": ("rate", "connections")}.get(action, ())
        for field in payload:
            if field not in (*scopes, *extra, "reason", "who"):
                raise _validation(f"{field}: not a field of /admin/{action} (expected one of "
                                  f"{', '.join(scopes)}, {', '.join((*extra, 'reason', 'who'))})")
        named = [k for k in scopes if k in payload]
        if len(named) != 1 or not isinstance(payload[named[0]], str):
            raise _validation(f"one of {', '.join(scopes)} is required, as a string (exactly one)")
        try:
            change = engine.control(action, named[0], payload[named[0]], payload.get("who", ""),
                                    payload.get("reason", ""), {k: payload[k] for k in extra if k in payload})
        except ControlError as e:
            raise _validation(str(e)) from None
        await on_every_shard(request, body)
        return _json(200, msgspec.to_builtins(change))

    async def admin_pauses(request: Request) -> Response:
        return _json(200, {"data": [msgspec.to_builtins(c) for c in engine.controls.pauses.values()]})

    async def admin_controls(request: Request) -> Response:
        """Every control in force: pauses, reroutes, limits, purges in quarantine, a drain."""
        c = engine.controls
        purges = [{**msgspec.to_builtins(p), "detail": {k: v for k, v in p.detail.items() if k != "parts"}}
                  for p in c.purges.values()]
        return _json(200, {"pauses": msgspec.to_builtins(list(c.pauses.values())),
                           "reroutes": msgspec.to_builtins(list(c.reroutes.values())),
                           "limits": msgspec.to_builtins(list(c.limits.values())),
                           "quarantine": purges,
                           "draining": msgspec.to_builtins(engine.draining)})

    async def admin_purge(request: Request) -> Response:
        """``POST /admin/purge`` with a filter (customer, domain, provider, message_type,
        id), ``reason``, ``who``, and optionally ``dry_run``, ``then`` ("bounce" or "drop")
        and ``keep`` (seconds or a duration such as "3d"): the queued mail it matches goes
        into quarantine. The figures are those of every shard."""
        body, payload = await admin_payload(request)
        from_peer = peers is not None and peers.from_peer(request)
        options = ("reason", "who", "dry_run", "then", "keep")
        for field in payload:
            if field not in (*PURGE_FIELDS, *options) and not (from_peer and field == "purge_id"):
                raise _validation(f"{field}: not a field of /admin/purge (a filter of "
                                  f"{', '.join(PURGE_FIELDS)}, and {', '.join(options)})")
        dry_run = payload.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise _validation("dry_run: must be true or false")
        keep = payload.get("keep")
        try:
            keep = parse_duration(keep, "keep") if keep is not None else None
            # The siblings purge under the same id, so that one release reaches them all.
            purge_id = payload["purge_id"] if from_peer else engine.new_purge_id()
            answer = engine.purge({k: payload[k] for k in PURGE_FIELDS if k in payload},
                                  who=payload.get("who", ""), reason=payload.get("reason", ""),
                                  then=payload.get("then", "bounce"), dry_run=dry_run, keep=keep, purge_id=purge_id)
        except (ControlError, ConfigError) as e:
            raise _validation(str(e)) from None
        if peers is not None and not from_peer:
            for other in await on_every_shard(request, orjson.dumps({**payload, "purge_id": purge_id})):
                for k in ("messages", "recipients", "in_flight"):
                    answer[k] = answer.get(k, 0) + other.get(k, 0)
            if not dry_run:
                answer["id"] = purge_id if answer["messages"] else None
        return _json(200, answer)

    async def admin_release(request: Request) -> Response:
        """``POST /admin/release`` with the purge's ``id``, ``reason`` and ``who``."""
        body, payload = await admin_payload(request)
        if not isinstance(payload.get("id"), str):
            raise _validation("id: the purge's id is required, as a string")
        try:
            answer: dict = engine.release(payload["id"], payload.get("who", ""), payload.get("reason", ""))
        except ControlError as e:
            if peers is None or peers.from_peer(request):
                raise _validation(str(e)) from None
            answer = {"id": payload["id"], "messages": 0, "recipients": 0, "error": str(e)}
        found = "error" not in answer
        for other in await on_every_shard(request, body):
            found = found or other["status"] == 200
            answer["messages"] += other.get("messages", 0)
            answer["recipients"] += other.get("recipients", 0)
        if not found:
            raise _validation(answer["error"])
        answer.pop("error", None)
        return _json(200, answer)

    async def admin_drain(request: Request) -> Response:
        """``POST /admin/drain`` (``reason``, ``who``, ``timeout``) closes intake and stops
        the daemon once nothing is left to send now; ``POST /admin/undrain`` calls it off."""
        body, payload = await admin_payload(request)
        for field in payload:
            if field not in ("reason", "who", "timeout"):
                raise _validation(f"{field}: not a field of {request.url.path} (reason, who, timeout)")
        timeout = payload.get("timeout")
        try:
            if timeout is not None:
                timeout = parse_duration(timeout, "timeout")
            if request.url.path.endswith("/undrain"):
                change = engine.undrain(payload.get("who", ""), payload.get("reason", ""))
            else:
                change = engine.drain(payload.get("who", ""), payload.get("reason", ""), timeout)
        except (ControlError, ConfigError) as e:
            raise _validation(str(e)) from None
        await on_every_shard(request, body)
        return _json(200, msgspec.to_builtins(change))

    async def metrics(request: Request) -> Response:
        return Response(engine.metrics.page(), media_type=METRICS_TYPE)

    async def admin_events(request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            raise _validation("limit: expected a whole number") from None
        recent = list(engine.events.recent)
        recent = recent[len(recent) - max(0, min(limit, len(recent))):]
        return Response(b"[" + b",".join(map(_encode_event, recent)) + b"]", media_type="application/json")

    async def admin_dead_letters(request: Request) -> Response:
        hooks = engine.webhooks
        dead = [] if hooks is None else hooks.dead_letters()
        return _json(200, {"data": [msgspec.to_builtins(d) for d in dead]})

    async def admin_retry_dead(request: Request) -> Response:
        hook_id = request.path_params["id"]
        if engine.webhooks is None or not engine.webhooks.retry_dead(hook_id):
            raise ApiError(404, "not_found", f"no dead letter {hook_id!r}")
        return _json(200, {"id": hook_id, "retried": True})

    def owner(request: Request, customer: str) -> int | None:
        """The sibling shard that must answer ``request``, or None for this one."""
        if peers is None or peers.from_peer(request):
            return None
        if "id" in request.path_params:
            shard = peers.owner_of_id(request.path_params["id"])
        elif (key := request.headers.get("idempotency-key")) is not None:
            shard = peers.owner_of_key(customer, key)
        elif request.url.path == "/emails/batch":
            return peers.least_busy()       # (a single email is not worth the hop)
        else:
            return None
        return None if shard == peers.index else shard

    async def forwarded(request: Request, shard: int) -> Response:
        assert peers is not None
        return await peers.forward(shard, request, await _read_body(request, body_limit * MAX_BATCH))

    def admin_endpoint(endpoint: Callable[[Request], Awaitable[Response]]):
        async def call(request: Request) -> Response:
            keys.admin(request)
            shard = owner(request, "")
            return await endpoint(request) if shard is None else await forwarded(request, shard)

        return _answering(call)

    def customer_endpoint(endpoint: Callable[[Request, str], Awaitable[Response]]):
        """Authenticate, take a request token, have the owning shard answer, and put the
        rate-limit headers on the answer."""

        async def call(request: Request) -> Response:
            customer = keys.customer(request)
            # A request passed on by a sibling was counted where it arrived.
            headers = limits.admit(customer) if peers is None or not peers.from_peer(request) else {}
            try:
                shard = owner(request, customer)
                if shard is not None:
                    response = await forwarded(request, shard)
                elif peers is None:
                    response = await endpoint(request, customer)
                else:
                    peers.requests[peers.index] += 1    # what this shard works on, for least_busy
                    try:
                        response = await endpoint(request, customer)
                    finally:
                        peers.requests[peers.index] -= 1
            except ApiError as e:
                e.headers = {**headers, **e.headers}
                raise
            response.headers.update(headers)
            return response

        return _answering(call)

    async def batch(customer: str, mode: str, payloads: object) -> Response:
        if not isinstance(payloads, list):
            raise _validation("the body must be an array of emails")
        if not 1 <= len(payloads) <= MAX_BATCH:
            raise _validation(f"a batch holds 1 to {MAX_BATCH} emails, got {len(payloads)}")
        now = engine.now()
        checked: list[Submission | ApiError] = []
        for i, payload in enumerate(payloads):
            try:
                built, when = build(payload, f"[{i}]."), _at(i, payload, now)
                try:
                    engine.quotas.check_recipients(customer, len(built.rcpts))
                except TooManyRecipients as e:
                    raise _validation(f"[{i}].to: {e}") from None
                if len(engine.blocked(built.rcpts)) == len(built.rcpts):
                    raise _validation(f"[{i}].to: every recipient is at a blocked domain (abuse.blocked_domains)")
                suppressed = engine.suppressed(customer, built.rcpts, now)
                if len(suppressed) == len(built.rcpts):
                    raise _validation(f"[{i}].to: {Suppressed(suppressed)}")
                checked.append(Submission(built.sender, built.rcpts, built.message, customer, "", when, built.tags))
            except ApiError as e:
                if mode == "strict":
                    raise                   # every email is checked before any is queued
                checked.append(e)
        if engine.spool_full:
            raise _spool_full()
        valid = [c for c in checked if isinstance(c, Submission)]
        if mode == "strict":
            try:                            # all or nothing: the whole batch must fit the quotas
                engine.check_quota(customer, [c.rcpts for c in valid], now=now)
            except QuotaExceeded as e:
                raise _over_quota(e, now) from None
        # One group commit for the whole batch (permissive: those the quotas hold are refused).
        got = await engine.submit_many(valid)
        results = iter(got)
        data: list[dict] = []
        errors: list[dict] = []
        for i, c in enumerate(checked):
            got = c if isinstance(c, ApiError) else next(results)
            if isinstance(got, str):
                data.append({"id": got})
            else:
                message = got.message if isinstance(got, ApiError) else \
                    _over_quota(got, now).message if isinstance(got, QuotaExceeded) else f"[{i}].to: {got}"
                errors.append({"index": i, "message": message.removeprefix(f"[{i}].")})
        if mode == "strict":
            if errors:                      # a race with the spool filling up: say so
                raise ApiError(429, "rate_limit_exceeded", f"{len(data)} of {len(checked)} emails queued: "
                               f"{errors[0]['message']}", headers={"Retry-After": "1"})
            return _json(200, {"data": data})
        return _json(200, {"data": data, "errors": errors})

    async def on_http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        name = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "application_error")
        return _error(ApiError(e.status_code, name, str(e.detail), headers=dict(e.headers or {})))

    return Starlette(
        routes=[Route("/emails", customer_endpoint(send_email), methods=["POST"]),
                Route("/emails/batch", customer_endpoint(send_batch), methods=["POST"]),
                Route("/emails/{id}/cancel", customer_endpoint(cancel_email), methods=["POST"]),
                Route("/emails/{id}", customer_endpoint(update_email), methods=["PATCH"]),
                Route("/emails/{id}", customer_endpoint(get_email), methods=["GET"]),
                Route("/admin/emails/{id}", admin_endpoint(admin_get_email), methods=["GET"]),
                Route("/admin/stats", admin_endpoint(admin_stats), methods=["GET"]),
                Route("/metrics", admin_endpoint(metrics), methods=["GET"]),
                Route("/admin/explain/{id}", admin_endpoint(admin_explain), methods=["GET"]),
                Route("/admin/pause", admin_endpoint(admin_control), methods=["POST"]),
                Route("/admin/resume", admin_endpoint(admin_control), methods=["POST"]),
                Route("/admin/pauses", admin_endpoint(admin_pauses), methods=["GET"]),
                *[Route(f"/admin/{action}", admin_endpoint(admin_control), methods=["POST"])
                  for action in ("reroute", "unroute", "limit", "unlimit")],
                Route("/admin/controls", admin_endpoint(admin_controls), methods=["GET"]),
                Route("/admin/purge", admin_endpoint(admin_purge), methods=["POST"]),
                Route("/admin/release", admin_endpoint(admin_release), methods=["POST"]),
                Route("/admin/drain", admin_endpoint(admin_drain), methods=["POST"]),
                Route("/admin/undrain", admin_endpoint(admin_drain), methods=["POST"]),
                Route("/admin/events", admin_endpoint(admin_events), methods=["GET"]),
                Route("/admin/webhooks/dead", admin_endpoint(admin_dead_letters), methods=["GET"]),
                Route("/admin/webhooks/dead/{id}/retry", admin_endpoint(admin_retry_dead), methods=["POST"]),
                *dashboard_routes(engine, admin_endpoint, peers)],
        exception_handlers={HTTPException: on_http_error},
    )


_SCOPES_OF = {"pause": SCOPES, "resume": SCOPES, "reroute": REROUTE_SCOPES, "unroute": REROUTE_SCOPES,
              "limit": LIMIT_SCOPES, "unlimit": LIMIT_SCOPES}


def _email_body(email: Email) -> dict:
    """Resend's email object. The message's content is not kept after it is queued: html and
    text are null, as Resend's are once its retention has passed."""
    return {"object": "email", "id": email.id, "to": email.to, "from": email.sender,
            "created_at": iso_utc(email.created_at), "subject": email.subject, "html": None, "text": None,
            "bcc": None, "cc": None, "reply_to": None, "last_event": email.last_event,
            "scheduled_at": iso_utc(email.scheduled_at) if email.scheduled_at else None,
            "tags": [{"name": k, "value": v} for k, v in email.tags.items()]}


_encode_event = msgspec.json.Encoder().encode


@contextlib.contextmanager
def _not_found_or_unscheduled():
    """An email of another customer is not found, like one that does not exist."""
    try:
        yield
    except NotFound as e:
        raise ApiError(404, "not_found", str(e)) from None
    except NotScheduled as e:
        raise _validation(str(e)) from None


def _at(i: int, payload: object, now: float) -> float:
    try:
        return scheduled_at(payload, now)
    except ApiError as e:
        raise _validation(f"[{i}].{e.message}") from None


def _answering(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Turn an endpoint's ApiError into its answer, and anything unexpected into a 500."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as e:
            return _error(e)
        except Exception:
            # The body may hold personal data and the headers a key: log neither.
            log.exception("%s %s failed", request.method, request.url.path)
            return _error(ApiError(500, "application_error", "An unexpected error occurred."))

    return answer


def bind_http(address: str) -> socket.socket:
    """A listening socket on ``address`` ("host:port"; port 0 picks one)."""
    host, port = parse_hostport(address, "listen.http")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(engine: Engine, address: str = "", *, sockets: list[socket.socket] | None = None,
                     peers: Peers | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on ``address`` until cancelled; or on the listening ``sockets`` given (a
    shard's: the port it shares with its siblings, and its private one for them).

    Args:
      task_status: started with the (host, port) of the first socket.
    """
    if sockets is None:
        sockets = [bind_http(address)]
    bound = sockets[0].getsockname()[:2]
    hc = hypercorn.config.Config()
    # hypercorn takes the descriptors over (and closes them) from here on.
    hc.bind = [f"fd://{sock.detach()}" for sock in sockets]
    hc.accesslog = None
    hc.errorlog = log
    hc.graceful_timeout = 1.0
    log.info("HTTP listener on %s:%d", *bound)

    async def started(task_status=trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn.trio.serve(create_app(engine, peers), hc, shutdown_trigger=trio.sleep_forever,
                                   task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(started)
        task_status.started(bound)
