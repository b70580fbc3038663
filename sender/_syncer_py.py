"""Pure-Python twin of ``sender._syncer_c``: the fsync thread's loop.

Wire format (host byte order, one ``write()`` each, so never split): a request is int32
``[count, fd...]`` with ``0 <= count <= MAX_FDS``; anything else (``count == -1`` by
convention) or end of file stops the loop. A reply is one int32 errno: 0 when every
fdatasync succeeded, else the first failure's.
"""

from __future__ import annotations

import os
import struct

__all__ = ["MAX_FDS", "serve"]

MAX_FDS = 1000   # (1 + MAX_FDS) int32s fit in PIPE_BUF (4096): a request is one atomic write
_INT = struct.Struct("=i")


def serve(req: int, reply: int) -> None:
    """Serve fsync requests from ``req``, replying on ``reply``, until a stop request."""
    while True:
        try:
            data = os.read(req, 4 * (MAX_FDS + 1))
        except OSError:
            return
        if len(data) < 4:
            return
        count = _INT.unpack_from(data)[0]
        if count < 0 or count > MAX_FDS or len(data) != 4 * (count + 1):
            return
        err = 0
        for (fd,) in struct.iter_unpack("=i", data[4:]):
            try:
                os.fdatasync(fd)
            except OSError as e:
                err = err or e.errno or 0
        try:
            os.write(reply, _INT.pack(err))
        except OSError:
            return
