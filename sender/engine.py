"""The engine: the public object that owns the journal and the delivery tree.

A trio program embeds ``sender`` by running an Engine in its own nursery and submitting to it::

    async with trio.open_nursery() as nursery:
        engine = await nursery.start(Engine(config).run)
        msg_id = await engine.submit("app@example.com", ["user@example.net"], body)

``sender run`` is a thin shell around the same object (plus the SMTP listener).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import random
import sys
import time
from pathlib import Path

import msgspec
import trio

from .config import Config, ConfigError
from .delivery import Dispatcher, PoolStatistics, backoff
from .errors import UsageError
from .dsn import Report, parse as parse_report, verp_address, verp_id
from .abuse import AbuseWatch
from .controls import EVENTS as CONTROL_EVENTS, Change, ControlError, Controls, check_reason, with_limits
from .dkim import DkimError, Signer
from .routing import describe_action
from .events import Event, EventLog
from .webhooks import Webhooks
from .metrics import Metrics
from .mime import summary
from .status import Email, EmailStatus, iso_utc
from .ndr import build_report, wants_report
from .idempotency import IdempotencyStore
from .quotas import QuotaExceeded, Quotas, TooManyRecipients
from .suppression import SUPPRESSING_CATEGORIES, Entry, SuppressionList
from .journal import Journal, JournalStatistics
from .smtp.client import OpenStream
from .model import Accepted, Bounced, Canceled, Deferred, Delivered, Delivery, Expired, Reply, Rescheduled

__all__ = ["Blocked", "Engine", "EngineStatistics", "NotFound", "NotScheduled", "QuotaExceeded", "SpoolFull", "Submission",
           "Suppressed", "TooManyRecipients", "max_in_flight", "split_by_domain", "suppression_path"]

log = logging.getLogger("sender.engine")

# Greylisting servers accept a retry after a few minutes (postgrey's default: 300 s).
GREYLIST_RETRY = 300.0
_ID_LEN = 17                    # message ids: 14 hex digits of microseconds, 3 of the pid
_VERP_LOCAL_MAX = 64            # octets of a local part (RFC 5321 4.5.3.1.1)
_VERP_SOURCE = "x"              # then 8 hex digits: the IPv4 source the message left from


class SpoolFull(Exception):
    """The spool is over ``spool.max_bytes``: injection must answer 452 4.3.1 until it drains."""


class Suppressed(UsageError):
    """Every recipient is on the customer's suppression list; ``entries`` says why for each."""

    def __init__(self, entries: dict[str, Entry]) -> None:
        self.entries = entries
        super().__init__("recipients suppressed: " + "; ".join(
            f"{addr} ({e.reason} since {time.strftime('%Y-%m-%d', time.gmtime(e.added_at))})"
            for addr, e in entries.items()))


class Blocked(UsageError):
    """Every recipient is at a domain of ``abuse.blocked_domains``; nothing was queued."""


class EngineStatistics(msgspec.Struct, frozen=True):
    accepted: int
    delivered: int
    deferred: int
    bounced: int
    expired: int
    suppressed: int
    bounced_later: int          # bounces that came back after the remote host had accepted
    complaints: int
    canceled: int               # scheduled messages called off before their time
    queued: int
    in_flight: int               # connection workers busy: in a transaction, or connecting for one
    live_messages: int
    journal: JournalStatistics
    sites: list[PoolStatistics]


def max_in_flight(config: Config) -> int:
    """Most messages whose delivery can be under way at once per path: one transaction per
    connection, at the largest connection_limit a path may have. After a crash, only these
    can be delivered twice."""
    sh = config.shaping
    limits = [config.delivery.connection_limit, sh.default.connection_limit,
              *(p.connection_limit for p in sh.provider.values())]
    return max(n for n in limits if n is not None)


def suppression_path(config: Config) -> Path:
    """The suppression log: in the spool, or beside the shards' spools (they share it)."""
    spool = Path(config.spool.path)
    return (spool.parent if config.daemon.processes > 1 else spool) / "suppression.log"


def split_by_domain(rcpts: list[str]) -> dict[str, list[str]]:
    """Group recipients by lower-cased domain, keeping their order. Domain names are interned:
    a queue of a million messages holds each domain once."""
    out: dict[str, list[str]] = {}
    for r in rcpts:
        out.setdefault(sys.intern(r.rpartition("@")[2].lower()), []).append(r)
    return out


class Submission(msgspec.Struct, frozen=True):
    """One message of :meth:`Engine.submit_many`."""

    sender: str
    rcpts: list[str]
    body: bytes
    customer: str = ""
    message_type: str = ""
    not_before: float = 0.0
    tags: dict[str, str] = {}


class NotFound(UsageError):
    """No such message queued (for this customer)."""


class NotScheduled(UsageError):
    """The message does not wait for a scheduled time (any more)."""


