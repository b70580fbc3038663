"""The ``sender`` command: run, sink, queue, classify, dsn, suppression, egress, events, explain,
ctl, dkim, webhooks, simulate, demo.

Each subcommand parses its flags, builds the same objects the Python API uses, and reports
bad input as one line naming the flag or config key, with exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path

import msgspec
import orjson
import trio

from .config import Config, ConfigError, load_config, parse_duration, parse_hostport

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own message names the flag; keep it on one line
        self.exit(2, f"sender {self.prog.split()[-1]}: error: {message}\n")


def _positive_int(flag: str):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects a whole number, got {value!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {n}")
        return n
    return parse


def _shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N, got {value!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {value}: index out of range")
    return i, n


def _fds(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--inherit expects file descriptors like 3,4, got {value!r}") from None


def _address(flag: str):
    def parse(value: str) -> str:
        try:
            parse_hostport(value, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sender", description="Outbound email MTA.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the daemon (SMTP listener + delivery)")
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument("--repair", action="store_true", help="skip corrupt journal records instead of refusing to start")
    run.add_argument("--grace", type=float, default=30.0, help="seconds to let transactions finish on shutdown")
    run.add_argument("--shard", type=_shard, help=argparse.SUPPRESS)  # set by the supervisor
    run.add_argument("--inherit", type=_fds, help=argparse.SUPPRESS)  # load board, SMTP, HTTP sockets (-1: none)

    sink = sub.add_parser("sink", help="run a programmable SMTP sink")
    sink.add_argument("--listen", required=True, type=_address("--listen"), help="host:port")
    sink.add_argument("--rules", help="TOML rules file")
    sink.add_argument("--log", help="write one JSON line per accepted message here")
    sink.add_argument("--simulate", choices=("google", "microsoft", "yahoo", "generic"),
                      help="answer with this provider's texts (sets [simulate] provider)")

    q = sub.add_parser("queue", help="count queued messages by state and domain (daemon may be stopped)")
    q.add_argument("--spool", required=True, help="spool directory")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")

    cl = sub.add_parser("classify", help="classify an SMTP reply: category and whether it is permanent (JSON)")
    cl.add_argument("--code", type=int, default=0, help="the basic reply code, e.g. 550 (0: none)")
    cl.add_argument("--text", required=True, help="the reply text")
    cl.add_argument("--enhanced", help="the RFC 3463 code, if not at the start of the text")

    ds = sub.add_parser("dsn", help="parse bounce / complaint messages: one JSON object per file")
    ds.add_argument("files", nargs="+", metavar="FILE")

    sup = sub.add_parser("suppression", help="list, add or remove suppressed addresses (daemon may be running)")
    sup.add_argument("action", choices=("list", "add", "remove"))
    sup.add_argument("address", nargs="?", help="the address to add or remove")
    sup.add_argument("--spool", required=True, help="spool directory (the root one of a sharded daemon)")
    sup.add_argument("--customer", default="", help="whose list (default: mail with no customer)")
    sup.add_argument("--reason", default="manual", help="why, for add (e.g. complaint, invalid_recipient)")
    sup.add_argument("--ttl", type=float, help="seconds until the entry expires, for add (default: never)")
    sup.add_argument("--all", action="store_true", help="list every customer's entries")

    eg = sub.add_parser("egress", help="warmup counts, adaptive rates and automation actions in force (JSON)")
    eg.add_argument("--spool", required=True, help="the daemon's spool directory")

    dk = sub.add_parser("dkim", help="make a DKIM key: writes the private key, prints the DNS record to publish")
    dk.add_argument("action", choices=("keygen",))
    dk.add_argument("--domain", required=True, help="the signing domain (d=), e.g. example.com")
    dk.add_argument("--selector", required=True, help="the selector (s=), e.g. s2026")
    dk.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    dk.add_argument("--bits", type=int, choices=(1024, 2048, 3072, 4096), default=2048, help="RSA key size")
    dk.add_argument("--out", required=True, help="the private key file to write (PEM, mode 0600; must not exist)")

    ev = sub.add_parser("events", help="query the event log: filter, count by fields, or follow (daemon may be stopped)")
    where = ev.add_mutually_exclusive_group(required=True)
    where.add_argument("--spool", help="the daemon's spool directory (its events/ folders, every shard's)")
    where.add_argument("--dir", help="an event folder (events.path)")
    for flag, field in _EVENT_FILTERS.items():
        ev.add_argument(f"--{flag}", dest=field, action="append", metavar="VALUE",
                        help=f"only events whose {field} is VALUE (repeat or comma-separate for any of several)")
    ev.add_argument("--since", help="from this time: ISO 8601 (UTC if no zone) or a duration ago, e.g. 2h")
    ev.add_argument("--until", help="before this time (same forms)")
    ev.add_argument("--group-by", metavar="FIELDS", help="count events per combination, e.g. provider,category")
    ev.add_argument("--follow", action="store_true", help="print events as they are written, until interrupted")
    ev.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ev.add_argument("--limit", type=_positive_int("--limit"), help="at most this many events (the newest)")

    ex = sub.add_parser("explain", help="one message's story: events, attempts, automation on its paths, now")
    ex.add_argument("id", help="the message id")
    ex.add_argument("--spool", required=True, help="the daemon's spool directory")
    ex.add_argument("--json", action="store_true", help="the gathered story as JSON")

    ctl = sub.add_parser("ctl", help="operate a running daemon through its admin API: pause, reroute, limit, "
                                      "purge into quarantine, release, drain")
    ctl.add_argument("action", choices=("pause", "resume", "reroute", "unroute", "limit", "unlimit", "purge",
                                        "release", "drain", "undrain", "pauses", "controls"))
    for name in ("customer", "domain", "provider", "source"):
        ctl.add_argument(f"--{name}", metavar="VALUE")
    ctl.add_argument("--pool", metavar="NAME", help="pause: the pool to pause; reroute: the pool to send from")
    ctl.add_argument("--message-type", metavar="TYPE", help="purge: only mail of this message type")
    ctl.add_argument("--id", metavar="ID", help="purge: one message; release: the purge's id")
    ctl.add_argument("--rate", help="limit: a message rate such as 100/min")
    ctl.add_argument("--connections", type=_positive_int("--connections"), help="limit: a provider's connections")
    ctl.add_argument("--dry-run", action="store_true", help="purge: only count what would go")
    ctl.add_argument("--then", choices=("bounce", "drop"), default="bounce",
                     help="purge: what happens when its time in quarantine is up (default: bounce)")
    ctl.add_argument("--keep", help="purge: how long it stays releasable (default: controls.quarantine_retention)")
    ctl.add_argument("--timeout", help="drain: stop after this even if mail is left (default: controls.drain_timeout)")
    ctl.add_argument("--reason", help="why (required for every change): kept with the change")
    ctl.add_argument("--who", default=os.environ.get("USER", ""), help="who makes the change (default: $USER)")
    ctl.add_argument("--url", default="http://127.0.0.1:8025", help="the daemon's HTTP API (listen.http)")
    ctl.add_argument("--key", default=os.environ.get("SENDER_ADMIN_KEY", ""),
                     help="an admin key (default: $SENDER_ADMIN_KEY)")

    wh = sub.add_parser("webhooks", help="webhooks waiting to be sent and the dead-letter list (JSON lines)")
    wh.add_argument("--spool", required=True, help="the daemon's spool directory")

    sim = sub.add_parser("simulate", help="run a warmup plan against simulated providers on a virtual clock")
    sim.add_argument("--config", required=True, help="TOML config with a [simulation] table")
    sim.add_argument("--days", type=_positive_int("--days"), default=30)
    sim.add_argument("--chart", default="", help="write a PNG chart here (needs matplotlib)")

    demo = sub.add_parser("demo", help="sink + daemon + load on loopback, then a report")
    demo.add_argument("--messages", type=_positive_int("--messages"), default=20000)
    demo.add_argument("--connections", type=_positive_int("--connections"), default=20)
    demo.add_argument("--domains", type=_positive_int("--domains"), default=200)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"sender {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _cmd_run(args) -> int:
    from .daemon import SHARD_TOKEN, LoadBoard, Shard, check_spool_layout, run_daemon, run_supervisor, shard_config
    from .journal import JournalCorrupt

    config = load_config(args.config)
    shard = None
    if args.shard is None:
        check_spool_layout(config)
    else:
        if not args.inherit:
            print("sender run: --shard is set by the supervisor, with --inherit", file=sys.stderr)
            return 2
        index, count = args.shard
        config = shard_config(config, index, count)
        board_fd, smtp_fd, http_fd = (args.inherit + [-1, -1])[:3]
        shard = Shard(LoadBoard(board_fd, count, index), socket.socket(fileno=smtp_fd) if smtp_fd >= 0 else None,
                      socket.socket(fileno=http_fd) if http_fd >= 0 else None, os.environ.get(SHARD_TOKEN, ""))
    try:
        if shard is None and config.daemon.processes > 1:
            return run_supervisor(args.config, config, repair=args.repair, grace=args.grace)
        def reload() -> Config:
            fresh = load_config(args.config)
            return fresh if args.shard is None else shard_config(fresh, *args.shard)

        trio.run(lambda: run_daemon(config, repair=args.repair, grace=args.grace, shard=shard,
                                    reload=reload if args.config else None))
    except BaseException as e:
        # trio wraps errors from inside nurseries in exception groups; report the cause.
        cause = _find(e, (JournalCorrupt, OSError))
        if cause is None:
            raise
        if isinstance(cause, OSError) and cause.filename is None and cause.errno:
            print(f"sender run: cannot listen on {config.listen.smtp}: {cause.strerror}", file=sys.stderr)
        else:
            print(f"sender run: {cause}", file=sys.stderr)
        return 1
    return 0


def _find(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` in ``exc``, looking inside exception groups."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find(sub, types)
            if found is not None:
                return found
    return None


def _cmd_sink(args) -> int:
    from .sink import Sink, SinkConfig, load_config as load_sink_config
    from .simulator import SimulateConfig

    config = SinkConfig()
    if args.rules:
        try:
            with open(args.rules, "rb") as f:
                config = load_sink_config(f.read())
        except OSError as e:
            raise ConfigError(f"--rules: cannot read {args.rules}: {e.strerror}") from None
    simulate = config.simulate
    if args.simulate:
        simulate = msgspec.structs.replace(simulate or SimulateConfig(), provider=args.simulate)
    sink = Sink(config.rule, log_path=args.log, simulate=simulate)

    async def serve() -> None:
        import signal
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(sink.run, args.listen)
                print(f"sink: listening on {host}:{port}", flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

    trio.run(serve)
    print(orjson.dumps({"sink": sink.address and f"{sink.address[0]}:{sink.address[1]}",
                        **{k: getattr(sink.stats, k) for k in sink.stats.__struct_fields__},
                        **({"sources": sink.simulator.statistics()} if sink.simulator else {})},
                       default=msgspec.to_builtins).decode(), flush=True)
    return 0


def _cmd_queue(args) -> int:
    from .journal import Journal

    if not os.path.isdir(args.spool):
        raise ConfigError(f"--spool: no such directory: {args.spool}")
    from .daemon import spool_dirs

    live = {}
    for d in spool_dirs(args.spool):
        live.update(Journal(d).replay(read_only=True))
    now = time.time()
    by_state = {"active": 0, "deferred": 0}
    by_domain: dict[str, dict[str, int]] = {}
    for d in live.values():
        state = "deferred" if d.attempts or d.next_at > now else "active"
        by_state[state] += 1
        for r in d.rcpts:
            dom = r.rpartition("@")[2].lower()
            row = by_domain.setdefault(dom, {"active": 0, "deferred": 0})
            row[state] += 1
    if args.json:
        print(orjson.dumps({"messages": len(live), "by_state": by_state, "by_domain": by_domain}).decode())
        return 0
    print(f"{len(live)} messages queued: {by_state['active']} active, {by_state['deferred']} deferred")
    if by_domain:
        width = max(len("domain"), *(len(k) for k in by_domain))
        print(f"{'domain':<{width}}  {'active':>8}  {'deferred':>8}   (recipients)")
        for dom, row in sorted(by_domain.items(), key=lambda kv: -(kv[1]["active"] + kv[1]["deferred"])):
            print(f"{dom:<{width}}  {row['active']:>8}  {row['deferred']:>8}")
    return 0


def _cmd_classify(args) -> int:
    from .classify import classify

    print(orjson.dumps(msgspec.to_builtins(classify(args.code, args.text, args.enhanced))).decode())
    return 0


def _cmd_dsn(args) -> int:
    from .dsn import parse, to_json

    status = 0
    for name in args.files:
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            print(f"sender dsn: {name}: {e.strerror}", file=sys.stderr)
            status = 1
            continue
        print(orjson.dumps(to_json(name, parse(data))).decode())
    return status


def _entry_json(e) -> str:
    row = msgspec.structs.asdict(e)
    if row["expires_at"] == math.inf:
        row["expires_at"] = None        # never
    return orjson.dumps(row).decode()


def _cmd_suppression(args) -> int:
    from .suppression import SuppressionList

    if not os.path.isdir(args.spool):
        raise ConfigError(f"--spool: no such directory: {args.spool}")
    if args.action != "list" and not args.address:
        raise ConfigError(f"suppression {args.action}: give the address")
    if args.address and "@" not in args.address:
        raise ConfigError(f"suppression {args.action}: not an address: {args.address!r}")
    # Shared: a running daemon may append to the same file; it reads these changes within a second.
    sl = SuppressionList(os.path.join(args.spool, "suppression.log"), shared=True)
    now = time.time()
    try:
        if args.action == "add":
            e = sl.add(args.customer, args.address, args.reason, now, source="cli",
                       ttl=args.ttl if args.ttl is not None else math.inf)
            print(_entry_json(e))
        elif args.action == "remove":
            if not sl.remove(args.customer, args.address, now):
                print(f"sender suppression remove: {args.address} is not suppressed for customer "
                      f"{args.customer!r}", file=sys.stderr)
                return 1
        else:
            for e in sl.entries(now, None if args.all else args.customer):
                print(_entry_json(e))
    finally:
        sl.close()
    return 0


def _cmd_egress(args) -> int:
    from .daemon import spool_dirs
    from .routing import read_state

    if not os.path.isdir(args.spool):
        raise ConfigError(f"--spool: no such directory: {args.spool}")
    for d in spool_dirs(args.spool):
        try:
            state = read_state(d / "egress.state")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        print(orjson.dumps({"spool": str(d), **(state or {"actions": []})}).decode())
    return 0


def _cmd_dkim(args) -> int:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if args.algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"--out: {args.out} exists; not overwriting a key") from None
    except OSError as e:
        raise ConfigError(f"--out: cannot create {args.out}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    value = f"v=DKIM1; k={args.algorithm}; p={base64.b64encode(public).decode()}"
    # TXT character strings hold at most 255 octets each.
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    print(f"; publish in DNS:\n{args.selector}._domainkey.{args.domain}. IN TXT {chunks}\n")
    print(f'; and in the config:\n[[dkim]]\ndomain = "{args.domain}"\nselector = "{args.selector}"\n'
          f'key_file = "{os.path.abspath(args.out)}"')
    return 0


_EVENT_FILTERS = {"id": "id", "event": "event", "customer": "customer", "domain": "domain",
                  "provider": "provider", "route": "site", "ip": "source", "type": "message_type",
                  "category": "category"}
_EVENT_HEADER = "  ".join(("time", "event", "id", "customer", "domain", "provider", "source", "category", "reply"))


def _event_time(value: str | None, flag: str, now: float) -> float | None:
    if value is None:
        return None
    try:
        return now - parse_duration(value, flag)
    except ConfigError:
        pass
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{flag}: expected ISO 8601 like 2026-11-24T08:00 or a duration ago like 2h, "
                          f"got {value!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)).timestamp()


def _cmd_events(args) -> int:
    from .daemon import spool_dirs
    from .events import Query, count, event_files, follow, select

    folders = [Path(args.dir)] if args.dir else [d / "events" for d in spool_dirs(args.spool)]
    if not os.path.isdir(args.dir or args.spool):
        raise ConfigError(f"--{'dir' if args.dir else 'spool'}: no such directory: {args.dir or args.spool}")
    match = {field: [v for value in values for v in value.split(",")]
             for field in _EVENT_FILTERS.values() if (values := getattr(args, field))}
    now = time.time()
    since, until = _event_time(args.since, "--since", now), _event_time(args.until, "--until", now)
    query = Query(match=match, since=since or 0.0, until=until if until is not None else math.inf)
    groups = args.group_by.split(",") if args.group_by else []
    known = {"time", *_EVENT_FILTERS.values()}
    for g in groups:
        if g not in known:
            raise ConfigError(f"--group-by: unknown field {g!r} (known: {', '.join(sorted(known))})")
    if args.follow and (groups or len(folders) > 1):
        raise ConfigError("--follow: one event folder, and no --group-by")
    out = sys.stdout
    if not args.json and not groups:
        out.write(_EVENT_HEADER + "\n")
    if args.follow:
        try:
            for ev, line in follow(folders[0], query):
                out.write(line.decode() if args.json else _event_row(ev) + "\n")
                out.flush()
        except KeyboardInterrupt:
            pass
        return 0
    files = sorted((f for folder in folders for f in event_files(folder)), key=lambda f: f.name)
    found = select(files, query, tuple(groups) if groups else None)
    if groups:
        counts = count((ev for ev, _ in found), groups)
        rows = counts.most_common()
        if args.json:
            for key, n in rows:
                out.write(orjson.dumps({**dict(zip(groups, key)), "count": n}).decode() + "\n")
        else:
            _print_table([*groups, "count"], [[*map(str, key), f"{n:,}"] for key, n in rows])
        return 0
    if args.limit:
        found = collections.deque(found, maxlen=args.limit)
    if args.json:
        for _, line in found:
            out.write(line.decode())
    else:
        for ev, _ in found:
            out.write(_event_row(ev) + "\n")
    return 0


def _event_row(ev) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ev.time)) + f".{int(ev.time % 1 * 1000):03d}Z"
    cells = [stamp, ev.event, ev.id, ev.customer or "-", ev.domain or "-", ev.provider or "-", ev.source or "-",
             ev.category or "-", (ev.reply or _detail_note(ev.detail))[:120]]
    return "  ".join(cells)


def _detail_note(detail: dict) -> str:
    """What an event without a reply says: a bucket holding mail, or an operator's change."""
    if "bucket" in detail:
        return f"{detail['bucket']} held {detail.get('held', '?')}"
    if "reason" in detail:
        purge = f"{detail['purge']} " if "purge" in detail else ""
        return f"{purge}by {detail.get('who', '?')}: {detail['reason']}"
    return ""


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) if i < len(row) - 1 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))


