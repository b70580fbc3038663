# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""Compiled twin of ``sender._wire_py``: reply parsing, dot-stuffing and un-stuffing.

Built as ``sender._wire_c``. Same names, signatures, results and error messages as the
Python twin, which holds the reference docstrings; any change here must be mirrored there in
the same commit (tests/test_wire.py compares the two on generated input).

Each function walks a body line by line with ``memchr`` (one call for the next LF, one to
make sure no CR hides inside the line), so a 2 KB message costs a few dozen vectorized
scans instead of five full passes in Python.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.string cimport memchr, memcpy

from sender.errors import RemoteProtocolError
from sender.model import Reply

__all__ = ["BARE_LINE_END", "LINE_TOO_LONG", "MAX_REPLY", "MAX_REPLY_LINE", "dot_stuff", "parse_reply",
           "unstuff"]

DEF _MAX_REPLY_LINE = 8192
DEF _MAX_REPLY = 65536
MAX_REPLY_LINE = _MAX_REPLY_LINE
MAX_REPLY = _MAX_REPLY

DEF _BARE = 1
DEF _LONG = 2
BARE_LINE_END = _BARE
LINE_TOO_LONG = _LONG


cdef inline bint _has_cr(const char* p, Py_ssize_t n) noexcept nogil:
    return n > 0 and memchr(p, 13, n) != NULL


cdef Py_ssize_t _scan(const char* p, Py_ssize_t n, Py_ssize_t max_line, bint* too_long) noexcept nogil:
    """Lines in p[:n] that start with ".", or -1 if a CR or LF is not part of a CRLF. Sets
    ``too_long`` if a line with its line end is longer than ``max_line`` (a last line without
    one counts as if it had it)."""
    cdef Py_ssize_t s = 0, nl, dots = 0
    cdef const char* q
    while s < n:
        q = <const char*>memchr(p + s, 10, n - s)
        if q == NULL:
            if _has_cr(p + s, n - s):
                return -1
            if n - s >= max_line:
                too_long[0] = True
            if p[s] == 46:
                dots += 1
            break
        nl = q - p
        if nl == s or p[nl - 1] != 13 or _has_cr(p + s, nl - 1 - s):
            return -1
        if nl - s + 1 > max_line:
            too_long[0] = True
        if p[s] == 46:
            dots += 1
        s = nl + 1
    return dots


def dot_stuff(bytes body not None):
    cdef const char* p = PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef bint too_long = False          # no line limit when sending
    cdef Py_ssize_t dots = _scan(p, n, PY_SSIZE_T_MAX, &too_long)
    if dots < 0:
        # Rare: normalize bare CR and LF to CRLF first, as the Python twin does.
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        p = PyBytes_AS_STRING(body)
        n = PyBytes_GET_SIZE(body)
        dots = _scan(p, n, PY_SSIZE_T_MAX, &too_long)
    cdef bint crlf_end = n >= 2 and p[n - 2] == 13 and p[n - 1] == 10
    cdef Py_ssize_t tail = 5 if n and not crlf_end else 3
    out = PyBytes_FromStringAndSize(NULL, n + dots + tail)
    cdef char* o = PyBytes_AS_STRING(out)
    cdef Py_ssize_t s = 0, e
    cdef const char* q
    if dots == 0:
        memcpy(o, p, n)
        o += n
    else:
        while s < n:
            if p[s] == 46:
                o[0] = 46
                o += 1
            q = <const char*>memchr(p + s, 10, n - s)
            e = n if q == NULL else (q - p) + 1
            memcpy(o, p + s, e - s)
            o += e - s
            s = e
    if tail == 5:
        memcpy(o, b"\r\n.\r\n", 5)
    else:
        memcpy(o, b".\r\n", 3)
    return out


