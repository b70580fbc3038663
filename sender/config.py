"""Configuration: TOML decoded into Structs, with errors that name the offending key.

Every section has defaults, so an empty file is a valid config that relays nowhere until a
route or DNS is used. Sizes accept "2GiB"-style strings; durations accept numbers (seconds)
or "30s" / "5m" / "2h" / "3d" strings.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
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
    "WebhookConfig",
    "WebhooksConfig",
    "DkimConfig",
    "EventsConfig",
    "AbuseConfig",
    "WEBHOOK_EVENTS",
    "SourceConfig",
    "PoolConfig",
    "WarmupPlan",
    "EgressConfig",
    "AutomationRule",
    "AutomationConfig",
    "AdaptiveRate",
    "check_automation_rule",
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
    "read_toml",
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
    admin_keys: list[str] = msgspec.field(default_factory=list)   # Bearer keys of the /admin endpoints
    attachment_folder: str = ""            # HTTP attachments[].path may name files in here ("" = none)
    hostname: str = "sender.localhost"
    max_message_size: int | str = "25MiB"
    max_recipients: int = 1000
    # The customer of every message the SMTP listener takes ("" = the X-Sender-Customer header
    # says): known from MAIL FROM on, so its quotas and max_recipients answer there and at RCPT.
    customer: str = ""
    max_connections: int = 1000
    max_line_length: int = 1000
    idle_timeout: float | str = "5m"       # close a client session idle this long


class CustomerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A customer: its id (``Engine.submit(customer=)``), its HTTP API keys, and the pool its
    mail leaves from (its dedicated pool, or a shared one; "" = ``egress.default_pool``)."""

    id: str
    api_keys: list[str] = msgspec.field(default_factory=list)
    pool: str = ""
    api_rate_limit: str = ""                # HTTP requests, e.g. "10/s" ("" = none): 429 over it
    # Messages accepted a UTC hour / a UTC day, every way in (SMTP, HTTP, Python API; 0 = none):
    # over it SMTP 451 4.7.1, HTTP 429, Python QuotaExceeded. Each of N processes takes 1/N.
    hourly_quota: int = 0
    daily_quota: int = 0
    max_recipients: int = 0                 # recipients a message (0 = only listen.max_recipients)
    webhook: list[WebhookConfig] = msgspec.field(default_factory=list)


class WebhookConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An endpoint that receives a customer's events, signed as Resend (Svix) signs them."""

    url: str                                # http:// or https://
    secret: str                             # "whsec_" + base64 of the signing key
    events: list[str] = msgspec.field(default_factory=list)   # e.g. ["email.bounced"]; [] = all


class WebhooksConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How webhooks are sent: the waits between attempts (Svix's schedule by default), after
    the last of which an event goes to the dead-letter list."""

    retry_schedule: list[float | str] = msgspec.field(
        default_factory=lambda: ["5s", "5m", "30m", "2h", "5h", "10h", "10h"])
    timeout: float | str = "15s"            # one attempt, connect to answer
    max_in_flight: int = 10                 # attempts at once per endpoint


class AbuseConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Auto-pause of a customer whose bounce or complaint rate passes a threshold (see
    sender.abuse)."""

    auto_pause: bool = True
    window: float | str = "1h"
    min_messages: int = 100                 # outcomes in the window before rates count
    max_bounce_rate: float = 0.10           # hard bounces / (delivered + bounced)
    max_complaint_rate: float = 0.003       # complaints / delivered
    # The message rate of a customer that has no [shaping.customer.ID] table yet, e.g. "100/h":
    # a new customer starts slow until an operator raises it ("" = no such limit).
    new_customer_rate: str = ""
    # Recipient domains nobody may mail (each with its subdomains): spam traps, typo domains,
    # a provider that asked. Refused at acceptance.
    blocked_domains: list[str] = msgspec.field(default_factory=list)


class EventsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The event log: JSON lines, a file per UTC hour, in ``path`` ("" = SPOOL/events)."""

    path: str = ""
    retention: float | str = "7d"           # files older than this are deleted
    recent: int = 10_000                    # events kept in memory for the API
    email_status: int = 100_000             # messages whose status GET /emails/{id} can tell


class ControlsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Operators' controls (``sender ctl``, ``/admin``)."""

    # A purge's mail waits in quarantine this long, releasable, before it is bounced or dropped.
    quarantine_retention: float | str = "7d"
    drain_timeout: float | str = "10m"      # a drain stops the daemon after this, queue or not


class DkimConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A DKIM key: mail whose From: domain is ``domain`` (or under it) is signed with it.
    Two entries for one domain (an RSA and an Ed25519 key) sign twice (RFC 8463)."""

    domain: str
    selector: str
    key_file: str                           # PEM (RSA or Ed25519), or base64 of an Ed25519 seed
    headers: list[str] = msgspec.field(default_factory=list)   # [] = the usual set, From oversigned


class SourceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A sending IP: the local address connections are bound to and the EHLO name it uses
    (which should match the address's PTR record)."""

    address: str
    ehlo: str = ""                          # "" = delivery.ehlo
    warmup: str = ""                        # a [warmup.NAME] plan, "default" for the built-in one
    warmup_start: str = ""                  # day 1 of the plan, "YYYY-MM-DD" (UTC)


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A weighted set of sources. A dedicated pool serves only the customers that name it,
    and its sources belong to no shared pool."""

    sources: dict[str, float] | list[str]   # name -> weight, or names with weight 1
    dedicated: bool = False
    # When a source has sent its warmup cap for today: "pool" sends from the pool's other
    # sources, "wait" keeps the mail for that source until tomorrow.
    overflow: Literal["pool", "wait"] = "pool"


class WarmupPlan(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Daily caps by day since the source's ``warmup_start`` (day 1 first); after the last
    day the source has no cap. ``provider`` gives a provider its own caps."""

    days: list[int] = msgspec.field(default_factory=list)
    provider: dict[str, list[int]] = msgspec.field(default_factory=dict)
    # Follow the providers' feedback: a source moves on to the next day's cap for a provider
    # only after a day that provider accepted its mail, holds on a day with deferrals
    # and steps back on a day with many.
    adaptive: bool = False
    advance_below: float = 0.02             # deferral share under which the cap grows
    retreat_above: float = 0.10             # deferral share over which it shrinks


class EgressConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    default_pool: str = ""                  # pool of customers that name none ("" = no pools)
    # Message type -> pool, for mail of customers on a shared pool (e.g. marketing apart).
    message_type: dict[str, str] = msgspec.field(default_factory=dict)
    # Rolling window of the outcome counts per (source, provider) that make its health.
    reputation_window: float | str = "1h"


class AutomationRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """When replies that match were seen ``count`` times within ``window`` for one (source,
    provider) or (source, site), take ``action`` on that pair for ``duration``.

    A reply matches when every given criterion holds: ``category`` (classifier's), ``code``,
    ``enhanced`` (prefix, e.g. "4.7.28" or "5.7"), ``text`` (a regular expression, case
    insensitive), ``provider``.
    """

    name: str
    category: str = ""
    code: int = 0
    enhanced: str = ""
    text: str = ""
    provider: list[str] = msgspec.field(default_factory=list)
    scope: Literal["source_provider", "source_site"] = "source_provider"
    count: int = 1
    window: float | str = "5m"
    action: Literal["suspend", "max_message_rate", "connection_limit", "reroute"] = "suspend"
    max_message_rate: str = ""              # for action "max_message_rate"
    connection_limit: int = 0               # for action "connection_limit"
    pool: str = ""                          # for action "reroute": where that provider's mail goes
    duration: float | str = "1h"


class AutomationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    default_rules: bool = True              # the built-in rules for the big providers' replies
    rule: list[AutomationRule] = msgspec.field(default_factory=list)   # checked before the built-in ones


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


class AdaptiveRate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A closed-loop message rate per (source IP, provider): it grows by ``increase`` each
    ``step`` while the provider's replies are clean, and is multiplied by ``decrease`` on a
    rate-limiting reply (at most once a step), always within ``min`` and ``max``."""

    min: str = "1/min"
    max: str = "100/s"
    start: str = ""                          # "" = min
    increase: str = "1/s"                    # added each step
    decrease: float = 0.5
    step: float | str = "1m"


class ProviderShaping(SiteShaping, kw_only=True):
    """A mailbox provider: the sites whose MX hosts match. ``match`` entries are ".suffix"
    (any host under it) or an exact host name or address."""

    match: list[str] = msgspec.field(default_factory=list)
    provider_connection_limit: int | None = None    # across all its sites
    provider_max_message_rate: str | None = None    # across all its sites and domains
    adaptive_rate: AdaptiveRate | None = None       # per (source IP, provider), closed loop


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
    source: dict[str, SourceConfig] = msgspec.field(default_factory=dict)
    pool: dict[str, PoolConfig] = msgspec.field(default_factory=dict)
    warmup: dict[str, WarmupPlan] = msgspec.field(default_factory=dict)
    egress: EgressConfig = msgspec.field(default_factory=EgressConfig)
    automation: AutomationConfig = msgspec.field(default_factory=AutomationConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    abuse: AbuseConfig = msgspec.field(default_factory=AbuseConfig)
    controls: ControlsConfig = msgspec.field(default_factory=ControlsConfig)
    dkim: list[DkimConfig] = msgspec.field(default_factory=list)

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
        _check_customers(self.customer, self.listen.admin_keys)
        _check_webhooks(self)
        ab = self.abuse
        ab.window = parse_duration(ab.window, "abuse.window")
        if ab.window <= 0 or ab.min_messages < 1:
            raise ConfigError("abuse.window and abuse.min_messages: must be more than 0")
        for name in ("max_bounce_rate", "max_complaint_rate"):
            if not 0.0 < getattr(ab, name) <= 1.0:
                raise ConfigError(f"abuse.{name}: a share between 0 and 1, like 0.1 for 10%")
        if ab.new_customer_rate:
            parse_rate(ab.new_customer_rate, "abuse.new_customer_rate")
        for d in ab.blocked_domains:
            if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", d.lower().strip(".")):
                raise ConfigError(f"abuse.blocked_domains: {d!r} is not a domain name")
        ab.blocked_domains = [d.lower().strip(".") for d in ab.blocked_domains]
        ev = self.events
        ev.retention = parse_duration(ev.retention, "events.retention")
        if ev.recent < 0 or ev.email_status < 0:
            raise ConfigError("events.recent and events.email_status: must be 0 or more")
        for name in ("quarantine_retention", "drain_timeout"):
            value = parse_duration(getattr(self.controls, name), f"controls.{name}")
            if value <= 0:
                raise ConfigError(f"controls.{name}: must be more than 0")
            setattr(self.controls, name, value)
        _check_dkim(self.dkim)
        _check_egress(self)
        _check_automation(self.automation, self.pool)


def _check_customers(customers: list[CustomerConfig], admin_keys: list[str]) -> None:
    ids: set[str] = set()
    owner: dict[str, str] = {}
    for key in admin_keys:
        if not key:
            raise ConfigError("listen.admin_keys: a key must not be empty")
        owner[key] = ""
    for i, c in enumerate(customers):
        if not c.id:
            raise ConfigError(f"customer[{i}].id: must not be empty")
        if c.id in ids:
            raise ConfigError(f"customer[{i}].id: {c.id!r} is already used by another customer")
        ids.add(c.id)
        if c.api_rate_limit:
            parse_rate(c.api_rate_limit, f"customer[{i}].api_rate_limit")
        for name in ("hourly_quota", "daily_quota", "max_recipients"):
            if getattr(c, name) < 0:
                raise ConfigError(f"customer[{i}].{name}: must be 0 (none) or more, got {getattr(c, name)}")
        for key in c.api_keys:
            if not key:
                raise ConfigError(f"customer[{i}].api_keys: a key must not be empty")
            # Never echo the key itself: the message ends up in logs.
            if owner.setdefault(key, c.id) != c.id:
                whose = f"customer {owner[key]!r}" if owner[key] else "listen.admin_keys"
                raise ConfigError(f"customer[{i}].api_keys: a key is also a key of {whose}")


WEBHOOK_EVENTS = ("email.sent", "email.delivered", "email.delivery_delayed", "email.bounced",
                  "email.complained", "email.failed", "email.suppressed", "email.scheduled")


def _check_webhooks(c: "Config") -> None:
    w = c.webhooks
    if not w.retry_schedule:
        raise ConfigError("webhooks.retry_schedule: needs at least one wait")
    w.retry_schedule = [parse_duration(v, f"webhooks.retry_schedule[{i}]") for i, v in enumerate(w.retry_schedule)]
    w.timeout = parse_duration(w.timeout, "webhooks.timeout")
    if w.max_in_flight < 1:
        raise ConfigError("webhooks.max_in_flight: must be at least 1")
    for i, cust in enumerate(c.customer):
        for j, hook in enumerate(cust.webhook):
            key = f"customer[{i}].webhook[{j}]"
            if not re.fullmatch(r"https?://[^\s/?#]+(?:[/?#]\S*)?", hook.url):
                raise ConfigError(f"{key}.url: expected an http:// or https:// URL, got {hook.url!r}")
            if not hook.secret.startswith("whsec_"):
                raise ConfigError(f"{key}.secret: expected \"whsec_\" followed by base64")
            try:
                if not base64.b64decode(hook.secret[6:], validate=True):
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{key}.secret: the part after \"whsec_\" is not base64") from None
            for e in hook.events:
                if e not in WEBHOOK_EVENTS:
                    raise ConfigError(f"{key}.events: unknown event {e!r} (known: {', '.join(WEBHOOK_EVENTS)})")


def _check_dkim(entries: list[DkimConfig]) -> None:
    for i, e in enumerate(entries):
        key = f"dkim[{i}]"
        if not re.fullmatch(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9-]+", e.domain.lower()):
            raise ConfigError(f"{key}.domain: expected a domain name, got {e.domain!r}")
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?", e.selector):
            raise ConfigError(f"{key}.selector: expected a selector like \"s2026\", got {e.selector!r}")
        if not e.key_file:
            raise ConfigError(f"{key}.key_file: must name the private key's file")
        for h in e.headers:
            if not re.fullmatch(r"[!-9;-~]+", h):
                raise ConfigError(f"{key}.headers: {h!r} is not a header field name")


def _check_egress(c: "Config") -> None:
    for name, src in c.source.items():
        key = f"source.{name}"
        try:
            ipaddress.ip_address(src.address)
        except ValueError:
            raise ConfigError(f"{key}.address: expected an IP address, got {src.address!r}") from None
        if src.warmup and src.warmup != "default" and src.warmup not in c.warmup:
            raise ConfigError(f"{key}.warmup: no plan [warmup.{src.warmup}] (nor \"default\")")
        if src.warmup and not src.warmup_start:
            raise ConfigError(f"{key}.warmup_start: needed with a warmup plan (\"YYYY-MM-DD\")")
        if src.warmup_start:
            try:
                datetime.date.fromisoformat(src.warmup_start)
            except ValueError:
                raise ConfigError(f"{key}.warmup_start: expected a date like \"2026-11-01\", "
                                  f"got {src.warmup_start!r}") from None
    shared: dict[str, str] = {}
    dedicated: dict[str, str] = {}
    for name, pool in c.pool.items():
        key = f"pool.{name}"
        if isinstance(pool.sources, list):
            pool.sources = {s: 1.0 for s in pool.sources}
        if not pool.sources:
            raise ConfigError(f"{key}.sources: a pool needs at least one source")
        for s, weight in pool.sources.items():
            if s not in c.source:
                raise ConfigError(f"{key}.sources: no [source.{s}]")
            if not weight > 0:
                raise ConfigError(f"{key}.sources: weight of {s!r} must be above 0, got {weight}")
            (dedicated if pool.dedicated else shared)[s] = name
    for s, name in dedicated.items():
        if s in shared:
            raise ConfigError(f"pool.{name}.sources: {s!r} is dedicated there and also in shared pool "
                              f"{shared[s]!r}")
    if c.pool and not c.egress.default_pool:
        raise ConfigError("egress.default_pool: needed when pools are configured")
    for key, name in [("egress.default_pool", c.egress.default_pool)] + [
            (f"egress.message_type.{t}", p) for t, p in c.egress.message_type.items()]:
        if name and name not in c.pool:
            raise ConfigError(f"{key}: no [pool.{name}]")
        if name and c.pool[name].dedicated:
            raise ConfigError(f"{key}: {name!r} is a dedicated pool; this key needs a shared one")
    for i, cust in enumerate(c.customer):
        if cust.pool and cust.pool not in c.pool:
            raise ConfigError(f"customer[{i}].pool: no [pool.{cust.pool}]")
    for name, plan in c.warmup.items():
        for pname, days in [("days", plan.days)] + [(f"provider.{p}", d) for p, d in plan.provider.items()]:
            if any(n < 1 for n in days):
                raise ConfigError(f"warmup.{name}.{pname}: daily caps must be at least 1")
        if not 0 <= plan.advance_below <= plan.retreat_above <= 1:
            raise ConfigError(f"warmup.{name}: need 0 <= advance_below <= retreat_above <= 1")
    c.egress.reputation_window = parse_duration(c.egress.reputation_window, "egress.reputation_window")
    for name, block in c.shaping.provider.items():
        a = block.adaptive_rate
        if a is None:
            continue
        key = f"shaping.provider.{name}.adaptive_rate"
        low, high = parse_rate(a.min, f"{key}.min"), parse_rate(a.max, f"{key}.max")
        parse_rate(a.increase, f"{key}.increase")
        if a.start:
            start = parse_rate(a.start, f"{key}.start")
            if not low.per_second <= start.per_second <= high.per_second:
                raise ConfigError(f"{key}.start: must be between min and max")
        if low.per_second > high.per_second:
            raise ConfigError(f"{key}.min: above max")
        if not 0 < a.decrease < 1:
            raise ConfigError(f"{key}.decrease: must be between 0 and 1, got {a.decrease}")
        a.step = parse_duration(a.step, f"{key}.step")


def _check_automation(a: AutomationConfig, pools: dict[str, PoolConfig]) -> None:
    for i, r in enumerate(a.rule):
        key = f"automation.rule[{i}]"
        if not r.name:
            raise ConfigError(f"{key}.name: must not be empty")
        check_automation_rule(r, key, pools)


def check_automation_rule(r: AutomationRule, key: str, pools: dict[str, PoolConfig] | None = None) -> None:
    """Validate one rule and normalize its durations (shared with the built-in rules file)."""
    from .classify import CATEGORIES     # classify reads no config: no cycle

    if not (r.category or r.code or r.enhanced or r.text):
        raise ConfigError(f"{key}: needs at least one of category, code, enhanced, text")
    if r.category and r.category not in CATEGORIES:
        raise ConfigError(f"{key}.category: {r.category!r} is not a category (one of: "
                          f"{', '.join(CATEGORIES)})")
    if r.enhanced and not re.fullmatch(r"[245](\.\d{1,3}){0,2}", r.enhanced):
        raise ConfigError(f"{key}.enhanced: expected a status code or its prefix like \"4.7.28\" or "
                          f"\"5.7\", got {r.enhanced!r}")
    if r.text:
        try:
            re.compile(r.text)
        except re.error as e:
            raise ConfigError(f"{key}.text: bad regular expression: {e}") from None
    if r.code and not 200 <= r.code <= 599:
        raise ConfigError(f"{key}.code: expected a reply code, got {r.code}")
    if r.count < 1:
        raise ConfigError(f"{key}.count: must be at least 1")
    r.window = parse_duration(r.window, f"{key}.window")
    r.duration = parse_duration(r.duration, f"{key}.duration")
    if r.action == "max_message_rate":
        parse_rate(r.max_message_rate, f"{key}.max_message_rate")
    elif r.action == "connection_limit" and r.connection_limit < 1:
        raise ConfigError(f"{key}.connection_limit: must be at least 1 with action \"connection_limit\"")
    elif r.action == "reroute":
        if not r.pool:
            raise ConfigError(f"{key}.pool: needed with action \"reroute\"")
        if pools is not None and r.pool not in pools:
            raise ConfigError(f"{key}.pool: no [pool.{r.pool}]")
        if pools is not None and pools[r.pool].dedicated:
            raise ConfigError(f"{key}.pool: {r.pool!r} is a dedicated pool; mail is moved only between "
                              "shared pools")


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


def read_toml(path: str | Path) -> dict:
    """A config file's TOML as a dict; a missing file or bad TOML is a ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    return parse_config(read_toml(path))
