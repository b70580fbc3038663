"""The fsync thread, with each twin of its loop: requests, errors, shutdown, bad input."""

from __future__ import annotations

import os
import select
import struct
import threading

import pytest
import trio

import sender.syncer
from sender import _syncer_py
from sender.syncer import MAX_FDS, Syncer

TWINS = [pytest.param(_syncer_py.serve, id="python")]
try:
    from sender import _syncer_c
except ImportError:
    pass
else:
    TWINS.append(pytest.param(_syncer_c.serve, id="compiled"))


@pytest.fixture(params=TWINS)
def twin(request, monkeypatch):
    monkeypatch.setattr(sender.syncer, "serve", request.param)
    return request.param


def readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_twins_agree_on_limits():
    if len(TWINS) == 2:
        assert _syncer_c.MAX_FDS == _syncer_py.MAX_FDS == MAX_FDS
    assert 4 * (MAX_FDS + 1) <= select.PIPE_BUF


def test_syncs_files_and_signals_done(twin, tmp_path):
    fds = [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT) for i in range(3)]
    s = Syncer()
    try:
        for round_ in range(3):
            for fd in fds:
                os.write(fd, b"x" * 100)
            s.start(fds)
            assert readable(s.ready_fd)
            s.finish()
            assert not readable(s.ready_fd, 0)     # one reply per request
        s.start([])                                # an empty request is answered too
        assert readable(s.ready_fd)
        s.finish()
    finally:
        s.close()
        for fd in fds:
            os.close(fd)


def test_first_failure_is_raised_with_its_errno(twin, tmp_path):
    good = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    r, w = os.pipe()                               # fdatasync on a pipe: EINVAL
    s = Syncer()
    try:
        s.start([good, r, good])
        assert readable(s.ready_fd)
        with pytest.raises(OSError) as e:
            s.finish()
        assert e.value.errno == 22 and "fdatasync" in str(e.value)
        s.start([good])                            # the thread survives an error
        assert readable(s.ready_fd)
        s.finish()
    finally:
        s.close()
        for fd in (good, r, w):
            os.close(fd)


def test_misuse_is_refused(twin):
    s = Syncer()
    with pytest.raises(RuntimeError, match="no request in flight"):
        s.finish()
    with pytest.raises(ValueError, match="at most 1000"):
        s.start(list(range(MAX_FDS + 1)))
    with pytest.raises(ValueError, match="negative"):
        s.start([-1])
    s.start([])
    with pytest.raises(RuntimeError, match="already in flight"):
        s.start([])
    s.close()
    s.close()                                      # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.start([])


def test_close_lets_the_request_in_flight_finish(twin, tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    s = Syncer()
    thread = s._thread
    s.start([fd])
    s.close()
    assert not thread.is_alive()
    os.close(fd)


@pytest.mark.parametrize("request_bytes", [
    b"",                                           # end of file
    struct.pack("=i", -1),                         # stop
    struct.pack("=i", MAX_FDS + 1),                # too many
    struct.pack("=ii", 2, 0),                      # shorter than its count
    b"\x01\x00",                                   # not even a count
])
def test_loop_stops_on_anything_but_a_request(request_bytes):
    for p in TWINS:
        serve = p.values[0]
        req_r, req_w = os.pipe()
        reply_r, reply_w = os.pipe()
        t = threading.Thread(target=serve, args=(req_r, reply_w))
        t.start()
        if request_bytes:
            os.write(req_w, request_bytes)
        else:
            os.close(req_w)
        t.join(5)
        assert not t.is_alive(), p.id
        assert not readable(reply_r, 0)
        for fd in (req_r, reply_r, reply_w) + ((req_w,) if request_bytes else ()):
            os.close(fd)


async def test_event_loop_waits_on_the_reply_pipe(twin, tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    s = Syncer()
    try:
        os.write(fd, b"y" * 4096)
        s.start([fd])
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(s.ready_fd)
        s.finish()
    finally:
        s.close()
        os.close(fd)
