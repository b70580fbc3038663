"""``sender simulate``: weeks of a warmup plan against simulated providers, in seconds.

The config file is a daemon config (sources, pools, warmup plans, automation, shaping) with
one more table that says what traffic to offer and how each provider answers::

    [simulation]
    volume = 3000                   # messages offered a day, in `batches` even batches
    [simulation.provider.google]
    share = 0.5                     # of the volume
    unknown_share = 0.01            # recipients that do not exist
    rate_limit = "60/h,burst=10"    # ...and any other key of the sink's [simulate] table
    [simulation.provider.yahoo]
    share = 0.5
    daily_limit = 400

The engine, its journal (in a temporary folder) and one provider-simulating sink per provider
(:mod:`sender.simulator`) run in one process on trio's ``MockClock``: time jumps whenever
every task waits, so a day of traffic takes a fraction of a second. Day 1 is the start date
(today, UTC), and every source with a warmup plan starts it then. The report prints, for each
day and source, the messages each provider accepted, the deferrals, and today's warmup cap.
"""

from __future__ import annotations

import datetime
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec
import trio
import trio.testing

from .config import Config, ConfigError, parse_config, read_toml
from .engine import Engine
from .routing import DAY
from .shaping import BUILTIN_PROVIDERS
from .simulator import ProviderSimulator, SimulateConfig
from .sink import Sink

__all__ = ["SimulationConfig", "ProviderLoad", "load_simulation", "run_simulation", "DayRow"]

# An MX host name per provider, under the suffix that makes it that provider's site.
_MX = {"google": "gmail-smtp-in.l.google.com", "microsoft": "sim-test.mail.protection.outlook.com",
       "yahoo": "mta5.am0.yahoodns.net"}
_SIMULATED_AS = {"google", "microsoft", "yahoo"}       # others answer as a generic Postfix
_SIM_FIELDS = set(SimulateConfig.__struct_fields__) - {"provider"}


class ProviderLoad(msgspec.Struct, kw_only=True):
    share: float = 1.0
    unknown_share: float = 0.0
    simulate: SimulateConfig = msgspec.field(default_factory=SimulateConfig)


class SimulationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    volume: int = 2000
    batches: int = 144
    customer: str = ""
    message_type: str = ""
    provider: dict[str, dict] = msgspec.field(default_factory=dict)


class DayRow(msgspec.Struct):
    day: int
    source: str
    delivered: dict[str, int]         # provider -> messages accepted
    deferred: int                     # transactions the providers deferred or refused
    cap: int | None                   # the source's warmup cap that day (its total, or its providers' sum)


def _mx(provider: str) -> str:
    return _MX.get(provider) or f"mx{BUILTIN_PROVIDERS[provider][0]}"


