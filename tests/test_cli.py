"""The ``sender`` command: bad input names the flag or key (exit 2), ``queue`` reads a spool,
``run`` stops cleanly on SIGTERM and refuses a corrupt journal unless told to repair it.

In-process calls to ``sender.cli.main`` for argument and config handling; subprocesses for
``sender run``, which owns signal handling.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import time
from pathlib import Path

import orjson
import pytest

from sender.cli import main
from sender.journal import Journal
from sender.model import Accepted, Deferred, Delivered, Reply

from helpers import free_port, spawn, stop, wait_for_line

LISTENING = r"^sender: listening on (127\.0\.0\.1):(\d+) \(SMTP\)$"


def write_config(tmp_path, extra: str = "", spool=None) -> str:
    path = tmp_path / "sender.toml"
    path.write_text(
        f'[spool]\npath = "{spool or tmp_path / "spool"}"\nfsync = "batch"\n'
        f'[listen]\nsmtp = "127.0.0.1:0"\n'
        f'[delivery]\nretry_interval = "1h"\nstarttls = "never"\n'
        f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{free_port()}"\n' + extra)
    return str(path)


# ----------------------------------------------------------------------- usage errors


def test_run_with_a_missing_config_names_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.toml"
    assert main(["run", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1


@pytest.mark.parametrize("toml, key", [
    ('[spool]\nmax_bytes = "2XB"\n', "spool.max_bytes"),
    ('[delivery]\nport = "x"\n', "delivery.port"),
    ('[delivery]\nbogus = 1\n', "delivery"),
    ('[delivery.timeouts]\ndata = "soon"\n', "delivery.timeouts.data"),
    ('[listen]\nsmtp = "nonsense"\n', "listen.smtp"),
    ('[[route]]\nmatch = "*"\nrelay = "mx:99999"\n', "route[0].relay"),
    ('[spool]\nfsync = "sometimes"\n', "spool.fsync"),
    ('[daemon]\nscheduling = "fast"\n', "daemon.scheduling"),
])
def test_config_errors_name_the_key(tmp_path, capsys, toml, key):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sender run: error: {key}"), err
    assert "Traceback" not in err
    if "bogus" in toml:
        assert "bogus" in err


def test_invalid_toml_names_the_file(tmp_path, capsys):
    path = tmp_path / "broken.toml"
    path.write_text("[spool\n")
    assert main(["run", "--config", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["demo", "--messages", "0"], "--messages"),
    (["demo", "--connections", "many"], "--connections"),
    (["sink", "--listen", "nonsense"], "--listen"),
    (["sink", "--listen", "127.0.0.1:70000"], "--listen"),
    (["run"], "--config"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1, err


@pytest.mark.parametrize("rules, key", [
    ('[[rule]]\nmatch = "*"\naction = "defer"\nreply = "550 5.1.1 no"\n', "rule[0].reply"),
    ('[[rule]]\nmatch = "*"\nbogus = 1\n', "rule[0]"),
])
def test_sink_rule_errors_name_the_rule(tmp_path, capsys, rules, key):
    path = tmp_path / "rules.toml"
    path.write_text(rules)
    assert main(["sink", "--listen", "127.0.0.1:0", "--rules", str(path)]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err, err


def test_sink_with_missing_rules_file_names_the_flag(tmp_path, capsys):
    assert main(["sink", "--listen", "127.0.0.1:0", "--rules", str(tmp_path / "nope.toml")]) == 2
    assert "--rules" in capsys.readouterr().err


# ----------------------------------------------------------------------- queue


def make_spool(path) -> None:
    j = Journal(path)
    j.replay()
    now = time.time()
    j.append(Accepted(id="A1", sender="s@x.test", rcpts=["u1@a.test", "u2@b.test"], received_at=now, body=b"1\r\n"))
    j.append(Accepted(id="A2", sender="s@x.test", rcpts=["u3@a.test"], received_at=now, body=b"2\r\n"))
    j.append(Accepted(id="A3", sender="s@x.test", rcpts=["u4@c.test"], received_at=now, body=b"3\r\n"))
    j.append(Deferred("A3", ["u4@c.test"], now, now + 3600, 1, Reply(451, "later", "4.3.0")))
    j.append(Accepted(id="A4", sender="s@x.test", rcpts=["u5@d.test"], received_at=now, body=b"4\r\n"))
    j.append(Delivered("A4", ["u5@d.test"], now, Reply(250, "ok", "2.0.0")))
    j.close()


def test_queue_counts_by_state_and_domain(tmp_path, capsys):
    make_spool(tmp_path / "spool")
    assert main(["queue", "--spool", str(tmp_path / "spool"), "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report == {
        "messages": 3,
        "by_state": {"active": 2, "deferred": 1},
        "by_domain": {"a.test": {"active": 2, "deferred": 0}, "b.test": {"active": 1, "deferred": 0},
                      "c.test": {"active": 0, "deferred": 1}},
    }
    assert main(["queue", "--spool", str(tmp_path / "spool")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "3 messages queued: 2 active, 1 deferred"
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert rows == {"a.test": ["2", "0"], "b.test": ["1", "0"], "c.test": ["0", "1"]}
    assert "d.test" not in "\n".join(table)


def test_queue_on_an_empty_spool_and_a_missing_one(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["queue", "--spool", str(tmp_path / "empty"), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["messages"] == 0
    assert main(["queue", "--spool", str(tmp_path / "nope")]) == 2
    assert "--spool" in capsys.readouterr().err


# ----------------------------------------------------------------------- run


def test_run_accepts_mail_and_stops_on_sigterm_with_status_0(tmp_path, capsys):
    out = tmp_path / "run.out"
    proc = spawn(["run", "--config", write_config(tmp_path), "--grace", "5"], out)
    try:
        m = wait_for_line(proc, out, LISTENING)
        with smtplib.SMTP(m.group(1), int(m.group(2)), timeout=5) as smtp:
            refused = smtp.sendmail("app@x.test", ["user@y.test"], b"Subject: hi\r\n\r\nhello\r\n")
            assert refused == {}
        status = stop(proc, signal.SIGTERM)
    finally:
        stop(proc, signal.SIGKILL)
    text = out.read_text()
    assert status == 0, text + out.with_suffix(".err").read_text()
    assert "sender: stopped; accepted 1," in text and "still queued 1" in text
    # The relay was unreachable: the message is still in the spool after the stop.
    assert main(["queue", "--spool", str(tmp_path / "spool"), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["messages"] == 1


@pytest.mark.parametrize("scheduling, policy", [("batch", os.SCHED_BATCH), ("normal", os.SCHED_OTHER)])
def test_run_applies_the_scheduling_policy_to_its_event_loop(tmp_path, scheduling, policy):
    out = tmp_path / "run.out"
    proc = spawn(["run", "--config", write_config(tmp_path, f'[daemon]\nscheduling = "{scheduling}"\n')], out)
    try:
        wait_for_line(proc, out, LISTENING)
        assert os.sched_getscheduler(proc.pid) == policy
    finally:
        stop(proc, signal.SIGKILL)


def corrupt_spool(spool) -> None:
    """Three messages in one segment; the middle record's payload is damaged."""
    j = Journal(spool)
    j.replay()
    locs = [j.append(Accepted(id=f"0000000000000{i}001", sender="s@x.test", rcpts=[f"u{i}@y.test"],
                              received_at=time.time(), body=b"hello\r\n")) for i in range(3)]
    j.close()
    seg = spool / "0000000001.seg"
    data = bytearray(seg.read_bytes())
    data[locs[1].offset + 12] ^= 0xFF
    seg.write_bytes(data)


