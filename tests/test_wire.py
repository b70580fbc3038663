"""Wire twins (reply parser, dot-stuffing, un-stuffing): fixed cases run on both through the
``wire_twin`` fixture, and hypothesis feeds both the same bytes, requiring identical results
and identical errors."""

import importlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sender.errors import RemoteProtocolError
from sender.model import Reply

NO_EXTENSIONS = os.environ.get("SENDER_NO_EXTENSIONS") == "1"
py = importlib.import_module("sender._wire_py")
c = None if NO_EXTENSIONS else importlib.import_module("sender._wire_c")
needs_c = pytest.mark.skipif(NO_EXTENSIONS, reason="SENDER_NO_EXTENSIONS=1")


# --- fixed cases, both twins --------------------------------------------------------------


@pytest.mark.parametrize("raw, reply, used", [
    (b"250 2.1.0 Ok\r\n", Reply(250, "Ok", "2.1.0"), 14),
    (b"250-a\r\n250-b 2.0.0 x\r\n250 c\r\nrest", Reply(250, "a\nb 2.0.0 x\nc", ""), 29),
    (b"550-5.1.1 first\r\n550 5.1.1 second\r\n", Reply(550, "first\nsecond", "5.1.1"), 35),
    (b"250 5.1.1 wrong class stays text\n", Reply(250, "5.1.1 wrong class stays text", ""), 33),
    (b"354 3.0.0 class 3 is never enhanced\r\n", Reply(354, "3.0.0 class 3 is never enhanced", ""), 37),
    (b"250\r\n", Reply(250, "", ""), 5),
    (b"421 4.7.0\r\n", Reply(421, "", "4.7.0"), 11),
    (b"250 2.1.1234 four digits\r\n", Reply(250, "2.1.1234 four digits", ""), 26),
    (b"250 \xff\xfe\r\n", Reply(250, "\ufffd\ufffd", ""), 8),
])
def test_parse_reply(wire_twin, raw, reply, used):
    assert wire_twin.parse_reply(bytearray(raw)) == (reply, used)


@pytest.mark.parametrize("raw", [b"", b"250 no end yet", b"250-first\r\n250 sec"])
def test_parse_reply_needs_more(wire_twin, raw):
    assert wire_twin.parse_reply(bytearray(raw)) is None


@pytest.mark.parametrize("raw, error", [
    (b"25\r\n", "malformed reply line: b'25'"),
    (b"2x0 hi\r\n", "malformed reply line: b'2x0 hi'"),
    (b"250_hi\r\n", "malformed reply line: b'250_hi'"),
    (b"199 hi\r\n", "reply code out of range: b'199 hi'"),
    (b"250-a\r\n251 b\r\n", "mixed codes in one reply: b'250' then b'251 b'"),
    (b"250 " + b"x" * 9000 + b"\r\n", "reply line longer than 8192 bytes"),
    (b"250 " + b"x" * 9000, "reply line longer than 8192 bytes"),
    (b"250-x\r\n" * 10000, "reply longer than 65536 bytes"),
])
def test_parse_reply_errors(wire_twin, raw, error):
    with pytest.raises(RemoteProtocolError) as e:
        wire_twin.parse_reply(bytearray(raw))
    assert str(e.value) == error


