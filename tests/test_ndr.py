"""Non-delivery reports to the envelope sender: RFC 3464, from the null sender, never looping."""

from __future__ import annotations

import email

import trio

from sender.config import parse_config
from sender.engine import Engine
from sender.sink import Sink, load_rules

RULES = '[[rule]]\nmatch = "bad@*"\naction = "reject"\nreply = "550 5.1.1 <bad@y.test>: no such user"\n'


def config(tmp_path, **bounces):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"},
        "listen": {"smtp": "", "hostname": "mx.sender.test"},
        "delivery": {"starttls": "never"},
        "route": [{"match": "*", "relay": "mx:25"}],
        "bounces": bounces,
    })


async def run(tmp_path, submits, **bounces):
    sink = Sink(load_rules(RULES))
    sink.messages = []
    bodies = []
    record = sink.record

    def keep(ev, peer, **kw):
        bodies.append((ev.sender, list(ev.rcpts), ev.body))
        record(ev, peer, **kw)

    sink.record = keep
    async with trio.open_nursery() as n:
        await n.start(sink.run_in_memory)
        engine = await n.start(Engine(config(tmp_path, **bounces), open_stream=sink.open_stream).run)
        for sender, rcpts, body, customer in submits:
            await engine.submit(sender, rcpts, body, customer=customer)
        with trio.fail_after(5):
            while engine.counts["bounced"] < len(submits) or engine.statistics().live_messages:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    return bodies


async def test_a_bounce_sends_the_sender_an_rfc3464_report(tmp_path, autojump_clock):
    body = b"Subject: Your invoice\r\nMessage-ID: <inv-1@app.test>\r\n\r\nsecret body text\r\n"
    bodies = await run(tmp_path, [("app@x.test", ["bad@y.test"], body, "acme")])
    (sender, rcpts, report), = [b for b in bodies if b[1] == ["app@x.test"]]
    assert sender == "" and rcpts == ["app@x.test"]          # from the null sender: nobody answers it
    msg = email.message_from_bytes(report)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied" and "MAILER-DAEMON@mx.sender.test" in msg["From"]
    parts = {p.get_content_type(): p for p in msg.walk()}
    status = parts["message/delivery-status"].get_payload()
    fields = {k: v for block in status for k, v in block.items()}
    assert fields["Final-Recipient"] == "rfc822; bad@y.test"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
    assert fields["Diagnostic-Code"] == "smtp; 550 <bad@y.test>: no such user"
    headers = parts["text/rfc822-headers"].get_payload()
    assert "Message-ID: <inv-1@app.test>" in headers and b"secret body text" not in report


async def test_no_report_for_the_null_sender_automatic_mail_or_an_opted_out_customer(tmp_path, autojump_clock):
    auto = b"Auto-Submitted: auto-generated\r\nSubject: alert\r\n\r\nx\r\n"
    plain = b"Subject: hi\r\n\r\nx\r\n"
    bodies = await run(tmp_path, [("", ["bad@y.test"], plain, ""),
                                  ("app@x.test", ["bad@y.test"], auto, ""),
                                  ("app@x.test", ["bad@y.test"], plain, "quiet")],
                       notify_customer={"quiet": False})
    assert [b for b in bodies if b[1] == ["app@x.test"]] == []