def unstuff(data, Py_ssize_t start, Py_ssize_t end, Py_ssize_t max_line):
    cdef const char* base
    cdef Py_ssize_t size
    if type(data) is bytearray:
        base, size = PyByteArray_AS_STRING(data), PyByteArray_GET_SIZE(data)
    elif type(data) is bytes:
        base, size = PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)
    else:
        raise TypeError(f"unstuff: expected bytes or bytearray, got {type(data).__name__}")
    if not 0 <= start <= end <= size:
        raise ValueError(f"unstuff: range {start}:{end} outside 0:{size}")
    if max_line < 1:
        raise ValueError(f"unstuff: max_line must be at least 1, got {max_line}")
    cdef const char* p = base + start
    cdef Py_ssize_t n = end - start, s, dots
    cdef bint too_long = False
    cdef const char* q
    dots = _scan(p, n, max_line, &too_long)
    if dots < 0:
        return _BARE
    if too_long:
        return _LONG
    if dots == 0:
        return PyBytes_FromStringAndSize(p, n)
    out = PyBytes_FromStringAndSize(NULL, n - dots)
    cdef char* o = PyBytes_AS_STRING(out)
    cdef Py_ssize_t e
    s = 0
    while s < n:
        if p[s] == 46:
            s += 1
        q = <const char*>memchr(p + s, 10, n - s) if s < n else NULL
        e = n if q == NULL else (q - p) + 1
        memcpy(o, p + s, e - s)
        o += e - s
        s = e
    return out


cdef inline bint _digits(const char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if n <= 0:
        return False
    for i in range(n):
        if not 48 <= p[i] <= 57:
            return False
    return True


cdef Py_ssize_t _enhanced(const char* t, Py_ssize_t n, char cls) noexcept nogil:
    """Length of the RFC 3463 code starting t[:n] whose class is ``cls``, or 0."""
    if n < 5 or t[0] != cls or t[1] != 46 or cls == 51:
        return 0
    cdef const char* sp = <const char*>memchr(t, 32, n)
    cdef Py_ssize_t end = n if sp == NULL else sp - t     # >= 2: t[0] and t[1] are no space
    # "subject.detail" between the class and the end: exactly one dot, 1-3 digits each side.
    cdef const char* dot = <const char*>memchr(t + 2, 46, end - 2)
    if dot == NULL:
        return 0
    cdef Py_ssize_t a = dot - (t + 2)
    cdef Py_ssize_t b = (t + end) - (dot + 1)
    if 0 < a <= 3 and 0 < b <= 3 and _digits(t + 2, a) and _digits(dot + 1, b):
        return end
    return 0


cdef _malformed(str what, const char* line, Py_ssize_t n):
    return RemoteProtocolError(f"{what}{PyBytes_FromStringAndSize(line, min(n, 80))!r}")


def parse_reply(bytearray buf):
    cdef const char* p = PyByteArray_AS_STRING(buf)
    cdef Py_ssize_t size = PyByteArray_GET_SIZE(buf)
    cdef Py_ssize_t start = 0, nl, end, n, tn, en
    cdef const char* q
    cdef const char* line
    cdef const char* t
    cdef int code = 0, this
    cdef char cls = 0, sep
    enhanced = ""
    texts = []
    while True:
        q = <const char*>memchr(p + start, 10, size - start) if size > start else NULL
        if q == NULL:
            if size - start > _MAX_REPLY_LINE:
                raise RemoteProtocolError(f"reply line longer than {_MAX_REPLY_LINE} bytes")
            return None
        nl = q - p
        end = nl - 1 if nl > start and p[nl - 1] == 13 else nl
        n = end - start
        if n > _MAX_REPLY_LINE:
            raise RemoteProtocolError(f"reply line longer than {_MAX_REPLY_LINE} bytes")
        line = p + start
        sep = line[3] if n > 3 else 0
        if n < 3 or not _digits(line, 3) or (n > 3 and sep != 32 and sep != 45):
            raise _malformed("malformed reply line: ", line, n)
        this = (line[0] - 48) * 100 + (line[1] - 48) * 10 + (line[2] - 48)
        if code == 0:
            if not 200 <= this <= 599:
                raise _malformed("reply code out of range: ", line, n)
            code, cls = this, line[0]
        elif this != code:
            raise _malformed(f"mixed codes in one reply: {str(code).encode()!r} then ", line, n)
        t, tn = line + 4, n - 4
        if tn < 0:
            tn = 0
        en = _enhanced(t, tn, cls) if tn >= 2 and t[1] == 46 else 0
        if en:
            if not enhanced:
                enhanced = PyUnicode_DecodeASCII(t, en, NULL)
            t, tn = t + en + 1, tn - en - 1
            if tn < 0:
                tn = 0
        texts.append(PyUnicode_DecodeUTF8(t, tn, "replace"))
        start = nl + 1
        if sep != 45:
            return Reply(code, "\n".join(texts), enhanced), start
        if start > _MAX_REPLY:
            raise RemoteProtocolError(f"reply longer than {_MAX_REPLY} bytes")
