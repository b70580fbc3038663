"""``daemon.processes = 2``: a supervisor and two engine processes sharing one port."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time

import orjson
import pytest

from sender.cli import main

from helpers import free_port, spawn, stop, wait_for_line


def write_config(tmp_path) -> tuple[str, int]:
    port = free_port()
    cfg = tmp_path / "sharded.toml"
    cfg.write_text(
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        f'[listen]\nsmtp = "127.0.0.1:{port}"\n'
        f'[delivery]\nretry_interval = "1h"\n'
        f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{free_port()}"\n'   # nothing listens: all deferred
        f'[daemon]\nprocesses = 2\n')
    return str(cfg), port


def start_daemon(tmp_path, name: str):
    """``sender run`` with two shards, once both listen; returns (proc, stdout path, config, port)."""
    cfg, port = write_config(tmp_path)
    out = tmp_path / f"{name}.out"
    proc = spawn(["run", "--config", cfg], out)
    try:
        wait_for_line(proc, out, r"listening on .*2 processes")
    except BaseException:
        stop(proc, signal.SIGKILL)
        raise
    return proc, out, cfg, port


def send_messages(port: int, count: int) -> None:
    """One SMTP connection per message, so the kernel spreads them over the shards."""
    for i in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("app@x.test", [f"u{i}@y.test"], b"Subject: s\r\n\r\nhi\r\n")


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError):
                continue
    return kids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_two_shards_share_the_port_and_keep_their_own_journals(tmp_path, capsys):
    proc, out, cfg, port = start_daemon(tmp_path, "sharded")
    try:
        send_messages(port, 30)
    finally:
        status = stop(proc)
    assert status == 0
    assert out.read_text().count("sender: stopped;") == 2
    shard_dirs = sorted(p.name for p in (tmp_path / "spool").iterdir() if p.is_dir())
    assert shard_dirs == ["shard-0", "shard-1"]
    assert (tmp_path / "spool" / "suppression.log").exists()        # one list, shared
    assert main(["queue", "--spool", str(tmp_path / "spool"), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["messages"] == 30
    for shard in shard_dirs:
        assert main(["queue", "--spool", str(tmp_path / "spool" / shard), "--json"]) == 0
        assert orjson.loads(capsys.readouterr().out)["messages"] > 0


def test_long_lived_connections_are_spread_evenly(tmp_path):
    # Twenty connections opened one after another and kept open: the kernel alone would
    # split them at random; the load board makes each go to the shard with fewer sessions.
    proc, out, cfg, port = start_daemon(tmp_path, "balanced")
    clients = []
    try:
        for _ in range(20):
            client = smtplib.SMTP("127.0.0.1", port, timeout=10)
            client.ehlo("x.test")
            clients.append(client)
        for i, client in enumerate(clients):
            client.sendmail("app@x.test", [f"u{i}@y.test"], b"Subject: s\r\n\r\nhi\r\n")
    finally:
        for client in clients:
            client.quit()
        status = stop(proc)
    assert status == 0
    accepted = sorted(int(n) for n in re.findall(r"stopped; accepted (\d+)", out.read_text()))
    assert accepted == [10, 10]


def test_killing_the_supervisor_kills_its_shards(tmp_path):
    proc, out, cfg, _ = start_daemon(tmp_path, "killed")
    try:
        shards = children_of(proc.pid)
        assert len(shards) == 2
    finally:
        stop(proc, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in shards) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in shards)


def test_fewer_processes_than_shards_with_mail_is_refused(tmp_path, capsys):
    proc, out, cfg, port = start_daemon(tmp_path, "first")
    try:
        send_messages(port, 12)
    finally:
        assert stop(proc) == 0
    single = tmp_path / "single.toml"
    single.write_text(open(cfg).read().replace("processes = 2", "processes = 1"))
    # With processes = 1 the spool's shard directories would be ignored: refuse, naming the key.
    assert main(["run", "--config", str(single)]) == 2
    assert "daemon.processes" in capsys.readouterr().err


def test_a_shard_that_dies_stops_the_daemon_with_an_error(tmp_path):
    proc, out, cfg, _ = start_daemon(tmp_path, "dies")
    try:
        first, second = children_of(proc.pid)
        os.kill(first, signal.SIGKILL)
        status = proc.wait(15)
    finally:
        stop(proc, signal.SIGKILL)
    assert status != 0
    assert "stopped;" in out.read_text()          # the surviving shard stopped cleanly
    assert not alive(second)


def test_sighup_reaches_every_shard(tmp_path):
    proc, out, _, _ = start_daemon(tmp_path, "hup")
    try:
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while out.read_text().count("shaping rules reloaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert out.read_text().count("shaping rules reloaded") == 2
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0


def test_the_http_api_across_two_shards(tmp_path):
    """Sends land on either shard; reads, cancels and idempotent repeats reach the shard that
    owns the message or key, whichever shard the connection went to."""
    import resend

    sink_port, http_port = free_port(), free_port()
    sink_log = tmp_path / "sink.jsonl"
    sink = spawn(["sink", "--listen", f"127.0.0.1:{sink_port}", "--log", str(sink_log)], tmp_path / "sink.out")
    cfg = tmp_path / "http.toml"
    cfg.write_text(
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        f'[listen]\nsmtp = ""\nhttp = "127.0.0.1:{http_port}"\n'
        f'[delivery]\nstarttls = "never"\n'
        f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{sink_port}"\n'
        f'[[customer]]\nid = "acme"\napi_keys = ["re_acme"]\n'
        f'[[customer]]\nid = "other"\napi_keys = ["re_other"]\n'
        f'[daemon]\nprocesses = 2\n')
    saved = resend.api_url, resend.api_key
    daemon = None
    try:
        wait_for_line(sink, tmp_path / "sink.out", r"listening on")
        daemon = spawn(["run", "--config", str(cfg)], tmp_path / "daemon.out")
        wait_for_line(daemon, tmp_path / "daemon.out", r"listening on .*HTTP, 2 processes")
        resend.api_url, resend.api_key = f"http://127.0.0.1:{http_port}", "re_acme"

        def email(to: str, **more) -> dict:
            return {"from": "App <app@x.test>", "to": [to], "subject": "s", "text": "hi", **more}

        ids: list[str] = []
        while len(ids) < 20 or len({i[-3:] for i in ids}) < 2 and len(ids) < 300:   # a connection each
            ids.append(resend.Emails.send(email(f"u{len(ids)}@y.test"))["id"])
        assert {i[-3:] for i in ids} == {"000", "001"}          # both shards took some
        for msg_id in ids * 2:
            assert resend.Emails.get(msg_id)["id"] == msg_id
        keyed = {resend.Emails.send(email("once@y.test"), {"idempotency_key": "k1"})["id"] for _ in range(6)}
        assert len(keyed) == 1
        later = [resend.Emails.send(email(f"l{i}@y.test", scheduled_at="in 1 hour"))["id"] for i in range(6)]
        for msg_id in later:
            resend.Emails.cancel(msg_id)
            assert resend.Emails.get(msg_id)["last_event"] == "canceled"
        resend.api_key = "re_other"
        for msg_id in ids[:4]:
            with pytest.raises(resend.exceptions.ResendError) as e:
                resend.Emails.get(msg_id)
            assert str(e.value.code) == "404"
        deadline = time.monotonic() + 15
        want = len(ids) + 1                                     # the keyed one once
        while sink_log.exists() and len(sink_log.read_text().splitlines()) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert len(sink_log.read_text().splitlines()) == want
    finally:
        resend.api_url, resend.api_key = saved
        if daemon is not None:
            assert stop(daemon) == 0
        stop(sink)


def test_operators_controls_reach_every_shard(tmp_path):
    """A purge, its release and a drain made through one shard act on both."""
    import httpx
    import resend

    http_port = free_port()
    cfg = tmp_path / "ctl.toml"
    cfg.write_text(
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        f'[listen]\nsmtp = ""\nhttp = "127.0.0.1:{http_port}"\nadmin_keys = ["adm"]\n'
        f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{free_port()}"\n'
        f'[[customer]]\nid = "acme"\napi_keys = ["re_acme"]\n'
        f'[daemon]\nprocesses = 2\n')
    saved = resend.api_url, resend.api_key
    daemon = spawn(["run", "--config", str(cfg)], tmp_path / "daemon.out")
    url = f"http://127.0.0.1:{http_port}"

    def admin(path: str, **body) -> dict:
        answer = httpx.post(url + path, headers={"authorization": "Bearer adm"}, json={"who": "ops", **body})
        assert answer.status_code == 200, answer.text
        return answer.json()

    try:
        wait_for_line(daemon, tmp_path / "daemon.out", r"listening on .*HTTP, 2 processes")
        resend.api_url, resend.api_key = url, "re_acme"
        ids: list[str] = []
        while len(ids) < 10 or len({i[-3:] for i in ids}) < 2 and len(ids) < 300:
            ids.append(resend.Emails.send({"from": "app@x.test", "to": [f"u{len(ids)}@y.test"], "subject": "s",
                                           "text": "hi", "scheduled_at": "in 1 hour"})["id"])
        assert {i[-3:] for i in ids} == {"000", "001"}
        for _ in range(4):                              # whichever shard answers: the whole daemon
            board = httpx.get(url + "/admin/dashboard.json", headers={"authorization": "Bearer adm"}).json()
            assert board["shards"] == "2/2" and board["totals"]["accepted"] == board["queued"]["total"] == len(ids)
            assert board["queued"]["customer"] == {"acme": len(ids)}
        assert admin("/admin/purge", customer="acme", dry_run=True, reason="look")["messages"] == len(ids)
        purge = admin("/admin/purge", customer="acme", reason="bad list", then="drop")
        assert purge["messages"] == len(ids) and purge["id"].startswith("Q")
        assert admin("/admin/release", id=purge["id"], reason="fine after all")["messages"] == len(ids)
        admin("/admin/drain", reason="deploy")
        assert daemon.wait(timeout=30) == 0             # both shards drained and stopped
        assert (tmp_path / "daemon.out").read_text().count("drained; shutting down") == 2
    finally:
        resend.api_url, resend.api_key = saved
        if daemon.poll() is None:
            stop(daemon)


def test_peers_place_ids_and_keys_and_pick_a_less_busy_sibling():
    from array import array

    from sender.inject.peers import Peers

    requests = array("i", [0, 0, 0])
    peers = Peers(1, 3, lambda i: 0, "token", requests)
    assert peers.owner_of_id("0661013970D7A2000") == 0 and peers.owner_of_id("0661013970D7A2002") == 2
    for odd in ("0661013970D7A2003", "0661013970D7A2ZZZ", "short", "msg_abc"):
        assert peers.owner_of_id(odd) == 1                      # not placeable: this shard
    owners = {peers.owner_of_key("acme", f"k{i}") for i in range(50)}
    assert owners == {0, 1, 2} and peers.owner_of_key("acme", "k1") == peers.owner_of_key("acme", "k1")
    assert peers.least_busy() is None
    requests[1] = 1
    assert peers.least_busy() is None                           # one more is not worth a hop
    requests[1], requests[2] = 4, 1
    assert peers.least_busy() == 0


def test_a_shard_has_its_own_spool_and_event_folder():
    from sender.config import parse_config
    from sender.daemon import shard_config

    config = parse_config({"spool": {"path": "/s", "max_bytes": 1000}, "events": {"path": "/ev"},
                           "daemon": {"processes": 2}})
    one = shard_config(config, 1, 2)
    assert (one.spool.path, one.spool.max_bytes, one.events.path) == ("/s/shard-1", 500, "/ev/shard-1")
    assert shard_config(parse_config({"spool": {"path": "/s"}}), 0, 2).events.path == ""   # in the spool
