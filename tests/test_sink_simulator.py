"""The sink's mailbox-provider simulator: per source IP limits, block-listing, greylisting and
unknown users, with the providers' own reply texts.

Driven by the real delivery client over in-memory streams on trio's virtual clock, from
chosen source IPs, so the tests see what a sender sees per IP.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from sender.classify import classify
from sender.cli import main
from sender.config import ConfigError
from sender.model import Reply
from sender.simulator import PROVIDER_REPLIES, SimulateConfig
from sender.sink import Sink, load_config, load_rules
from sender.smtp.client import Timeouts, open_session

BODY = b"Subject: t\r\nMessage-ID: <sim@client.test>\r\n\r\nhello\r\n"

EXPECTED_CATEGORY = {"rate_limit": "rate_limited", "volume": "rate_limited", "blocklist": "blocklisted_ip",
                     "greylist": "greylisted", "unknown_user": "invalid_recipient"}


async def start(nursery, rules: str = "", **simulate) -> Sink:
    sink = Sink(load_rules(rules), simulate=SimulateConfig(**simulate))
    sink.messages = []
    await nursery.start(sink.run_in_memory)
    return sink


async def send(sink: Sink, source: str, rcpts: list[str], sender: str = "a@x.test"):
    """One message in its own session (a 421 closes the session, as providers do)."""
    session = await open_session("mx.test", 25, ehlo="client.test", source=source,
                                 open_stream=sink.open_stream, timeouts=Timeouts())
    try:
        return await session.transaction(sender, rcpts, BODY)
    finally:
        await session.quit()


def expected(provider: str, kind: str, ip: str = "127.0.0.3", rcpt: str = "") -> Reply:
    code, enhanced, text = PROVIDER_REPLIES[provider][kind]
    domain = rcpt.rpartition("@")[2]
    return Reply(code, text.format(ip=ip, rcpt=rcpt, domain=domain, host="sink.localhost"), enhanced)


@pytest.mark.parametrize("provider, kind", [(p, k) for p in PROVIDER_REPLIES for k in PROVIDER_REPLIES[p]])
def test_every_reply_text_is_classified_as_its_kind(provider, kind):
    reply = expected(provider, kind, ip="203.0.113.5", rcpt="someone@example.com")
    got = classify(reply.code, reply.text, reply.enhanced or None)
    assert got.category == EXPECTED_CATEGORY[kind], (provider, kind, got)
    assert got.permanent == (kind in ("blocklist", "unknown_user"))


async def test_rate_limit_is_per_source_ip_and_recovers(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, provider="google", rate_limit="6/min,burst=2")
        first = [await send(sink, "127.0.0.3", ["u@gmail.test"]) for _ in range(3)]
        other = await send(sink, "127.0.0.4", ["u@gmail.test"])
        assert [r.final.code for r in first[:2]] == [250, 250]
        # Gmail answers the recipient, then closes the connection (421).
        assert first[2].rcpts == [expected("google", "rate_limit")]
        assert first[2].rcpts[0].enhanced == "4.7.28" and not first[2].data_started
        assert other.final.code == 250                   # .4 has its own bucket
        await trio.sleep(10)                             # one token back at 6/min
        again = await send(sink, "127.0.0.3", ["u@gmail.test"])
        assert again.final.code == 250
        n.cancel_scope.cancel()
    stats = sink.simulator.statistics()
    assert (stats["127.0.0.3"].accepted, stats["127.0.0.3"].rate_limited) == (3, 1)
    assert (stats["127.0.0.4"].accepted, stats["127.0.0.4"].rate_limited) == (1, 0)
    assert [m["source"] for m in sink.messages] == ["127.0.0.3"] * 2 + ["127.0.0.4", "127.0.0.3"]
    assert sink.stats.deferred == 1


async def test_limited_sources_alone_are_held_to_the_rate(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, provider="google", rate_limit="1/h", limited_sources=["127.0.0.3"])
        held = [await send(sink, "127.0.0.3", ["u@gmail.test"]) for _ in range(2)]
        free = [await send(sink, "127.0.0.4", ["u@gmail.test"]) for _ in range(5)]
        n.cancel_scope.cancel()
    assert held[0].final.code == 250 and held[1].rcpts[0].enhanced == "4.7.28"
    assert [r.final.code for r in free] == [250] * 5


async def test_microsoft_refuses_the_mail_command(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, provider="microsoft", rate_limit="1/h")
        ok = await send(sink, "127.0.0.3", ["u@outlook.test"])
        limited = await send(sink, "127.0.0.3", ["u@outlook.test"])
        n.cancel_scope.cancel()
    assert ok.final.code == 250
    assert limited.mail == expected("microsoft", "rate_limit") and limited.mail.enhanced == "4.7.650"
    assert "[127.0.0.3] has been temporarily rate limited" in limited.mail.text


async def test_daily_limit_defers_with_yahoo_tss04_and_resets_next_day(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, provider="yahoo", daily_limit=2)
        codes = [(await send(sink, "127.0.0.3", ["u@yahoo.test"])).final.code for _ in range(2)]
        over = await send(sink, "127.0.0.3", ["u@yahoo.test"])
        assert over.mail == expected("yahoo", "volume")
        assert over.mail.text.startswith("[TSS04] Messages from 127.0.0.3 temporarily deferred")
        assert (await send(sink, "127.0.0.4", ["u@yahoo.test"])).final.code == 250
        await trio.sleep(86400 - trio.current_time() % 86400)   # to the next day
        codes.append((await send(sink, "127.0.0.3", ["u@yahoo.test"])).final.code)
        n.cancel_scope.cancel()
    assert codes == [250, 250, 250]
    assert sink.simulator.statistics()["127.0.0.3"].volume_limited == 1


async def test_daily_limit_uses_the_rate_text_for_google(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, provider="google", daily_limit=1)
        await send(sink, "127.0.0.3", ["u@gmail.test"])
        over = await send(sink, "127.0.0.3", ["u@gmail.test", "v@gmail.test"])
        n.cancel_scope.cancel()
    assert over.rcpts[0] == expected("google", "rate_limit")
    assert sink.simulator.statistics()["127.0.0.3"].volume_limited == 1   # once per transaction


BOUNCE_RULES = '[[rule]]\nmatch = "bounce*@*"\naction = "reject"\n'


async def test_bounce_share_lists_the_source_until_it_is_forgiven(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, BOUNCE_RULES, provider="microsoft", blocklist_bounce_rate=0.2,
                           blocklist_min=10, blocklist_for="1h")
        # 3 of 10 recipients bounce: 30% > 20%, judged once 10 were seen.
        for i in range(9):
            res = await send(sink, "127.0.0.3", [f"bounce{i}@outlook.test" if i < 3 else f"ok{i}@outlook.test"])
            assert res.mail.code == 250
        assert sink.simulator.statistics()["127.0.0.3"].listings == 0
        await send(sink, "127.0.0.3", ["ok9@outlook.test"])
        t_listed = trio.current_time()
        blocked = await send(sink, "127.0.0.3", ["ok@outlook.test"])
        assert blocked.mail == expected("microsoft", "blocklist")
        assert "(S3150)" in blocked.mail.text and blocked.mail.code == 550
        assert (await send(sink, "127.0.0.4", ["ok@outlook.test"])).final.code == 250
        stats = sink.simulator.statistics()["127.0.0.3"]
        assert stats.listings == 1 and stats.blocklisted_until == t_listed + 3600
        await trio.sleep(stats.blocklisted_until - trio.current_time() - 1)
        assert (await send(sink, "127.0.0.3", ["ok@outlook.test"])).mail.code == 550
        await trio.sleep(1)
        forgiven = await send(sink, "127.0.0.3", ["ok@outlook.test"])
        # Counters start afresh: one more bounce is 1 of 2, not yet judged (min 10).
        bounced = await send(sink, "127.0.0.3", ["bounce@outlook.test"])
        after = await send(sink, "127.0.0.3", ["ok@outlook.test"])
        n.cancel_scope.cancel()
    assert forgiven.final.code == 250 and bounced.rcpts[0].code == 550 and after.final.code == 250
    stats = sink.simulator.statistics()["127.0.0.3"]
    assert (stats.blocklisted, stats.listings, stats.rejected, stats.recipients) == (2, 1, 4, 13)


async def test_unknown_users_count_towards_the_share_and_google_blocks_at_rcpt(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, provider="google", unknown_users="nobody*@*", blocklist_bounce_rate=0.5,
                           blocklist_min=4)
        res = await send(sink, "127.0.0.3", ["nobody1@gmail.test", "ok@gmail.test", "NOBODY2@gmail.test",
                                             "nobody3@gmail.test"])
        blocked = await send(sink, "127.0.0.3", ["ok@gmail.test"])
        n.cancel_scope.cancel()
    unknown = expected("google", "unknown_user")
    assert res.rcpts == [unknown, Reply(250, "Ok", "2.1.5"), unknown, unknown]
    assert res.final.code == 250 and sink.messages[0]["to"] == ["ok@gmail.test"]
    assert blocked.mail.code == 250 and blocked.rcpts == [expected("google", "blocklist")]


async def test_unknown_user_wording_per_provider(autojump_clock):
    async with trio.open_nursery() as n:
        yahoo = await start(n, provider="yahoo", unknown_users="gone@*")
        generic = await start(n, unknown_users="gone@*")
        y = await send(yahoo, "127.0.0.3", ["gone@yahoo.test"])
        g = await send(generic, "127.0.0.3", ["gone@example.test"])
        n.cancel_scope.cancel()
    assert y.rcpts == [Reply(554, "delivery error: dd This user doesn't have a yahoo.com account "
                                  "(gone@yahoo.test) [0] - sink.localhost", "")]
    assert g.rcpts == [Reply(550, "<gone@example.test>: Recipient address rejected: User unknown in virtual "
                                  "mailbox table", "5.1.1")]


async def test_greylisting_defers_the_first_try_and_a_retry_too_soon(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, greylist="5m")
        first = await send(sink, "127.0.0.3", ["u@grey.test"])
        await trio.sleep(60)
        soon = await send(sink, "127.0.0.3", ["u@grey.test"])
        other_ip = await send(sink, "127.0.0.4", ["u@grey.test"])     # a new triplet
        await trio.sleep(240)
        later = await send(sink, "127.0.0.3", ["u@grey.test"])
        again = await send(sink, "127.0.0.3", ["u@grey.test"])        # the triplet stays passed
        n.cancel_scope.cancel()
    grey = Reply(451, "<u@grey.test>: Recipient address rejected: Greylisted, see "
                      "http://postgrey.schweikert.ch/help/grey.test.html", "4.7.1")
    assert first.rcpts == [grey] and soon.rcpts == [grey] and other_ip.rcpts == [grey]
    assert later.final.code == 250 and again.final.code == 250
    stats = sink.simulator.statistics()
    assert (stats["127.0.0.3"].greylisted, stats["127.0.0.3"].accepted, stats["127.0.0.3"].recipients) == (2, 2, 2)


async def test_without_simulate_the_sink_is_unchanged(autojump_clock):
    async with trio.open_nursery() as n:
        sink = Sink(load_rules(BOUNCE_RULES))
        await n.start(sink.run_in_memory)
        res = await send(sink, "127.0.0.3", ["ok@x.test", "bounce@x.test"])
        n.cancel_scope.cancel()
    assert sink.simulator is None and [r.code for r in res.rcpts] == [250, 550]


# ----------------------------------------------------------------------- config

SIMULATE_TOML = """
[[rule]]
match = "bounce*@*"
action = "reject"