@pytest.mark.parametrize("body, out", [
    (b"", b".\r\n"),
    (b"\r\n", b"\r\n.\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b".a\r\n..b\r\nc.\r\n", b"..a\r\n...b\r\nc.\r\n.\r\n"),
    (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r.\rb", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\r\nb\r\n", b"a\r\n\r\nb\r\n.\r\n"),
    (b"a\nb\rc\r\r\n", b"a\r\nb\r\nc\r\n\r\n.\r\n"),
])
def test_dot_stuff(wire_twin, body, out):
    assert wire_twin.dot_stuff(body) == out


def test_dot_stuff_wants_bytes(wire_twin):
    with pytest.raises(TypeError):
        wire_twin.dot_stuff(bytearray(b"x"))


@pytest.mark.parametrize("data, result", [
    (b"a\r\n", b"a\r\n"),
    (b".\r\n", b"\r\n"),
    (b"..\r\n.a\r\nb.\r\n", b".\r\na\r\nb.\r\n"),
    (b"a\nb\r\n", 1),
    (b"a\rb\r\n", 1),
    (b"a\r\n\n", 1),
    (b"x" * 998 + b"\r\n", b"x" * 998 + b"\r\n"),
    (b"x" * 999 + b"\r\n", 2),
    (b"x" * 999 + b"\r\n\n", 1),
    (b"x" * 1000, 2),
    (b"x" * 999, b"x" * 999),
])
def test_unstuff(wire_twin, data, result):
    assert wire_twin.unstuff(data, 0, len(data), 1000) == result
    framed = bytearray(b"\r\n" + data + b".\r\n")
    assert wire_twin.unstuff(framed, 2, 2 + len(data), 1000) == result


def test_unstuff_codes_and_bad_arguments(wire_twin):
    assert (wire_twin.BARE_LINE_END, wire_twin.LINE_TOO_LONG) == (1, 2)
    with pytest.raises(ValueError, match="range"):
        wire_twin.unstuff(b"abc", 2, 5, 10)
    with pytest.raises(ValueError, match="range"):
        wire_twin.unstuff(b"abc", 2, 1, 10)
    with pytest.raises(ValueError, match="max_line"):
        wire_twin.unstuff(b"abc", 0, 3, 0)
    with pytest.raises(TypeError):
        wire_twin.unstuff(memoryview(b"abc"), 0, 3, 10)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_stuffing_round_trips_through_unstuff(body):
    """What the client writes, the server reads back as the body with CRLF line ends."""
    wire = (c or py).dot_stuff(body)
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    data = b"\r\n" + wire
    end = data.find(b"\r\n.\r\n")
    assert end == len(data) - 5                     # no early terminator, whatever the body
    got = (c or py).unstuff(data, 2, end + 2, 10_000)
    normalized = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    assert got == (normalized + b"\r\n" if normalized and not normalized.endswith(b"\r\n") else normalized)


# --- side by side -------------------------------------------------------------------------

_REPLY_PIECES = st.sampled_from([
    b"250", b"550", b"421", b"354", b"199", b"2x0", b" ", b"-", b"\r\n", b"\n", b"\r", b"2.1.0",
    b"5.1.1", b"4.7.28", b"3.0.0", b"2.1234.5", b"2.1.", b".", b"ok", b"\xff", b"\xc3\xa9", b"x" * 40,
])


def _same(f_c, f_py, *args):
    """Both twins return equal values, or raise the same exception type with the same text."""
    def run(f):
        try:
            return "ok", f(*args)
        except Exception as e:       # noqa: BLE001 - the comparison is the test
            return type(e).__name__, str(e)
    assert run(f_c) == run(f_py)


@needs_c
@given(st.lists(_REPLY_PIECES, max_size=30).map(b"".join) | st.binary(max_size=200))
@settings(max_examples=1000, deadline=None)
def test_parse_reply_twins_agree(raw):
    _same(c.parse_reply, py.parse_reply, bytearray(raw))


@needs_c
@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"bc", b" "]), max_size=40)
       .map(b"".join) | st.binary(max_size=200))
@settings(max_examples=1000, deadline=None)
def test_stuffing_twins_agree(body):
    _same(c.dot_stuff, py.dot_stuff, body)


@needs_c
@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"bcdefg"]), max_size=40)
       .map(b"".join), st.integers(0, 8), st.integers(0, 8), st.integers(-1, 12), st.booleans())
@settings(max_examples=1000, deadline=None)
def test_unstuff_twins_agree(data, cut_start, cut_end, max_line, as_bytearray):
    buf = bytearray(data) if as_bytearray else data
    start, end = min(cut_start, len(data)), max(len(data) - cut_end, 0)
    _same(c.unstuff, py.unstuff, buf, start, end, max_line)
