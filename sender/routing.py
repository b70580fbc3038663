"""Egress: which source IP each delivery leaves from, and the state behind that choice.

A customer's mail leaves from its pool (its dedicated pool, or a shared one; a message type
may have a shared pool of its own). Within the pool a source is drawn by weight, times the
square of its health toward the recipient's provider (:mod:`sender.reputation`), among the
sources that

- are not suspended for that provider or site by an automation action (:mod:`sender.automation`),
- have not sent today's warmup cap, when the pool overflows (``overflow = "pool"``); with
  ``overflow = "wait"`` a capped source keeps its share of the mail until tomorrow.

When no source may send, the delivery waits until the earliest one may again, plus a random
spread, so that the mail held by a suspension does not all come back in the same second.

Warmup caps count per day (UTC) since the source's ``warmup_start``. An adaptive plan keeps a
stage per (source, provider) instead of the calendar: the stage moves on after a day the
provider accepted the source's mail, holds after a day with some deferrals, and steps back
after a day with many.

Counters, stages, automation actions, adaptive rates and reputation windows are saved in the
spool (``egress.state``) once a second when they changed, and at shutdown: a crash loses at
most the last second's counts.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import msgspec

from .automation import Action, Automation
from .config import Config, WarmupPlan
from .files import replace_file
from .model import Delivery, Reply
from .reputation import AIMD, Reputation

__all__ = ["BUILTIN_WARMUP", "Choice", "Egress", "Source", "Pool", "DAY", "describe_action", "read_state"]

log = logging.getLogger("sender.egress")

DAY = 86400.0
# Modelled on the IP warmup schedules that sending platforms publish (doubling at first, then
# growing by about half a day's volume each day): day 1 = 50 messages ... day 15 = 1,000,000.
BUILTIN_WARMUP = WarmupPlan(days=[50, 100, 500, 1_000, 5_000, 10_000, 20_000, 40_000, 70_000, 100_000,
                                  150_000, 250_000, 400_000, 600_000, 1_000_000])
# Mail held by a suspension or a warmup cap comes back spread over this share of the wait
# (between RESUME_SPREAD_MIN and RESUME_SPREAD_MAX seconds).
RESUME_SPREAD = 0.1
RESUME_SPREAD_MIN = 30.0
RESUME_SPREAD_MAX = 900.0
# A source's weight is multiplied by health**2, never by less than this (it keeps a trickle
# of mail, so its health can be seen to recover).
MIN_HEALTH = 0.05
SAVE_EVERY = 1.0
FIRED_KEPT = 1000
# A candidate source below this health is named in the reason of a choice (weighted down).
LOW_HEALTH = 0.5
# Reasons of choices kept (one per distinct situation); past this many they are made anew.
REASONS_KEPT = 4096


@dataclass(eq=False)
class Source:
    name: str
    address: str            # "" = the system's choice (no pools configured, no delivery.source)
    ehlo: str
    plan: WarmupPlan | None = None
    start_day: int = 0      # day number (days since the epoch, UTC) of the plan's day 1


@dataclass(eq=False)
class Pool:
    name: str
    members: list[tuple[Source, float]]
    dedicated: bool = False
    overflow: str = "pool"


class Choice(NamedTuple):
    """The source to send from, or None and when to try again; ``reason`` says why."""

    source: Source | None
    wait_until: float
    reason: str


class _State(msgspec.Struct, kw_only=True):
    """What survives a restart (``egress.state``)."""

    day: int = 0
    sent: dict[str, int] = {}                # today's count: "SOURCE" and "SOURCE>PROVIDER"
    stages: dict[str, int] = {}              # adaptive plans: "SOURCE>PROVIDER" -> stage (1-based)
    evaluated: dict[str, int] = {}           # adaptive plans: day of the last stage decision
    outcomes: dict[str, list[int]] = {}      # "DAY>SOURCE>PROVIDER" -> [accepted, deferred]
    actions: list[Action] = []
    rates: dict[str, float] = {}             # adaptive rates: "SOURCE>PROVIDER" -> messages/s
    reputation: bytes = b""


def _day(now: float) -> int:
    return int(now // DAY)


def _spread(wait: float) -> float:
    return random.uniform(0.0, min(RESUME_SPREAD_MAX, max(RESUME_SPREAD_MIN, wait * RESUME_SPREAD)))


class Egress:
    """Sources, pools, warmup, reputation and automation, for the dispatcher.

    Args:
      config: the daemon config (``source``, ``pool``, ``warmup``, ``egress``, ``automation``,
        and ``shaping.provider.*.adaptive_rate``).
      state_path: where the state is kept (None: in memory only); read by :meth:`start`.
    """

    def __init__(self, config: Config, state_path: str | os.PathLike | None = None) -> None:
        self.state_path = Path(state_path) if state_path is not None else None
        self.shares = config.daemon.processes
        self.state = _State()
        self.reputation = Reputation(window=config.egress.reputation_window)
        self.automation = Automation(config.automation.rule, config.automation.default_rules)
        self._aimd: dict[tuple[str, str], AIMD] = {}
        self.fired: deque[Action] = deque(maxlen=FIRED_KEPT)    # recent actions, newest last
        self.dirty = False
        self._saved_at = -math.inf
        # (domain, provider) -> the pool an operator sends that mail from, or None
        self.operator_route: Callable[[str, str], str | None] | None = None
        self.configure(config)

    def start(self, now: float) -> None:
        """Take up the saved state (counters of another day start from zero, expired actions
        are dropped)."""
        self.state = self._load()
        if self.state.reputation:
            try:
                self.reputation = Reputation.restore(self.state.reputation,
                                                     window=self.config.egress.reputation_window)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.error("egress state %s: reputation windows unreadable (%s): they start empty",
                          self.state_path, e)
        self.automation.restore(self.state.actions, now)
        self._roll(now)

    # ------------------------------------------------------------------ config

    def configure(self, config: Config) -> None:
        """Take the sources, pools and plans of ``config`` (at start and on reload)."""
        self.config = config
        dc = config.delivery
        self.default_source = Source("", dc.source, dc.ehlo)
        self.sources: dict[str, Source] = {}
        for name, sc in config.source.items():
            plan = None
            if sc.warmup:
                plan = BUILTIN_WARMUP if sc.warmup == "default" and "default" not in config.warmup \
                    else config.warmup[sc.warmup]
            start = _day(datetime.datetime.combine(datetime.date.fromisoformat(sc.warmup_start), datetime.time(),
                                                   datetime.timezone.utc).timestamp()) if sc.warmup_start else 0
            self.sources[name] = Source(name, sc.address, sc.ehlo or dc.ehlo, plan, start)
        self.pools = {name: Pool(name, [(self.sources[s], w) for s, w in pc.sources.items()], pc.dedicated,
                                 pc.overflow)
                      for name, pc in config.pool.items()}
        self.customer_pool = {c.id: c.pool for c in config.customer if c.pool}
        self._caps: dict[tuple[str, str, int], tuple[int | None, int | None]] = {}
        self._reasons: dict[tuple, str] = {}    # situation -> reason of a choice (see _reason)
        self.adaptive = {name: block.adaptive_rate for name, block in config.shaping.provider.items()
                         if block.adaptive_rate is not None}
        for (source, provider), aimd in list(self._aimd.items()):
            if provider not in self.adaptive:
                del self._aimd[(source, provider)]
        self.automation.replace(config.automation.rule, config.automation.default_rules)

    # ------------------------------------------------------------------ choice

    def pool_of(self, customer: str, message_type: str) -> Pool | None:
        """The pool a customer's mail of this type leaves from (None: no pools configured)."""
        if not self.pools:
            return None
        name = self.customer_pool.get(customer, "")
        if not name or not self.pools[name].dedicated:
            name = self.config.egress.message_type.get(message_type) or name or self.config.egress.default_pool
        return self.pools[name]

    def choose(self, d: Delivery, provider: str, site: str, now: float) -> Choice:
        """Pick the source ``d`` leaves from toward ``site`` (of ``provider``), counting it
        against the source's warmup cap; or say when to ask again."""
        pool = base = self.pool_of(d.customer, d.message_type)
        ordered = self.operator_route(d.domain, provider) if self.operator_route is not None else None
        if ordered is not None and ordered in self.pools:
            pool = self.pools[ordered]          # an operator's reroute (sender ctl reroute)
        elif pool is not None and provider:
            target = self.automation.reroute(pool.name, provider)
            if target is not None and target in self.pools and not self.pools[target].dedicated \
                    and not pool.dedicated:
                pool = self.pools[target]
        members = pool.members if pool is not None else [(self.default_source, 1.0)]
        overflow = pool.overflow if pool is not None else "wait"
        day = self._roll(now)
        candidates: list[tuple[Source, float, bool]] = []
        waits: list[tuple[float, str]] = []
        weak: list[str] = []
        for source, weight in members:
            action = self.automation.suspended(source.address, provider, site)
            if action is not None:
                waits.append((action.until, f"{source.address or 'default source'} suspended for "
                                            f"{provider or site} by rule {action.rule!r}"))
                continue
            room = self._room(source, provider, day)
            if not room:
                if overflow == "pool":
                    waits.append(((day + 1) * DAY, f"{source.address} sent its warmup cap for today"))
                    continue
            health = self.reputation.health(source.address, provider, now) if provider else 1.0
            if health < LOW_HEALTH:
                weak.append(f"{source.address} weighted down (health {health:.2f})")
            candidates.append((source, weight * max(health, MIN_HEALTH) ** 2, room))
        if not candidates:
            until, reason = min(waits)
            return Choice(None, until + _spread(until - now), reason)
        if len(candidates) == 1:
            source, _, room = candidates[0]
        else:
            pick = random.random() * sum(c[1] for c in candidates)
            for source, weight, room in candidates:
                pick -= weight
                if pick < 0:
                    break
        if not room:
            until = (day + 1) * DAY
            return Choice(None, until + _spread(until - now), f"{source.address} sent its warmup cap for today")
        self._count(source, provider)
        return Choice(source, now, self._reason(d, provider, base, pool, len(candidates), waits, weak)
                      if pool is not None else "")

    def _reason(self, d: Delivery, provider: str, base: Pool, pool: Pool, n: int, waits: list[tuple[float, str]],
                weak: list[str]) -> str:
        """Why a source of ``pool`` was chosen, in a few words: the pool and why that one (the
        customer's dedicated pool, the pool of its message type, the default, a reroute), how
        many of its sources were candidates, those left out and why, and those weighted down.
        Made once per distinct situation: this runs for every delivery."""
        rerouted = ""
        if pool is not base:
            if self.operator_route is not None and self.operator_route(d.domain, provider) == pool.name:
                rerouted = "an operator"
            else:
                action = self.automation.rerouting(base.name, provider)
                rerouted = f"rule {action.rule!r}" if action is not None else "a rule"
        customer = d.customer if d.customer in self.customer_pool else ""
        message_type = d.message_type if d.message_type in self.config.egress.message_type else ""
        key = (base.name, pool.name, rerouted, customer, message_type, n,
               tuple(r for _, r in waits) if waits else (), tuple(weak) if weak else ())
        reason = self._reasons.get(key)
        if reason is None:
            if rerouted:
                why = f"rerouted from pool {base.name} toward {provider} by {rerouted}"
            elif base.dedicated:
                why = "the customer's dedicated pool"
            elif message_type and self.config.egress.message_type[message_type] == base.name:
                why = f"the pool of {message_type} mail"
            elif customer and self.customer_pool[customer] == base.name:
                why = "the customer's pool"
            else:
                why = "the default pool"
            total = len(pool.members)
            reason = f"from pool {pool.name} ({why}): " + (
                "its only source" if total == 1 else f"{n} of {total} sources" if n < total else f"{total} sources")
            notes = [r for _, r in waits] + weak
            if notes:
                reason += "; " + "; ".join(notes)
            if len(self._reasons) >= REASONS_KEPT:
                self._reasons.clear()
            self._reasons[key] = reason
        return reason

    # ------------------------------------------------------------------ warmup

    def _roll(self, now: float) -> int:
        """Today's day number; counters start again on a new day."""
        day = _day(now)
        if day != self.state.day:
            self.state.day = day
            self.state.sent = {}
            self._caps.clear()
            self.state.outcomes = {k: v for k, v in self.state.outcomes.items()
                                   if int(k.partition(">")[0]) >= day - 1}
            self.dirty = True
        return day

    def cap(self, source: Source, provider: str, day: int) -> tuple[int | None, int | None]:
        """(cap of the source today, cap of its mail to ``provider`` today); None = no cap.
        Worked out once a day per pair (an adaptive stage is decided then too)."""
        if source.plan is None:
            return None, None
        key = (source.address, provider, day)
        caps = self._caps.get(key)
        if caps is None:
            caps = self._caps[key] = self._work_out_cap(source, provider, day)
        return caps

    def _work_out_cap(self, source: Source, provider: str, day: int) -> tuple[int | None, int | None]:
        plan = source.plan
        assert plan is not None             # cap() answers for sources without one
        n = day - source.start_day + 1
        if n < 1:
            n = 1                                   # a start date in the future: day 1
        if plan.adaptive:
            days = plan.provider.get(provider, plan.days)
            if not provider or not days:
                return None, None
            stage = self._stage(source, provider, days, day)
            return None, self._share(days[stage - 1]) if stage <= len(days) else None
        total = self._share(plan.days[n - 1]) if n <= len(plan.days) else None
        days = plan.provider.get(provider)
        per_provider = self._share(days[n - 1]) if days and n <= len(days) else None
        return total, per_provider

    def _share(self, cap: int) -> int:
        return max(1, math.ceil(cap / self.shares))

    def _room(self, source: Source, provider: str, day: int) -> bool:
        total, per_provider = self.cap(source, provider, day)
        sent = self.state.sent
        if total is not None and sent.get(source.address, 0) >= total:
            return False
        if per_provider is not None and sent.get(f"{source.address}>{provider}", 0) >= per_provider:
            return False
        return True

    def _count(self, source: Source, provider: str) -> None:
        if source.plan is None:
            return
        sent = self.state.sent
        sent[source.address] = sent.get(source.address, 0) + 1
        key = f"{source.address}>{provider}"
        sent[key] = sent.get(key, 0) + 1
        self.dirty = True

    def _stage(self, source: Source, provider: str, days: list[int], day: int) -> int:
        """The adaptive stage of (source, provider) today: decided once a day from
        yesterday's replies."""
        key = f"{source.address}>{provider}"
        st = self.state
        stage = st.stages.get(key, 1)
        if st.evaluated.get(key) == day:
            return stage
        accepted, deferred = st.outcomes.get(f"{day - 1}>{key}", (0, 0))
        plan = source.plan
        assert plan is not None
        if key in st.evaluated and accepted + deferred:
            share = deferred / (accepted + deferred)
            if share > plan.retreat_above:
                stage = max(1, stage - 1)
            elif share < plan.advance_below and stage <= len(days) \
                    and accepted + deferred >= self._share(days[stage - 1]) // 2:
                stage += 1              # the cap was used and the provider took the mail
        st.stages[key] = stage
        st.evaluated[key] = day
        self.dirty = True
        return stage

    # ------------------------------------------------------------------ feedback

    def observe(self, source: str, provider: str, site: str, d: Delivery, event: str, category: str,
                reply: Reply | None, now: float) -> list[Action]:
        """An outcome of mail from ``source``: into the reputation window, the day's counts
        of adaptive warmup and the adaptive rate; returns the automation actions it fired.

        Args:
          event: "delivered", "deferred" or "bounced".
        """
        if provider:
            self.reputation.record(source, provider, event, category, now)
            if event != "bounced":             # adaptive warmup weighs accepted against deferred
                counts = self.state.outcomes.setdefault(f"{self._roll(now)}>{source}>{provider}", [0, 0])
                counts[event == "deferred"] += 1
            aimd = self._pair_aimd(source, provider, now)
            if aimd is not None and aimd.on_reply(category == "rate_limited", now):
                self.state.rates[f"{source}>{provider}"] = aimd.rate
            self.dirty = True
        if reply is None or event == "delivered":
            return []
        pool = self.pool_of(d.customer, d.message_type)
        fired = self.automation.observe(source=source, provider=provider, site=site,
                                        pool=pool.name if pool is not None else "", reply=reply,
                                        category=category, now=now)
        for action in fired:
            self.dirty = True
            self.fired.append(action)
            log.warning("automation: rule %r fired for %s toward %s: %s until %s, after: %s", action.rule,
                        action.source or "the default source", action.site or action.provider,
                        describe_action(action), datetime.datetime.fromtimestamp(action.until, datetime.timezone.utc)
                        .isoformat(timespec="seconds"), " | ".join(action.replies))
        return fired

    def record_later(self, source: str, provider: str, event: str, category: str, now: float) -> None:
        """A bounce after delivery, or a complaint: into the reputation window only."""
        self.reputation.record(source, provider, event, category, now)
        self.dirty = True

    def _pair_aimd(self, source: str, provider: str, now: float) -> AIMD | None:
        conf = self.adaptive.get(provider)
        if conf is None:
            return None
        aimd = self._aimd.get((source, provider))
        if aimd is None:
            aimd = self._aimd[(source, provider)] = AIMD.from_config(conf, now)
            saved = self.state.rates.get(f"{source}>{provider}")
            if saved is not None:
                aimd.rate = min(max(saved, aimd.min_rate), aimd.max_rate)
        return aimd

    def pair_rate(self, source: str, provider: str, now: float) -> float | None:
        """The message rate that holds mail from ``source`` to ``provider`` as a whole: its
        adaptive rate and any automation cap, the lower; None when neither applies."""
        rates = []
        aimd = self._pair_aimd(source, provider, now) if provider else None
        if aimd is not None:
            rates.append(aimd.rate / self.shares)
        cap = self.automation.max_message_rate(source, provider, "")
        if cap is not None:
            rates.append(cap.per_second / self.shares)
        return min(rates) if rates else None

    def site_cap(self, source: str, provider: str, site: str) -> float | None:
        """An automation cap on one (source, site) path, in messages/s."""
        cap = self.automation.max_message_rate(source, "", site)
        return cap.per_second / self.shares if cap is not None else None

    def connection_cap(self, source: str, provider: str, site: str) -> int | None:
        cap = self.automation.connection_limit(source, provider, site)
        return max(1, math.ceil(cap / self.shares)) if cap is not None else None

    def tick(self, now: float) -> tuple[list[tuple[str, str]], list[Action]]:
        """Adaptive-rate steps and action expiries that are due: the (source, provider)
        pairs whose rate changed, and the actions that ended."""
        changed = [pair for pair, aimd in self._aimd.items() if aimd.next_at <= now and aimd.tick(now)]
        for source, provider in changed:
            self.state.rates[f"{source}>{provider}"] = self._aimd[(source, provider)].rate
        ended = self.automation.expire(now)
        for action in ended:
            log.warning("automation: %s for %s toward %s (rule %r) ended", describe_action(action),
                        action.source or "the default source", action.site or action.provider, action.rule)
        if changed or ended:
            self.dirty = True
        return changed, ended

    def next_wakeup(self) -> float:
        t = self.automation.next_expiry()
        for aimd in self._aimd.values():
            t = min(t, aimd.next_at)
        return t

    # ------------------------------------------------------------------ persistence

    def _load(self) -> _State:
        if self.state_path is None or not self.state_path.exists():
            return _State()
        try:
            return msgspec.msgpack.decode(self.state_path.read_bytes(), type=_State)
        except (msgspec.DecodeError, OSError) as e:
            log.error("egress state %s unreadable (%s): warmup counts start from zero", self.state_path, e)
            return _State()

    def save(self, now: float, *, force: bool = False) -> None:
        """Write the state if it changed (at most once per ``SAVE_EVERY`` unless forced):
        a temporary file, fsync, rename."""
        if self.state_path is None or not self.dirty or (not force and now - self._saved_at < SAVE_EVERY):
            return
        self.state.actions = self.automation.active()
        self.state.reputation = self.reputation.snapshot()
        replace_file(self.state_path, [msgspec.msgpack.encode(self.state)])
        self.dirty = False
        self._saved_at = now


def read_state(path: str | os.PathLike) -> dict | None:
    """What ``egress.state`` holds, as plain data for the CLI (None if there is none)."""
    try:
        state = msgspec.msgpack.decode(Path(path).read_bytes(), type=_State)
    except FileNotFoundError:
        return None
    except msgspec.DecodeError as e:
        raise ValueError(f"{path}: unreadable egress state: {e}") from None
    when = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    return {
        "day": when(state.day * DAY)[:10] if state.day else None,
        "sent_today": state.sent,
        "warmup_stages": state.stages,
        "adaptive_rates": state.rates,
        "actions": [{"rule": a.rule, "action": describe_action(a), "source": a.source,
                     "toward": a.site or a.provider, "since": when(a.started), "until": when(a.until),
                     "replies": a.replies} for a in state.actions],
    }


def describe_action(action: Action) -> str:
    """What an action does, in a few words ("suspend", "max_message_rate 10/m", ...)."""
    if action.kind == "max_message_rate":
        return f"max_message_rate {action.max_message_rate}"
    if action.kind == "connection_limit":
        return f"connection_limit {action.connection_limit}"
    if action.kind == "reroute":
        return f"reroute from pool {action.pool!r} to {action.target!r}"
    return "suspend"