def test_run_refuses_a_corrupt_journal_then_starts_with_repair(tmp_path):
    spool = tmp_path / "spool"
    corrupt_spool(spool)
    config = write_config(tmp_path)
    out = tmp_path / "refused.out"
    proc = spawn(["run", "--config", config], out)
    try:
        status = proc.wait(15)
    finally:
        stop(proc, signal.SIGKILL)
    err = out.with_suffix(".err").read_text()
    assert status != 0
    assert "0000000001.seg" in err and "--repair" in err, err
    assert "listening" not in out.read_text()

    out = tmp_path / "repair.out"
    proc = spawn(["run", "--config", config, "--repair", "--grace", "5"], out)
    try:
        wait_for_line(proc, out, LISTENING)
        status = stop(proc, signal.SIGTERM)
    finally:
        stop(proc, signal.SIGKILL)
    assert status == 0, out.with_suffix(".err").read_text()
    # The damaged record is skipped; the two around it are still queued.
    assert "still queued 2" in out.read_text()
    live = Journal(spool).replay(repair=True, read_only=True)
    assert sorted(live) == ["00000000000000001", "00000000000002001"]


def run_until_exit(args: list[str], out) -> tuple[int, str]:
    """Run ``sender`` in a subprocess that is expected to stop by itself; (status, stderr)."""
    proc = spawn(args, out)
    try:
        status = proc.wait(15)
    finally:
        stop(proc, signal.SIGKILL)
    return status, out.with_suffix(".err").read_text()


