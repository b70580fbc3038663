"""Reply parsing, dot-stuffing and un-stuffing: the compiled twin when built, else the Python one.

Which twin: see ``sender._twins``; ``COMPILED`` says which one is in use.
Type checkers always see the Python twin, which carries the reference API.
"""

from typing import TYPE_CHECKING

__all__ = ["BARE_LINE_END", "COMPILED", "LINE_TOO_LONG", "MAX_REPLY", "MAX_REPLY_LINE", "dot_stuff",
           "parse_reply", "unstuff"]

COMPILED: bool
if TYPE_CHECKING:
    from .._wire_py import (BARE_LINE_END as BARE_LINE_END, LINE_TOO_LONG as LINE_TOO_LONG,
                            MAX_REPLY as MAX_REPLY, MAX_REPLY_LINE as MAX_REPLY_LINE,
                            dot_stuff as dot_stuff, parse_reply as parse_reply, unstuff as unstuff)

    COMPILED = False
else:
    from .._twins import pick

    _twin, COMPILED = pick("_wire_c", "_wire_py")
    BARE_LINE_END, LINE_TOO_LONG = _twin.BARE_LINE_END, _twin.LINE_TOO_LONG
    MAX_REPLY, MAX_REPLY_LINE = _twin.MAX_REPLY, _twin.MAX_REPLY_LINE
    dot_stuff, parse_reply, unstuff = _twin.dot_stuff, _twin.parse_reply, _twin.unstuff
