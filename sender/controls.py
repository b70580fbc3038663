"""Operator controls that outlive a restart: pauses, reroutes, run-time limits, purges into a
quarantine, and drains.

- A pause holds the matching mail in the queue (customer, recipient domain, provider, source
  IP or pool): nothing matching is handed to a connection from the moment it is set
  (transactions already under way finish), and the held mail goes on, in its order, when the
  pause is lifted.
- A reroute sends a recipient domain's or a provider's mail from another pool.
- A limit replaces the configured message rate (and, for a provider, connection limit) of a
  customer, domain, provider or source IP until it is lifted.
- A purge takes the queued mail a filter matches into a quarantine. It can be released (sent
  on) until its time is up; only then is it bounced or dropped, as the purge said.
- A drain stops intake and lets the queue empty before the daemon stops (not restored at
  start: the restart is the end of a drain).

Every change names who made it and why. Changes are appended to ``SPOOL/controls.log`` (JSON
lines) and fsynced before they are answered; the log is read again at start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import msgspec

from .config import Config, ConfigError, DomainShaping, ProviderShaping, RateLimit, parse_rate
from .files import replace_file
from .model import Delivery

__all__ = ["EVENTS", "SCOPES", "Change", "ControlError", "Controls", "check_reason", "with_limits"]

SCOPES = ("customer", "domain", "provider", "source", "pool")      # of a pause
REROUTE_SCOPES = ("domain", "provider")
LIMIT_SCOPES = ("customer", "domain", "provider", "source")
# What sets a state -> what lifts it; a purge is ended by a release or its expiry.
_LIFTS = {"resume": "pause", "unroute": "reroute", "unlimit": "limit"}
# Each action -> the event that tells it.
EVENTS = {"pause": "paused", "resume": "resumed", "reroute": "rerouted", "unroute": "unrouted",
          "limit": "limited", "unlimit": "unlimited", "purge": "purged", "release": "released",
          "expire": "quarantine_expired", "drain": "draining", "undrain": "undrained"}


class ControlError(ValueError):
    """A change that cannot be made; the message names the field at fault."""


class Change(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    action: str                 # one of EVENTS
    scope: str                  # what it applies to: a pause's scope, "purge", "daemon"...
    value: str                  # the customer, domain... or the purge's id
    who: str
    reason: str
    at: float
    detail: dict[str, Any] = {}     # reroute: pool; limit: rate, connections; purge: filter, parts...


class _Path(Protocol):
    provider: str
    source: str


class Controls:
    """The controls in force, from and to ``path``.

    Args:
      pools: pool name -> the addresses of its sources (a pool's pause holds mail leaving
        from any of them).
    """

    def __init__(self, path: str | os.PathLike, pools: dict[str, set[str]] | None = None) -> None:
        self.path = Path(path)
        self.pools = pools or {}
        self.pauses: dict[tuple[str, str], Change] = {}
        self.reroutes: dict[tuple[str, str], Change] = {}
        self.limits: dict[tuple[str, str], Change] = {}
        self.purges: dict[str, Change] = {}         # purge id -> the purge, while its mail is held
        self._states = {"pause": self.pauses, "reroute": self.reroutes, "limit": self.limits}
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                self._apply(msgspec.json.decode(line, type=Change))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue                    # a torn last line: the change was never answered
        if len(lines) > 1000 and len(lines) > 4 * len(self.in_force()):
            replace_file(self.path, (msgspec.json.encode(c) + b"\n" for c in self.in_force()))

    def in_force(self) -> list[Change]:
        """Every change still in force, oldest first."""
        out = [*self.pauses.values(), *self.reroutes.values(), *self.limits.values(), *self.purges.values()]
        return sorted(out, key=lambda c: c.at)

    def _apply(self, change: Change) -> None:
        key = (change.scope, change.value)
        if change.action in self._states:
            self._states[change.action][key] = change
        elif change.action in _LIFTS:
            self._states[_LIFTS[change.action]].pop(key, None)
        elif change.action == "purge":
            self.purges[change.value] = change
        elif change.action in ("release", "expire"):
            self.purges.pop(change.value, None)
        # (a drain is kept for the record: it ends with the process that drained)

    def record(self, change: Change) -> Change:
        """Make ``change`` durable (appended and fsynced), then put it in force."""
        with open(self.path, "ab") as f:
            f.write(msgspec.json.encode(change) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._apply(change)
        return change

    def change(self, action: str, scope: str, value: str, who: str, reason: str, now: float,
               detail: dict[str, Any] | None = None) -> Change:
        """Pause, resume, reroute, unroute, limit or unlimit; durable when this returns.

        Raises:
          ControlError: naming the field at fault: an unknown action or scope, an empty value,
            no reason, an unknown pool, a bad rate, or lifting something not in force.
        """
        detail = dict(detail or {})
        if action not in ("pause", "resume", "reroute", "unroute", "limit", "unlimit"):
            raise ControlError(f"action: expected pause, resume, reroute, unroute, limit or unlimit, got {action!r}")
        scopes = SCOPES if action in ("pause", "resume") else \
            REROUTE_SCOPES if action in ("reroute", "unroute") else LIMIT_SCOPES
        if scope not in scopes:
            raise ControlError(f"scope: {action} takes one of {', '.join(scopes)}, got {scope!r}")
        value = value.strip().lower() if scope in ("domain", "provider") else value.strip()
        if not value:
            raise ControlError(f"{scope}: must not be empty")
        check_reason(reason)
        if scope == "pool" and value not in self.pools:
            raise ControlError(f"pool: no [pool.{value}]")
        if action in _LIFTS:
            if (scope, value) not in self._states[_LIFTS[action]]:
                state = {"pause": "paused", "reroute": "rerouted", "limit": "limited"}[_LIFTS[action]]
                raise ControlError(f"{scope}: {value!r} is not {state}")
            detail = {}
        elif action == "reroute":
            pool = detail.get("pool")
            if not isinstance(pool, str) or pool not in self.pools:
                raise ControlError(f"pool: {action} needs the pool to send from; no [pool.{pool}]")
            detail = {"pool": pool}
        elif action == "limit":
            detail = _limit_detail(scope, detail)
        change = Change(action=action, scope=scope, value=value, who=who or "unknown", reason=reason.strip(),
                        at=now, detail=detail)
        return self.record(change)

    def holds(self, d: Delivery, path: _Path) -> Change | None:
        """The pause that holds ``d`` on ``path``, if any."""
        return self.holding(d.customer, d.domain, path.provider, path.source)

    def holding(self, customer: str, domain: str, provider: str, source: str) -> Change | None:
        """The pause that holds mail of ``customer`` to ``domain`` leaving from ``source``
        toward ``provider``, if any."""
        if not self.pauses:
            return None
        for scope, value in (("customer", customer), ("domain", domain), ("provider", provider),
                             ("source", source)):
            found = self.pauses.get((scope, value))
            if found is not None:
                return found
        for (scope, value), change in self.pauses.items():
            if scope == "pool" and source in self.pools.get(value, ()):
                return change
        return None

    def reroute(self, domain: str, provider: str) -> str | None:
        """The pool an operator sends ``domain``'s mail (or ``provider``'s) from, if any."""
        if not self.reroutes:
            return None
        found = self.reroutes.get(("domain", domain)) or self.reroutes.get(("provider", provider))
        return found.detail["pool"] if found is not None else None


def check_reason(reason: object) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise ControlError("reason: is required (say why, for whoever looks next)")
    return reason.strip()


def _limit_detail(scope: str, detail: dict[str, Any]) -> dict[str, Any]:
    """The checked ``rate`` (e.g. "100/min") and, for a provider, ``connections`` of a limit."""
    out: dict[str, Any] = {}
    rate = detail.get("rate")
    if rate is not None:
        if not isinstance(rate, str):
            raise ControlError("rate: expected a rate such as \"100/min\"")
        try:
            parse_rate(rate, "rate")
        except ConfigError as e:
            raise ControlError(str(e)) from None
        out["rate"] = rate
    connections = detail.get("connections")
    if connections is not None:
        if scope != "provider":
            raise ControlError("connections: only a provider's connection limit can be set")
        if type(connections) is not int or connections < 1:
            raise ControlError(f"connections: expected a whole number of at least 1, got {connections!r}")
        out["connections"] = connections
    if not out:
        raise ControlError("rate: a limit needs a rate (or, for a provider, connections)")
    return out


def with_limits(config: Config, limits) -> Config:
    """``config`` with the operators' run-time ``limits`` (Changes) in its ``[shaping]``."""
    limits = list(limits)
    if not limits:
        return config
    sh = config.shaping
    tables = {"customer": dict(sh.customer), "domain": dict(sh.domain), "source": dict(sh.source),
              "provider": dict(sh.provider)}
    for change in limits:
        rate, connections = change.detail.get("rate"), change.detail.get("connections")
        table = tables[change.scope]
        if change.scope in ("customer", "source"):
            table[change.value] = RateLimit(max_message_rate=rate)
        elif change.scope == "domain":
            table[change.value] = msgspec.structs.replace(table.get(change.value) or DomainShaping(),
                                                          max_message_rate=rate)
        else:
            new = {"provider_max_message_rate": rate} if rate is not None else {}
            if connections is not None:
                new["provider_connection_limit"] = connections
            table[change.value] = msgspec.structs.replace(table.get(change.value) or ProviderShaping(), **new)
    return msgspec.structs.replace(config, shaping=msgspec.structs.replace(sh, **tables))
