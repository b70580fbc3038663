"""Traffic shaping: which limits hold a delivery, and the buckets that enforce them.

Four levels of message rate, each a token bucket shared by everything at that level:

- customer      ``[shaping.customer.NAME]``        all of one customer's mail
- domain        ``[shaping.domain."example.com"]`` all mail to one recipient domain
- provider      ``[shaping.provider.NAME]``        ``provider_max_message_rate``: every site whose
                                                   MX hosts match, so every domain hosted there
- source IP     ``[shaping.source."127.0.0.2"]``   everything sent from one address

and per path (source IP, site): ``max_message_rate``, ``connection_limit``,
``max_connection_rate``, ``max_deliveries_per_connection``, ``idle_timeout``, from the
provider's block, else ``[shaping.default]``, else ``[delivery]``. A message waits in the
:class:`~sender.scheduler.Scheduler` until every bucket on its way has a token.

Backoff mode, per path (like PowerMTA's): a 421 or a reply that says the sender goes too fast
slows the whole path to ``backoff_max_message_rate``; after each ``backoff_step`` without
another one the rate doubles, until it is back at the normal limit.

Rules are an immutable snapshot of the config (:class:`Rules`); :meth:`Shaper.replace`
swaps them at run time, re-timing every bucket and queue in place (SIGHUP, admin API).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import NamedTuple, Protocol

import msgspec

from .classify import classify_reply
from .config import Config, ProviderShaping, Rate, SiteShaping, parse_rate
from .model import Delivery, Reply
from .scheduler import Scheduler

__all__ = ["BUILTIN_PROVIDERS", "LEVELS", "Hold", "Rules", "Shaper", "SiteLimits", "RetryPolicy", "is_rate_limited"]

# MX host suffixes of the big mailbox providers. A [shaping.provider.NAME] block with the same
# name and no ``match`` of its own uses these.
BUILTIN_PROVIDERS: dict[str, tuple[str, ...]] = {
    "google": (".google.com", ".googlemail.com"),
    "microsoft": (".protection.outlook.com", ".hotmail.com", ".outlook.com"),
    "yahoo": (".yahoodns.net", ".yahoo.com"),
    "apple": (".icloud.com", ".me.com"),
    "gmx": (".gmx.net", ".web.de", ".mail.com"),
    "mailru": (".mail.ru",),
    "yandex": (".yandex.net", ".yandex.ru"),
    "comcast": (".comcast.net",),
    "proofpoint": (".pphosted.com", ".ppe-hosted.com"),
    "mimecast": (".mimecast.com", ".mimecast.co.za"),
    "barracuda": (".barracudanetworks.com", ".ess.barracudanetworks.com"),
}

_DEFAULT_BACKOFF_RATE = "60/min"
_DEFAULT_BACKOFF_STEP = 60.0
# An unlimited path leaves backoff once its rate has doubled this many times.
_RECOVERY_STEPS = 6

def is_rate_limited(reply: Reply) -> bool:
    """A 421, or a reply the classifier calls rate limiting: the path backs off."""
    return reply.code == 421 or classify_reply(reply).category == "rate_limited"


class SiteLimits(msgspec.Struct, frozen=True):
    """What holds one (source IP, site) path."""

    connection_limit: int
    max_connection_rate: Rate | None
    max_message_rate: Rate | None
    max_deliveries_per_connection: int
    idle_timeout: float
    backoff_rate: Rate
    backoff_step: float


class RetryPolicy(msgspec.Struct, frozen=True):
    retry_interval: float
    max_retry_interval: float
    max_age: float


class Rules:
    """The shaping config resolved into lookups. Immutable: replaced whole on reload.

    With ``daemon.processes = N`` each engine process holds 1/N of every rate and
    connection limit (rounded up, at least one connection).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.shares = config.daemon.processes
        sh = config.shaping
        self.providers: list[tuple[str, tuple[str, ...], ProviderShaping]] = []
        for name, block in sh.provider.items():
            self.providers.append((name, tuple(m.lower() for m in block.match) or BUILTIN_PROVIDERS.get(name, ()),
                                   block))
        for name, suffixes in BUILTIN_PROVIDERS.items():
            if name not in sh.provider:
                self.providers.append((name, suffixes, ProviderShaping()))
        self.names = {name for name, _, _ in self.providers}
        self._sites: dict[str, SiteLimits] = {}
        self._provider_of: dict[tuple[str, ...], str] = {}
        self.customer_rates = {k: self._rate(v.max_message_rate, f"shaping.customer.{k}.max_message_rate")
                               for k, v in sh.customer.items()}
        # A customer with no [shaping.customer.ID] table of its own is new: it starts slow.
        self.new_customer_rate = self._rate(config.abuse.new_customer_rate or None, "abuse.new_customer_rate")
        self.domain_rates = {k: self._rate(v.max_message_rate, f"shaping.domain.{k}.max_message_rate")
                             for k, v in sh.domain.items()}
        self.source_rates = {k: self._rate(v.max_message_rate, f"shaping.source.{k}.max_message_rate")
                             for k, v in sh.source.items()}
        self.provider_rates = {n: self._rate(b.provider_max_message_rate, f"shaping.provider.{n}.provider_max_message_rate")
                               for n, _, b in self.providers}
        self.provider_connection_limits = {n: self._share(b.provider_connection_limit) for n, _, b in self.providers
                                           if b.provider_connection_limit is not None}
        self._retry: dict[tuple[str, str], RetryPolicy] = {}

    def _rate(self, value: str | None, key: str) -> Rate | None:
        if value is None:
            return None
        rate = parse_rate(value, key)
        if self.shares == 1:
            return rate
        return Rate(rate.per_second / self.shares, max(1.0, rate.burst / self.shares))

    def _share(self, limit: int) -> int:
        return max(1, math.ceil(limit / self.shares))

    def provider_of(self, hosts: tuple[str, ...]) -> str:
        """The provider whose ``match`` covers one of the site's hosts, first block first; ""
        when none does."""
        found = self._provider_of.get(hosts)
        if found is None:
            found = ""
            for name, matches, _ in self.providers:
                if any(h == m or (m.startswith(".") and h.endswith(m)) for h in hosts for m in matches):
                    found = name
                    break
            self._provider_of[hosts] = found
        return found

    def _block(self, provider: str) -> SiteShaping | None:
        for name, _, block in self.providers:
            if name == provider:
                return block
        return None

    def _pick(self, name: str, *blocks):
        """The first block (most specific first) that sets ``name``."""
        for block in blocks:
            value = getattr(block, name, None) if block is not None else None
            if value is not None:
                return value
        return None

    def site(self, provider: str) -> SiteLimits:
        """Limits of a path to a site of ``provider`` ("" for none)."""
        limits = self._sites.get(provider)
        if limits is None:
            block, default, dc = self._block(provider), self.config.shaping.default, self.config.delivery
            key = f"shaping.provider.{provider}" if provider else "shaping.default"
            pick = lambda name: self._pick(name, block, default, dc)  # noqa: E731
            limits = self._sites[provider] = SiteLimits(
                connection_limit=self._share(pick("connection_limit")),
                max_connection_rate=self._rate(pick("max_connection_rate"), f"{key}.max_connection_rate"),
                max_message_rate=self._rate(pick("max_message_rate"), f"{key}.max_message_rate"),
                max_deliveries_per_connection=pick("max_deliveries_per_connection"),
                idle_timeout=pick("idle_timeout"),
                backoff_rate=self._rate(pick("backoff_max_message_rate") or _DEFAULT_BACKOFF_RATE,
                                        f"{key}.backoff_max_message_rate"),
                backoff_step=pick("backoff_step") or _DEFAULT_BACKOFF_STEP,
            )
        return limits

    def retry_policy(self, domain: str, provider: str) -> RetryPolicy:
        """Retry timing and lifetime of mail to ``domain``: its block, its provider's, the
        default's, then ``[delivery]``."""
        policy = self._retry.get((domain, provider))
        if policy is None:
            blocks = (self.config.shaping.domain.get(domain), self._block(provider), self.config.shaping.default,
                      self.config.delivery)
            policy = self._retry[(domain, provider)] = RetryPolicy(
                *(self._pick(n, *blocks) for n in ("retry_interval", "max_retry_interval", "max_age")))
        return policy

    def priority(self, message_type: str) -> int:
        return self.config.shaping.priority.get(message_type, 0)


