"""Byte-level SMTP wire work, the reference twin of ``sender._wire_c`` (``_fast/wire.pyx``).

Every message crosses these functions once: the client parses each reply and dot-stuffs each
body, the server checks and un-stuffs each body it receives. They scan whole message bodies,
so the compiled twin does each in one pass with ``memchr``, where this one makes a pass per
``count``/``replace``. Both twins give identical results and errors for any input
(tests/test_wire.py drives them side by side); ``sender.smtp.wire`` picks one.
"""

from __future__ import annotations

from .errors import RemoteProtocolError
from .model import Reply

__all__ = ["BARE_LINE_END", "LINE_TOO_LONG", "MAX_REPLY", "MAX_REPLY_LINE", "dot_stuff", "parse_reply",
           "unstuff"]

MAX_REPLY_LINE = 8192  # bytes per reply line, CRLF excluded
MAX_REPLY = 65536  # bytes per (multi-line) reply, so an endless "250-" cannot eat memory

# What unstuff() returns instead of a body.
BARE_LINE_END = 1   # a CR or LF that is not part of a CRLF
LINE_TOO_LONG = 2   # a line (its line end included) longer than the limit

_SEPARATORS = (b" ", b"-", b"")


def dot_stuff(body: bytes) -> bytes:
    """The bytes to write after a 354: ``body`` with CRLF line ends, leading dots doubled,
    a final CRLF ensured, and the ``.\\r\\n`` terminator appended.

    Bare CR and bare LF become CRLF, so the body can never end the data early or smuggle a
    terminator past a lenient server.

    Raises:
      TypeError: ``body`` is not bytes.
    """
    if not isinstance(body, bytes):
        raise TypeError(f"dot_stuff: expected bytes, got {type(body).__name__}")
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    body = body.replace(b"\r\n.", b"\r\n..")
    if body[:1] == b".":
        body = b"." + body
    if body and body[-2:] != b"\r\n":
        return body + b"\r\n.\r\n"
    return body + b".\r\n"


def unstuff(data: bytes | bytearray, start: int, end: int, max_line: int) -> bytes | int:
    """``data[start:end]``, received after a 354 (terminator excluded, final CRLF kept), with
    one leading dot removed from each line (RFC 5321 4.5.2).

    Returns BARE_LINE_END if it holds a CR or LF outside a CRLF (SMTP smuggling), else
    LINE_TOO_LONG if a line with its line end is longer than ``max_line`` bytes (a last line
    without one counts as if it had it), else the body.

    Raises:
      TypeError: ``data`` is not bytes or bytearray.
      ValueError: the range is not inside ``data``, or ``max_line`` is below 1.
    """
    if type(data) is not bytearray and type(data) is not bytes:
        raise TypeError(f"unstuff: expected bytes or bytearray, got {type(data).__name__}")
    if not 0 <= start <= end <= len(data):
        raise ValueError(f"unstuff: range {start}:{end} outside 0:{len(data)}")
    if max_line < 1:
        raise ValueError(f"unstuff: max_line must be at least 1, got {max_line}")
    body = bytes(memoryview(data)[start:end])
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        return BARE_LINE_END
    # Jump window by window to the last LF in each: a few rfind calls, not a step per line.
    s, n = 0, len(body)
    while n - s >= max_line:
        nl = body.rfind(b"\n", s, s + max_line)
        if nl < 0:
            return LINE_TOO_LONG
        s = nl + 1
    if body[:1] == b".":
        body = body[1:]
    return body.replace(b"\r\n.", b"\r\n")


def _enhanced(text: bytes, cls: int) -> int:
    """Length of the RFC 3463 code ("d.ddd.ddd") starting ``text``, or 0.

    Only a code whose class digit matches the reply's first digit counts, so a "250 2.1.0"
    gives "2.1.0" but the "5.1.1" in a 250 line stays text.
    """
    if len(text) < 5 or text[0] != cls or text[1] != 46 or cls == 51:  # ".", "3"
        return 0
    sp = text.find(b" ")
    end = len(text) if sp < 0 else sp
    parts = text[2:end].split(b".")
    if len(parts) != 2:
        return 0
    a, b = parts
    if 0 < len(a) <= 3 and 0 < len(b) <= 3 and a.isdigit() and b.isdigit():
        return end
    return 0


def parse_reply(buf: bytearray) -> tuple[Reply, int] | None:
    """One complete reply from the start of ``buf`` and the bytes it used, or None if short.

    Lines end in CRLF (a bare LF is tolerated). Every line must carry the same code.

    Raises:
      RemoteProtocolError: a malformed line, a code out of 200-599, mixed codes, or a line or
        reply over the size limits.
    """
    start = 0
    code = b""
    enhanced = ""
    texts = []
    while True:
        nl = buf.find(b"\n", start)
        if nl < 0:
            if len(buf) - start > MAX_REPLY_LINE:
                raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
            return None
        end = nl - 1 if nl > start and buf[nl - 1] == 13 else nl
        if end - start > MAX_REPLY_LINE:
            raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
        line = bytes(buf[start:end])
        sep = line[3:4]
        if len(line) < 3 or not line[:3].isdigit() or sep not in _SEPARATORS:
            raise RemoteProtocolError(f"malformed reply line: {line[:80]!r}")
        if not code:
            code = line[:3]
            if not b"200" <= code <= b"599":
                raise RemoteProtocolError(f"reply code out of range: {line[:80]!r}")
        elif line[:3] != code:
            raise RemoteProtocolError(f"mixed codes in one reply: {code!r} then {line[:80]!r}")
        text = line[4:]
        n = _enhanced(text, code[0]) if text[1:2] == b"." else 0
        if n:
            if not enhanced:
                enhanced = text[:n].decode()
            text = text[n + 1 :]
        texts.append(text.decode("utf-8", "replace"))
        start = nl + 1
        if sep != b"-":
            return Reply(int(code), "\n".join(texts), enhanced), start
        if start > MAX_REPLY:
            raise RemoteProtocolError(f"reply longer than {MAX_REPLY} bytes")
