"""Mailbox-provider behaviour for the sink: rate limits, daily volume, block-listing,
greylisting and unknown users, answered with the texts the real providers send.

A sink with a ``[simulate]`` table judges every source IP on its own, the way large
providers do, so a sender's per-IP shaping and its reading of the replies can be tested
and benchmarked on loopback (one sink per provider, e.g. on 127.0.0.11, .12, .13)::

    [simulate]
    provider = "yahoo"              # google | microsoft | yahoo | generic: whose texts
    rate_limit = "20/min,burst=5"   # messages per source IP (token bucket)
    daily_limit = 1000              # messages per source IP per day
    blocklist_bounce_rate = 0.1     # 5xx recipients / all recipients that lists the IP...
    blocklist_min = 50              # ...once this many recipients were judged
    blocklist_for = "1h"            # how long a listing lasts
    greylist = "5m"                 # first try of a (source IP, sender, recipient) waits this long
    unknown_users = "nobody*@*"     # recipients answered "user unknown"
    limited_sources = ["127.0.0.3"] # rate_limit and daily_limit hold only these ([] = all)

Every feature is off while its key is unset. Time is ``trio.current_time()``, so tests on a
virtual clock see hours pass at once.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Literal

import msgspec
import trio

from .config import ConfigError, parse_duration, parse_rate
from .scheduler import TokenBucket
from .smtp.serve import Answer

__all__ = ["PROVIDER_REPLIES", "ProviderSimulator", "SimulateConfig", "SimulatedTransaction",
           "SourceStatistics"]

Provider = Literal["google", "microsoft", "yahoo", "generic"]

_GREYLISTED = (451, "4.7.1", "<{rcpt}>: Recipient address rejected: Greylisted, see "
                             "http://postgrey.schweikert.ch/help/{domain}.html")

# Public reply texts, as each provider sends them. Placeholders: {ip} (the source IP), {rcpt}
# and {domain} (the recipient and its domain), {host} (the sink's host name). "\n" splits a
# multi-line reply. None of the big providers greylist, so all answer as Postfix + postgrey.
PROVIDER_REPLIES: dict[str, dict[str, tuple[int, str, str]]] = {
    "google": {
        "rate_limit": (421, "4.7.28",
                       "[{ip}] Our system has detected an unusual rate of\n"
                       "unsolicited mail originating from your IP address. To protect our\n"
                       "users from spam, mail sent from your IP address has been temporarily\n"
                       "rate limited. Please visit\n"
                       " https://support.google.com/mail/?p=UnsolicitedRateLimitError to\n"
                       "review our Bulk Email Senders Guidelines. - gsmtp"),
        "blocklist": (550, "5.7.1",
                      "[{ip}] Our system has detected an unusual rate of\n"
                      "unsolicited mail originating from your IP address. To protect our\n"
                      "users from spam, mail sent from your IP address has been blocked.\n"
                      "Please visit\n"
                      " https://support.google.com/mail/?p=UnsolicitedIPError to review our\n"
                      "Bulk Email Senders Guidelines. - gsmtp"),
        "unknown_user": (550, "5.1.1",
                         "The email account that you tried to reach does not exist. Please try\n"
                         "double-checking the recipient's email address for typos or\n"
                         "unnecessary spaces. For more information, go to\n"
                         " https://support.google.com/mail/?p=NoSuchUser - gsmtp"),
        "greylist": _GREYLISTED,
    },
    "microsoft": {
        "rate_limit": (451, "4.7.650",
                       "The mail server [{ip}] has been temporarily rate limited due to IP "
                       "reputation. For e-mail delivery information, see https://postmaster.live.com (S775)"),
        "blocklist": (550, "5.7.1",
                      "Unfortunately, messages from [{ip}] weren't sent. Please contact your Internet "
                      "service provider since part of their network is on our block list (S3150). You can "
                      "also refer your provider to http://mail.live.com/mail/troubleshooting.aspx#errors. "
                      "[{host}]"),
        "unknown_user": (550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017062302). [{host}]"),
        "greylist": _GREYLISTED,
    },
    "yahoo": {
        "volume": (421, "4.7.0",
                   "[TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user "
                   "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"),
        "blocklist": (553, "5.7.2",
                      "[TSS09] All messages from {ip} will be permanently deferred; Retrying will NOT "
                      "succeed. See https://postmaster.yahooinc.com/error-codes"),
        "unknown_user": (554, "", "delivery error: dd This user doesn't have a yahoo.com account ({rcpt}) "
                                  "[0] - {host}"),
        "greylist": _GREYLISTED,
    },
    "generic": {   # Postfix with a rate-limiting policy service and a DNS block list
        "rate_limit": (450, "4.7.1", "Client host rejected: Rate limit exceeded for {ip}, try again later"),
        "volume": (450, "4.7.1", "Client host rejected: Daily sending quota exceeded for {ip}, "
                                 "try again tomorrow"),
        "blocklist": (554, "5.7.1", "Service unavailable; Client host [{ip}] blocked using "
                                    "bl.{host}; listed for a high bounce rate"),
        "unknown_user": (550, "5.1.1", "<{rcpt}>: Recipient address rejected: User unknown in virtual "
                                       "mailbox table"),
        "greylist": _GREYLISTED,
    },
}

# Yahoo defers for rate and for volume alike with TSS04; the others have no daily-volume text of
# their own and answer a day's excess with their rate-limit text.
PROVIDER_REPLIES["yahoo"]["rate_limit"] = PROVIDER_REPLIES["yahoo"]["volume"]
PROVIDER_REPLIES["google"]["volume"] = PROVIDER_REPLIES["google"]["rate_limit"]
PROVIDER_REPLIES["microsoft"]["volume"] = PROVIDER_REPLIES["microsoft"]["rate_limit"]

# Where a provider judges the source IP (rate, volume, block list). Microsoft and Yahoo refuse
# the MAIL command (their logs read "in reply to MAIL FROM command"); Gmail and a Postfix policy
# service answer the recipients, which lets a client defer the message without sending its body.
_JUDGED_AT: dict[str, Literal["mail", "rcpt"]] = {"google": "rcpt", "microsoft": "mail", "yahoo": "mail",
                                                  "generic": "rcpt"}

_DAY = 86400.0


class SimulateConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[simulate]`` table of a sink's rules file; see the module docstring."""

    provider: Provider = "generic"
    rate_limit: str | None = None
    daily_limit: int | None = None
    blocklist_bounce_rate: float | None = None
    blocklist_min: int = 50
    blocklist_for: float | str = "1h"
    greylist: float | str | None = None
    unknown_users: str | None = None
    # The source IPs that rate_limit and daily_limit hold ([] = every one): a provider that
    # distrusts some of a sender's IPs more than others.
    limited_sources: list[str] = []


class SourceStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What one source IP got. Transaction counts (rate, volume, block list) count a refused
    transaction once, however many recipients it had.

    Attributes:
      accepted: messages taken at the end of data.
      recipients: recipients judged for the bounce share (greylisted ones are not).
      rejected: of those, how many got a 5xx (user unknown or a sink rule).
      rate_limited: transactions deferred by ``rate_limit``.
      volume_limited: transactions deferred by ``daily_limit``.
      greylisted: recipients deferred by greylisting.
      blocklisted: transactions refused while listed.
      listings: times the source was block-listed.
      blocklisted_until: the end of the latest listing (trio time; 0.0: never listed).
    """

    accepted: int = 0
    recipients: int = 0
    rejected: int = 0
    rate_limited: int = 0
    volume_limited: int = 0
    greylisted: int = 0
    blocklisted: int = 0
    listings: int = 0
    blocklisted_until: float = 0.0


_COUNTERS = tuple(f for f in SourceStatistics.__struct_fields__ if f != "blocklisted_until")


class _Source:
    """Mutable state of one source IP; :meth:`ProviderSimulator.statistics` snapshots it."""

    __slots__ = ("bucket", "day", "today", "share_seen", "share_rejected", "counts", "listed_until")

    def __init__(self, bucket: TokenBucket | None) -> None:
        self.bucket = bucket
        self.day = -1
        self.today = 0                   # transactions admitted on ``day``
        self.share_seen = 0              # bounce-share counters, reset on listing
        self.share_rejected = 0
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.listed_until = 0.0          # kept after expiry, for the statistics


class ProviderSimulator:
    """Decides, per source IP, what a mailbox provider would answer before the sink's rules do.

    Args:
      config: the ``[simulate]`` table.
      hostname: the sink's name, for texts that name the answering host.

    Raises:
      ConfigError: a value is wrong; the message names the key (``simulate.rate_limit: ...``).
    """

    def __init__(self, config: SimulateConfig, *, hostname: str = "sink.localhost") -> None:
        self.config = config
        self.provider = config.provider
        self.hostname = hostname
        self.replies = PROVIDER_REPLIES[config.provider]
        self.judged_at = _JUDGED_AT[config.provider]
        self.rate = parse_rate(config.rate_limit, "simulate.rate_limit") if config.rate_limit is not None else None
        if config.daily_limit is not None and config.daily_limit < 1:
            raise ConfigError(f"simulate.daily_limit: expected a positive count, got {config.daily_limit!r}")
        self.daily_limit = config.daily_limit
        share = config.blocklist_bounce_rate
        if share is not None and not 0.0 < share <= 1.0:
            raise ConfigError(f"simulate.blocklist_bounce_rate: expected a share above 0 and at most 1, "
                              f"got {share!r}")
        self.blocklist_share = share
        if config.blocklist_min < 1:
            raise ConfigError(f"simulate.blocklist_min: expected a positive count, got {config.blocklist_min!r}")
        self.blocklist_min = config.blocklist_min
        self.blocklist_for = parse_duration(config.blocklist_for, "simulate.blocklist_for")
        self.greylist_delay = (parse_duration(config.greylist, "simulate.greylist")
                               if config.greylist is not None else None)
        if config.unknown_users is not None and not config.unknown_users:
            raise ConfigError("simulate.unknown_users: expected a glob like \"nobody*@*\", got an empty string")
        self.unknown_users = config.unknown_users.lower() if config.unknown_users else None
        self._sources: dict[str, _Source] = {}
        self._greylist: dict[tuple[str, str, str], float] = {}  # triplet -> first attempt

    def transaction(self, source: str, sender: str) -> SimulatedTransaction:
        """Start judging one MAIL transaction from ``source`` (an IP, without port)."""
        state = self._sources.get(source)
        if state is None:
            bucket = TokenBucket(self.rate.per_second, self.rate.burst, trio.current_time()) if self.rate else None
            state = self._sources[source] = _Source(bucket)
        return SimulatedTransaction(self, source, state, sender)

    def statistics(self) -> dict[str, SourceStatistics]:
        """A snapshot per source IP, in order of first contact."""
        return {ip: SourceStatistics(**s.counts, blocklisted_until=s.listed_until) for ip, s in self._sources.items()}

    def reply(self, kind: str, source: str, rcpt: str = "") -> Answer:
        code, enhanced, text = self.replies[kind]
        domain = rcpt.rpartition("@")[2]
        return code, enhanced, text.format(ip=source, rcpt=rcpt, domain=domain, host=self.hostname)

    # -- the source-IP verdict, once per transaction

    def _admit(self, source: str, state: _Source) -> Answer | None:
        now = trio.current_time()
        if now < state.listed_until:       # once past it, forgiven: counters were reset at listing
            state.counts["blocklisted"] += 1
            return self.reply("blocklist", source)
        if self.config.limited_sources and source not in self.config.limited_sources:
            state.today += 1
            return None
        if self.daily_limit is not None:
            day = math.floor(now / _DAY)
            if day != state.day:
                state.day, state.today = day, 0
            if state.today >= self.daily_limit:
                state.counts["volume_limited"] += 1
                return self.reply("volume", source)
        if state.bucket is not None and not state.bucket.try_take(now):
            state.counts["rate_limited"] += 1
            return self.reply("rate_limit", source)
        state.today += 1
        return None

    def _judge_share(self, source: str, state: _Source, *, rejected: int, seen: int) -> None:
        """Add recipients to the bounce share; list the source once the share is too high."""
        state.counts["recipients"] += seen
        state.counts["rejected"] += rejected
        if self.blocklist_share is None or trio.current_time() < state.listed_until:
            return
        state.share_seen += seen
        state.share_rejected += rejected
        if state.share_seen >= self.blocklist_min and state.share_rejected > self.blocklist_share * state.share_seen:
            state.listed_until = trio.current_time() + self.blocklist_for
            state.counts["listings"] += 1
            state.share_seen = state.share_rejected = 0


class SimulatedTransaction:
    """The simulator's view of one MAIL transaction; the sink session calls it in order."""

    def __init__(self, sim: ProviderSimulator, source: str, state: _Source, sender: str) -> None:
        self.sim = sim
        self.source = source
        self.state = state
        self.sender = sender.lower()
        self._verdict: Answer | None = None
        self._judged = False

    def _source_verdict(self) -> Answer | None:
        if not self._judged:
            self._judged = True
            self._verdict = self.sim._admit(self.source, self.state)
        return self._verdict

    def on_mail(self) -> Answer | None:
        """The refusal of the MAIL command, or None to go on."""
        if self.sim.judged_at == "mail":
            return self._source_verdict()
        return None

    def on_rcpt(self, rcpt: str) -> Answer | None:
        """The simulator's answer to this recipient, or None to let the sink's rules answer.

        A refused source gets the same answer for every recipient of the transaction.
        """
        sim = self.sim
        verdict = self._source_verdict()
        if verdict is not None:
            return verdict
        address = rcpt.lower()
        if sim.unknown_users is not None and fnmatch.fnmatchcase(address, sim.unknown_users):
            sim._judge_share(self.source, self.state, rejected=1, seen=1)
            return sim.reply("unknown_user", self.source, rcpt)
        if sim.greylist_delay is not None and not self._greylist_passed(address):
            self.state.counts["greylisted"] += 1
            return sim.reply("greylist", self.source, rcpt)
        return None

    def _greylist_passed(self, address: str) -> bool:
        """True once the triplet's first try is ``greylist`` old; a retry too soon keeps waiting
        (as postgrey does: the first try's time stands)."""
        key = (self.source, self.sender, address)
        now = trio.current_time()
        first = self.sim._greylist.setdefault(key, now)
        return now > first and now - first >= self.sim.greylist_delay  # a first try never passes

    def answered(self, code: int) -> None:
        """The sink's rules answered a recipient the simulator let through."""
        self.sim._judge_share(self.source, self.state, rejected=int(code >= 500), seen=1)

    def rejected_at_data(self, recipients: int) -> None:
        """A rule refused the data with a 5xx for ``recipients`` already counted as taken."""
        self.sim._judge_share(self.source, self.state, rejected=recipients, seen=0)

    def delivered(self) -> None:
        self.state.counts["accepted"] += 1