def load_simulation(path: str | Path) -> tuple[Config, SimulationConfig, dict[str, ProviderLoad], Path]:
    """Read a simulation file: the daemon config made to run in memory on a temporary spool,
    the traffic to offer, and each provider's behaviour. Errors name the key."""
    data = read_toml(path)
    try:
        sim = msgspec.convert(data.pop("simulation", {}), SimulationConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"simulation: {e}") from None
    if sim.volume < 1 or sim.batches < 1:
        raise ConfigError("simulation.volume and simulation.batches: must be at least 1")
    if not sim.provider:
        raise ConfigError("simulation.provider: name at least one provider, e.g. [simulation.provider.google]")
    loads: dict[str, ProviderLoad] = {}
    for name, table in sim.provider.items():
        key = f"simulation.provider.{name}"
        if name not in BUILTIN_PROVIDERS:
            raise ConfigError(f"{key}: unknown provider (one of: {', '.join(BUILTIN_PROVIDERS)})")
        table = dict(table)
        share, unknown = table.pop("share", 1.0), table.pop("unknown_share", 0.0)
        for k in table:
            if k not in _SIM_FIELDS:
                raise ConfigError(f"{key}.{k}: unknown key (share, unknown_share, {', '.join(sorted(_SIM_FIELDS))})")
        if not isinstance(share, (int, float)) or share <= 0:
            raise ConfigError(f"{key}.share: must be above 0, got {share!r}")
        if not isinstance(unknown, (int, float)) or not 0 <= unknown < 1:
            raise ConfigError(f"{key}.unknown_share: must be at least 0 and below 1, got {unknown!r}")
        table["provider"] = name if name in _SIMULATED_AS else "generic"
        if unknown:
            table.setdefault("unknown_users", "nobody*@*")
        try:
            simulate = msgspec.convert(table, SimulateConfig)
            ProviderSimulator(simulate)                 # checks the values
        except msgspec.ValidationError as e:
            raise ConfigError(f"{key}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{key}.{str(e).removeprefix('simulate.')}") from None
        loads[name] = ProviderLoad(share=float(share), unknown_share=float(unknown), simulate=simulate)
    start = datetime.datetime.now(datetime.timezone.utc).date()
    spool = Path(tempfile.mkdtemp(prefix="sender-simulate-"))
    data["spool"] = {**data.get("spool", {}), "path": str(spool / "spool"), "fsync": "never"}
    data["listen"] = {**data.get("listen", {}), "smtp": "", "http": ""}
    data["daemon"] = {**data.get("daemon", {}), "processes": 1}
    data["delivery"] = {**data.get("delivery", {}), "starttls": "never"}
    data["bounces"] = {**data.get("bounces", {}), "notify": False}
    data["route"] = [{"match": f"{name}.sim.test", "relay": f"{_mx(name)}:25"} for name in loads]
    for source in data.get("source", {}).values():
        if isinstance(source, dict) and source.get("warmup"):
            source["warmup_start"] = start.isoformat()
    return parse_config(data), sim, loads, spool


