"""The operators' dashboard: ``GET /dashboard``, one page with its CSS, script and charts
inline (no outside assets), and the data it polls every 2 s, ``GET /admin/dashboard.json``.

Both need an admin key. A browser cannot send a Bearer token on navigation, so a read of the
admin endpoints also takes the key as the password of HTTP Basic auth (any user name), and a
401 on ``/dashboard`` asks for it with ``WWW-Authenticate: Basic``.

The data: the engine's totals and queue depth by state; the queued deliveries by provider,
customer and source address, counted from the live registry (cached for a second, longer when
the walk is slow); outcomes per 10-second interval over the last 15 minutes and bounce
categories over the last hour, both counted from the events by one subscriber per engine; the
pauses and automation actions in force. On a sharded daemon the shard that answers asks its
siblings for theirs and sums them (:func:`merge`): one view of the whole daemon.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import math
import time
import weakref

import orjson
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .events import Event
from .routing import describe_action

__all__ = ["BUCKETS", "INTERVAL", "Board", "Rates", "board", "routes"]

INTERVAL = 10.0                 # seconds per rate bucket
WINDOW = 900.0                  # the rates' window: 15 minutes
BUCKETS = int(WINDOW // INTERVAL)
BOUNCE_WINDOW = 3600.0          # bounce categories: the last hour, in minutes
QUEUE_CACHE = 1.0               # seconds a count of the queue is reused, at least
QUEUE_CPU_SHARE = 0.05          # and at most this share of the loop goes to counting it
KINDS = ("delivered", "deferred", "bounced")
DIMENSIONS = ("provider", "customer", "source")
UNROUTED = "unrouted"           # no site known yet (or none at all: a failed MX lookup)
OTHER = "other"                 # a site no provider's match covers
DEFAULT_SOURCE = "default"      # no source address: the system's choice
NO_CUSTOMER = "none"            # mail injected without a customer
REALM = 'Basic realm="sender admin", charset="UTF-8"'


def _provider(provider: str, site: str) -> str:
    return provider or (OTHER if site else UNROUTED)


def _source(source: str, site: str) -> str:
    return source or (DEFAULT_SOURCE if site else UNROUTED)


class Rates:
    """Outcomes (recipients delivered, deferred, bounced) per 10-second interval, per provider,
    customer and source; bounces per category per minute. Older intervals are dropped as
    new ones start."""

    def __init__(self) -> None:
        self._intervals: dict[int, collections.Counter[tuple[str, str, str]]] = {}
        self._minutes: dict[int, collections.Counter[str]] = {}

    def observe(self, ev: Event) -> None:
        kind = ev.event
        if kind not in KINDS:
            return
        n = len(ev.rcpts) or 1
        i = int(ev.time // INTERVAL)
        counts = self._intervals.get(i)
        if counts is None:
            if self._intervals and i < max(self._intervals) - BUCKETS:
                return                          # older than the window
            counts = self._intervals[i] = collections.Counter()
            for old in [k for k in self._intervals if k <= i - BUCKETS]:
                del self._intervals[old]
        counts[(kind, "provider", _provider(ev.provider, ev.site))] += n
        counts[(kind, "customer", ev.customer or NO_CUSTOMER)] += n
        counts[(kind, "source", _source(ev.source, ev.site))] += n
        if kind == "bounced":
            m = int(ev.time // 60)
            minute = self._minutes.get(m)
            if minute is None:
                minute = self._minutes[m] = collections.Counter()
                for old in [k for k in self._minutes if k <= m - BOUNCE_WINDOW // 60]:
                    del self._minutes[old]
            minute[ev.category or "unknown"] += n

    def snapshot(self, now: float) -> dict:
        """Per dimension, per value, per kind: the total and the series of the window's
        intervals, oldest first (the last one is under way)."""
        last = int(now // INTERVAL)
        first = last - BUCKETS + 1
        out: dict[str, dict] = {dim: {} for dim in DIMENSIONS}
        for i, counts in self._intervals.items():
            if not first <= i <= last:
                continue
            for (kind, dim, value), n in counts.items():
                row = out[dim].get(value)
                if row is None:
                    row = out[dim][value] = {k: {"total": 0, "series": [0] * BUCKETS} for k in KINDS}
                row[kind]["total"] += n
                row[kind]["series"][i - first] += n
        for dim in DIMENSIONS:
            out[dim] = dict(sorted(out[dim].items(), key=lambda kv: (-sum(k["total"] for k in kv[1].values()),
                                                                     kv[0])))
        return {"interval": INTERVAL, "buckets": BUCKETS, "start": first * INTERVAL, "kinds": list(KINDS), **out}

    def bounce_categories(self, now: float) -> list[dict]:
        """Bounced recipients per category over the last hour, the most first."""
        last = int(now // 60)
        total: collections.Counter[str] = collections.Counter()
        for m, counts in self._minutes.items():
            if last - BOUNCE_WINDOW // 60 < m <= last:
                total.update(counts)
        return [{"category": c, "count": n} for c, n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))]


def other_controls(engine) -> list[dict]:
    """Reroutes, run-time limits, purges in quarantine and a drain, as rows of the page."""
    c = engine.controls
    rows = []
    for change in [*c.reroutes.values(), *c.limits.values(), *c.purges.values(),
                   *([engine.draining] if engine.draining is not None else [])]:
        detail = change.detail
        what = {"reroute": lambda: f"from pool {detail['pool']}",
                "limit": lambda: ", ".join(f"{k} {v}" for k, v in detail.items()),
                "purge": lambda: f"{detail['recipients']} recipients held, then {detail['then']}",
                "drain": lambda: "intake closed"}[change.action]()
        rows.append({"action": change.action, "scope": change.scope, "value": change.value, "what": what,
                     "who": change.who, "reason": change.reason, "at": change.at})
    return sorted(rows, key=lambda r: r["at"])


def count_queue(engine) -> dict:
    """Queued deliveries (a message's part per recipient domain) by provider, customer and
    source address. A delivery in a site's queue or held by a pause is counted on its path;
    another on the only source its (customer, domain) or its site has had a path from, else
    as unrouted (waiting for a retry, its source is chosen then)."""
    d = engine.dispatcher
    pools = list(d.pools.values())
    at: dict[int, object] = {}
    for pool in pools:
        for part in pool.queue:
            at[id(part)] = pool
    for part, pool in d._paused:
        at[id(part)] = pool
    queue_sources: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for customer, domain, path in d.shaper._queues:
        queue_sources[customer, domain].add(path.source)
    site_sources: dict[str, set[str]] = collections.defaultdict(set)
    for pool in pools:
        site_sources[pool.site.key].add(pool.source)
    paths: dict[tuple[str, str], tuple[str, str]] = {}

    def path_of(customer: str, domain: str) -> tuple[str, str]:
        site = d.site_of(domain)
        if site is None:
            return UNROUTED, UNROUTED
        sources = queue_sources.get((customer, domain)) or site_sources.get(site.key) or ()
        source = _source(next(iter(sources)), site.key) if len(sources) == 1 else UNROUTED
        return _provider(site.provider, site.key), source

    provider: collections.Counter[str] = collections.Counter()
    customer: collections.Counter[str] = collections.Counter()
    source: collections.Counter[str] = collections.Counter()
    total = 0
    for entry in engine._live.values():
        for part in entry if isinstance(entry, list) else (entry,):
            total += 1
            customer[part.customer or NO_CUSTOMER] += 1
            pool = at.get(id(part)) if at else None
            if pool is not None:
                where = _provider(pool.provider, pool.site.key), _source(pool.source, pool.site.key)
            else:
                key = (part.customer, part.domain)
                where = paths.get(key)
                if where is None:
                    where = paths[key] = path_of(*key)
            provider[where[0]] += 1
            source[where[1]] += 1

    def ranked(c: collections.Counter[str]) -> dict[str, int]:
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    return {"total": total, "provider": ranked(provider), "customer": ranked(customer), "source": ranked(source)}


class Board:
    """The dashboard's state for one engine: its rates (an events subscriber) and the last
    count of its queue. Holds no reference to the engine."""

    def __init__(self, engine) -> None:
        self.rates = Rates()
        for ev in list(engine.events.recent):  # what happened before the API started
            self.rates.observe(ev)
        engine.events.subscribers.append(self.rates.observe)
        self._queued: dict = {}
        self._queued_at = 0.0
        self._queued_until = -math.inf

    def queued(self, engine) -> dict:
        now = trio.current_time()
        if now >= self._queued_until:
            started = time.perf_counter()
            self._queued = count_queue(engine)
            cost = time.perf_counter() - started
            self._queued_at = engine.now()
            self._queued_until = now + max(QUEUE_CACHE, cost / QUEUE_CPU_SHARE)
        return {**self._queued, "at": self._queued_at}

    def data(self, engine) -> dict:
        now = engine.now()
        queued = self.queued(engine)
        counts = engine.counts
        totals = {k: counts.get(k, 0) for k in ("accepted", "delivered", "deferred", "bounced", "expired",
                                                "suppressed", "complaints", "bounced_later", "canceled")}
        totals.update(queued=queued["total"], messages=len(engine._live), in_flight=engine.dispatcher.busy())
        pauses = sorted(engine.controls.pauses.values(), key=lambda c: c.at)
        actions = [a for a in engine.dispatcher.egress.automation.active() if a.until > now]
        return {
            "now": now,
            "processes": engine.config.daemon.processes,
            "totals": totals,
            "depth": engine.dispatcher.depth(),
            "queued": queued,
            "rates": self.rates.snapshot(now),
            "bounce_categories": self.rates.bounce_categories(now),
            "pauses": [{"scope": c.scope, "value": c.value, "who": c.who, "reason": c.reason, "at": c.at}
                       for c in pauses],
            "controls": other_controls(engine),
            "automation": [{"rule": a.rule, "kind": a.kind, "action": describe_action(a), "source": a.source,
                            "provider": a.provider, "site": a.site, "pool": a.pool, "target": a.target,
                            "started": a.started, "until": a.until, "replies": a.replies[-3:]}
                           for a in actions],
        }


_boards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def board(engine) -> Board:
    """The engine's Board, made (and its events subscriber registered) on first use."""
    found = _boards.get(engine)
    if found is None:
        found = _boards[engine] = Board(engine)
    return found


def routes(engine, admin_endpoint, peers=None) -> list:
    """``GET /dashboard`` and ``GET /admin/dashboard.json``, each behind ``admin_endpoint``;
    with ``peers`` (a sharded daemon), the data of every shard, summed."""
    state = board(engine)

    async def page(request: Request) -> Response:
        return Response(PAGE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def data(request: Request) -> Response:
        mine = state.data(engine)
        if peers is not None and not peers.from_peer(request):
            parts = [mine]
            for shard in range(peers.count):
                if shard != peers.index:
                    answer = await peers.forward(shard, request, b"")
                    if answer.status_code == 200:
                        parts.append(orjson.loads(answer.body))
            mine = merge(parts)
            mine["shards"] = f"{len(parts)}/{peers.count}"
        return Response(orjson.dumps(mine), media_type="application/json", headers={"Cache-Control": "no-store"})

    return [Route("/dashboard", _asking_basic(admin_endpoint(page), only=True), methods=["GET"]),
            Route("/admin/dashboard.json", _asking_basic(admin_endpoint(data), only=False), methods=["GET"])]


def merge(parts: list[dict]) -> dict:
    """The data of several shards as one: figures summed, outcome series aligned on time,
    bounce categories summed, automation actions of any shard; the pauses and other controls
    are the same on every shard (each change is made on all), so the first's stand. The
    series end with the newest window among them."""
    parts = sorted(parts, key=lambda p: -p["rates"]["start"])
    out = orjson.loads(orjson.dumps(parts[0]))
    for part in parts[1:]:
        out["now"] = max(out["now"], part["now"])
        for section in ("totals", "depth"):
            for k, v in part[section].items():
                out[section][k] = out[section].get(k, 0) + v
        queued = out["queued"]
        queued["total"] += part["queued"]["total"]
        for dim in DIMENSIONS:
            for value, n in part["queued"][dim].items():
                queued[dim][value] = queued[dim].get(value, 0) + n
        rates, theirs = out["rates"], part["rates"]
        shift = round((theirs["start"] - rates["start"]) / rates["interval"])
        for dim in DIMENSIONS:
            for value, row in theirs[dim].items():
                mine = rates[dim].setdefault(value, {k: {"total": 0, "series": [0] * rates["buckets"]} for k in KINDS})
                for kind in KINDS:
                    mine[kind]["total"] += row[kind]["total"]
                    for i, n in enumerate(row[kind]["series"]):
                        if 0 <= i + shift < rates["buckets"]:
                            mine[kind]["series"][i + shift] += n
        categories = collections.Counter({c["category"]: c["count"] for c in out["bounce_categories"]})
        categories.update({c["category"]: c["count"] for c in part["bounce_categories"]})
        out["bounce_categories"] = [{"category": c, "count": n}
                                    for c, n in sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))]
        out["automation"] += [a for a in part["automation"] if a not in out["automation"]]
    for dim in DIMENSIONS:
        out["queued"][dim] = dict(sorted(out["queued"][dim].items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def _asking_basic(endpoint, *, only: bool):
    """Have a 401 ask for Basic credentials (instead of, or besides, a Bearer token), so a
    browser shows its login dialog, or sends the ones it has for the realm."""

    async def call(request: Request) -> Response:
        response = await endpoint(request)
        if response.status_code == 401:
            if only:
                response.headers["WWW-Authenticate"] = REALM
            else:
                response.headers.append("WWW-Authenticate", REALM)
        return response

    return call


# ----------------------------------------------------------------------------- the page

_STYLE = """
:root { --bg: #f4f5f7; --card: #fff; --ink: #1f2937; --mute: #6b7280; --line: #e5e7eb;
        --delivered: #2e7d32; --deferred: #d97706; --bounced: #c62828; --queued: #2563eb; --paused: #6b7280; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       background: var(--bg); color: var(--ink); }
header { display: flex; align-items: baseline; gap: 12px; padding: 12px 20px; background: #111827; color: #f9fafb; }
header h1 { font-size: 18px; margin: 0; letter-spacing: .02em; }
header .sub { color: #9ca3af; }
#status { margin-left: auto; font-size: 12px; color: #9ca3af; }
#status.error { color: #fca5a5; font-weight: 600; }
#note { display: none; margin: 12px 20px 0; padding: 8px 12px; background: #fff7ed; border: 1px solid #fed7aa;
        border-radius: 6px; }
#note.shown { display: block; }
main { padding: 16px 20px 24px; display: grid; gap: 16px; grid-template-columns: repeat(3, minmax(0, 1fr)); }
.totals { grid-column: 1 / -1; display: grid; grid-template-columns: repeat(auto-fit, minmax(110px, 1fr)); gap: 10px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.tile .label { color: var(--mute); font-size: 11px; text-transform: uppercase; letter-spacing: .05em;
               white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tile .num { display: block; font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.tile .num.delivered { color: var(--delivered); } .tile .num.deferred { color: var(--deferred); }
.tile .num.bounced, .tile .num.expired { color: var(--bounced); } .tile .num.queued { color: var(--queued); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; min-width: 0; }
.card.wide { grid-column: 1 / -1; }
.card.span2 { grid-column: span 2; }
@media (max-width: 1000px) { main { grid-template-columns: minmax(0, 1fr); } .card.span2 { grid-column: auto; } }
h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--mute); margin: 0 0 8px; }
h2 .count { color: var(--ink); margin-left: 6px; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 4px 6px; border-bottom: 1px solid var(--line); white-space: nowrap; vertical-align: middle; }
th { font-weight: 600; color: var(--mute); font-size: 11px; text-transform: uppercase; letter-spacing: .04em; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap { white-space: normal; }
td.bar { width: 40%; }
td.spark { width: 45%; min-width: 120px; }
svg.spark { width: 100%; height: 26px; display: block; }
.empty { color: var(--mute); font-style: italic; }
.mute { color: var(--mute); }
svg.chart { display: block; }
svg.bar { width: 100%; height: 12px; display: block; }
svg text { font: 10px system-ui, sans-serif; fill: var(--mute); }
.legend { font-size: 12px; color: var(--mute); margin-top: 4px; }
.legend span { margin-right: 14px; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.c-delivered { background: var(--delivered); } .c-deferred { background: var(--deferred); }
.c-bounced { background: var(--bounced); } .c-queued { background: var(--queued); } .c-paused { background: var(--paused); }
"""

_SCRIPT = r"""
"use strict";
const KINDS = ["delivered", "deferred", "bounced"];
const COLOR = {delivered: "#2e7d32", deferred: "#d97706", bounced: "#c62828", queued: "#2563eb", paused: "#6b7280"};
const SVGNS = "http://www.w3.org/2000/svg";
const MAX_ROWS = 20;
const history = [];                       // [server time, queued, paused] per refresh, 15 minutes

const fmt = n => Number(n).toLocaleString("en-US");
const $ = id => document.getElementById(id);

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null) continue;
    if (k === "testid") e.dataset.testid = v; else if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k instanceof Node ? k : String(k));
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}
const num = (n, testid, cls) => el("span", {class: "num" + (cls ? " " + cls : ""), testid}, fmt(n));
const td = (cls, ...kids) => el("td", {class: cls}, ...kids);
const th = (text, cls) => el("th", {class: cls}, text);
function clock(t) { return new Date(t * 1000).toLocaleTimeString("en-GB", {hour12: false}); }
function ago(t, now) {
  const s = Math.max(0, Math.round(now - t));
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 172800) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}
function ahead(t, now) { return "in " + ago(now, t).replace(" ago", ""); }
function niceMax(v) {
  if (v <= 5) return 5;
  const p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
  return (m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}
function legend(names) {
  return el("div", {class: "legend"}, ...names.map(n => el("span", {}, el("i", {class: "c-" + n}), n)));
}
function emptyRow(cols, text) { return el("tr", {}, el("td", {class: "empty", colspan: cols}, text)); }

// A line chart as wide as ``box``: series [{name, values}], x from 0 to n-1, labels [[index, text]].
function lineChart(box, series, n, labels, label, H) {
  const W = Math.max(240, box.clientWidth || 600), L = 44, R = 12, T = 10, B = 22;
  const top = niceMax(Math.max(0, ...series.flatMap(s => s.values)));
  const x = i => L + (n > 1 ? i * (W - L - R) / (n - 1) : W - L - R);
  const y = v => H - B - v / top * (H - T - B);
  const s = sv("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "chart", role: "img", "aria-label": label});
  for (const f of [0, 0.5, 1]) {
    s.append(sv("line", {x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), stroke: "#e5e7eb"}));
    s.append(sv("text", {x: L - 6, y: y(top * f) + 3, "text-anchor": "end"}, fmt(top * f)));
  }
  for (const [i, text] of labels) s.append(sv("text", {x: x(i), y: H - 6, "text-anchor": "middle"}, text));
  for (const ser of series) {
    if (!ser.values.length) continue;
    const pts = ser.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    s.append(sv("polyline", {points: pts, fill: "none", stroke: COLOR[ser.name], "stroke-width": 1.8,
                             "stroke-linejoin": "round"}));
    if (n <= 30) ser.values.forEach((v, i) => s.append(sv("circle", {cx: x(i), cy: y(v), r: 2.5, fill: COLOR[ser.name]})));
  }
  return s;
}

// Stacked bars of one row's outcomes per interval.
function spark(row, n) {
  const W = 360, H = 26, bw = W / n;
  const s = sv("svg", {viewBox: `0 0 ${W} ${H}`, class: "spark", preserveAspectRatio: "none", role: "img",
                       "aria-label": "outcomes per 10 s interval, last 15 minutes"});
  const totals = Array.from({length: n}, (_, i) => KINDS.reduce((a, k) => a + (row ? row[k].series[i] : 0), 0));
  const top = Math.max(1, ...totals);
  s.append(sv("line", {x1: 0, x2: W, y1: H - 0.5, y2: H - 0.5, stroke: "#e5e7eb"}));
  if (!row) return s;
  for (let i = 0; i < n; i++) {
    let base = H;
    for (const k of KINDS) {
      const v = row[k].series[i];
      if (!v) continue;
      const h = Math.max(1, v / top * (H - 2));
      base -= h;
      s.append(sv("rect", {x: (i * bw).toFixed(2), y: base.toFixed(2), width: Math.max(1, bw - 0.6).toFixed(2),
                           height: h.toFixed(2), fill: COLOR[k]}));
    }
  }
  return s;
}

function bar(value, top, color) {
  const W = 200, H = 12;
  const s = sv("svg", {viewBox: `0 0 ${W} ${H}`, class: "bar", preserveAspectRatio: "none"});
  s.append(sv("rect", {x: 0, y: 0, width: W, height: H, fill: "#f3f4f6", rx: 2}));
  if (value > 0) s.append(sv("rect", {x: 0, y: 0, width: Math.max(2, W * value / Math.max(1, top)), height: H,
                                      fill: color, rx: 2}));
  return s;
}

const TOTALS = [["accepted", "Accepted"], ["delivered", "Delivered"], ["deferred", "Deferred"],
                ["bounced", "Bounced"], ["expired", "Expired"], ["complaints", "Complaints"],
                ["suppressed", "Suppressed"], ["queued", "Queued now"], ["messages", "Messages"],
                ["in_flight", "In flight"]];

const TITLES = {queued: "deliveries waiting (a message has one per recipient domain), paused ones included",
                messages: "messages in the queue", in_flight: "connection workers running",
                accepted: "messages accepted since the daemon started (the outcomes count recipients)"};

function renderTotals(d) {
  $("totals").replaceChildren(...TOTALS.map(([k, label]) =>
    el("div", {class: "tile", title: TITLES[k] || null}, el("div", {class: "label"}, label),
       num(d.totals[k], "total-" + k, k))));
}

function renderDepth(d) {
  const states = Object.entries(d.depth);
  const top = Math.max(1, ...states.map(([, v]) => v));
  $("depth").replaceChildren(
    el("tr", {}, th("state"), th("deliveries", "n"), th("")),
    ...states.map(([k, v]) => el("tr", {}, td("", k.replace("_", " ")), td("n", num(v, "depth-" + k)),
                                  td("bar", bar(v, top, k === "paused" ? COLOR.paused : COLOR.queued)))));
}

function renderQueueChart(d) {
  history.push([d.now, d.totals.queued, d.depth.paused || 0]);
  while (history.length && history[0][0] < d.now - 900) history.shift();
  const n = history.length;
  const labels = n > 1 ? [[0, clock(history[0][0])], [n - 1, clock(history[n - 1][0])]] : [];
  const box = $("queue-chart");
  box.replaceChildren(
    lineChart(box, [{name: "queued", values: history.map(h => h[1])}, {name: "paused", values: history.map(h => h[2])}],
              n, labels, "queued deliveries over time", 180),
    legend(["queued", "paused"]));
}

function sumSeries(rows, kind, n) {
  const out = new Array(n).fill(0);
  for (const row of Object.values(rows)) row[kind].series.forEach((v, i) => { out[i] += v; });
  return out;
}

function renderRateChart(d) {
  const r = d.rates, n = r.buckets;
  // Every event counts once per dimension: the providers' rows add up to all of them.
  const series = KINDS.map(k => ({name: k, values: sumSeries(r.provider, k, n)}));
  const labels = [[0, "-15 min"], [30, "-10 min"], [60, "-5 min"], [n - 1, "now"]];
  const totals = KINDS.map(k => el("span", {}, el("i", {class: "c-" + k}), k + " ",
                                   num(series.find(s => s.name === k).values.reduce((a, b) => a + b, 0), "rate-total-" + k)));
  const box = $("rate-chart");
  box.replaceChildren(lineChart(box, series, n, labels, "outcomes per 10 s interval", 200),
                                  el("div", {class: "legend"}, ...totals,
                                     el("span", {}, `per ${r.interval} s, recipients`)));
}

function renderDimension(d, dim) {
  const queued = d.queued[dim] || {}, rates = d.rates[dim] || {}, n = d.rates.buckets;
  const rateSum = v => rates[v] ? KINDS.reduce((a, k) => a + rates[v][k].total, 0) : 0;
  const values = [...new Set([...Object.keys(queued), ...Object.keys(rates)])]
    .sort((a, b) => ((queued[b] || 0) + rateSum(b)) - ((queued[a] || 0) + rateSum(a)) || a.localeCompare(b));
  const rows = values.slice(0, MAX_ROWS).map(v => el("tr", {testid: `row-${dim}-${v}`},
    td("", v),
    td("n", num(queued[v] || 0, `queue-${dim}-${v}`)),
    ...KINDS.map(k => td("n", num(rates[v] ? rates[v][k].total : 0, `rate-${dim}-${v}-${k}`))),
    td("spark", spark(rates[v], n))));
  if (!values.length) rows.push(emptyRow(6, "nothing queued or sent in the last 15 minutes"));
  if (values.length > MAX_ROWS) rows.push(emptyRow(6, `${values.length - MAX_ROWS} more`));
  $("dim-" + dim).replaceChildren(
    el("tr", {}, th(dim === "source" ? "source IP" : dim), th("queued", "n"), th("delivered", "n"),
       th("deferred", "n"), th("bounced", "n"), th("last 15 min")),
    ...rows);
}

function renderBounces(d) {
  const rows = d.bounce_categories, top = Math.max(1, ...rows.map(r => r.count));
  $("bounces-count").replaceChildren(num(rows.reduce((a, r) => a + r.count, 0), "bounces-total"));
  $("bounces").replaceChildren(
    el("tr", {}, th("category"), th("recipients", "n"), th("")),
    ...rows.map(r => el("tr", {}, td("", r.category), td("n", num(r.count, "bounce-category-" + r.category)),
                        td("bar", bar(r.count, top, COLOR.bounced)))),
    ...(rows.length ? [] : [emptyRow(3, "no bounces in the last hour")]));
}

function renderPauses(d) {
  $("pauses-count").replaceChildren(num(d.pauses.length, "pauses-count"));
  $("pauses").replaceChildren(
    el("tr", {}, th("scope"), th("value"), th("who"), th("reason"), th("since")),
    ...d.pauses.map(p => el("tr", {testid: `pause-${p.scope}-${p.value}`},
      td("", p.scope), td("", p.value), td("", p.who || "—"),
      td("wrap", el("span", {testid: `pause-reason-${p.scope}-${p.value}`}, p.reason)),
      td("", clock(p.at), " ", el("span", {class: "mute"}, "(" + ago(p.at, d.now) + ")")))),
    ...(d.pauses.length ? [] : [emptyRow(5, "no pauses")]));
}

function renderControls(d) {
  $("controls-count").replaceChildren(num(d.controls.length, "controls-count"));
  $("controls").replaceChildren(
    el("tr", {}, th("control"), th("on"), th("what"), th("who"), th("reason"), th("since")),
    ...d.controls.map(c => el("tr", {testid: `control-${c.action}-${c.value}`},
      td("", c.action), td("", c.scope === "daemon" ? "daemon" : `${c.scope} ${c.value}`), td("wrap", c.what),
      td("", c.who || "—"), td("wrap", c.reason),
      td("", clock(c.at), " ", el("span", {class: "mute"}, "(" + ago(c.at, d.now) + ")")))),
    ...(d.controls.length ? [] : [emptyRow(6, "no reroutes, limits, quarantine or drain")]));
}

function renderAutomation(d) {
  $("automation-count").replaceChildren(num(d.automation.length, "automation-count"));
  $("automation").replaceChildren(
    el("tr", {}, th("rule"), th("action"), th("source"), th("provider / site"), th("since"), th("until"),
       th("last reply")),
    ...d.automation.map(a => el("tr", {testid: `automation-${a.rule}-${a.source}`},
      td("", a.rule), td("", a.action), td("", a.source || "default"), td("wrap", a.site || a.provider),
      td("", clock(a.started)), td("", clock(a.until), " ", el("span", {class: "mute"}, "(" + ahead(a.until, d.now) + ")")),
      td("wrap", a.replies.length ? a.replies[a.replies.length - 1] : ""))),
    ...(d.automation.length ? [] : [emptyRow(7, "no automation actions in force")]));
}

function render(d) {
  const partial = d.shards && d.shards.split("/")[0] !== d.shards.split("/")[1];
  $("note").className = partial ? "shown" : "";
  $("note").textContent = partial ? `Only ${d.shards} processes answered: the figures are theirs.` : "";
  renderTotals(d);
  renderDepth(d);
  renderQueueChart(d);
  renderRateChart(d);
  for (const dim of ["provider", "customer", "source"]) renderDimension(d, dim);
  renderBounces(d);
  renderPauses(d);
  renderControls(d);
  renderAutomation(d);
}

async function refresh() {
  try {
    const r = await fetch("/admin/dashboard.json", {cache: "no-store", credentials: "same-origin",
                                                    headers: {"Accept": "application/json"}});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const d = await r.json();
    render(d);
    $("status").className = "";
    $("status").textContent = "updated " + clock(d.now);
    delete document.body.dataset.error;
    document.body.dataset.updated = String(d.now);
    document.body.dataset.loaded = "1";
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = "refresh failed: " + e.message;
    document.body.dataset.error = e.message;
  } finally {
    setTimeout(refresh, 2000);
  }
}
refresh();
"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>sender · dashboard</title>
<style>{_STYLE}</style>
</head>
<body>
<header><h1>sender</h1><span class="sub">operators' dashboard</span><span id="status">loading…</span></header>
<div id="note"></div>
<main>
<section class="totals" id="totals"></section>
<section class="card"><h2>Queue depth by state</h2><table id="depth"></table></section>
<section class="card span2"><h2>Queued deliveries, since this page opened</h2><div id="queue-chart"></div></section>
<section class="card wide"><h2>Outcomes per 10 s, last 15 minutes</h2><div id="rate-chart"></div></section>
<section class="card wide"><h2>By provider</h2><table id="dim-provider"></table></section>
<section class="card wide"><h2>By customer</h2><table id="dim-customer"></table></section>
<section class="card wide"><h2>By source IP</h2><table id="dim-source"></table></section>
<section class="card"><h2>Bounce categories, last hour<span class="count" id="bounces-count"></span></h2>
<table id="bounces"></table></section>
<section class="card span2"><h2>Pauses<span class="count" id="pauses-count"></span></h2><table id="pauses"></table></section>
<section class="card span2"><h2>Reroutes, limits, quarantine, drain<span class="count" id="controls-count"></span></h2><table id="controls"></table></section>
<section class="card wide"><h2>Automation actions in force<span class="count" id="automation-count"></span></h2>
<table id="automation"></table></section>
</main>
<script>{_SCRIPT}</script>
</body>
</html>
""".encode()


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# The page runs only its own script and style: nothing injected into it (a customer id, a
# pause's reason) could run, and it talks to no one but this server.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": f"default-src 'none'; script-src {_digest(_SCRIPT)}; style-src {_digest(_STYLE)}; "
                               f"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               f"frame-ancestors 'none'",
}
