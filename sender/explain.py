"""``sender explain MESSAGE_ID``: one message's story, from the files a daemon leaves.

The story is the message's events in order (accepted, each attempt's outcome with the source
it left from and why that source, the site and provider it went to, the reply and its
category, the next attempt), the automation actions that fired on the paths it took while it
was in the queue (with their rule and the replies behind them), the throttles that held mail
it waited with (its customer's, its domain's, or those of a path it took: the bucket, how
many deliveries it held and until when; not while it waited for a retry), the operators'
changes that named its customer, a recipient domain, or a provider or source it went to
(pauses, reroutes, limits, with who and why; a purge of it is among its own events), and where it is
now: finished, or still queued (from the journal, read without changing it) with its
recipients, attempts and next attempt. It reads only files, so it works with the daemon
stopped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import msgspec

from .controls import EVENTS
from .events import Event, Query, event_files, file_hour, select
from .journal import Journal

__all__ = ["Story", "explain", "explain_live", "render"]

HOUR = 3600.0


class Story(msgspec.Struct):
    id: str
    events: list[Event]
    actions: list[Event]                # automation actions on the message's paths meanwhile
    queued: list[dict]                  # what the journal still holds: one entry per part
    throttles: list[Event] = []         # throttled events of the buckets that held it meanwhile
    controls: list[Event] = []          # operators' changes that concerned it meanwhile


def _id_time(msg_id: str) -> float:
    try:
        return int(msg_id[:14], 16) / 1e6
    except ValueError:
        return 0.0


def explain(spool_dirs: list[Path], msg_id: str) -> Story:
    """Gather the story of ``msg_id`` from ``spool_dirs`` (a shard's own, or every one): their
    event folders and journals."""
    events, actions, throttles, controls = _told(msg_id, [d / "events" for d in spool_dirs])
    queued = []
    for d in spool_dirs:
        live = Journal(d).replay(read_only=True) if any(d.glob("*.seg")) else {}
        entry = live.get(msg_id)
        if entry is not None:
            queued.append({"rcpts": entry.rcpts, "attempts": entry.attempts, "next_at": entry.next_at,
                           "customer": entry.customer, "spool": str(d)})
    return Story(msg_id, events, actions, queued, throttles, controls)


def explain_live(msg_id: str, folder: Path, queued: list[dict]) -> Story:
    """The story told by a running engine: its event ``folder`` (flushed by the caller) and
    ``queued``, where each part waits now and why (``Engine.where``). Reads only files: it
    may run in a worker thread."""
    events, actions, throttles, controls = _told(msg_id, [folder])
    return Story(msg_id, events, actions, queued, throttles, controls)


def _told(msg_id: str, folders: list[Path]) -> tuple[list[Event], list[Event], list[Event], list[Event]]:
    """The message's events, the automation actions on its paths while it was queued, and
    the throttles and operators' changes that concerned it meanwhile."""
    files = sorted((f for folder in folders for f in event_files(folder)), key=lambda f: f.name)
    accepted = _id_time(msg_id)
    # Nothing about a message comes before its id's time (an hour's slack for clocks).
    files = [f for f in files if (file_hour(f) or 0.0) + HOUR >= accepted - HOUR]
    events = [ev for ev, _ in select(files, Query(match={"id": [msg_id]}))]
    paths = {(ev.source, ev.provider) for ev in events if ev.source}
    actions: list[Event] = []
    if paths and events:
        first, last = events[0].time, events[-1].time
        actions = [ev for ev, _ in select(files, Query(match={"event": ["automation"]}, since=first, until=last + 1))
                   if (ev.source, ev.provider) in paths]
    return events, actions, _throttles(files, events), _controls(files, events)


# The operators' changes of how mail goes (a purge of the message is among its own events).
CONTROL_EVENTS = tuple(EVENTS[a] for a in ("pause", "resume", "reroute", "unroute", "limit", "unlimit"))


def _controls(files: list[Path], events: list[Event]) -> list[Event]:
    """The operators' pauses, reroutes and limits (and their lifting) that named the message's
    customer, one of its recipient domains, or a provider or source its mail went to, from its
    acceptance to its last event (to now while it is queued)."""
    if not events:
        return []
    head = next((ev for ev in events if ev.event in ("accepted", "scheduled")), events[0])
    named = {("customer", head.customer)} if head.customer else set()
    for ev in events:
        named |= {("domain", r.rpartition("@")[2].lower()) for r in ev.rcpts}
        named |= {(k, v) for k, v in (("provider", ev.provider), ("source", ev.source)) if v}
    until = events[-1].time + 1 if events[-1].event in _FINAL else math.inf
    return [c for c, _ in select(files, Query(match={"event": list(CONTROL_EVENTS)}, since=head.time, until=until))
            if (c.detail.get("scope"), c.detail.get("value")) in named]


_FINAL = ("delivered", "bounced", "expired", "failed", "canceled")


def _throttles(files: list[Path], events: list[Event]) -> list[Event]:
    """The throttled events that concerned the message while it was in the queue: a bucket of
    its customer, of one of its recipient domains, or of a path (source, site, provider) that
    domain's mail took, reported between its acceptance and its last event (now, while it is
    queued), except while that domain's part waited for a retry or its scheduled time, or
    after it was done."""
    if not events:
        return []
    head = next((ev for ev in events if ev.event in ("accepted", "scheduled")), events[0])
    domains: dict[str, set[str]] = {}               # domain -> its recipients
    for ev in (head, *events):
        for r in ev.rcpts:
            domains.setdefault(ev.domain or r.rpartition("@")[2].lower(), set()).add(r)
    away: dict[str, list[tuple[float, float]]] = {d: [] for d in domains}
    paths: dict[str, set[tuple[str, str, str]]] = {d: set() for d in domains}
    done: dict[str, set[str]] = {d: set() for d in domains}
    for ev in events:
        parts = [ev.domain] if ev.domain in domains else list(domains)
        for d in parts:
            if ev.source or ev.site:
                paths[d].add((ev.source, ev.site, ev.provider))
            if ev.event in ("deferred", "scheduled", "rescheduled") and ev.next_at > ev.time:
                away[d].append((ev.time, ev.next_at))
            elif ev.event in _FINAL:
                done[d].update(ev.rcpts)
                if done[d] >= domains[d]:
                    away[d].append((ev.time, math.inf))
    finished = all(done[d] >= rcpts for d, rcpts in domains.items())
    until = events[-1].time + 1 if finished else math.inf

    def concerns(t: Event, domain: str) -> bool:
        if any(start <= t.time < end for start, end in away[domain]):
            return False
        if t.customer:
            return t.customer == head.customer
        if t.domain:
            return t.domain == domain
        if not (t.source or t.site or t.provider):
            return False
        return any((not t.source or t.source == s) and (not t.site or t.site == site)
                   and (not t.provider or t.provider == p) for s, site, p in paths[domain])

    return [t for t, _ in select(files, Query(match={"event": ["throttled"]}, since=events[0].time, until=until))
            if any(concerns(t, d) for d in domains)]


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _waits(q: dict) -> str:
    state = q.get("state")
    via = f" ({q['source']} -> {q['site']})" if q.get("site") else ""
    if state == "throttled":
        return f"held by the {q['bucket']} bucket until {_when(q['until'])}{via}"
    if state == "timer" or (state is None and q["next_at"]):
        return f"next attempt at {_when(q.get('until') or q['next_at'])}"
    return {"resolving": "waiting for its MX lookup", "ready": f"ready, waiting for a connection{via}",
            "shaper": f"waiting its turn in the shaper (or being sent){via}",
            "in_flight": "being sent"}.get(state, "waiting for its turn")


def _held_lines(out: list[str], runs: dict[str, list], start: float) -> None:
    """Write the line of each run of a bucket's throttled reports in its place; no run is left."""
    for slot, first, last, reports in runs.values():
        d = first.detail
        held = d.get("held", 0)
        until = d.get("until")
        out[slot] = (f"{_when(first.time)}  +{first.time - start:9.3f}s  {'throttled':<11} bucket {d.get('bucket')} "
                     f"held {held} {'delivery' if held == 1 else 'deliveries'}, its next token at "
                     + (_when(float(until)) if isinstance(until, (int, float)) else "(none: paused)"))
        if reports > 1:
            out[slot] += (f"; {reports - 1} more report(s) until {_when(last.time)}, "
                          f"the last holding {last.detail.get('held', 0)}")
    runs.clear()


def _one_line(reply: str, limit: int = 160) -> str:
    text = " ".join(reply.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render(story: Story) -> str:
    """The story as text, a line per event."""
    if not story.events and not story.queued:
        return f"{story.id}: no events and not queued (an unknown id, or its events are past retention)"
    out = []
    head = next((ev for ev in story.events if ev.event in ("accepted", "scheduled")), None)
    if head is not None:
        d = head.detail
        out.append(f"message {story.id}  customer {head.customer or '-'}  type {head.message_type or '-'}")
        out.append(f"  from {d.get('from', '-')}  subject {d.get('subject', '')!r}  to {len(head.rcpts)} "
                   f"recipient(s)" + (f"  tags {d['tags']}" if d.get("tags") else ""))
    else:
        out.append(f"message {story.id}")
    start = story.events[0].time if story.events else 0.0
    # At one time, what acted on the message comes before what it did.
    timeline = sorted([*story.events, *story.actions, *story.throttles, *story.controls],
                      key=lambda ev: (ev.time, ev.id == story.id))
    # A bucket's reports between two of the message's own events make one line, at the first.
    runs: dict[str, list] = {}                  # bucket -> [its line's index, first, last, reports]
    for ev in timeline:
        if ev.event == "throttled":
            run = runs.get(str(ev.detail.get("bucket")))
            if run is None:
                runs[str(ev.detail.get("bucket"))] = [len(out), ev, ev, 1]
                out.append("")
            else:
                run[2], run[3] = ev, run[3] + 1
            continue
        if ev.event != "automation":
            _held_lines(out, runs, start)
        line = f"{_when(ev.time)}  +{ev.time - start:9.3f}s  {ev.event:<11}"
        if ev.event in CONTROL_EVENTS:
            d = ev.detail
            more = "".join(f" {k} {d[k]}" for k in ("pool", "rate", "connections") if k in d)
            line += f" {d.get('scope')} {d.get('value')}{more} by {d.get('who')}: {d.get('reason')}"
        elif ev.event == "automation":
            d = ev.detail
            replies = d.get("replies") or []
            line += (f" rule {d.get('rule')}: {d.get('action')} {ev.source} toward {ev.site or ev.provider} "
                     f"until {_when(float(d.get('until', 0)))}" + (f" (after: {_one_line(replies[-1])})" if replies else ""))
        else:
            line += " " + ",".join(ev.rcpts)
            if ev.source or ev.site:
                line += f"  via {ev.source or '-'} -> {ev.site or '-'}" + (f" ({ev.provider})" if ev.provider else "")
            if ev.reply:
                line += f"  {_one_line(ev.reply)}"
            if ev.category:
                line += f"  [{ev.category}]"
            if ev.event == "deferred":
                line += f"  attempt {ev.attempts}, next at {_when(ev.next_at)}"
            elif ev.event in ("scheduled", "rescheduled"):
                line += f"  goes at {_when(ev.next_at)}"
            if ev.chosen:
                line += f"\n{'':>37}source: {ev.chosen}"
        out.append(line)
    _held_lines(out, runs, start)
    if story.queued:
        for q in story.queued:
            out.append(f"now: queued for {', '.join(q['rcpts'])}: {q['attempts']} attempt(s) so far, {_waits(q)}")
    else:
        final = [ev for ev in story.events if ev.event in ("delivered", "bounced", "expired", "failed", "canceled")]
        out.append(f"now: done ({', '.join(sorted({ev.event for ev in final})) or 'no final event recorded'})")
    return "\n".join(out)
