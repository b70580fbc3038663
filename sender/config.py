"""Configuration: TOML decoded into Structs, with errors that name the offending key.

Every section has defaults, so an empty file is a valid config that relays nowhere until a
route or DNS is used. Sizes accept "2GiB"-style strings; durations accept numbers (seconds)
or "30s" / "5m" / "2h" / "3d" strings.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

__all__ = [
    "Config",
    "ConfigError",
    "SpoolConfig",
    "ListenConfig",
    "CustomerConfig",
    "DeliveryConfig",
    "TimeoutConfig",
    "Route",
    "DnsConfig",
    "DaemonConfig",
    "ShapingConfig",
    "SuppressionConfig",
    "BouncesConfig",
    "SiteShaping",
    "ProviderShaping",
    "DomainShaping",
    "RateLimit",
    "Rate",
    "load_config",
    "parse_config",
    "parse_size",
    "parse_duration",
    "parse_hostport",
    "parse_rate",
]


class ConfigError(ValueError):
    """A config value is wrong; the message names the key (e.g. ``spool.max_bytes``)."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: int | str, key: str) -> int:
    if isinstance(value, int) and value >= 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"{key}: expected a size like 10485760 or \"2GiB\", got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: int | float | str, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value))
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ConfigError(f"{key}: expected seconds or a duration like \"30s\", \"5m\", \"2h\", \"3d\", got {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_hostport(value: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; a bare host takes ``default_port``."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", value or "")
    if not m:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    host = m.group(1) or m.group(3)
    port = m.group(2) or m.group(4)
    if port is None:
        if default_port is None:
            raise ConfigError(f"{key}: expected host:port (port missing), got {value!r}")
        return host, default_port
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: port {port} out of range")
    return host, int(port)


class Rate(msgspec.Struct, frozen=True):
    """A token-bucket limit: ``per_second`` tokens a second, at most ``burst`` at once."""

    per_second: float
    burst: float


_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0,
               "hr": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*([a-z]+)\s*(?:,\s*burst\s*=\s*(\d+(?:\.\d+)?)\s*)?")


def parse_rate(value: str, key: str) -> Rate:
    """"100/s", "10/min", "500/h", "2000/day", "1/5min"; optionally ",burst=N".

    Without a burst, a bucket holds a tenth of a second's worth (at least one message): the
    limit is paced smoothly, and in any T seconds at most ``burst + rate * T`` go out.
    """
    m = _RATE_RE.fullmatch(str(value).lower())
    if not m or m.group(3) not in _RATE_UNITS or float(m.group(1)) <= 0 or m.group(2) == "0":
        raise ConfigError(f"{key}: expected a rate like \"100/s\", \"10/min\", \"500/h\" or \"2000/day\", "
                          f"optionally \",burst=N\", got {value!r}")
    per_second = float(m.group(1)) / (_RATE_UNITS[m.group(3)] * int(m.group(2) or 1))
    burst = float(m.group(4)) if m.group(4) else max(1.0, per_second / 10)
    if burst < 1:
        raise ConfigError(f"{key}: burst must be at least 1, got {value!r}")
    return Rate(per_second, burst)


class SpoolConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = "spool"
    fsync: Literal["always", "batch", "never"] = "batch"
    max_bytes: int | str = "2GiB"
    segment_bytes: int | str = "64MiB"
    # Group-commit window: how long the writer waits for more records before an fsync.
    batch_window: float | str = 0.0
    # Compaction moves live messages out of the oldest segment once it is this sparse.
    compact_live_ratio: float = 0.25


class ListenConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    smtp: str = "127.0.0.1:2525"
    http: str = ""                         # the Resend-compatible HTTP API ("" = off)
    hostname: str = "sender.localhost"
    max_message_size: int | str = "25MiB"
    max_recipients: int = 1000
    max_connections: int = 1000
    max_line_length: int = 1000
    idle_timeout: float | str = "5m"       # close a client session idle this long


class CustomerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A customer of the HTTP API: its id (``Engine.submit(customer=)``) and its API keys."""

    id: str
    api_keys: list[str] = msgspec.field(default_factory=list)


class TimeoutConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-phase client timeouts, RFC 5321 section 4.5.3.2 defaults (plus connect)."""

    connect: float | str = 30.0
    greeting: float | str = 300.0
    ehlo: float | str = 300.0
    mail: float | str = 300.0
    rcpt: float | str = 300.0
    data: float | str = 120.0
    data_block: float | str = 180.0
    data_done: float | str = 600.0
    quit: float | str = 10.0


class DeliveryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    port: int = 25
    ehlo: str = "sender.example"
    source: str = ""                       # local address to bind ("" = any)
    connection_limit: int = 20             # per site
    max_deliveries_per_connection: int = 1000
    idle_timeout: float | str = 5.0        # QUIT an idle session after this long
    retry_interval: float | str = "60s"    # first retry; doubles each attempt, full jitter
    max_retry_interval: float | str = "1h"
    max_age: float | str = "3d"            # then the message expires and bounces
    starttls: Literal["opportunistic", "never"] = "opportunistic"
    timeouts: TimeoutConfig = msgspec.field(default_factory=TimeoutConfig)


class Route(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    match: str
    relay: str


class DnsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    nameservers: list[str] = msgspec.field(default_factory=list)   # "ip" or "ip:port"
    timeout: float = 5.0


class RateLimit(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A level that only has a message rate: a customer, a recipient domain's own limit, a
    source IP across every site."""

    max_message_rate: str | None = None


class SiteShaping(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Limits of one (source IP, site) path; unset keys fall back to the level below
    (provider -> [shaping.default] -> [delivery])."""

    connection_limit: int | None = None
    max_connection_rate: str | None = None          # new connections, e.g. "10/s"
    max_message_rate: str | None = None
    max_deliveries_per_connection: int | None = None
    idle_timeout: float | str | None = None
    retry_interval: float | str | None = None
    max_retry_interval: float | str | None = None
    max_age: float | str | None = None
    # Backoff mode: a 421 or a rate-limiting reply slows the path to this rate, and then
    # doubles it back every backoff_step while no new one comes.
    backoff_max_message_rate: str | None = None
    backoff_step: float | str | None = None


class ProviderShaping(SiteShaping, kw_only=True):
    """A mailbox provider: the sites whose MX hosts match. ``match`` entries are ".suffix"
    (any host under it) or an exact host name or address."""

    match: list[str] = msgspec.field(default_factory=list)
    provider_connection_limit: int | None = None    # across all its sites
    provider_max_message_rate: str | None = None    # across all its sites and domains


class DomainShaping(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A recipient domain: its own message rate and its retry policy."""

    max_message_rate: str | None = None
    retry_interval: float | str | None = None
    max_retry_interval: float | str | None = None
    max_age: float | str | None = None


class ShapingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    default: SiteShaping = msgspec.field(default_factory=SiteShaping)
    provider: dict[str, ProviderShaping] = msgspec.field(default_factory=dict)
    domain: dict[str, DomainShaping] = msgspec.field(default_factory=dict)
    customer: dict[str, RateLimit] = msgspec.field(default_factory=dict)
    source: dict[str, RateLimit] = msgspec.field(default_factory=dict)
    # Message type -> priority; higher goes first within the same limits.
    priority: dict[str, int] = msgspec.field(
        default_factory=lambda: {"transactional": 10, "": 0, "marketing": -10})


class SuppressionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-customer suppression of addresses that bounced for good or complained."""

    enabled: bool = True
    # Invalid recipients and complaints stay until removed; these expire.
    bad_domain_ttl: float | str = "7d"
    inactive_mailbox_ttl: float | str = "90d"


class BouncesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Return path of outbound mail: bounces+ID@domain (VERP), so a bounce names its message;
    # mail the SMTP listener receives for this domain is read as bounces and complaints.
    domain: str = ""
    # Non-delivery reports (RFC 3464) to the envelope sender on a permanent failure or expiry.
    notify: bool = True
    notify_customer: dict[str, bool] = msgspec.field(default_factory=dict)   # per-customer override


class DaemonConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Independent engine processes sharing one listening socket (the least busy accepts), each
    # with its own journal under spool.path/shard-N and 1/N of each connection limit.
    processes: int = 1
    # Linux scheduling policy of the engine's thread. "batch" (SCHED_BATCH): a wake-up of the
    # daemon never preempts another process, so the apps beside it keep their latency and the
    # daemon handles its ready connections in bigger batches, with fewer context switches.
    scheduling: Literal["batch", "normal"] = "batch"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    route: list[Route] = msgspec.field(default_factory=list)
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    shaping: ShapingConfig = msgspec.field(default_factory=ShapingConfig)
    suppression: SuppressionConfig = msgspec.field(default_factory=SuppressionConfig)
    bounces: BouncesConfig = msgspec.field(default_factory=BouncesConfig)
    customer: list[CustomerConfig] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        # Normalize strings like "2GiB" and "5m" once, so the rest of the code sees numbers.
        s, d, t = self.spool, self.delivery, self.delivery.timeouts
        s.max_bytes = parse_size(s.max_bytes, "spool.max_bytes")
        s.segment_bytes = parse_size(s.segment_bytes, "spool.segment_bytes")
        s.batch_window = parse_duration(s.batch_window, "spool.batch_window")
        if not 0.0 <= s.compact_live_ratio <= 1.0:
            raise ConfigError("spool.compact_live_ratio: must be between 0 and 1")
        self.listen.max_message_size = parse_size(self.listen.max_message_size, "listen.max_message_size")
        self.listen.idle_timeout = parse_duration(self.listen.idle_timeout, "listen.idle_timeout")
        if self.listen.smtp:
            parse_hostport(self.listen.smtp, "listen.smtp")
        if self.listen.http:
            parse_hostport(self.listen.http, "listen.http")
            if self.daemon.processes > 1:
                raise ConfigError("listen.http: not yet served with daemon.processes > 1")
        for name in ("idle_timeout", "retry_interval", "max_retry_interval", "max_age"):
            setattr(d, name, parse_duration(getattr(d, name), f"delivery.{name}"))
        for name in TimeoutConfig.__struct_fields__:
            setattr(t, name, parse_duration(getattr(t, name), f"delivery.timeouts.{name}"))
        if not 1 <= self.daemon.processes <= 64:
            raise ConfigError(f"daemon.processes: must be between 1 and 64, got {self.daemon.processes}")
        if d.connection_limit < 1:
            raise ConfigError("delivery.connection_limit: must be at least 1")
        if d.max_deliveries_per_connection < 1:
            raise ConfigError("delivery.max_deliveries_per_connection: must be at least 1")
        if not 0 < d.port < 65536:
            raise ConfigError(f"delivery.port: {d.port} out of range")
        _check_shaping(self.shaping)
        for name in ("bad_domain_ttl", "inactive_mailbox_ttl"):
            setattr(self.suppression, name, parse_duration(getattr(self.suppression, name), f"suppression.{name}"))
        for i, r in enumerate(self.route):
            parse_hostport(r.relay, f"route[{i}].relay", default_port=d.port)
            if not r.match or " " in r.match:
                raise ConfigError(f"route[{i}].match: expected a domain, \".suffix\" or \"*\", got {r.match!r}")
        _check_customers(self.customer)


def _check_customers(customers: list[CustomerConfig]) -> None:
    ids: set[str] = set()
    owner: dict[str, str] = {}
    for i, c in enumerate(customers):
        if not c.id:
            raise ConfigError(f"customer[{i}].id: must not be empty")
        if c.id in ids:
            raise ConfigError(f"customer[{i}].id: {c.id!r} is already used by another customer")
        ids.add(c.id)
        for key in c.api_keys:
            if not key:
                raise ConfigError(f"customer[{i}].api_keys: a key must not be empty")
            # Never echo the key itself: the message ends up in logs.
            if owner.setdefault(key, c.id) != c.id:
                raise ConfigError(f"customer[{i}].api_keys: a key is also a key of customer {owner[key]!r}")


_DURATIONS = ("idle_timeout", "retry_interval", "max_retry_interval", "max_age", "backoff_step")
_RATES = ("max_connection_rate", "max_message_rate", "backoff_max_message_rate", "provider_max_message_rate")


def _check_block(block: msgspec.Struct, key: str) -> None:
    """Validate rates and normalize durations of one shaping block, naming the key."""
    for name in _DURATIONS:
        if getattr(block, name, None) is not None:
            setattr(block, name, parse_duration(getattr(block, name), f"{key}.{name}"))
    for name in _RATES:
        if getattr(block, name, None) is not None:
            parse_rate(getattr(block, name), f"{key}.{name}")
    for name in ("connection_limit", "max_deliveries_per_connection", "provider_connection_limit"):
        value = getattr(block, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"{key}.{name}: must be at least 1, got {value}")


def _check_shaping(sh: ShapingConfig) -> None:
    _check_block(sh.default, "shaping.default")
    for level in ("provider", "domain", "customer", "source"):
        for name, block in getattr(sh, level).items():
            _check_block(block, f"shaping.{level}.{name}")
    for name, block in sh.provider.items():
        for m in block.match:
            if not m or " " in m or m == ".":
                raise ConfigError(f"shaping.provider.{name}.match: expected \".suffix\" or a host, got {m!r}")
    sh.domain = {d.lower(): v for d, v in sh.domain.items()}


_KEY_RE = re.compile(r"at `\$\.?(.*?)`")


_SHAPING_BLOCKS = {"provider": ProviderShaping, "domain": DomainShaping, "customer": RateLimit, "source": RateLimit}


def _key_of(err: msgspec.ValidationError, data: dict) -> str:
    m = _KEY_RE.search(str(err))
    key = (m.group(1) if m else "") or "(top level)"
    level = key.removeprefix("shaping.").partition("[...]")[0]
    if key.startswith("shaping.") and "[...]" in key and level in _SHAPING_BLOCKS:
        # msgspec does not name dict keys in its paths: find the block that fails.
        blocks = data.get("shaping", {}).get(level, {})
        for name, block in blocks.items() if isinstance(blocks, dict) else ():
            try:
                msgspec.convert(block, _SHAPING_BLOCKS[level])
            except msgspec.ValidationError as inner:
                return f"shaping.{level}.{name}" + (f".{_key_of(inner, {})}" if _KEY_RE.search(str(inner)) else "")
    return key


def parse_config(data: dict) -> Config:
    """Decode a TOML-shaped dict; errors name the key, e.g. ``delivery.port``."""
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        msg = str(e)
        if "__post_init__" in msg or isinstance(e.__cause__, ConfigError):
            raise ConfigError(msg.split(" - at ")[0]) from None
        raise ConfigError(f"{_key_of(e, data)}: {msg.split(' - at ')[0]}") from None


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return parse_config(data)