@dataclass
class _Backoff:
    rate: float              # current message rate of the path (per second)
    next_step: float         # when it doubles, unless another rate-limiting reply comes first


# The levels of the buckets, as their names begin ("customer:acme", "path:127.0.0.2>mx.example:25").
LEVELS = ("customer", "domain", "provider", "source", "path", "pair")


class Hold(NamedTuple):
    """A bucket holding mail at a moment (:meth:`Shaper.holding`): the throttle events and
    the saturation metrics."""

    bucket: str             # "customer:acme", as :meth:`Shaper.held` names it
    level: str              # one of LEVELS
    held: int               # deliveries waiting for its token
    until: float            # when its next token comes
    # What it concerns: the level's key, or for a path (pair) bucket its source, site and provider.
    customer: str = ""
    domain: str = ""
    provider: str = ""
    source: str = ""
    site: str = ""


class Path(Protocol):
    """Where released messages go: one (source IP, site), with the provider it belongs to.
    The dispatcher's site pools are paths."""

    key: str
    source: str
    provider: str
    site_bucket: int


class Shaper:
    """Owns the scheduler: one queue per (customer, recipient domain, path), each naming the
    buckets that hold it, and the backoff state of each path.

    Args:
      rules: the current :class:`Rules`.
      now: clock reading for the buckets' start (they start full).
    """

    def __init__(self, rules: Rules, now: float) -> None:
        self.rules = rules
        self.scheduler = Scheduler()
        self._buckets: dict[tuple[str, str], int] = {}
        self._bucket_keys: dict[int, tuple[str, str]] = {}     # bucket id -> (level, key)
        self._queues: dict[tuple[str, str, Path], int] = {}
        self._queue_keys: list[tuple[str, str, Path]] = []
        self._backoff: dict[Path, _Backoff] = {}
        self._caps: dict[Path, float] = {}          # automation caps on one path (messages/s)
        self._start = now

    # ---------------------------------------------------------------- buckets and queues

    def _bucket(self, level: str, key: str, rate: Rate | None, now: float) -> int:
        bid = self._buckets.get((level, key))
        if bid is None:
            per_second, burst = (rate.per_second, rate.burst) if rate else (math.inf, 1.0)
            bid = self._buckets[(level, key)] = self.scheduler.add_bucket(f"{level}:{key}", per_second, burst, now)
            self._bucket_keys[bid] = (level, key)
        return bid

    def _limit(self, level: str, key: str, rate: Rate | None, now: float) -> list[int]:
        """The bucket of a limited level, [] for an unlimited one (checking it would cost for nothing)."""
        if rate is None and (level, key) not in self._buckets:
            return []
        bid = self._bucket(level, key, rate, now)
        return [bid] if rate is not None else []

    def path_bucket(self, path: Path, now: float) -> int:
        """The bucket of one (source IP, site) path; always present, so backoff can slow it."""
        return self._bucket("path", path.key, self.rules.site(path.provider).max_message_rate, now)

    def _queue_buckets(self, customer: str, domain: str, path: Path, now: float) -> list[int]:
        r = self.rules
        pair = self._buckets.get(("pair", f"{path.source}>{path.provider}"))
        return (self._limit("domain", domain, r.domain_rates.get(domain), now)
                + self._limit("customer", customer, r.customer_rates.get(customer, r.new_customer_rate
                                                                         if customer else None), now)
                + self._limit("provider", path.provider, r.provider_rates.get(path.provider), now)
                + self._limit("source", path.source, r.source_rates.get(path.source), now)
                + ([pair] if pair is not None else [])
                + [path.site_bucket])

    def set_pair_rate(self, source: str, provider: str, rate: float | None, now: float) -> None:
        """Limit all mail from ``source`` to ``provider`` to ``rate`` messages/s (None: lift
        it): the adaptive rate and automation caps of the pair. The pair's bucket is made on
        first use, and the queues of its paths take it on."""
        key = ("pair", f"{source}>{provider}")
        per_second = rate if rate is not None else math.inf
        bid = self._buckets.get(key)
        if bid is None:
            if rate is None:
                return
            self._bucket("pair", key[1], Rate(per_second, max(1.0, per_second / 10)), now)
            for qkey, qid in self._queues.items():
                if qkey[2].source == source and qkey[2].provider == provider:
                    self.scheduler.set_queue_buckets(qid, self._queue_buckets(*qkey, now), now)
            return
        self.scheduler.set_bucket(bid, per_second, max(1.0, per_second / 10) if rate is not None else 1.0, now)

    def cap_path(self, path: Path, rate: float | None, now: float) -> None:
        """An automation cap on one path (None: lift it); backoff acts below it."""
        if rate is None:
            self._caps.pop(path, None)
        else:
            self._caps[path] = rate
        self._apply_path_rate(path, now)

    def _apply_path_rate(self, path: Path, now: float) -> None:
        """Set the path's bucket from its limit, its backoff and its cap, the lowest."""
        state = self._backoff.get(path)
        if state is not None:
            per_second, burst = state.rate, max(1.0, state.rate / 10)
        else:
            rate = self.rules.site(path.provider).max_message_rate
            per_second, burst = (rate.per_second, rate.burst) if rate else (math.inf, 1.0)
        cap = self._caps.get(path)
        if cap is not None and cap < per_second:
            per_second, burst = cap, max(1.0, cap / 10)
        self.scheduler.set_bucket(path.site_bucket, per_second, burst, now)

    def drain(self, path: Path, now: float) -> list[Delivery]:
        """Take every delivery queued for ``path`` out of the scheduler (its source may not
        send there any more: they are routed again)."""
        out: list[Delivery] = []
        for key, qid in self._queues.items():
            if key[2] is path:
                out += self.scheduler.drain(qid, now)
        return out

    def drain_where(self, wanted: Callable[[str, str, Path], bool], now: float) -> list[tuple[Delivery, Path]]:
        """Take out every delivery of the queues whose (customer, domain, path) is ``wanted``
        (a pause holds them), each with its path."""
        out: list[tuple[Delivery, Path]] = []
        for (customer, domain, path), qid in self._queues.items():
            if wanted(customer, domain, path):
                out += [(d, path) for d in self.scheduler.drain(qid, now)]
        return out

    def queue(self, customer: str, domain: str, path: Path, now: float) -> int:
        """The queue of one customer's mail to one domain over one path (created on first use)."""
        key = (customer, domain, path)
        qid = self._queues.get(key)
        if qid is None:
            qid = self._queues[key] = self.scheduler.add_queue(self._queue_buckets(customer, domain, path, now))
            self._queue_keys.append(key)
        return qid

    # ---------------------------------------------------------------- messages

    def push(self, d: Delivery, path: Path, now: float) -> None:
        self.scheduler.push(self.queue(d.customer, d.domain, path, now), d, now,
                            self.rules.priority(d.message_type))

    def pop(self, now: float) -> tuple[Path, Delivery] | None:
        """The next delivery every bucket on its way lets go now, and its path."""
        got = self.scheduler.pop(now)
        if got is None:
            return None
        qid, d = got
        return self._queue_keys[qid][2], d

    def next_wakeup(self) -> float:
        """When ``pop`` may have something again, or a backoff step is due."""
        t = self.scheduler.next_wakeup()
        for state in self._backoff.values():
            if state.next_step < t:
                t = state.next_step
        return t

    def held(self, d: Delivery, path: Path, now: float) -> tuple[str, float] | None:
        """Which bucket holds ``d``'s queue and until when at the earliest (for explain)."""
        qid = self._queues.get((d.customer, d.domain, path))
        got = self.scheduler.held(qid, now) if qid is not None else None
        return (self.scheduler.bucket_name(got[0]), got[1]) if got else None

    def holding(self, now: float) -> list[Hold]:
        """The buckets holding mail at ``now``: each with the deliveries waiting for its token
        and when that comes. One pass over the queues (a parked queue waits on one bucket),
        for the periodic throttle events and the metrics, never per delivery."""
        sched = self.scheduler
        if not len(sched):
            return []
        found: dict[int, list] = {}                 # bucket id -> [deliveries, until, a path]
        for key, qid in self._queues.items():
            got = sched.held(qid, now)
            if got is not None:
                entry = found.get(got[0])
                if entry is None:
                    found[got[0]] = [sched.queue_length(qid), got[1], key[2]]
                else:
                    entry[0] += sched.queue_length(qid)
        out = []
        for bid, (held, until, path) in found.items():
            level, key = self._bucket_keys[bid]
            bucket = f"{level}:{key}"
            if level == "path":
                # A path's key is its site's, prefixed by "SOURCE>" when the source has an address.
                site = path.key[len(path.source) + 1:] if path.source else path.key
                out.append(Hold(bucket, level, held, until, provider=path.provider, source=path.source, site=site))
            elif level == "pair":
                out.append(Hold(bucket, level, held, until, provider=path.provider, source=path.source))
            else:
                out.append(Hold(bucket, level, held, until, **{level: key}))
        return out

    def has_queue(self, d: Delivery, path: Path) -> bool:
        """Whether ``d``'s (customer, domain, path) has a queue here (it may wait in it)."""
        return (d.customer, d.domain, path) in self._queues

    def __len__(self) -> int:
        return len(self.scheduler)

    # ---------------------------------------------------------------- backoff

    def backoff(self, path: Path, now: float) -> None:
        """A rate-limiting reply on ``path``: slow it to its backoff rate, or, already slowed,
        start the recovery step over."""
        state = self._backoff.get(path)
        limits = self.rules.site(path.provider)
        if state is None:
            rate = limits.backoff_rate.per_second
            normal = limits.max_message_rate
            if normal is not None and normal.per_second <= rate:
                rate = normal.per_second / 2
            state = self._backoff[path] = _Backoff(rate, 0.0)
            self._apply_path_rate(path, now)
        state.next_step = now + limits.backoff_step

    def in_backoff(self, path: Path) -> float | None:
        """The path's current rate if it is in backoff."""
        state = self._backoff.get(path)
        return state.rate if state else None

    def tick(self, now: float) -> None:
        """Take the recovery steps that are due."""
        for path, state in list(self._backoff.items()):
            if state.next_step > now:
                continue
            limits = self.rules.site(path.provider)
            state.rate *= 2
            normal = limits.max_message_rate
            ceiling = normal.per_second if normal else limits.backoff_rate.per_second * 2**_RECOVERY_STEPS
            if state.rate >= ceiling:
                del self._backoff[path]
            else:
                state.next_step = now + limits.backoff_step
            self._apply_path_rate(path, now)

    # ---------------------------------------------------------------- reload

    def replace(self, rules: Rules, now: float) -> None:
        """Apply new rules at run time: every bucket gets its new rate, every queue its new
        set of buckets; messages waiting keep their place."""
        self.rules = rules
        levels = {"customer": rules.customer_rates, "domain": rules.domain_rates,
                  "source": rules.source_rates, "provider": rules.provider_rates}
        for (level, key), bid in self._buckets.items():
            if level in ("path", "pair"):
                continue
            rate = levels[level].get(key)
            per_second, burst = (rate.per_second, rate.burst) if rate else (math.inf, 1.0)
            self.scheduler.set_bucket(bid, per_second, burst, now)
        for path in {key[2] for key in self._queues}:
            self._apply_path_rate(path, now)
        for key, qid in self._queues.items():
            self.scheduler.set_queue_buckets(qid, self._queue_buckets(*key, now), now)
