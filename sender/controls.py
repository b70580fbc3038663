"""Operator controls that outlive a restart: pauses of sending by customer, recipient domain,
provider, source IP or pool.

A pause holds the matching mail in the queue: nothing matching is handed to a connection
from the moment it is set (transactions already under way finish), and the held mail goes on,
in its order, when the pause is lifted. Every change names who made it and why. Changes are
appended to ``SPOOL/controls.log`` (JSON lines) and fsynced before they are answered; the log
is read again at start, so pauses survive a restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import msgspec

from .model import Delivery

__all__ = ["SCOPES", "Change", "ControlError", "Controls"]

SCOPES = ("customer", "domain", "provider", "source", "pool")


class ControlError(ValueError):
    """A change that cannot be made; the message names the field at fault."""


class Change(msgspec.Struct, frozen=True, kw_only=True):
    action: str                 # "pause" | "resume"
    scope: str                  # one of SCOPES
    value: str
    who: str
    reason: str
    at: float


class _Path(Protocol):
    provider: str
    source: str


class Controls:
    """The pauses in force, from and to ``path``.

    Args:
      pools: pool name -> the addresses of its sources (a pool's pause holds mail leaving
        from any of them).
    """

    def __init__(self, path: str | os.PathLike, pools: dict[str, set[str]] | None = None) -> None:
        self.path = Path(path)
        self.pools = pools or {}
        self.pauses: dict[tuple[str, str], Change] = {}
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                self._apply(msgspec.json.decode(line, type=Change))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue                    # a torn last line: the change was never answered

    def _apply(self, change: Change) -> None:
        key = (change.scope, change.value)
        if change.action == "pause":
            self.pauses[key] = change
        else:
            self.pauses.pop(key, None)

    def change(self, action: str, scope: str, value: str, who: str, reason: str, now: float) -> Change:
        """Pause or resume; durable when this returns.

        Raises:
          ControlError: an unknown action or scope, an empty value, no reason, an unknown pool,
            or a resume of something that is not paused.
        """
        if action not in ("pause", "resume"):
            raise ControlError(f"action: expected pause or resume, got {action!r}")
        if scope not in SCOPES:
            raise ControlError(f"scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
        value = value.strip().lower() if scope in ("domain", "provider") else value.strip()
        if not value:
            raise ControlError(f"{scope}: must not be empty")
        if not reason.strip():
            raise ControlError("reason: is required (say why, for whoever looks next)")
        if scope == "pool" and value not in self.pools:
            raise ControlError(f"pool: no [pool.{value}]")
        if action == "resume" and (scope, value) not in self.pauses:
            raise ControlError(f"{scope}: {value!r} is not paused")
        change = Change(action=action, scope=scope, value=value, who=who or "unknown", reason=reason.strip(), at=now)
        with open(self.path, "ab") as f:
            f.write(msgspec.json.encode(change) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._apply(change)
        return change

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