[simulate]
provider = "yahoo"
rate_limit = "20/min,burst=5"
daily_limit = 1000
blocklist_bounce_rate = 0.1
blocklist_for = "2h"
greylist = "5m"
unknown_users = "nobody*@*"
"""


def test_simulate_table_is_read_by_the_sink_loader():
    config = load_config(SIMULATE_TOML.encode())
    assert [r.match for r in config.rule] == ["bounce*@*"]
    assert config.simulate == SimulateConfig(provider="yahoo", rate_limit="20/min,burst=5", daily_limit=1000,
                                             blocklist_bounce_rate=0.1, blocklist_for="2h", greylist="5m",
                                             unknown_users="nobody*@*")
    sim = Sink(config.rule, simulate=config.simulate).simulator
    assert (sim.rate.per_second, sim.rate.burst) == (20 / 60, 5)
    assert (sim.blocklist_for, sim.greylist_delay, sim.blocklist_min) == (7200, 300, 50)
    assert load_config(b"").simulate is None and load_rules(SIMULATE_TOML) == config.rule


@pytest.mark.parametrize("table, key", [
    ('rate_limit = "fast"', "simulate.rate_limit: expected a rate"),
    ('rate_limit = 5', "simulate.rate_limit: Expected `str | null`"),
    ('provider = "aol"', "simulate.provider: Invalid enum value 'aol'"),
    ('daily_limit = 0', "simulate.daily_limit: expected a positive count"),
    ('blocklist_bounce_rate = 1.5', "simulate.blocklist_bounce_rate: expected a share"),
    ('blocklist_bounce_rate = nan', "simulate.blocklist_bounce_rate: expected a share"),
    ('blocklist_min = 0', "simulate.blocklist_min: expected a positive count"),
    ('blocklist_for = "soon"', "simulate.blocklist_for: expected seconds or a duration"),
    ('greylist = "-1m"', "simulate.greylist: expected seconds or a duration"),
    ('unknown_users = ""', "simulate.unknown_users: expected a glob"),
    ('rate_limits = "5/s"', "simulate.rate_limits: unknown key"),
])
def test_simulate_errors_name_the_key(table, key):
    with pytest.raises(ConfigError) as e:
        load_config(f"[simulate]\n{table}\n")
    assert str(e.value).startswith(key), str(e.value)


def test_a_simulate_that_is_not_a_table_is_named():
    with pytest.raises(ConfigError, match=r"^simulate: Expected `object"):
        load_config("simulate = 3\n")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.text(alphabet='[]=".,/\n abcdeilmnoprstuvy0123456789_', max_size=200).map(str.encode)))
def test_loader_takes_any_bytes_and_fails_only_with_config_error(data):
    try:
        config = load_config(data)
    except ConfigError:
        return
    assert isinstance(config.rule, list)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["rate_limit", "blocklist_for", "greylist"]),
       st.text(alphabet="0123456789./,=abdhimnrstuw ", max_size=20))
def test_bad_simulate_values_fail_naming_the_key(key, value):
    try:
        load_config(f"[simulate]\n{key} = {value!r}\n".replace("'", '"').replace('\\', ''))
    except ConfigError as e:
        assert str(e).startswith(f"simulate.{key}: ") or str(e).startswith("sink rules: not a TOML")


def test_cli_names_the_simulate_key_and_checks_the_flag(tmp_path, capsys):
    path = tmp_path / "rules.toml"
    path.write_text('[simulate]\nrate_limit = "lots"\n')
    assert main(["sink", "--listen", "127.0.0.1:0", "--rules", str(path), "--simulate", "google"]) == 2
    err = capsys.readouterr().err
    assert "simulate.rate_limit" in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        main(["sink", "--listen", "127.0.0.1:0", "--simulate", "aol"])
    assert e.value.code == 2 and "--simulate" in capsys.readouterr().err