def test_corrupt_journal_is_reported_in_one_line_without_a_traceback(tmp_path):
    corrupt_spool(tmp_path / "spool")
    status, err = run_until_exit(["run", "--config", write_config(tmp_path)], tmp_path / "refused.out")
    assert status == 1
    assert err.startswith("sender run: journal: corrupt record in segment 0000000001.seg"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("processes", [1, 2])     # 2: the supervisor binds
def test_port_in_use_is_reported_in_one_line(tmp_path, processes):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "busy.toml"
        cfg.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n[listen]\nsmtp = "127.0.0.1:{port}"\n'
                       f'[daemon]\nprocesses = {processes}\n')
        status, err = run_until_exit(["run", "--config", str(cfg)], tmp_path / "busy.out")
    assert status == 1
    assert err.startswith(f"sender run: cannot listen on 127.0.0.1:{port}:"), err
    assert "Traceback" not in err


def test_suppression_cli_adds_lists_and_removes(tmp_path, capsys):
    spool = str(tmp_path)
    assert main(["suppression", "add", "A@Y.test", "--spool", spool, "--customer", "acme", "--reason", "complaint"]) == 0
    added = orjson.loads(capsys.readouterr().out)
    assert (added["customer"], added["address"], added["reason"], added["expires_at"]) == (
        "acme", "a@y.test", "complaint", None)
    assert main(["suppression", "list", "--spool", spool, "--customer", "other"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["suppression", "remove", "a@y.test", "--spool", spool, "--customer", "other"]) == 1
    assert "not suppressed for customer 'other'" in capsys.readouterr().err
    assert main(["suppression", "remove", "a@y.test", "--spool", spool, "--customer", "acme"]) == 0
    assert main(["suppression", "list", "--spool", spool, "--all"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["suppression", "add", "--spool", spool]) == 2
    assert "give the address" in capsys.readouterr().err


def test_classify_prints_the_classification_as_json(capsys):
    assert main(["classify", "--code", "550", "--text", "5.1.1 <u@y.test>: Recipient address rejected: "
                 "User unknown in local recipient table"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert (out["category"], out["permanent"], out["enhanced"]) == ("invalid_recipient", True, "5.1.1")


def test_dsn_prints_one_json_object_per_file(tmp_path, capsys):
    data = Path(__file__).parent / "data" / "dsn" / "rfc3464-two-recipients.eml"
    missing = tmp_path / "nope.eml"
    assert main(["dsn", str(data), str(missing)]) == 1
    out = capsys.readouterr()
    (line,) = out.out.splitlines()
    report = orjson.loads(line)
    assert report["file"] == str(data) and report["kind"] == "bounce"
    assert set(report) == {"file", "kind", "original_message_id", "recipients"}
    assert set(report["recipients"][0]) == {"recipient", "action", "status", "diagnostic", "category", "permanent"}
    assert "nope.eml" in out.err


def test_dkim_keygen_writes_a_key_that_signs_and_prints_its_record(tmp_path, capsys):
    from sender.dkim import Signer, load_key

    out = tmp_path / "k.pem"
    assert main(["dkim", "keygen", "--domain", "x.test", "--selector", "s1", "--algorithm", "ed25519",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert 's1._domainkey.x.test. IN TXT "v=DKIM1; k=ed25519; p=' in printed
    assert f'key_file = "{out}"' in printed
    assert out.stat().st_mode & 0o777 == 0o600
    key = load_key("x.test", "s1", str(out))
    assert Signer([key]).sign(b"From: a@x.test\r\n\r\nhi\r\n", 0.0).startswith(b"DKIM-Signature: v=1; a=ed25519-sha256")
    before = out.read_bytes()
    assert main(["dkim", "keygen", "--domain", "x.test", "--selector", "s1", "--out", str(out)]) == 2
    assert "--out:" in capsys.readouterr().err and out.read_bytes() == before


def test_webhooks_cli_shows_pending_and_dead_letters(tmp_path, capsys):
    from sender.config import parse_config
    from sender.webhooks import Webhooks

    secret = "whsec_" + "a2V5a2V5a2V5a2V5"
    config = parse_config({"customer": [{"id": "acme", "webhook": [{"url": "http://127.0.0.1:9/h", "secret": secret}]}]})
    hooks = Webhooks(config.customer, config.webhooks, tmp_path / "webhooks.log", lambda: 1000.0)
    hooks.emit("acme", "email.delivered", {"email_id": "A"}, 1000.0)
    hooks.emit("acme", "email.bounced", {"email_id": "B"}, 1000.0)
    dead = next(iter(hooks._hooks.values()))
    hooks._bury(dead, "HTTP 500")
    hooks.close()
    assert main(["webhooks", "--spool", str(tmp_path)]) == 0
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"spool": str(tmp_path), "pending": 1, "dead": 1}
    letter = lines[1]["dead_letter"]
    assert (letter["customer"], letter["last_error"]) == ("acme", "HTTP 500")
    assert orjson.loads(letter["body"])["data"]["email_id"] == "A"
    assert main(["webhooks", "--spool", str(tmp_path / "nope")]) == 2


def _event_log(folder, events):
    from sender.events import Event, EventLog

    log = EventLog(folder, now=lambda: events[-1][0])
    for t, kind, customer, provider, category in events:
        log.emit(Event(time=t, event=kind, id=f"{int(t):014X}000", customer=customer, domain="y.test",
                       provider=provider, category=category, reply="421 4.7.0 try later" if category else ""))
    log.close()


def test_events_cli_filters_counts_and_prints_json(tmp_path, capsys):
    base = 1_795_500_000.0
    _event_log(tmp_path / "ev", [
        (base + 1, "deferred", "acme", "microsoft", "rate_limited"),
        (base + 2, "deferred", "acme", "microsoft", "rate_limited"),
        (base + 3, "deferred", "beta", "microsoft", "reputation"),
        (base + 4, "delivered", "acme", "google", ""),
        (base + 5, "delivered", "", "microsoft", ""),
    ])
    assert main(["events", "--dir", str(tmp_path / "ev"), "--provider", "microsoft",
                 "--group-by", "customer,category", "--json"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"customer": "acme", "category": "rate_limited", "count": 2},
                    {"customer": "beta", "category": "reputation", "count": 1},
                    {"customer": "", "category": "", "count": 1}]
    assert main(["events", "--dir", str(tmp_path / "ev"), "--event", "delivered", "--customer", "acme,beta",
                 "--json"]) == 0
    assert [orjson.loads(line)["provider"] for line in capsys.readouterr().out.splitlines()] == ["google"]
    assert main(["events", "--dir", str(tmp_path / "ev"), "--customer", "", "--json"]) == 0   # mail of no customer
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["events", "--dir", str(tmp_path / "ev"), "--since", "2026-11-24T06:00:03Z",
                 "--until", "2026-11-24T06:00:05"]) == 0                  # no zone: UTC
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("time  event") and len(table) == 3
    assert "beta" in table[1] and "google" in table[2]
    assert main(["events", "--dir", str(tmp_path / "ev"), "--limit", "1"]) == 0           # the newest
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 and table[1].split()[1:2] == ["delivered"] and "microsoft" in table[1]
    assert main(["events", "--dir", str(tmp_path / "ev"), "--group-by", "colour"]) == 2
    assert "--group-by: unknown field 'colour'" in capsys.readouterr().err
    assert main(["events", "--dir", str(tmp_path / "ev"), "--since", "yesterday-ish"]) == 2
    assert "--since:" in capsys.readouterr().err


def test_events_table_tells_a_throttle_and_an_operators_change(tmp_path, capsys):
    from sender.events import Event, EventLog

    base = 1_795_500_000.0
    log = EventLog(tmp_path / "ev", now=lambda: base + 2)
    log.emit(Event(time=base + 1, event="throttled", customer="acme",
                   detail={"bucket": "customer:acme", "held": 40, "until": base + 7}))
    log.emit(Event(time=base + 2, event="purged", detail={"scope": "purge", "value": "Q1", "who": "ops",
                                                        "reason": "bought list"}))
    log.close()
    assert main(["events", "--dir", str(tmp_path / "ev")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].endswith("customer:acme held 40") and rows[2].endswith("by ops: bought list")


def test_ctl_pauses_and_resumes_through_a_running_daemon(tmp_path, capsys):
    port = free_port()
    cfg = tmp_path / "ctl.toml"
    cfg.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n[listen]\nsmtp = ""\nhttp = "127.0.0.1:{port}"\n'
                   f'admin_keys = ["adm_k"]\n[[customer]]\nid = "acme"\napi_keys = ["re_k"]\n')
    proc = spawn(["run", "--config", str(cfg)], tmp_path / "run.out")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_line(proc, tmp_path / "run.out", r"listening on .*\(HTTP\)")
        assert main(["ctl", "pause", "--customer", "acme", "--url", url, "--key", "adm_k"]) == 2
        assert "--reason: required" in capsys.readouterr().err
        assert main(["ctl", "pause", "--customer", "acme", "--reason", "bounce storm", "--who", "ops",
                     "--url", url, "--key", "adm_k"]) == 0
        change = orjson.loads(capsys.readouterr().out)
        assert (change["scope"], change["value"], change["who"], change["reason"]) == (
            "customer", "acme", "ops", "bounce storm")
        assert main(["ctl", "pauses", "--url", url, "--key", "re_k"]) == 1         # not an admin key
        assert "401" in capsys.readouterr().err
        assert main(["ctl", "resume", "--customer", "acme", "--reason", "over", "--url", url, "--key", "adm_k"]) == 0
        capsys.readouterr()
        assert main(["ctl", "pauses", "--url", url, "--key", "adm_k"]) == 0
        assert orjson.loads(capsys.readouterr().out) == {"data": []}
    finally:
        stop(proc)
    assert main(["ctl", "pauses", "--url", url, "--key", "adm_k"]) == 2         # nobody listens now
    assert "--url: cannot reach" in capsys.readouterr().err


def test_ctl_purges_releases_limits_and_drains_a_running_daemon(tmp_path, capsys):
    import httpx

    port, smtp_port, nobody = free_port(), free_port(), free_port()
    cfg = tmp_path / "ctl.toml"
    cfg.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n[listen]\nsmtp = "127.0.0.1:{smtp_port}"\n'
                   f'http = "127.0.0.1:{port}"\nadmin_keys = ["adm_k"]\n'
                   f'[[customer]]\nid = "acme"\napi_keys = ["re_k"]\n'
                   f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{nobody}"\n'      # refused: mail stays queued
                   f'[bounces]\nnotify = false\n')
    proc = spawn(["run", "--config", str(cfg)], tmp_path / "run.out")
    url = f"http://127.0.0.1:{port}"
    admin = ["--url", url, "--key", "adm_k", "--who", "ops"]

    def ctl(*args: str) -> tuple[int, str]:
        code = main(["ctl", *args, *admin])
        got = capsys.readouterr()
        return code, got.out if code == 0 else got.err

    try:
        wait_for_line(proc, tmp_path / "run.out", r"listening on .*\(HTTP\)")
        for i in range(3):
            answer = httpx.post(f"{url}/emails", headers={"authorization": "Bearer re_k"},
                                json={"from": "a@x.test", "to": [f"u{i}@y.test"], "subject": "s", "text": "t"})
            assert answer.status_code == 200
        code, out = ctl("purge", "--customer", "acme", "--dry-run", "--reason", "check")
        assert code == 0 and orjson.loads(out)["messages"] == 3
        code, out = ctl("purge", "--customer", "acme", "--then", "drop", "--keep", "2d", "--reason", "bad list")
        purge = orjson.loads(out)
        assert code == 0 and purge["messages"] == 3 and purge["then"] == "drop"
        code, out = ctl("controls")
        assert [q["value"] for q in orjson.loads(out)["quarantine"]] == [purge["id"]]
        assert ctl("release", "--id", "Qnope", "--reason", "x") == (1, "sender ctl release: 422: id: no purge "
                                                                      "'Qnope' in quarantine (released, expired, "
                                                                      "or never made)\n")
        code, out = ctl("release", "--id", purge["id"], "--reason", "list is fine")
        assert code == 0 and orjson.loads(out)["recipients"] == 3
        code, err = ctl("limit", "--customer", "acme", "--rate", "fast", "--reason", "x")
        assert code == 1 and "422: rate: " in err
        assert ctl("limit", "--customer", "acme", "--reason", "x") == (2, "sender ctl: error: --rate or --connections: "
                                                                       "the new limit\n")
        code, out = ctl("limit", "--customer", "acme", "--rate", "10/min", "--reason", "complaints")
        assert code == 0 and orjson.loads(out)["detail"] == {"rate": "10/min"}, out
        code, err = ctl("reroute", "--provider", "google", "--pool", "nope", "--reason", "x")
        assert code == 1 and "422: pool: " in err
        code, out = ctl("drain", "--reason", "deploy")
        assert code == 0 and orjson.loads(out)["action"] == "drain"
        # Nothing left to send now (the mail waits for its retry): the daemon stops by itself.
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            stop(proc)
    out = (tmp_path / "run.out").read_text()
    assert "sender: drained; shutting down" in out and "still queued 3" in out