class Engine:
    """Durable queue + delivery. Create, then ``await nursery.start(engine.run)``.

    Args:
      config: a :class:`~sender.config.Config`.
      repair: skip corrupt journal records in the middle instead of refusing to start.
      open_stream: replaces TCP connects for delivery (tests use in-memory streams).
      epoch: wall-clock seconds at trio time 0 (default: the real clock's, at ``run``); a
        simulation on a virtual clock picks its own date.
      id_suffix: the last three hex digits of every message id (a shard's index, so that any
        shard can tell which one owns a message); default: from the process id.
    """

    def __init__(self, config: Config, *, repair: bool = False, open_stream: OpenStream | None = None,
                 epoch: float | None = None, id_suffix: int | None = None) -> None:
        self.config = config
        self._fixed_epoch = epoch
        self.repair = repair
        sp = config.spool
        self.journal = Journal(sp.path, fsync=sp.fsync, segment_bytes=sp.segment_bytes,
                               batch_window=sp.batch_window)
        Path(sp.path).mkdir(parents=True, exist_ok=True)
        self.controls = Controls(Path(sp.path) / "controls.log", pools={
            name: {config.source[s].address for s in pc.sources if s in config.source}
            for name, pc in config.pool.items()})
        self._rules_config = config         # the shaping rules before the operators' limits
        self.dispatcher = Dispatcher(with_limits(config, self.controls.limits.values()), self, self.now, open_stream,
                                     state_path=str(Path(sp.path) / "egress.state"))
        self.dispatcher.controls = self.controls
        self.dispatcher.egress.operator_route = self.controls.reroute
        self.quarantine: dict[str, list[Delivery]] = {}     # purge id -> its parts, held
        self._quarantine_changed = trio.Event()
        self.draining: Change | None = None                 # intake is closed while set
        self.drained = trio.Event()                         # set when a drain is done
        self.intake_busy: list = []         # listeners' "a client is in a transaction" checks
        self._live: dict[str, Delivery | list[Delivery]] = {}
        self._epoch = 0.0
        self._last_id = 0
        self._pid = (os.getpid() if id_suffix is None else id_suffix) & 0xFFF
        self.counts = dict.fromkeys(("accepted", "delivered", "deferred", "bounced", "expired", "suppressed",
                                     "bounced_later", "complaints", "canceled"), 0)
        self.quotas = Quotas(config.customer, config.daemon.processes)
        su = config.suppression
        self.suppression = SuppressionList(
            suppression_path(config), {"bad_domain": su.bad_domain_ttl, "inactive_mailbox": su.inactive_mailbox_ttl},
            shared=config.daemon.processes > 1, on_write=self._suppression_written) if su.enabled else None
        self._suppression_dirty = trio.Event()
        self._suppression_read = 0.0
        self._wait_outcomes = sp.fsync == "always"
        ev = config.events
        self.events = EventLog(ev.path or Path(sp.path) / "events", retention=ev.retention, recent=ev.recent,
                               now=self.now)
        self.emails = EmailStatus(ev.email_status)
        try:
            self.signer = Signer.from_config(config.dkim)
        except DkimError as e:
            raise ConfigError(str(e)) from None
        self.webhooks = Webhooks(config.customer, config.webhooks, Path(sp.path) / "webhooks.log", self.now,
                                 on_write=self._webhook_written) if any(c.webhook for c in config.customer) else None
        self.events.subscribers.append(self.emails.observe)
        self.metrics = Metrics(self)
        ab = config.abuse
        self.abuse = AbuseWatch(ab.window, ab.min_messages, ab.max_bounce_rate, ab.max_complaint_rate) \
            if ab.auto_pause else None
        if self.abuse is not None:
            self.events.subscribers.append(self._watch)
        self.events.subscribers.append(self.metrics.observe)
        self.journal.on_fsync = self.metrics.fsync_done
        self._nursery: trio.Nursery | None = None
        self._drained = trio.Event()

    # ---------------------------------------------------------------- clock, ids

    def now(self) -> float:
        """Wall-clock seconds, advancing with trio's clock (so MockClock warps it too)."""
        return self._epoch + trio.current_time()

    def new_id(self) -> str:
        """A fresh message id (sortable by time, unique across restarts)."""
        return self._new_id()

    def _new_id(self) -> str:
        # Microseconds since the epoch, kept strictly increasing; unique across restarts
        # because replay seeds _last_id from the newest id on disk.
        t = max(int(self.now() * 1_000_000), self._last_id + 1)
        self._last_id = t
        return f"{t:014X}{self._pid:03X}"

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Replay the journal, start the writer and the dispatcher, then run until cancelled.

        Raises:
          JournalCorrupt: the journal is corrupt in the middle and ``repair`` is off.
        """
        self._epoch = time.time() - trio.current_time() if self._fixed_epoch is None else self._fixed_epoch
        # The replayed dict becomes the live registry itself: no second million-entry copy.
        self._live = live = self.journal.replay(repair=self.repair)
        self._last_id = _id_time(max(live, default=""))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.journal.run)
            if self.emails.capacity:
                self.emails.load(self.events.folder)
            self.quotas.load(self.events.folder, self.now())
            await nursery.start(self.events.run)
            if self.webhooks is not None:
                await nursery.start(self.webhooks.run)
            await nursery.start(self.dispatcher.run)
            now = self.now()
            held = self._quarantined_rcpts()
            for d in list(live.values()):
                self._track(d, now, held)
            nursery.start_soon(self._compactor)
            nursery.start_soon(self._quarantine_expiry)
            if self.suppression is not None:
                nursery.start_soon(self._suppression_sync)
            log.info("engine started: %d messages in the queue", len(self._live))
            task_status.started(self)

    def _track(self, msg: Delivery, now: float | None = None,
               held: dict[str, dict[str, str]] | None = None) -> None:
        """Register a live message and queue one delivery per recipient domain (but for the
        recipients in a purge's quarantine, ``held``: message id -> recipient -> purge id)."""
        if len(msg.rcpts) == 1 and not (held and msg.id in held):
            msg.domain = sys.intern(msg.rcpts[0].rpartition("@")[2].lower())
            self._live[msg.id] = msg
            self.dispatcher.submit(msg, now)
            return
        groups = split_by_domain(msg.rcpts)
        parts = []
        for domain, rcpts in groups.items():
            d = msgspec.structs.replace(msg, domain=domain, rcpts=rcpts) if len(groups) > 1 else msg
            d.domain = domain
            parts.append(d)
        self._live[msg.id] = parts[0] if len(parts) == 1 else parts
        if held and msg.id in held:
            parts = self._hold_back(parts, held[msg.id])
        for d in parts:
            self.dispatcher.submit(d, now)

    async def shutdown(self, grace: float) -> None:
        """Stop starting transactions, wait up to ``grace`` seconds for the ones in flight."""
        self.dispatcher.stop()
        with trio.move_on_after(grace):
            while self.dispatcher.in_flight():
                await trio.sleep(0.02)
        await self.journal.wait_durable()

    # ---------------------------------------------------------------- intake

    @property
    def spool_full(self) -> bool:
        return self.journal.total_bytes >= self.config.spool.max_bytes

    async def submit(self, sender: str, rcpts: list[str], body: bytes, *, customer: str = "",
                     message_type: str = "", msg_id: str | None = None, not_before: float = 0.0,
                     tags: dict[str, str] | None = None) -> str:
        """Make a message durable and queue it; returns its id once it is safe on disk.

        Args:
          customer: whose mail it is (its shaping limits, pool, quotas and recipient limit).
          message_type: e.g. "transactional" or "marketing": its priority (``shaping.priority``).
          msg_id: an id from :meth:`new_id` when the caller needed it earlier (trace headers).
          not_before: wall-clock time before which it is not sent (a scheduled email); its
            ``max_age`` counts from then.
          tags: name -> value, told back in the message's events and webhooks.

        Recipients on the customer's suppression list are left out (see :meth:`suppressed`).

        Raises:
          UsageError: no recipients, or an address without a domain.
          Suppressed: every recipient is suppressed; nothing was queued.
          TooManyRecipients: more than the customer's ``max_recipients``.
          QuotaExceeded: the customer's hourly or daily quota is used up (``retry_at``).
          SpoolFull: the spool is over its size limit.
        """
        rec = self._accepted(sender, rcpts, body, customer, message_type, msg_id, not_before, tags)
        self._announce(rec)
        loc = await self.journal.commit(rec)
        self._queue_accepted(rec, loc)
        return rec.id

    async def submit_many(self, messages: list[Submission]) -> list[str | Exception]:
        """Make several messages durable in one group commit, and queue them: for each, its
        id, or the exception :meth:`submit` would have raised (nothing queued for that one)."""
        records: list[Accepted | Exception] = []
        for m in messages:
            try:
                records.append(self._accepted(m.sender, m.rcpts, m.body, m.customer, m.message_type, None,
                                              m.not_before, m.tags))
            except (UsageError, Suppressed, SpoolFull) as e:
                records.append(e)
        for r in records:
            if isinstance(r, Accepted):
                self._announce(r)
        locations = [self.journal.append(r) if isinstance(r, Accepted) else None for r in records]
        await self.journal.wait_durable()
        out: list[str | Exception] = []
        for rec, loc in zip(records, locations):
            if isinstance(rec, Accepted):
                self._queue_accepted(rec, loc)
                out.append(rec.id)
            else:
                out.append(rec)
        return out

    def _accepted(self, sender: str, rcpts: list[str], body: bytes, customer: str, message_type: str,
                  msg_id: str | None, not_before: float, tags: dict[str, str] | None = None,
                  own_report: bool = False) -> Accepted:
        """Check a message and make its Accepted record (suppressed recipients left out); it
        counts against the customer's quotas from here. ``own_report``: a non-delivery report
        of ours, which the customer's quota and recipient limit never refuse (it still counts)."""
        if not rcpts:
            raise UsageError("rcpts: at least one recipient is required")
        for r in rcpts:
            local, at, domain = r.rpartition("@")
            if not at or not local or not domain or any(c in r for c in "\r\n <>"):
                raise UsageError(f"rcpts: invalid recipient address {r!r}")
        if not own_report:
            self.quotas.check_recipients(customer, len(rcpts))
        if self.spool_full:
            raise SpoolFull(f"spool is over its limit of {self.config.spool.max_bytes} bytes")
        now = self.now()
        if not own_report:
            self.check_quota(customer, [rcpts], message_type=message_type, now=now)
        blocked = self.blocked(rcpts)
        if blocked:
            for addr in blocked:
                self._emit(Event(time=now, event="blocked", customer=customer, rcpts=[addr],
                                 domain=addr.rpartition("@")[2].lower(), message_type=message_type,
                                 category="blocked_domain"), notify=False)
            if len(blocked) == len(rcpts):
                raise Blocked(f"every recipient is at a blocked domain (abuse.blocked_domains): {', '.join(blocked)}")
            rcpts = [r for r in rcpts if r not in blocked]
        suppressed = self.suppressed(customer, rcpts, now)
        if suppressed:
            self.counts["suppressed"] += len(suppressed)
            everyone = len(suppressed) == len(rcpts)
            msg_id = "" if everyone else msg_id or self._new_id()
            for addr, entry in suppressed.items():
                self._emit(Event(time=now, event="suppressed", id=msg_id, customer=customer, rcpts=[addr],
                                 domain=addr.rpartition("@")[2].lower(), message_type=message_type,
                                 category=entry.reason, detail={"from": sender, **summary(body)}))
            if everyone:
                raise Suppressed(suppressed)
            rcpts = [r for r in rcpts if r not in suppressed]
        # A scheduled message's life (max_age) starts at its time.
        start = not_before if not_before > now else now
        self.quotas.take(customer, now)
        return Accepted(id=msg_id or self._new_id(), sender=sys.intern(sender), rcpts=list(rcpts),
                        received_at=start, body=body, customer=customer,
                        next_at=not_before if not_before > now else 0.0, message_type=message_type,
                        tags=tags or {})

    def _announce(self, rec: Accepted) -> None:
        """The accepted (or scheduled) event, before the record is durable: its webhook is
        then in the outbox no later than the message is in the journal. (Should the commit
        fail, the daemon stops: a journal that cannot be synced acknowledges nothing more.)"""
        head = summary(rec.body)
        if rec.tags:
            head["tags"] = rec.tags
        self._emit(Event(time=self.now(), event="scheduled" if rec.next_at else "accepted", id=rec.id,
                         customer=rec.customer, rcpts=rec.rcpts, message_type=rec.message_type,
                         next_at=rec.next_at, detail=head), notify=bool(rec.sender))

    def _queue_accepted(self, rec: Accepted, loc) -> None:
        self.counts["accepted"] += 1
        self._track(Delivery(id=rec.id, sender=rec.sender, domain="", rcpts=rec.rcpts, segment=loc.segment,
                             offset=loc.offset, length=loc.length, received_at=rec.received_at,
                             next_at=rec.next_at, customer=rec.customer, message_type=rec.message_type))

    @functools.cached_property
    def idempotency(self) -> IdempotencyStore:
        """Answers kept by idempotency key (HTTP ``Idempotency-Key``), made on first use."""
        return IdempotencyStore(Path(self.config.spool.path) / "idempotency.log")

    def check_quota(self, customer: str, messages: list[list[str]] | None = None, *, message_type: str = "",
                    now: float | None = None) -> None:
        """Raise :class:`QuotaExceeded` unless the customer's hourly and daily quotas have room
        for ``messages`` (the recipients of each; None: one message whose recipients are not
        known yet, as at SMTP MAIL FROM) now. Counts nothing; a refusal is told as a
        ``quota_exceeded`` event per message."""
        now = self.now() if now is None else now
        messages = [[]] if messages is None else messages
        over = self.quotas.over(customer, len(messages), now)
        if over is None:
            return
        for rcpts in messages:
            domains = {r.rpartition("@")[2].lower() for r in rcpts}
            self._emit(Event(time=now, event="quota_exceeded", customer=customer, rcpts=list(rcpts),
                             domain=domains.pop() if len(domains) == 1 else "", message_type=message_type,
                             category="quota", detail={"quota": over.quota, "limit": over.limit,
                                                       "retry_at": over.retry_at}), notify=False)
        raise over

    def blocked(self, rcpts: list[str]) -> list[str]:
        """The recipients at a domain of ``abuse.blocked_domains`` (or under one)."""
        domains = self.config.abuse.blocked_domains
        if not domains:
            return []
        out = []
        for r in rcpts:
            domain = r.rpartition("@")[2].lower().rstrip(".")
            if any(domain == d or domain.endswith("." + d) for d in domains):
                out.append(r)
        return out

    def suppressed(self, customer: str, rcpts: list[str], now: float | None = None) -> dict[str, Entry]:
        """The recipients that ``customer`` must not mail, with the entry that says why."""
        if self.suppression is None:
            return {}
        now = self.now() if now is None else now
        if now - self._suppression_read >= 1.0:
            # What a sibling shard or `sender suppression add` appended: seen within a second.
            self._suppression_read = now
            self.suppression.refresh()
        check = self.suppression.check
        return {r: e for r in rcpts if (e := check(customer, r, now)) is not None}

    def _suppression_written(self) -> None:
        if not self._suppression_dirty.is_set():
            self._suppression_dirty.set()

    async def _suppression_sync(self) -> None:
        """fsync what this process added to the suppression log, a second after the first
        unsynced write at the latest (asleep while there is none)."""
        while True:
            await self._suppression_dirty.wait()
            await trio.sleep(1.0)
            self._suppression_dirty = trio.Event()
            await trio.to_thread.run_sync(self.suppression.sync)

    # ---------------------------------------------------------------- outcomes (called by delivery)

    def return_path(self, d: Delivery, source: str = "") -> str:
        """``bounces+ID@bounces.domain`` (VERP) when ``bounces.domain`` is set: a bounce then
        names its message. ID is the message id; then "x" and the IPv4 source address in hex
        when it left from one (a later bounce or complaint counts against that source's
        reputation); then the customer in hex when it fits the 64-byte local part (it finds
        the customer's suppression list once the message is gone from the queue). The null
        sender stays null."""
        domain = self.config.bounces.domain
        if not domain or not d.sender:
            return d.sender
        tag = ""
        if source:
            try:
                tag = _VERP_SOURCE + ipaddress.IPv4Address(source).packed.hex()
            except ValueError:
                pass                        # IPv6: no room; such reports count for no source
        customer = d.customer.encode().hex()
        if len("bounces+") + _ID_LEN + len(tag) + len(customer) > _VERP_LOCAL_MAX:
            customer = ""
        return verp_address(d.id + tag + customer, domain)

    def take_report(self, envelope_rcpts: list[str], raw: bytes) -> Report:
        """A bounce or complaint arrived at the bounce domain: record the outcome against the
        message and recipient it names, and suppress the address for that customer when the
        failure is for good or it is a complaint."""
        domain = self.config.bounces.domain
        report = parse_report(raw, bounce_domain=domain)
        vid = report.verp_id or next((v for r in envelope_rcpts if (v := verp_id(r, domain))), None)
        if vid is None or len(vid) < _ID_LEN:
            log.info("report without a message id of ours (%s): ignored", report.kind)
            return report
        msg_id, rest = vid[:_ID_LEN], vid[_ID_LEN:]
        source = ""
        if rest.startswith(_VERP_SOURCE) and len(rest) >= 9:    # customer hex never holds an "x"
            try:
                source = str(ipaddress.IPv4Address(bytes.fromhex(rest[1:9])))
            except ValueError:
                pass
            rest = rest[9:]
        try:
            customer = bytes.fromhex(rest).decode()
        except ValueError:
            customer = ""
        live = self._live.get(msg_id)
        if live is not None:
            customer = (live[0] if isinstance(live, list) else live).customer
        now = self.now()
        for r in report.recipients:
            if not r.recipient:
                continue
            if source and report.kind in ("complaint", "bounce"):
                self.dispatcher.reputation_later(source, r.recipient, report.kind, r.category, now)
            self._emit(Event(time=now, event="complained" if report.kind == "complaint" else "bounced", id=msg_id,
                             customer=customer, rcpts=[r.recipient], domain=r.recipient.rpartition("@")[2].lower(),
                             source=source, reply=r.diagnostic or "", category=r.category or "",
                             detail={"after_delivery": live is None, "report": report.kind,
                                     **({"feedback_type": report.feedback_type} if report.feedback_type else {})}))
            if report.kind == "complaint":
                self.counts["complaints"] += 1
                if self.suppression is not None:
                    self.suppression.add(customer, r.recipient, "complaint", now, source=msg_id,
                                         detail=report.feedback_type or "")
            elif report.kind == "bounce" and r.permanent:
                self.counts["bounced_later"] += 1
                reply = Reply(r.reply_code or 550, r.diagnostic or "", r.status or "")
                if live is None:        # a bounce after delivery: its history, for events
                    self._record(Bounced(msg_id, [r.recipient], now, reply, r.category))
                if self.suppression is not None and r.category in SUPPRESSING_CATEGORIES:
                    self.suppression.add(customer, r.recipient, r.category, now, source=msg_id, detail=str(reply))
        log.info("%s for %s read: %d recipients", report.kind, msg_id, len(report.recipients))
        return report

    def body(self, d: Delivery) -> bytes:
        return self.journal.read(d.segment, d.offset, d.length).body

    def message(self, d: Delivery) -> bytes:
        """The bytes delivery sends: the body as accepted, DKIM-signed for its From: domain
        when a ``[[dkim]]`` key applies (signed at each attempt, so a new key or selector
        takes effect for mail already queued)."""
        body = self.body(d)
        return body if self.signer is None else self.signer.sign(body, self.now())

    # ---------------------------------------------------------------- operators' controls

    def control(self, action: str, scope: str, value: str, who: str, reason: str,
                detail: dict | None = None) -> Change:
        """Pause or resume sending (customer, recipient domain, provider, source IP or pool),
        reroute a domain or provider to a pool (``detail["pool"]``) or unroute it, limit a
        rate (``detail["rate"]``, a provider's ``detail["connections"]``) or unlimit it:
        durable when this returns, an event, and in force at once.

        Raises:
          ControlError: naming the field at fault (a reason is required).
        """
        if action == "limit" and scope == "provider" and value.strip().lower() not in self.dispatcher.shaper.rules.names:
            raise ControlError(f"provider: no provider {value!r} ([shaping.provider.NAME] or a built-in one)")
        change = self.controls.change(action, scope, value, who, reason, self.now(), detail)
        self._control_event(change)
        if action in ("pause", "resume"):
            self.dispatcher.controls_changed()
        elif action in ("reroute", "unroute"):
            self.dispatcher.rerouted(**{scope: change.value})
        else:
            self.replace_rules(self._rules_config)
        return change

    def _control_event(self, change: Change, **detail) -> None:
        fields = {change.scope: change.value} if change.scope in ("customer", "domain", "provider", "source") else {}
        self._emit(Event(time=change.at, event=CONTROL_EVENTS[change.action],
                         detail={"scope": change.scope, "value": change.value, "who": change.who,
                                 "reason": change.reason, **change.detail, **detail}, **fields), notify=False)
        log.warning("%s %s %r by %s: %s", change.action, change.scope, change.value, change.who, change.reason)

    def replace_rules(self, config: Config) -> None:
        """New shaping rules at run time (SIGHUP): the operators' limits stay on top."""
        self._rules_config = config
        self.dispatcher.replace_rules(with_limits(config, self.controls.limits.values()))

    def purge(self, match: dict[str, str], *, who: str, reason: str, then: str = "bounce",
              dry_run: bool = False, keep: float | None = None, purge_id: str | None = None) -> dict:
        """Take the queued mail that ``match`` names (``PURGE_FIELDS``, all must match) out
        of the queue into a quarantine, durable when this returns. It can be released until
        ``keep`` seconds (``controls.quarantine_retention``) have passed; then ``then``
        happens: "bounce" (a bounce, its webhook and a report to the sender) or "drop"
        (canceled, silently). ``dry_run`` only counts. A part in a transaction under way is
        not taken (``in_flight``). ``provider`` matches mail whose domain's MX hosts are known
        to be that provider's (not yet looked up: no match).

        Raises:
          ControlError: naming the field at fault.
        """
        reason = check_reason(reason)
        if not match:
            raise ControlError(f"filter: a purge needs at least one of {', '.join(PURGE_FIELDS)}")
        for name, value in match.items():
            if name not in PURGE_FIELDS:
                raise ControlError(f"{name}: not a purge filter (use {', '.join(PURGE_FIELDS)})")
            if not isinstance(value, str) or not value.strip():
                raise ControlError(f"{name}: expected a non-empty string")
        match = {k: v.strip().lower() if k in ("domain", "provider") else v.strip() for k, v in match.items()}
        if then not in ("bounce", "drop"):
            raise ControlError(f"then: expected bounce or drop, got {then!r}")
        if keep is not None and not keep > 0:
            raise ControlError("keep: must be more than 0 seconds")
        held = {id(d) for parts in self.quarantine.values() for d in parts}
        wanted = [d for d in self._parts() if id(d) not in held and self._purge_matches(d, match)]
        count = _tally(wanted)
        if dry_run:
            return {"dry_run": True, "filter": match, **count}
        now = self.now()
        taken = self.dispatcher.take(wanted)
        count = {**_tally(taken), "in_flight": len(wanted) - len(taken)}
        if not taken:
            return {"id": None, "filter": match, **count}
        purge_id = purge_id or self.new_purge_id()
        until = now + (keep if keep is not None else self.config.controls.quarantine_retention)
        change = Change(action="purge", scope="purge", value=purge_id, who=who or "unknown", reason=reason, at=now,
                        detail={"filter": match, "then": then, "until": until, **count,
                                "parts": [[d.id, list(d.rcpts)] for d in taken]})
        try:
            self.controls.record(change)
        except OSError:
            for d in taken:             # not durable: nothing was purged
                self.dispatcher.submit(d, now)
            raise
        self.quarantine[purge_id] = taken
        why = {"purge": purge_id, "who": change.who, "reason": reason, "until": until, "then": then}
        for d in taken:
            self._outcome("quarantined", d, d.rcpts, now, detail=why)
        self._control_event(msgspec.structs.replace(change, detail={k: v for k, v in change.detail.items()
                                                                    if k != "parts"}))
        self._quarantine_changed.set()
        return {"id": purge_id, "filter": match, "then": then, "until": until, **count}

    def new_purge_id(self) -> str:
        return "Q" + self._new_id()

    def release(self, purge_id: str, who: str, reason: str) -> dict:
        """Send a purge's quarantined mail on (through the shaper and any pause, as new).

        Raises:
          ControlError: no such purge in quarantine, or no reason.
        """
        reason = check_reason(reason)
        if purge_id not in self.controls.purges:
            raise ControlError(f"id: no purge {purge_id!r} in quarantine (released, expired, or never made)")
        now = self.now()
        change = self.controls.record(Change(action="release", scope="purge", value=purge_id,
                                             who=who or "unknown", reason=reason, at=now))
        parts = [d for d in self.quarantine.pop(purge_id, []) if d.rcpts]
        for d in parts:
            self._outcome("released", d, d.rcpts, now, detail={"purge": purge_id, "who": change.who, "reason": reason})
            d.next_at = 0.0
            self.dispatcher.submit(d, now)
        count = _tally(parts)
        self._control_event(change, **count)
        self._quarantine_changed.set()
        return {"id": purge_id, **count}

    async def _quarantine_expiry(self) -> None:
        """Bounce or drop each purge's mail when its time in quarantine is up (asleep until
        then). The outcomes are durable before the purge is marked expired, so a crash in
        between expires the rest again at start."""
        while True:
            self._quarantine_changed = trio.Event()
            due = min((c.detail["until"] for c in self.controls.purges.values()), default=None)
            if due is None or due > self.now():
                with trio.move_on_after(max(0.0, due - self.now()) if due is not None else float("inf")):
                    await self._quarantine_changed.wait()
                continue
            now = self.now()
            purge_id, purge = next((k, c) for k, c in self.controls.purges.items() if c.detail["until"] == due)
            reply = Reply(550, f"purged by {purge.who}: {purge.reason}", "5.7.1")
            for d in self.quarantine.pop(purge_id, []):
                if not d.rcpts:
                    continue
                rcpts = list(d.rcpts)
                if purge.detail["then"] == "bounce":
                    self.bounced(d, rcpts, reply, "permanent_other")
                else:
                    self._outcome("canceled", d, rcpts, now, reply, detail={"purge": purge_id})
                    self._record(Canceled(d.id, rcpts, now))
                    self.counts["canceled"] += 1
                    self._done(d, rcpts)
            await self.journal.wait_durable()
            self._control_event(self.controls.record(Change(
                action="expire", scope="purge", value=purge_id, who="sender quarantine",
                reason=f"{purge.detail['then']} after {due - purge.at:g} s in quarantine",
                at=now)))

    def _parts(self):
        for entry in self._live.values():
            if isinstance(entry, list):
                yield from entry
            else:
                yield entry

    def _purge_matches(self, d: Delivery, match: dict[str, str]) -> bool:
        for name, value in match.items():
            have = self.dispatcher.provider_of(d.domain) if name == "provider" else getattr(d, name)
            if have != value:
                return False
        return True

    def _quarantined_rcpts(self) -> dict[str, dict[str, str]]:
        """Message id -> recipient -> purge id, of every purge still in quarantine (at start)."""
        held: dict[str, dict[str, str]] = {}
        for purge_id, purge in self.controls.purges.items():
            self.quarantine[purge_id] = []
            for msg_id, rcpts in purge.detail["parts"]:
                held.setdefault(msg_id, {}).update(dict.fromkeys(rcpts, purge_id))
        return held

    def _hold_back(self, parts: list[Delivery], held: dict[str, str]) -> list[Delivery]:
        """Put the quarantined recipients of a replayed message's ``parts`` back in their
        purge's quarantine; returns the parts to queue."""
        out = []
        for d in parts:
            mine = [r for r in d.rcpts if r in held]
            if not mine:
                out.append(d)
                continue
            if len(mine) < len(d.rcpts):          # part of them: the rest is queued
                rest = [r for r in d.rcpts if r not in held]
                d.rcpts = rest
                out.append(d)
                d = msgspec.structs.replace(d, rcpts=mine)
                entry = self._live[d.id]
                self._live[d.id] = (entry if isinstance(entry, list) else [entry]) + [d]
            d.next_at = 0.0
            self.quarantine[held[mine[0]]].append(d)
        return out

    def drain(self, who: str, reason: str, timeout: float | None = None) -> Change:
        """Close intake (SMTP 421 4.3.2, HTTP 503) and let what is queued go; :attr:`drained`
        is set once nothing is left to send now (mail waiting for a retry, a pause or in
        quarantine stays on disk) or after ``timeout`` (``controls.drain_timeout``). The
        daemon then stops.

        Raises:
          ControlError: no reason, or a drain already under way.
        """
        reason = check_reason(reason)
        if self.draining is not None:
            raise ControlError(f"drain: already draining since {iso_utc(self.draining.at)} ({self.draining.reason})")
        now = self.now()
        timeout = timeout if timeout is not None else self.config.controls.drain_timeout
        change = self.controls.record(Change(action="drain", scope="daemon", value="", who=who or "unknown",
                                             reason=reason, at=now, detail={"until": now + timeout}))
        self.draining = change
        self._control_event(change)
        assert self._nursery is not None
        self._nursery.start_soon(self._drain, change)
        return change

    def undrain(self, who: str, reason: str) -> Change:
        """Call a drain off: intake opens again.

        Raises:
          ControlError: no reason, or no drain under way.
        """
        reason = check_reason(reason)
        if self.draining is None:
            raise ControlError("drain: no drain under way")
        change = self.controls.record(Change(action="undrain", scope="daemon", value="", who=who or "unknown",
                                             reason=reason, at=self.now()))
        self.draining = None
        self._control_event(change)
        return change

    async def _drain(self, change: Change) -> None:
        await trio.sleep(DRAIN_ANSWER)          # the answers to the drain (and its siblings') go out first
        with trio.move_on_at(trio.current_time() + change.detail["until"] - change.at):
            while self.draining is change:
                depth = self.dispatcher.depth()
                if not (depth["ready"] or depth["throttled"] or depth["resolving"] or depth["in_flight"]
                        or any(busy() for busy in self.intake_busy)):
                    break
                await trio.sleep(0.1)
        if self.draining is change:
            log.warning("drained: %d messages stay queued for the next start", len(self._live))
            self.drained.set()

    def _watch(self, ev: Event) -> None:
        assert self.abuse is not None
        reason = self.abuse.observe(ev)
        if reason and ("customer", ev.customer) not in self.controls.pauses and self._nursery is not None:
            # Out of the delivery call that made the event: the pause reshuffles the queues.
            self._nursery.start_soon(self._auto_pause, ev.customer, reason)

    async def _auto_pause(self, customer: str, reason: str) -> None:
        if ("customer", customer) not in self.controls.pauses:
            self.control("pause", "customer", customer, "sender abuse watch", reason)

    def where(self, msg_id: str) -> list[dict]:
        """Where each part of a queued message waits now, and why (see Dispatcher.where)."""
        entry = self._live.get(msg_id)
        parts = [] if entry is None else entry if isinstance(entry, list) else [entry]
        now = self.now()
        return [{"rcpts": list(p.rcpts), "attempts": p.attempts, "next_at": p.next_at, "customer": p.customer,
                 **self.dispatcher.where(p, now)} for p in parts]

    def email(self, msg_id: str) -> Email | None:
        """A message's summary and last event: from the event log's account of recent
        messages, or, for an older one still queued, from its journal record."""
        email = self.emails.get(msg_id)
        if email is not None:
            return email
        entry = self._live.get(msg_id)
        if entry is None:
            return None
        parts = entry if isinstance(entry, list) else [entry]
        head = self.journal.read(parts[0].segment, parts[0].offset, parts[0].length)
        fields = summary(head.body)
        now = self.now()
        waiting = all(p.attempts == 0 and p.next_at > now for p in parts)
        last = "scheduled" if waiting else "delivery_delayed" if any(p.attempts for p in parts) else "queued"
        return Email(msg_id, head.customer, _id_time(msg_id) / 1e6, fields.get("from", ""),
                     [r for p in parts for r in p.rcpts], fields.get("subject", ""), last,
                     parts[0].next_at if waiting else 0.0, dict(head.tags))

    def _emit(self, ev: Event, notify: bool = True) -> None:
        """Record ``ev``; and unless ``notify`` is off (our own non-delivery reports), tell
        the customer's webhooks."""
        self.events.emit(ev)
        hooks = self.webhooks
        if notify and hooks is not None and (kind := _WEBHOOK_TYPES.get(ev.event)) and hooks.wants(ev.customer, kind):
            hooks.emit(ev.customer, kind, self._webhook_data(ev, kind), ev.time)

    def action_taken(self, action) -> None:
        self._emit(Event(time=action.started, event="automation", source=action.source, provider=action.provider,
                         site=action.site, detail={"rule": action.rule, "action": describe_action(action),
                                                   "until": action.until, "replies": action.replies}))

    def throttled(self, hold, now: float) -> None:
        """A bucket holds mail now (the dispatcher reports it every THROTTLE_REPORT seconds):
        ``sender explain`` shows it for the messages it concerns."""
        self._emit(Event(time=now, event="throttled", customer=hold.customer, domain=hold.domain,
                         provider=hold.provider, site=hold.site, source=hold.source,
                         detail={"bucket": hold.bucket, "held": hold.held, "until": round(hold.until, 3)}))

    def _webhook_written(self) -> None:
        # The outbox is fsynced with the journal's next batch, before the outcome records
        # written after it: an outcome is never durable without its webhook.
        assert self.webhooks is not None
        self.journal.sync_with(self.webhooks.fd)

    def _webhook_data(self, ev: Event, kind: str) -> dict:
        """The ``data`` of a Resend webhook event."""
        email = self.email(ev.id) if ev.id else None
        detail = ev.detail
        data: dict = {"email_id": ev.id or None,
                      "created_at": iso_utc(email.created_at if email is not None else ev.time),
                      "from": email.sender if email is not None else str(detail.get("from", "")),
                      "to": ev.rcpts,
                      "subject": email.subject if email is not None else str(detail.get("subject", ""))}
        if email is not None and email.tags:
            data["tags"] = dict(email.tags)
        if kind == "email.bounced":
            data["bounce"] = {"type": "Permanent" if ev.event == "bounced" else "Transient",
                              "subType": ev.category, "message": ev.reply}
        elif kind == "email.delivery_delayed":
            data["delay"] = {"attempts": ev.attempts, "next_attempt_at": iso_utc(ev.next_at), "message": ev.reply}
        elif kind == "email.failed":
            data["failed"] = {"reason": ev.reply}
        elif kind == "email.suppressed":
            data["suppressed"] = {"type": ev.category, "message": f"{ev.rcpts[0]} is on the suppression list"}
        elif kind == "email.complained":
            data["complaint"] = {"feedback_type": str(detail.get("feedback_type", "abuse"))}
        elif kind == "email.scheduled":
            data["scheduled_at"] = iso_utc(ev.next_at)
        return data

    def _outcome(self, event: str, d: Delivery, rcpts: list[str], now: float, reply: Reply | None = None,
                 category: str = "", via=None, **fields) -> None:
        self._emit(Event(time=now, event=event, id=d.id, customer=d.customer, rcpts=list(rcpts), domain=d.domain,
                         age=max(0.0, now - d.received_at), provider=via.provider if via is not None else "",
                         site=via.site.key if via is not None else "",
                         source=via.source if via is not None else "",
                         message_type=d.message_type, reply=str(reply) if reply is not None else "",
                         category=category, chosen=d.chosen if via is not None else "", **fields),
                   notify=bool(d.sender))

    def _record(self, rec) -> None:
        if self.journal.closed:
            # Shutting down by cancellation: a worker torn out of its session reports after the
            # journal closed. The message stays live on disk and goes again after a restart,
            # like any delivery in flight at a stop.
            log.info("not journaled (the journal is closed): %s for %s", type(rec).__name__, rec.id)
            return
        self.journal.append(rec)

    async def settle(self) -> None:
        """With fsync = "always", wait until the outcomes just recorded are durable."""
        if self._wait_outcomes:
            await self.journal.wait_durable()

    def _scheduled(self, msg_id: str, customer: str) -> list[Delivery]:
        """The parts of a message of ``customer`` that waits for its scheduled time.

        Raises:
          NotFound: no such message queued for this customer (another's is not seen).
          NotScheduled: it is not waiting for a time any more (sending has begun).
        """
        entry = self._live.get(msg_id)
        parts = [] if entry is None else entry if isinstance(entry, list) else [entry]
        if not parts or parts[0].customer != customer:
            raise NotFound(f"no queued email {msg_id!r}")
        now = self.now()
        if any(p.attempts or p.next_at <= now for p in parts):
            raise NotScheduled(f"email {msg_id!r} is not scheduled (sending has begun)")
        return parts

    async def cancel(self, msg_id: str, customer: str = "") -> None:
        """Call off a scheduled message before its time (journaled: final).

        Raises:
          NotFound, NotScheduled: see :meth:`_scheduled`.
        """
        parts = self._scheduled(msg_id, customer)
        now = self.now()
        await self.journal.commit(Canceled(msg_id, [r for p in parts for r in p.rcpts], now))
        self.counts["canceled"] += 1
        for p in parts:
            self._outcome("canceled", p, p.rcpts, now)
            self._done(p, p.rcpts)      # the dispatcher drops it when its time comes (no recipients)

    async def reschedule(self, msg_id: str, customer: str, when: float) -> None:
        """Give a scheduled message another time (journaled); ``when`` in the past: now.

        Raises:
          NotFound, NotScheduled: see :meth:`_scheduled`.
        """
        parts = self._scheduled(msg_id, customer)
        now = self.now()
        when = max(when, now)
        await self.journal.commit(Rescheduled(msg_id, now, when))
        for p in parts:
            self._outcome("rescheduled", p, p.rcpts, now, next_at=when)
            # A timer at the new time (or queued now); the old timer finds it moved and skips it.
            p.received_at = when
            p.next_at = when if when > now else 0.0
            self.dispatcher.submit(p)

    def _done(self, d: Delivery, rcpts: list[str]) -> None:
        """``rcpts`` of ``d`` reached a final state; release the message when none is left."""
        if len(rcpts) == len(d.rcpts):
            d.rcpts = []
        else:
            gone = set(rcpts)
            d.rcpts = [r for r in d.rcpts if r not in gone]
        if d.rcpts:
            return
        entry = self._live.get(d.id)
        if isinstance(entry, list):
            entry = [x for x in entry if x is not d]
            if entry:
                self._live[d.id] = entry if len(entry) > 1 else entry[0]
                return
        elif entry is not d:
            return
        del self._live[d.id]
        self.journal.release(d.segment)

    def delivered(self, d: Delivery, rcpts: list[str], reply: Reply, via=None) -> None:
        now = self.now()
        # The event first: its webhook is in the outbox before the outcome is in the journal.
        self._outcome("delivered", d, rcpts, now, reply, "", via, attempts=d.attempts + 1)
        self._record(Delivered(d.id, rcpts, now, reply))
        self.counts["delivered"] += len(rcpts)
        self._done(d, rcpts)

    def bounced(self, d: Delivery, rcpts: list[str], reply: Reply, category: str = "permanent_other",
                via=None) -> None:
        now = self.now()
        self._outcome("bounced", d, rcpts, now, reply, category, via, attempts=d.attempts + 1)
        self._record(Bounced(d.id, rcpts, now, reply, category))
        self.counts["bounced"] += len(rcpts)
        log.info("bounced %s to %s (%s): %s", d.id, ",".join(rcpts), category, reply)
        if self.suppression is not None and category in SUPPRESSING_CATEGORIES:
            for r in rcpts:
                self.suppression.add(d.customer, r, category, now, source=d.id, detail=str(reply))
        self._report_failure(d, rcpts, reply)
        self._done(d, rcpts)

    def _report_failure(self, d: Delivery, rcpts: list[str], reply: Reply) -> None:
        """Send the envelope sender a non-delivery report, if it wants one (``[bounces]``)."""
        bc = self.config.bounces
        if not d.sender or not bc.notify_customer.get(d.customer, bc.notify) or self._nursery is None:
            return
        original = self.body(d)
        if not wants_report(d.sender, original):
            return
        report = build_report(hostname=self.config.listen.hostname, msg_id=d.id, sender=d.sender,
                              failed=[(r, reply, "") for r in rcpts], original=original,
                              arrival=d.received_at, now=self.now())
        self._nursery.start_soon(self._send_report, d, report)

    async def _send_report(self, d: Delivery, report: bytes) -> None:
        try:
            rec = self._accepted("", [d.sender], report, d.customer, "transactional", None, 0.0, own_report=True)
            self._announce(rec)
            self._queue_accepted(rec, await self.journal.commit(rec))
        except (UsageError, SpoolFull) as e:
            log.warning("no non-delivery report for %s to %s: %s", d.id, d.sender, e)

    def deferred(self, d: Delivery, rcpts: list[str], reply: Reply, category: str = "transient_other",
                 via=None) -> Delivery | None:
        """Journal a deferral of ``rcpts``; returns the delivery to retry, or None if it expired.

        A greylisted delivery comes back after ``GREYLIST_RETRY`` (the greylisting servers'
        usual wait), whatever its count of attempts; others back off exponentially.
        """
        policy = self.dispatcher.retry_policy(d.domain)
        now = self.now()
        attempts = d.attempts + 1
        expires = d.received_at + policy.max_age
        if now >= expires:
            # Given up: "expired" after replies from a remote host, "failed" when none ever answered.
            self._outcome("failed" if category == "connection_failure" else "expired", d, rcpts, now, reply,
                          category, via, attempts=attempts)
            self._record(Expired(d.id, rcpts, now, reply))
            self.counts["expired"] += len(rcpts)
            log.info("expired %s to %s after %d attempts: %s", d.id, ",".join(rcpts), attempts, reply)
            self._report_failure(d, rcpts, reply)
            self._done(d, rcpts)
            return None
        if category == "greylisted":
            wait = GREYLIST_RETRY * (1 + random.random() / 5)
        else:
            wait = backoff(attempts, policy.retry_interval, policy.max_retry_interval)
        next_at = min(now + wait, expires)
        self._outcome("deferred", d, rcpts, now, reply, category, via, attempts=attempts, next_at=next_at)
        self._record(Deferred(d.id, rcpts, now, next_at, attempts, reply, category))
        self.counts["deferred"] += len(rcpts)
        if len(rcpts) == len(d.rcpts):
            d.attempts, d.next_at = attempts, next_at
            return d
        # Part of the recipients: split them off into their own delivery.
        retry = msgspec.structs.replace(d, rcpts=list(rcpts), attempts=attempts, next_at=next_at)
        gone = set(rcpts)
        d.rcpts = [r for r in d.rcpts if r not in gone]
        entry = self._live.get(d.id)
        self._live[d.id] = (entry if isinstance(entry, list) else [entry]) + [retry]
        return retry

    # ---------------------------------------------------------------- compaction

    async def _compactor(self) -> None:
        """Delete dead segments; move the few live messages out of a sparse oldest segment.
        Every second while the journal grows, less often (up to once a minute) while it does
        not: a quiet daemon, or days of virtual time, cost few wake-ups."""
        ratio = self.config.spool.compact_live_ratio
        delay, seen = 1.0, -1
        while True:
            await trio.sleep(delay)
            size = self.journal.total_bytes
            delay = 1.0 if size != seen else min(delay * 2, 60.0)
            seen = size
            self.journal.drop_dead_segments()
            seg = self.journal.oldest_sealed()
            if seg is not None and self.journal.live.get(seg, 0) <= ratio * self.journal.accepted.get(seg, 0):
                await self._move_forward(seg)

    async def _move_forward(self, seg: int) -> None:
        """Re-append every live message of ``seg`` so the segment can be deleted.

        The old location stays in use until the copies are durable; a message that becomes
        final meanwhile has its final record journaled after its copy, so replay agrees.
        """
        moves = []
        for msg_id, entry in list(self._live.items()):
            parts = entry if isinstance(entry, list) else [entry]
            if parts[0].segment != seg or self._live.get(msg_id) is not entry:
                continue
            head = self.journal.read(seg, parts[0].offset, parts[0].length)
            rec = Accepted(id=msg_id, sender=head.sender, rcpts=[r for p in parts for r in p.rcpts],
                           received_at=parts[0].received_at, body=head.body, customer=head.customer,
                           message_type=head.message_type, tags=head.tags,
                           attempts=max(p.attempts for p in parts), next_at=max(p.next_at for p in parts))
            moves.append((msg_id, self.journal.append(rec)))
            if len(moves) % 500 == 0:
                await trio.sleep(0)
        await self.journal.wait_durable()
        for msg_id, loc in moves:
            entry = self._live.get(msg_id)
            if entry is None:
                self.journal.release(loc.segment)   # went final meanwhile: the copy is dead too
                continue
            for p in entry if isinstance(entry, list) else [entry]:
                p.segment, p.offset, p.length = loc.segment, loc.offset, loc.length
            self.journal.release(seg)
        log.info("compaction: moved %d live messages out of segment %d", len(moves), seg)
        self.journal.drop_dead_segments()

    # ---------------------------------------------------------------- inspection

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            **self.counts,
            queued=self.dispatcher.queued(),
            in_flight=self.dispatcher.busy(),
            live_messages=len(self._live),
            journal=self.journal.statistics(),
            sites=self.dispatcher.statistics(),
        )


# Event -> Resend's webhook event type.
_WEBHOOK_TYPES = {
    "accepted": "email.sent",
    "scheduled": "email.scheduled",
    "delivered": "email.delivered",
    "deferred": "email.delivery_delayed",
    "bounced": "email.bounced",
    "expired": "email.bounced",
    "failed": "email.failed",
    "complained": "email.complained",
    "suppressed": "email.suppressed",
}


DRAIN_ANSWER = 1.0
PURGE_FIELDS = ("customer", "domain", "provider", "message_type", "id")


def _tally(parts: list[Delivery]) -> dict[str, int]:
    """How many messages and recipients ``parts`` hold."""
    return {"messages": len({d.id for d in parts}), "recipients": sum(len(d.rcpts) for d in parts)}


def _id_time(msg_id: str) -> int:
    try:
        return int(msg_id[:14], 16)
    except ValueError:
        return 0
