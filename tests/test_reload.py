"""SIGHUP re-reads the config and applies new shaping rules to a running daemon."""

from __future__ import annotations

import signal
import smtplib
import time

from helpers import free_port, spawn, stop, wait_for_line


def write_config(path, port: int, sink_port: int, rate: str) -> None:
    path.write_text(
        f'[spool]\npath = "{path.parent / "spool"}"\n'
        f'[listen]\nsmtp = "127.0.0.1:{port}"\n'
        f'[delivery]\nstarttls = "never"\n'
        f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{sink_port}"\n'
        f'[shaping.domain."y.test"]\nmax_message_rate = "{rate}"\n')


def delivered(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def wait_until(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_sighup_applies_new_limits_and_a_bad_config_changes_nothing(tmp_path):
    sink_port, port = free_port(), free_port()
    log = tmp_path / "sink.jsonl"
    sink = spawn(["sink", "--listen", f"127.0.0.1:{sink_port}", "--log", str(log)], tmp_path / "sink.out")
    daemon = None
    try:
        wait_for_line(sink, tmp_path / "sink.out", "listening")
        cfg = tmp_path / "sender.toml"
        write_config(cfg, port, sink_port, "1/h")
        daemon = spawn(["run", "--config", str(cfg)], tmp_path / "daemon.out")
        wait_for_line(daemon, tmp_path / "daemon.out", "listening on")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for i in range(5):
                client.sendmail("app@x.test", [f"u{i}@y.test"], b"Subject: s\r\n\r\nhi\r\n")
        assert wait_until(lambda: delivered(log) == 1)
        time.sleep(0.3)
        assert delivered(log) == 1                     # the rest wait for the hourly token

        cfg.write_text(cfg.read_text().replace('"1/h"', '"fast"'))
        daemon.send_signal(signal.SIGHUP)
        err = tmp_path / "daemon.err"
        assert wait_until(lambda: "config not reloaded" in err.read_text())
        assert "shaping.domain.y.test.max_message_rate" in err.read_text()
        assert daemon.poll() is None and delivered(log) == 1

        write_config(cfg, port, sink_port, "100/s")
        daemon.send_signal(signal.SIGHUP)
        wait_for_line(daemon, tmp_path / "daemon.out", "shaping rules reloaded")
        assert wait_until(lambda: delivered(log) == 5)
    finally:
        if daemon is not None:
            assert stop(daemon) == 0
        stop(sink)
