"""Automatic reactions to what providers reply: pause a sending IP, cap its rate, limit its
connections, or move a pool's mail elsewhere, for a while.

Rules (:class:`~sender.config.AutomationRule`) come from the configuration, then from the
packaged ``automation_rules.toml``. :class:`Automation` counts the replies each rule matches per
(source, provider) or (source, site) and turns a rule that reaches its count into an
:class:`Action`, which delivery asks about on every attempt (:meth:`Automation.suspended` and
the other queries are dict lookups). Time is passed in, never read.
"""

from __future__ import annotations

import heapq
import math
import re
import tomllib
from collections import deque
from importlib import resources

import msgspec

from .config import AutomationRule, ConfigError, Rate, check_automation_rule, parse_rate
from .model import Reply

__all__ = ["MAX_REPLIES", "Action", "Automation", "builtin_rules", "load_rules"]

MAX_REPLIES = 10
"""Replies an :class:`Action` keeps to show why it fired."""

_KEY_RE = re.compile(r"at `\$\.?(.*?)`")
_UNKNOWN_RE = re.compile(r"unknown field `(.*?)`")


class Action(msgspec.Struct, kw_only=True):
    """One reaction in force: what, on which pair, until when, and the replies behind it.

    ``site`` is "" when the rule counts per (source, provider). ``pool`` is the pool the mail
    that fired it left from; ``target`` the pool a reroute sends that mail to instead.
    """

    rule: str
    kind: str
    source: str
    provider: str
    site: str
    pool: str
    target: str = ""
    max_message_rate: str = ""
    connection_limit: int = 0
    started: float
    until: float
    replies: list[str] = msgspec.field(default_factory=list)


