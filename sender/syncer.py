"""The journal's fsync thread: fdatasync off the event loop without a GIL round trip.

Group commit needs an fdatasync that does not stall the event loop. Handing it to a worker
through ``trio.to_thread`` costs a GIL handoff and a trip through trio's scheduler each way,
milliseconds per batch under load: longer than the fdatasync itself, and paid by every
acknowledgement waiting on it. A :class:`Syncer` keeps one thread parked in ``read()`` on a
request pipe; it syncs the descriptors it is sent and writes the result to a reply pipe, whose
read end the event loop waits on like any socket. The compiled loop (``sender._syncer_c``)
never takes the GIL; the Python twin (``sender._syncer_py``) is the same loop with it.
``SENDER_NO_EXTENSIONS=1`` forces the twin, and ``COMPILED`` says which one is in use.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence

from ._twins import pick

__all__ = ["COMPILED", "MAX_FDS", "Syncer"]

_twin, COMPILED = pick("_syncer_c", "_syncer_py")
MAX_FDS, serve = _twin.MAX_FDS, _twin.serve

_INT = struct.Struct("=i")


class Syncer:
    """One fsync thread; at most one request in flight.

    Use: ``start(fds)``, wait until ``ready_fd`` is readable (``trio.lowlevel.wait_readable``),
    then ``finish()``, which raises the first failure.
    """

    def __init__(self) -> None:
        self._req_r, self._req_w = os.pipe2(os.O_CLOEXEC)
        self._reply_r, self._reply_w = os.pipe2(os.O_CLOEXEC)
        self._pending = False
        self._closed = False
        self._thread = threading.Thread(target=serve, args=(self._req_r, self._reply_w),
                                        name="sender-fsync", daemon=True)
        self._thread.start()

    @property
    def ready_fd(self) -> int:
        """Readable once the request in flight has finished."""
        return self._reply_r

    def start(self, fds: Sequence[int]) -> None:
        """Begin fdatasync of every descriptor in ``fds``, in order.

        Raises:
          RuntimeError: a request is already in flight, or the syncer is closed.
          ValueError: more than ``MAX_FDS`` descriptors, or a negative one.
        """
        if self._closed:
            raise RuntimeError("syncer is closed")
        if self._pending:
            raise RuntimeError("syncer: a request is already in flight")
        if len(fds) > MAX_FDS:
            raise ValueError(f"syncer: at most {MAX_FDS} descriptors per request, got {len(fds)}")
        if any(fd < 0 for fd in fds):
            raise ValueError(f"syncer: negative file descriptor in {list(fds)}")
        os.write(self._req_w, struct.pack(f"=i{len(fds)}i", len(fds), *fds))
        self._pending = True

    def finish(self) -> None:
        """Collect the result of the request in flight (blocks until it is done).

        Raises:
          RuntimeError: no request is in flight.
          OSError: an fdatasync failed (the first failure's errno).
        """
        if not self._pending:
            raise RuntimeError("syncer: no request in flight")
        err = _INT.unpack(os.read(self._reply_r, 4))[0]
        self._pending = False
        if err:
            raise OSError(err, f"fdatasync: {os.strerror(err)}")

    def close(self) -> None:
        """Let a request in flight finish, stop the thread and close the pipes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        os.write(self._req_w, _INT.pack(-1))
        self._thread.join()
        for fd in (self._req_r, self._req_w, self._reply_r, self._reply_w):
            os.close(fd)
