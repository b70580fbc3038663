"""Compare the compiled and pure-Python wire twins; prints µs per call and the ratio.

Usage: python bench/wire_twins.py [N]   (default N=20_000 calls per figure, a few seconds).

What one relayed 2 KB message costs in each: the client parses four replies (the data's 250,
then MAIL, RCPT and the 354 of the next message) and dot-stuffs the body; the server checks
and un-stuffs it. Runs alternate between twins and each figure is the best of REPEAT, so load
from other processes skews both sides alike.
"""

import importlib
import os
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
REPEAT = 5

BODY = (b"From: a@x.test\r\nSubject: bench\r\n\r\n" + b"x" * 70 + b"\r\n") * 28   # about 2 KB
REPLIES = (b"250 2.0.0 Ok: queued as 0123456789AB\r\n", b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n",
           b"354 End data with <CR><LF>.<CR><LF>\r\n")


def parse_four(mod):
    parse = mod.parse_reply
    bufs = [bytearray(r) for r in REPLIES]
    t0 = time.perf_counter()
    for _ in range(N):
        for b in bufs:
            parse(b)
    return (time.perf_counter() - t0) / N


def stuff(mod):
    dot_stuff = mod.dot_stuff
    t0 = time.perf_counter()
    for _ in range(N):
        dot_stuff(BODY)
    return (time.perf_counter() - t0) / N


def unstuff(mod):
    data = bytearray(b"\r\n" + mod.dot_stuff(BODY))
    end, un = len(data) - 3, mod.unstuff
    t0 = time.perf_counter()
    for _ in range(N):
        un(data, 2, end, 1000)
    return (time.perf_counter() - t0) / N


def main() -> int:
    if os.environ.get("SENDER_NO_EXTENSIONS") == "1":
        print("wire_twins: SENDER_NO_EXTENSIONS=1, nothing compiled to compare", file=sys.stderr)
        return 2
    twins = {name: importlib.import_module(f"sender._wire_{name}") for name in ("c", "py")}
    print(f"wire twins, best of {REPEAT} x {N:,} calls, 2 KB body:")
    print(f"{'':34}{'compiled':>12}{'Python':>12}{'ratio':>8}")
    total = {"c": 0.0, "py": 0.0}
    for label, fn in (("parse 4 replies", parse_four), ("dot-stuff the body", stuff),
                      ("check and un-stuff the body", unstuff)):
        best = {name: min(fn(twins[name]) for _ in range(REPEAT)) for name in ("c", "py")}
        for name in total:
            total[name] += best[name]
        print(f"{label:34}{best['c'] * 1e6:>9.2f} µs{best['py'] * 1e6:>9.2f} µs{best['py'] / best['c']:>7.1f}x")
    print(f"{'per relayed message':34}{total['c'] * 1e6:>9.2f} µs{total['py'] * 1e6:>9.2f} µs"
          f"{total['py'] / total['c']:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