class _CountingSink(Sink):
    """Counts accepted messages per (day, source IP)."""

    def __init__(self, simulate: SimulateConfig) -> None:
        super().__init__(simulate=simulate, hostname=f"{simulate.provider}.sim.test")
        self.per_day: Counter[tuple[int, str]] = Counter()

    def record(self, ev, peer, **kw) -> None:
        super().record(ev, peer, **kw)
        self.per_day[(int(trio.current_time() // DAY), peer.rpartition(":")[0])] += len(ev.rcpts)


async def run_simulation(config: Config, sim: SimulationConfig, loads: dict[str, ProviderLoad], days: int,
                         *, seed: int = 1) -> tuple[list[DayRow], dict]:
    """Offer ``days`` of traffic; returns a row per day and source, and totals. Runs on the
    caller's clock (``trio.run(..., clock=MockClock(autojump_threshold=0))``)."""
    rnd = random.Random(seed)
    random.seed(seed)
    epoch = datetime.datetime.combine(datetime.datetime.now(datetime.timezone.utc).date(), datetime.time(),
                                      datetime.timezone.utc).timestamp()
    sinks = {_mx(name): _CountingSink(load.simulate) for name, load in loads.items()}
    provider_of_mx = {_mx(name): name for name in loads}

    async def open_stream(host, port, source=""):
        sink = sinks.get(host)
        if sink is None:
            raise OSError(111, "Connection refused")
        return await sink.open_stream(host, port, source)

    names = list(loads)
    weights = [loads[n].share for n in names]
    engine = Engine(config, open_stream=open_stream, epoch=epoch)
    rows: list[DayRow] = []
    offered = 0
    body = b"From: <news@sender.sim.test>\r\nSubject: warmup\r\n\r\n" + b"Hello from a warming IP.\r\n" * 60
    seen_refusals: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        for sink in sinks.values():
            await nursery.start(sink.run_in_memory)
        await nursery.start(engine.run)
        egress = engine.dispatcher.egress
        per_batch = sim.volume / sim.batches
        carry = 0.0
        for day in range(days):
            today = int((epoch + trio.current_time()) // DAY)
            caps = {source.address: _cap(egress, source, names, today) for source in egress.sources.values()}
            for _ in range(sim.batches):
                carry += per_batch
                n, carry = int(carry), carry - int(carry)
                for _ in range(n):
                    name = rnd.choices(names, weights)[0]
                    local = "nobody" if rnd.random() < loads[name].unknown_share else "user"
                    offered += 1
                    await engine.submit("news@sender.sim.test", [f"{local}{offered}@{name}.sim.test"], body,
                                        customer=sim.customer, message_type=sim.message_type)
                await trio.sleep(DAY / sim.batches)
            for source in egress.sources.values():
                ip = source.address
                delivered = {provider_of_mx[mx]: sink.per_day.get((day, ip), 0) for mx, sink in sinks.items()}
                refusals = sum(_refusals(sink, ip) for sink in sinks.values())
                rows.append(DayRow(day + 1, ip, delivered, refusals - seen_refusals.get(ip, 0), caps.get(ip)))
                seen_refusals[ip] = refusals
        totals = {"offered": offered, **engine.counts, "queued": engine.dispatcher.queued(),
                  "actions": Counter(a.rule for a in egress.fired)}
        nursery.cancel_scope.cancel()
    return rows, totals


def _cap(egress, source, providers: list[str], day: int) -> int | None:
    """The source's cap for the day: its total, or the sum of its providers' caps."""
    total, _ = egress.cap(source, "", day)
    if total is not None:
        return total
    per_provider = [egress.cap(source, p, day)[1] for p in providers]
    return None if any(c is None for c in per_provider) else sum(per_provider)


def _refusals(sink: Sink, ip: str) -> int:
    stats = sink.simulator.statistics().get(ip) if sink.simulator is not None else None
    if stats is None:
        return 0
    return stats.rate_limited + stats.volume_limited + stats.blocklisted + stats.greylisted


def format_report(rows: list[DayRow], totals: dict, loads: dict[str, ProviderLoad], sim: SimulationConfig,
                  days: int, seconds: float) -> str:
    names = list(loads)
    share = sum(l.share for l in loads.values())
    head = (f"sender simulate: {days} days, {sim.volume:,} messages a day offered ("
            + ", ".join(f"{n} {loads[n].share / share:.0%}" for n in names) + ")")
    width = max([len(r.source) for r in rows] + [9])
    lines = [head, "", f"{'day':>3}  {'source':<{width}}" + "".join(f"{n:>11}" for n in names)
             + f"{'deferred':>10}{'cap':>10}"]
    for r in rows:
        lines.append(f"{r.day:>3}  {r.source:<{width}}" + "".join(f"{r.delivered.get(n, 0):>11,}" for n in names)
                     + f"{r.deferred:>10,}" + (f"{r.cap:>10,}" if r.cap is not None else f"{'-':>10}"))
    lines.append("")
    lines.append(f"offered {totals['offered']:,}, delivered {totals['delivered']:,}, bounced {totals['bounced']:,}, "
                 f"expired {totals['expired']:,}, still queued {totals['queued']:,}")
    if totals["actions"]:
        lines.append("automation actions: " + ", ".join(f"{rule} x{n}" for rule, n in totals["actions"].most_common()))
    lines.append(f"simulated {days} days in {seconds:.1f} s")
    return "\n".join(lines)


def write_chart(rows: list[DayRow], path: str) -> bool:
    """A PNG of messages accepted per day by each source, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for source in sorted({r.source for r in rows}):
        mine = [r for r in rows if r.source == source]
        ax.plot([r.day for r in mine], [sum(r.delivered.values()) for r in mine], marker=".", label=source)
    ax.set_xlabel("day")
    ax.set_ylabel("messages accepted")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def simulate(path: str, days: int, chart: str | None) -> str:
    config, sim, loads, spool = load_simulation(path)
    started = time.monotonic()
    try:
        rows, totals = trio.run(run_simulation, config, sim, loads, days,
                                clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    report = format_report(rows, totals, loads, sim, days, time.monotonic() - started)
    if chart and write_chart(rows, chart):
        report += f"\nchart: {chart}"
    return report