def load_rules(text: str, source: str = "automation_rules.toml") -> list[AutomationRule]:
    """Parse and check a rules file: a ``[[rule]]`` array of AutomationRule fields.

    Raises:
      ConfigError: naming the rule by index and the field, e.g.
        ``automation_rules.toml rule[3].text: bad regular expression: ...``.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None
    extra = set(doc) - {"rule"}
    if extra:
        raise ConfigError(f"{source}: unknown key {sorted(extra)[0]!r}, expected [[rule]] entries")
    items = doc.get("rule", [])
    if not isinstance(items, list):
        raise ConfigError(f"{source}: \"rule\" must be an array of tables ([[rule]])")
    rules = []
    for i, item in enumerate(items):
        key = f"{source} rule[{i}]"
        try:
            rule = msgspec.convert(item, AutomationRule)
        except msgspec.ValidationError as e:
            m = _KEY_RE.search(str(e)) or _UNKNOWN_RE.search(str(e))
            where = f".{m.group(1)}" if m and m.group(1) else ""
            raise ConfigError(f"{key}{where}: {_KEY_RE.sub('', str(e)).rstrip(' -')}") from None
        check_automation_rule(rule, key)
        rules.append(rule)
    return rules


_builtin: list[AutomationRule] | None = None


def builtin_rules() -> list[AutomationRule]:
    """The packaged rules, parsed once (copies, so callers may not change the cache)."""
    global _builtin
    if _builtin is None:
        _builtin = load_rules(resources.files(__package__).joinpath("automation_rules.toml").read_text("utf-8"))
    return [msgspec.structs.replace(r, provider=list(r.provider)) for r in _builtin]


class _Rule:
    """A rule ready to match: regex compiled, enhanced prefix split for dotted comparison."""

    __slots__ = ("rule", "regex", "enhanced", "providers")

    def __init__(self, rule: AutomationRule) -> None:
        self.rule = rule
        self.regex = re.compile(rule.text, re.IGNORECASE) if rule.text else None
        self.enhanced = rule.enhanced.rstrip(".")
        self.providers = frozenset(rule.provider)

    def matches(self, reply: Reply, text: str, category: str, provider: str) -> bool:
        r = self.rule
        if r.category and r.category != category:
            return False
        if r.code and r.code != reply.code:
            return False
        if self.enhanced and not (reply.enhanced == self.enhanced or reply.enhanced.startswith(self.enhanced + ".")):
            return False
        if self.providers and provider not in self.providers:
            return False
        return self.regex is None or self.regex.search(text) is not None


class _Hits:
    """The latest matching replies of one rule on one pair: enough of them to tell whether
    ``count`` fell within the window."""

    __slots__ = ("times", "replies")

    def __init__(self, count: int) -> None:
        self.times: deque[float] = deque(maxlen=count)
        self.replies: deque[str] = deque(maxlen=min(count, MAX_REPLIES))


# An action's pair: ("p", source, provider) or ("s", source, site).
_Pair = tuple[str, str, str]


class Automation:
    """Rules, the replies they matched, and the actions in force.

    A rule matches a reply when every criterion it sets holds: ``category`` is the classifier's,
    ``code`` equal, ``enhanced`` a prefix on dot boundaries ("5.7" takes "5.7.1", not
    "5.70.1"), ``text`` found case-insensitively (runs of white space count as one space),
    ``provider`` lists the provider. Every rule that matches counts the reply; user rules come
    first, and a built-in rule named like a user rule is left out, so a user rule can replace it.

    A rule counts per (source, provider), or per (source, site) with ``scope = "source_site"``;
    a site of no provider ("") always counts per site, since "" is not one provider.

    Args:
      rules: the configuration's rules, checked with ``check_automation_rule``.
      default_rules: add the packaged rules after them.

    Raises:
      ConfigError: two user rules share a name.
    """

    def __init__(self, rules: list[AutomationRule], default_rules: bool = True) -> None:
        self._rules: list[_Rule] = []
        self._hits: dict[tuple[str, _Pair], _Hits] = {}
        self._actions: dict[tuple[str, _Pair], Action] = {}
        self._index: dict[_Pair, list[Action]] = {}           # pair -> its actions
        self._reroutes: dict[tuple[str, str], list[Action]] = {}  # (pool, provider) -> reroutes
        self._expiry: list[tuple[float, str, _Pair]] = []      # heap; stale entries skipped
        self._rates: dict[str, Rate] = {}
        self.replace(rules, default_rules)

    @property
    def rules(self) -> list[AutomationRule]:
        return [c.rule for c in self._rules]

    def replace(self, rules: list[AutomationRule], default_rules: bool = True) -> None:
        """Swap the rules (on a configuration reload). Actions in force stay until they
        expire, even those of rules that are gone; counts of rules that are gone are dropped."""
        names: set[str] = set()
        for i, r in enumerate(rules):
            if r.name in names:
                raise ConfigError(f"automation.rule[{i}].name: another rule is named {r.name!r}")
            names.add(r.name)
            check_automation_rule(r, f"automation.rule[{i}]")     # idempotent; makes durations floats
        builtin = [r for r in builtin_rules() if r.name not in names] if default_rules else []
        self._rules = [_Rule(r) for r in (*rules, *builtin)]
        kept = {c.rule.name for c in self._rules}
        self._hits = {k: v for k, v in self._hits.items() if k[0] in kept}

    def matching(self, reply: Reply, category: str, provider: str) -> list[AutomationRule]:
        """The rules ``reply`` matches, in order (for tests and ``sender explain``)."""
        text = " ".join(reply.text.split())
        return [c.rule for c in self._rules if c.matches(reply, text, category, provider)]

    def observe(self, *, source: str, provider: str, site: str, pool: str, reply: Reply, category: str,
                now: float) -> list[Action]:
        """Count ``reply`` for the rules it matches; return the actions that fire now.

        A rule fires when its ``count``-th matching reply on a pair comes within ``window`` of
        the first of them. While its action is in force on that pair it does not fire again,
        but every further matching reply pushes ``until`` to ``now + duration``: the provider
        is still saying the same thing, so the action should not lapse in the middle of it.

        Args:
          pool: the pool the mail left from (kept in the action; a reroute moves that pool).
          category: the classifier's category of ``reply``.
        """
        fired: list[Action] = []
        text = None
        for c in self._rules:
            r = c.rule
            if c.regex is not None and text is None:
                text = " ".join(reply.text.split())
            if not c.matches(reply, text or "", category, provider):
                continue
            pair = self._pair(r, source, provider, site)
            key = (r.name, pair)
            active = self._actions.get(key)
            if active is not None and active.until > now:
                if now + r.duration > active.until:
                    active.until = now + r.duration
                    heapq.heappush(self._expiry, (active.until, r.name, pair))
                continue
            hits = self._hits.get(key)
            if hits is None:
                hits = self._hits[key] = _Hits(r.count)
            hits.times.append(now)
            hits.replies.append(str(reply))
            if len(hits.times) < r.count or now - hits.times[0] >= r.window:
                continue
            del self._hits[key]
            if active is not None:
                self._remove(key)                 # expired but not yet collected
            action = Action(
                rule=r.name, kind=r.action, source=source, provider=provider,
                site=site if pair[0] == "s" else "", pool=pool,
                target=r.pool if r.action == "reroute" else "",
                max_message_rate=r.max_message_rate if r.action == "max_message_rate" else "",
                connection_limit=r.connection_limit if r.action == "connection_limit" else 0,
                started=now, until=now + r.duration, replies=list(hits.replies))
            self._install(action)
            fired.append(action)
        return fired

    @staticmethod
    def _pair(rule: AutomationRule, source: str, provider: str, site: str) -> _Pair:
        if rule.scope == "source_site" or not provider:
            return ("s", source, site)
        return ("p", source, provider)

    @staticmethod
    def _pair_of(action: Action) -> _Pair:
        return ("s", action.source, action.site) if action.site else ("p", action.source, action.provider)

    def _install(self, action: Action) -> None:
        pair = self._pair_of(action)
        self._actions[(action.rule, pair)] = action
        self._index.setdefault(pair, []).append(action)
        if action.kind == "reroute":
            self._reroutes.setdefault((action.pool, action.provider), []).append(action)
        if action.kind == "max_message_rate" and action.max_message_rate not in self._rates:
            self._rates[action.max_message_rate] = parse_rate(action.max_message_rate, f"rule {action.rule}")
        heapq.heappush(self._expiry, (action.until, action.rule, pair))

    def _remove(self, key: tuple[str, _Pair]) -> Action:
        action = self._actions.pop(key)
        _discard(self._index, key[1], action)
        if action.kind == "reroute":
            _discard(self._reroutes, (action.pool, action.provider), action)
        return action

    def expire(self, now: float) -> list[Action]:
        """Remove and return the actions whose ``until`` has come."""
        gone = []
        while self._expiry and self._expiry[0][0] <= now:
            until, rule, pair = heapq.heappop(self._expiry)
            action = self._actions.get((rule, pair))
            if action is not None and action.until == until:
                gone.append(self._remove((rule, pair)))
        # Counts that can no longer reach a firing are dropped here, off the hot path.
        windows = {c.rule.name: c.rule.window for c in self._rules}
        self._hits = {k: h for k, h in self._hits.items() if now - h.times[-1] < windows.get(k[0], 0.0)}
        return gone

    def next_expiry(self) -> float:
        """When :meth:`expire` next has something to do; ``math.inf`` with nothing in force."""
        while self._expiry:
            until, rule, pair = self._expiry[0]
            action = self._actions.get((rule, pair))
            if action is not None and action.until == until:
                return until
            heapq.heappop(self._expiry)
        return math.inf

    def active(self) -> list[Action]:
        """The actions in force, oldest first (some may be past ``until`` until :meth:`expire`)."""
        return sorted(self._actions.values(), key=lambda a: (a.started, a.rule))

    def restore(self, actions: list[Action], now: float) -> None:
        """Put persisted actions back after a restart; those already over are dropped, and one
        whose rule and pair are already in force keeps the later ``until``."""
        for a in actions:
            if a.until <= now:
                continue
            key = (a.rule, self._pair_of(a))
            current = self._actions.get(key)
            if current is not None:
                if current.until >= a.until:
                    continue
                self._remove(key)
            self._install(msgspec.structs.replace(a, replies=list(a.replies)))

    def _applying(self, source: str, provider: str, site: str) -> list[Action]:
        if not self._index:                 # the usual case: nothing in force
            return []
        found = self._index.get(("s", source, site), [])
        if provider:
            found = found + self._index.get(("p", source, provider), [])
        return found

    def suspended(self, source: str, provider: str, site: str) -> Action | None:
        """A suspension of ``source`` towards this provider or site, or None."""
        for a in self._applying(source, provider, site):
            if a.kind == "suspend":
                return a
        return None

    def max_message_rate(self, source: str, provider: str, site: str) -> Rate | None:
        """The lowest message rate cap in force for the path, or None."""
        caps = [self._rates[a.max_message_rate] for a in self._applying(source, provider, site)
                if a.kind == "max_message_rate"]
        return min(caps, key=lambda r: r.per_second) if caps else None

    def connection_limit(self, source: str, provider: str, site: str) -> int | None:
        """The lowest connection limit in force for the path, or None."""
        limits = [a.connection_limit for a in self._applying(source, provider, site) if a.kind == "connection_limit"]
        return min(limits) if limits else None

    def reroute(self, pool: str, provider: str) -> str | None:
        """The pool that mail of ``pool`` to ``provider`` should leave from instead, or None
        (the oldest reroute in force wins)."""
        found = self._reroutes.get((pool, provider))
        return found[0].target if found else None

    def rerouting(self, pool: str, provider: str) -> Action | None:
        """The reroute in force for mail of ``pool`` to ``provider`` (the oldest), or None."""
        found = self._reroutes.get((pool, provider))
        return found[0] if found else None


def _discard(index: dict, key, action: Action) -> None:
    found = index.get(key)
    if found is None:
        return
    found[:] = [a for a in found if a is not action]
    if not found:
        del index[key]
