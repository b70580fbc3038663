"""``sender demo``: the whole path on loopback in one process, bounded, with a report.

A sink with rules (most recipients accepted, one domain deferring, some mailboxes unknown),
the daemon's engine and SMTP listener on a temporary spool, and K client connections that
inject N messages over SMTP. It ends by itself once every message has an outcome (or after a
time limit) and prints delivered / deferred / bounced and messages per second.
"""

from __future__ import annotations

import sys
import tempfile
import time

import trio

from .config import parse_config
from .engine import Engine
from .inject.smtpd import serve_smtp
from .sink import Sink, load_rules
from .smtp.client import open_session

__all__ = ["run_demo", "make_body"]

DEMO_RULES = """
[[rule]]
match = "*@busy.demo.test"
action = "defer"
reply = "451 4.7.1 Busy: try again later"

[[rule]]
match = "nobody*@*"
action = "reject"
reply = "550 5.1.1 No such user here"
"""


def make_body(i: int, sender: str, rcpt: str, size: int = 2048) -> bytes:
    """A plain message of about ``size`` bytes with a unique Message-ID."""
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: demo message {i}\r\n"
            f"Message-ID: <demo-{i}@sender.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def _recipient(i: int, domains: int) -> str:
    if i % 50 == 7:
        return f"user{i}@busy.demo.test"
    if i % 40 == 3:
        return f"nobody{i}@d{i % domains}.demo.test"
    return f"user{i}@d{i % domains}.demo.test"


class _Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def show(self, label: str, done: int) -> None:
        frac = done / self.total if self.total else 1.0
        if self.tty:
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{label:<10} [{bar:<30}] {done:>7}/{self.total}")
            sys.stderr.flush()
        elif int(frac * 10) != self._last_decile:
            self._last_decile = int(frac * 10)
            sys.stderr.write(f"{label}: {done}/{self.total}\n")

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        self._last_decile = -1


async def run_demo(messages: int = 20000, connections: int = 20, domains: int = 200,
                   time_limit: float = 300.0) -> int:
    sink = Sink(load_rules(DEMO_RULES))
    with tempfile.TemporaryDirectory(prefix="sender-demo-") as spool:
        async with trio.open_nursery() as nursery:
            sink_host, sink_port = await nursery.start(sink.run, "127.0.0.1:0")
            config = parse_config({
                "spool": {"path": spool, "fsync": "batch"},
                "listen": {"smtp": "127.0.0.1:0"},
                "delivery": {"retry_interval": "30s", "connection_limit": 20},
                "route": [{"match": "*", "relay": f"{sink_host}:{sink_port}"}],
            })
            engine = await nursery.start(Engine(config).run)
            host, port = await nursery.start(serve_smtp, engine, config.listen.smtp)
            print(f"demo: sink on {sink_host}:{sink_port}, sender listening on {host}:{port}, "
                  f"spool {spool}", flush=True)
            print(f"demo: injecting {messages} messages over {connections} SMTP connections "
                  f"to {domains} domains", flush=True)

            progress = _Progress(messages)
            start = time.perf_counter()
            injected = 0
            next_i = 0

            async def client() -> None:
                nonlocal injected, next_i
                session = await open_session(host, port, ehlo="demo.client")
                try:
                    while next_i < messages:
                        i = next_i
                        next_i += 1
                        rcpt = _recipient(i, domains)
                        res = await session.transaction("app@sender.test", [rcpt], make_body(i, "app@sender.test", rcpt))
                        if res.final.code == 250:
                            injected += 1
                finally:
                    await session.quit()

            async with trio.open_nursery() as clients:
                for _ in range(connections):
                    clients.start_soon(client)
                while next_i < messages:
                    progress.show("injected", injected)
                    await trio.sleep(0.1)
            progress.show("injected", injected)
            progress.end()
            inject_secs = time.perf_counter() - start

            with trio.move_on_after(time_limit):
                while True:
                    c = engine.counts
                    # Every message has an outcome once each has been delivered, bounced, or
                    # deferred at least once (deferred ones stay queued for their retry). The
                    # non-delivery reports for the bounces are messages of their own.
                    done = c["delivered"] + c["bounced"] + engine.dispatcher.waiting_retry()
                    progress.show("outcomes", min(done, messages))
                    if done >= c["accepted"]:
                        break
                    await trio.sleep(0.1)
            progress.end()
            total_secs = time.perf_counter() - start
            st = engine.statistics()
            nursery.cancel_scope.cancel()

    deferred_now = st.live_messages
    print()
    print("demo report")
    print(f"  injected   {injected:>8}   ({injected / inject_secs:,.0f} msgs/s accepted over SMTP, fsync=batch)")
    print(f"  delivered  {st.delivered:>8}")
    print(f"  bounced    {st.bounced:>8}   (550 5.1.1 from the sink's rules)")
    print(f"  reports    {st.accepted - injected:>8}   (non-delivery reports to the sender, delivered too)")
    print(f"  deferred   {deferred_now:>8}   (451 4.7.1 from busy.demo.test; still queued for retry)")
    print(f"  sink saw   {sink.stats.messages:>8} messages on {sink.stats.connections} connections")
    print(f"  end to end {total_secs:8.2f} s   ({st.delivered / total_secs:,.0f} msgs/s delivered)")
    ok = (injected == messages and st.accepted - injected == st.bounced
          and st.delivered + st.bounced + deferred_now == st.accepted)
    print("  result     " + ("ok: every message accounted for" if ok else "INCOMPLETE"))
    return 0 if ok else 1
