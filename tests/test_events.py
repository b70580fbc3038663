"""``sender.events``: the event log's files, memory and subscribers, and queries over it."""

from __future__ import annotations

import logging
import threading

from sender.events import Event, EventLog, Query, event_files, follow, select

HOUR = 3600.0
T0 = 1_795_500_000.0            # 2026-11-24T06:00:00Z


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_events_go_to_a_file_per_hour_and_old_files_are_pruned(tmp_path):
    clock = Clock(T0)
    log = EventLog(tmp_path, retention=2 * HOUR, recent=3, now=clock)
    for hour in range(5):
        clock.t = T0 + hour * HOUR
        log.emit(Event(time=clock.t, event="accepted", id=str(hour)))
        log.flush()
    log.close()
    names = [p.name for p in event_files(tmp_path)]
    assert names == ["2026-11-24T08.jsonl", "2026-11-24T09.jsonl", "2026-11-24T10.jsonl"]
    assert [e.id for e in log.recent] == ["2", "3", "4"] and log.written == 5


def test_a_failing_subscriber_is_logged_and_the_others_still_hear(tmp_path, caplog):
    log = EventLog(tmp_path, now=Clock(T0))
    heard = []

    def broken(ev):
        raise RuntimeError("boom")

    log.subscribers += [broken, heard.append]
    with caplog.at_level(logging.ERROR, logger="sender.events"):
        log.emit(Event(time=T0, event="delivered", id="a"))
    assert [e.id for e in heard] == ["a"] and "subscriber" in caplog.text
    log.close()


def _write(folder, events) -> None:
    clock = Clock(T0)
    log = EventLog(folder, now=clock)
    for ev in events:
        clock.t = ev.time
        log.emit(ev)
        log.flush()
    log.close()


def test_select_matches_fields_and_times_and_skips_a_torn_line(tmp_path):
    _write(tmp_path, [Event(time=T0 + 1, event="deferred", customer="acme", provider="microsoft"),
                      Event(time=T0 + 2, event="deferred", customer='acme"x', provider="google"),
                      Event(time=T0 + HOUR + 1, event="delivered", customer="acme", provider="microsoft"),
                      Event(time=T0 + 2 * HOUR, event="bounced", customer="", provider="microsoft")])
    with open(event_files(tmp_path)[-1], "ab") as f:
        f.write(b'{"time":1795507300,"event":"deliv')         # a crash mid-line
    files = event_files(tmp_path)

    def ids(**q):
        return [(ev.event, ev.customer) for ev, _ in select(files, Query(**q))]

    assert ids(match={"provider": ["microsoft"]}) == [("deferred", "acme"), ("delivered", "acme"), ("bounced", "")]
    assert ids(match={"customer": ['acme"x']}) == [("deferred", 'acme"x')]          # quoting in the needle
    assert ids(match={"customer": [""]}) == [("bounced", "")]
    assert ids(match={"event": ["deferred", "bounced"], "provider": ["microsoft"]}) == [("deferred", "acme"),
                                                                                       ("bounced", "")]
    assert ids(since=T0 + HOUR, until=T0 + 2 * HOUR) == [("delivered", "acme")]


def test_follow_prints_new_events_and_moves_on_to_the_next_hour(tmp_path):
    clock = Clock(T0)
    log = EventLog(tmp_path, now=clock)
    log.emit(Event(time=T0, event="accepted", id="old"))
    log.flush()
    seen: list[str] = []
    done = threading.Event()

    tail = follow(tmp_path, Query(match={"event": ["delivered"]}), poll=0.01,
                  stop=lambda: len(seen) >= 2 or done.is_set())       # from here on

    def reader():
        for ev, _ in tail:
            seen.append(ev.id)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i, t in enumerate((T0 + 10, T0 + HOUR + 10)):            # the second in the next hour's file
            clock.t = t
            log.emit(Event(time=t, event="accepted", id=f"a{i}"))
            log.emit(Event(time=t, event="delivered", id=f"d{i}"))
            log.flush()
        thread.join(5)
    finally:
        done.set()
        thread.join(5)
        log.close()
    assert seen == ["d0", "d1"]