def _cmd_explain(args) -> int:
    from .daemon import spool_dirs
    from .explain import explain, render

    if not os.path.isdir(args.spool):
        raise ConfigError(f"--spool: no such directory: {args.spool}")
    story = explain(spool_dirs(args.spool), args.id)
    print(msgspec.json.encode(story).decode() if args.json else render(story))
    return 0 if story.events or story.queued else 1


def _cmd_ctl(args) -> int:
    from .httpclient import request

    if not args.key:
        raise ConfigError("--key: an admin key is needed (or set SENDER_ADMIN_KEY)")
    headers = {"authorization": f"Bearer {args.key}", "content-type": "application/json"}
    method, path, body = "POST", f"/admin/{args.action}", b""
    if args.action in ("pauses", "controls"):
        method = "GET"
    else:
        if not args.reason:
            raise ConfigError("--reason: required, so that whoever looks next knows why")
        payload = _ctl_payload(args)
        payload.update(reason=args.reason, who=args.who)
        body = orjson.dumps(payload)
    try:
        answer = trio.run(request, method, args.url.rstrip("/") + path, headers, body, 30.0)
    except (OSError, ValueError, trio.TooSlowError) as e:
        raise ConfigError(f"--url: cannot reach {args.url}: {e}") from None
    text = answer.body.decode("utf-8", "replace")
    if answer.status != 200:
        try:
            text = orjson.loads(answer.body)["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
        print(f"sender ctl {args.action}: {answer.status}: {text}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _ctl_payload(args) -> dict:
    """The admin API's body for ``sender ctl ACTION``, its flags checked."""
    named = {n: v for n in ("customer", "domain", "provider", "source") if (v := getattr(args, n))}
    action = args.action
    if action in ("drain", "undrain"):
        return {"timeout": args.timeout} if args.timeout and action == "drain" else {}
    if action == "release":
        if not args.id:
            raise ConfigError("--id: the purge's id to release (sender ctl controls lists them)")
        return {"id": args.id}
    if action == "purge":
        match = {**named, **({"message_type": args.message_type} if args.message_type else {}),
                 **({"id": args.id} if args.id else {})}
        if not match or "source" in match:
            raise ConfigError("--customer, --domain, --provider, --message-type or --id: say what to purge")
        return {**match, "dry_run": args.dry_run, "then": args.then, **({"keep": args.keep} if args.keep else {})}
    if action in ("pause", "resume") and args.pool:
        named["pool"] = args.pool
    if len(named) != 1:
        raise ConfigError("--customer, --domain, --provider, --source or --pool: say what to "
                          f"{action} (exactly one)")
    if action == "reroute":
        if not args.pool:
            raise ConfigError("--pool: the pool to send from")
        named["pool"] = args.pool
    if action == "limit":
        if not args.rate and not args.connections:
            raise ConfigError("--rate or --connections: the new limit")
        named.update({k: v for k, v in (("rate", args.rate), ("connections", args.connections)) if v})
    return named


def _cmd_webhooks(args) -> int:
    from .daemon import spool_dirs
    from .webhooks import read_outbox

    if not os.path.isdir(args.spool):
        raise ConfigError(f"--spool: no such directory: {args.spool}")
    for d in spool_dirs(args.spool):
        pending, dead = read_outbox(d / "webhooks.log")
        print(orjson.dumps({"spool": str(d), "pending": pending, "dead": len(dead)}).decode())
        for letter in dead:
            print(orjson.dumps({"dead_letter": msgspec.to_builtins(letter)}).decode())
    return 0


def _cmd_simulate(args) -> int:
    from .simulate import simulate

    if not args.verbose:        # the report sums up the automation actions the log would list
        logging.getLogger("sender").setLevel(logging.ERROR)
    print(simulate(args.config, args.days, args.chart or None))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return trio.run(lambda: run_demo(messages=args.messages, connections=args.connections, domains=args.domains))


_COMMANDS = {"run": _cmd_run, "sink": _cmd_sink, "queue": _cmd_queue, "classify": _cmd_classify,
             "dsn": _cmd_dsn, "suppression": _cmd_suppression, "demo": _cmd_demo, "simulate": _cmd_simulate,
             "egress": _cmd_egress, "dkim": _cmd_dkim, "webhooks": _cmd_webhooks, "events": _cmd_events,
             "explain": _cmd_explain, "ctl": _cmd_ctl}

if __name__ == "__main__":
    sys.exit(main())
