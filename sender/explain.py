"""``sender explain MESSAGE_ID``: one message's story, from the files a daemon leaves.

The story is the message's events in order (accepted, each attempt's outcome with the source
it left from, the site and provider it went to, the reply and its category, the next attempt),
the automation actions that fired on the paths it took while it was in the queue (with their
rule and the replies behind them), and where it is now: finished, or still queued (from the
journal, read without changing it) with its recipients, attempts and next attempt. It reads
only files, so it works with the daemon stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from .events import Event, Query, event_files, file_hour, select
from .journal import Journal

__all__ = ["Story", "explain", "explain_live", "render"]

HOUR = 3600.0


class Story(msgspec.Struct):
    id: str
    events: list[Event]
    actions: list[Event]                # automation actions on the message's paths meanwhile
    queued: list[dict]                  # what the journal still holds: one entry per part


def _id_time(msg_id: str) -> float:
    try:
        return int(msg_id[:14], 16) / 1e6
    except ValueError:
        return 0.0


def explain(spool_dirs: list[Path], msg_id: str) -> Story:
    """Gather the story of ``msg_id`` from ``spool_dirs`` (a shard's own, or every one): their
    event folders and journals."""
    events, actions = _told(msg_id, [d / "events" for d in spool_dirs])
    queued = []
    for d in spool_dirs:
        live = Journal(d).replay(read_only=True) if any(d.glob("*.seg")) else {}
        entry = live.get(msg_id)
        if entry is not None:
            queued.append({"rcpts": entry.rcpts, "attempts": entry.attempts, "next_at": entry.next_at,
                           "customer": entry.customer, "spool": str(d)})
    return Story(msg_id, events, actions, queued)


def explain_live(msg_id: str, folder: Path, queued: list[dict]) -> Story:
    """The story told by a running engine: its event ``folder`` (flushed by the caller) and
    ``queued``, where each part waits now and why (``Engine.where``). Reads only files: it
    may run in a worker thread."""
    events, actions = _told(msg_id, [folder])
    return Story(msg_id, events, actions, queued)


def _told(msg_id: str, folders: list[Path]) -> tuple[list[Event], list[Event]]:
    """The message's events, and the automation actions on its paths while it was queued."""
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
    return events, actions


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
    timeline = sorted([*story.events, *story.actions], key=lambda ev: ev.time)
    for ev in timeline:
        line = f"{_when(ev.time)}  +{ev.time - start:9.3f}s  {ev.event:<11}"
        if ev.event == "automation":
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
        out.append(line)
    if story.queued:
        for q in story.queued:
            out.append(f"now: queued for {', '.join(q['rcpts'])}: {q['attempts']} attempt(s) so far, {_waits(q)}")
    else:
        final = [ev for ev in story.events if ev.event in ("delivered", "bounced", "expired", "failed", "canceled")]
        out.append(f"now: done ({', '.join(sorted({ev.event for ev in final})) or 'no final event recorded'})")
    return "\n".join(out)
