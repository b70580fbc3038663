# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""Compiled twin of ``sender._syncer_py``: the fsync thread's loop.

Built as ``sender._syncer_c``. Same names, signatures and wire format as the Python twin,
which holds the reference docstrings; any change here must be mirrored there in the same
commit.

The loop (read a request, fdatasync, write the reply) runs entirely without the GIL, so it
starts syncing the moment a request arrives and never waits for the event loop's thread to
let go of the interpreter.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int32_t
from posix.unistd cimport fdatasync, read, write

__all__ = ["MAX_FDS", "serve"]

DEF _MAX_FDS = 1000
MAX_FDS = _MAX_FDS


cdef int _write_reply(int fd, int32_t err) noexcept nogil:
    cdef ssize_t n
    while True:
        n = write(fd, &err, sizeof(err))
        if n == sizeof(err):
            return 0
        if n < 0 and errno == EINTR:
            continue
        return -1


cdef void _serve_loop(int req, int reply) noexcept nogil:
    cdef int32_t buf[_MAX_FDS + 1]
    cdef ssize_t n
    cdef int32_t count, err, i
    while True:
        n = read(req, buf, sizeof(buf))
        if n < 0 and errno == EINTR:
            continue
        if n < <ssize_t>sizeof(int32_t):
            return                      # end of file or a read error: stop
        count = buf[0]
        if count < 0 or count > _MAX_FDS or n != <ssize_t>((count + 1) * sizeof(int32_t)):
            return                      # the stop request, or not a request of ours
        err = 0
        for i in range(count):
            if fdatasync(buf[1 + i]) != 0 and err == 0:
                err = errno
        if _write_reply(reply, err) != 0:
            return


def serve(int req, int reply):
    """Serve fsync requests from ``req``, replying on ``reply``, until a stop request."""
    with nogil:
        _serve_loop(req, reply)
