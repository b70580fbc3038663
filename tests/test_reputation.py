import pytest
from hypothesis import given
from hypothesis import strategies as st

from sender.config import AdaptiveRate
from sender.reputation import AIMD, Counts, Reputation

S, P = "192.0.2.1", "google"


def fill(rep, now, delivered=0, **bad):
    """Record ``delivered`` deliveries and, per category, that many bounces at ``now``."""
    for _ in range(delivered):
        rep.record(S, P, "delivered", "", now)
    for category, n in bad.items():
        for _ in range(n):
            rep.record(S, P, "bounced", category, now)


def test_counts_by_event_and_category():
    rep = Reputation()
    rep.record(S, P, "delivered", "", 10.0)
    rep.record(S, P, "deferred", "greylisted", 11.0)
    rep.record(S, P, "bounced", "invalid_recipient", 12.0)
    rep.record(S, P, "complaint", "", 13.0)
    assert rep.counts(S, P, 14.0) == Counts(1, 1, 1, 1, {"greylisted": 1, "invalid_recipient": 1})
    assert rep.counts(S, "microsoft", 14.0) == Counts()
    assert rep.counts("192.0.2.2", P, 14.0) == Counts()


def test_unknown_event_is_refused():
    with pytest.raises(ValueError, match="opened"):
        Reputation().record(S, P, "opened", "", 0.0)


def test_window_slides():
    rep = Reputation(window=60.0, slots=6)
    fill(rep, 0.0, delivered=3, blocklisted_ip=1)
    fill(rep, 30.0, delivered=2)
    assert rep.counts(S, P, 59.0).delivered == 5
    late = rep.counts(S, P, 65.0)                  # the first slice has left the window
    assert (late.delivered, late.bounced, late.categories) == (2, 0, {})
    assert rep.counts(S, P, 200.0) == Counts()     # everything left, long after


def test_late_record_inside_window_counts_and_outside_does_not():
    rep = Reputation(window=60.0, slots=6)
    fill(rep, 100.0, delivered=1)
    fill(rep, 70.0, delivered=1)                   # late, but within the window
    fill(rep, 10.0, delivered=1)                   # older than the window
    assert rep.counts(S, P, 100.0).delivered == 2


def test_health_without_evidence_is_one():
    rep = Reputation(min_samples=20)
    fill(rep, 0.0, delivered=5, blocklisted_ip=10)
    assert rep.health(S, P, 1.0) == 1.0
    assert rep.health("nobody", P, 1.0) == 1.0


def test_health_with_evidence():
    rep = Reputation(min_samples=20)
    fill(rep, 0.0, delivered=100)
    assert rep.health(S, P, 1.0) == 1.0
    fill(rep, 0.0, blocklisted_ip=5)
    assert 0.0 <= rep.health(S, P, 1.0) < 0.9


def test_reputation_replies_weigh_more_than_list_problems():
    def score(category):
        rep = Reputation(min_samples=20)
        fill(rep, 0.0, delivered=90, **{category: 10})
        return rep.health(S, P, 1.0)

    assert score("blocklisted_ip") < score("invalid_recipient")
    assert score("spam_content") < score("greylisted")
    assert score("rate_limited") < score("mailbox_full")
    assert score("invalid_recipient") > 0.9


def test_complaints_at_public_threshold_cost_visibly():
    rep = Reputation(min_samples=20)
    fill(rep, 0.0, delivered=1000)
    for _ in range(3):                             # 0.3%
        rep.record(S, P, "complaint", "", 0.0)
    assert rep.health(S, P, 1.0) <= 0.8
    for _ in range(7):                             # 1%
        rep.record(S, P, "complaint", "", 0.0)
    assert rep.health(S, P, 1.0) < 0.2


def test_snapshot_restore_round_trip():
    rep = Reputation(window=60.0, slots=6)
    fill(rep, 0.0, delivered=3, blocklisted_ip=1)
    rep.record(S, P, "deferred", "greylisted", 20.0)
    rep.record(S, P, "complaint", "", 20.0)
    rep.record("192.0.2.2", "yahoo", "delivered", "", 40.0)
    back = Reputation.restore(rep.snapshot(), window=60.0, slots=6)
    for source, provider in ((S, P), ("192.0.2.2", "yahoo")):
        assert back.counts(source, provider, 50.0) == rep.counts(source, provider, 50.0)
    assert back.counts(S, P, 65.0).delivered == 0  # old slices still leave on time
    assert back.counts(S, P, 65.0).deferred == 1


def test_restore_empty():
    assert Reputation.restore(Reputation().snapshot()).counts(S, P, 0.0) == Counts()


def make_aimd(now=0.0, **kw):
    args = dict(min_rate=1.0, max_rate=10.0, start=8.0, increase=1.0, decrease=0.5, step=60.0)
    args.update(kw)
    return AIMD(now=now, **args)


def test_aimd_cuts_once_per_step():
    a = make_aimd()
    assert a.on_reply(True, 10.0) and a.rate == 4.0
    assert not a.on_reply(True, 20.0) and a.rate == 4.0    # in-flight replies: same news
    assert not a.on_reply(True, 69.0)
    assert a.on_reply(True, 70.0) and a.rate == 2.0


def test_aimd_grows_after_clean_step_only():
    a = make_aimd(start=4.0)
    assert a.next_at == 60.0
    a.on_reply(False, 30.0)
    assert not a.tick(59.0)
    assert a.tick(60.0) and a.rate == 5.0
    assert a.next_at == 120.0
    assert not a.tick(120.0) and a.rate == 5.0             # a step without replies: no growth
    a.on_reply(False, 130.0)
    a.on_reply(True, 140.0)                                # cut
    a.on_reply(False, 150.0)
    a.on_reply(True, 160.0)                                # in flight: no cut, no growth
    assert not a.tick(a.next_at) and a.rate == 2.5


def test_aimd_bounds():
    a = make_aimd(start=1.5)
    a.on_reply(True, 0.0)
    assert a.rate == 1.0
    assert not a.on_reply(True, 100.0)                     # already at min
    b = make_aimd(start=9.5)
    b.on_reply(False, 1.0)
    assert b.tick(60.0) and b.rate == 10.0
    b.on_reply(False, 61.0)
    assert not b.tick(120.0) and b.rate == 10.0
    assert make_aimd(start=50.0).rate == 10.0


def test_aimd_refuses_nonsense():
    with pytest.raises(ValueError):
        make_aimd(min_rate=5.0, max_rate=1.0)
    with pytest.raises(ValueError):
        make_aimd(decrease=1.5)
    with pytest.raises(ValueError):
        make_aimd(step=0.0)


def test_aimd_from_config():
    a = AIMD.from_config(AdaptiveRate(min="60/min", max="10/s", increase="1/s", decrease=0.5, step="30s"), 5.0)
    assert (a.min_rate, a.max_rate, a.rate, a.increase, a.step) == (1.0, 10.0, 1.0, 1.0, 30.0)
    assert a.next_at == 35.0
    assert AIMD.from_config(AdaptiveRate(start="5/s"), 0.0).rate == 5.0


@given(st.lists(st.tuples(st.sampled_from([None, False, True]), st.floats(0.0, 500.0))),
       st.floats(0.01, 50.0), st.floats(0.0, 50.0), st.floats(0.01, 1.0), st.floats(0.0, 100.0))
def test_aimd_rate_stays_within_bounds(events, low, span, decrease, start):
    a = AIMD(low, low + span, start, 1.0, decrease, 30.0, 0.0)
    now = 0.0
    for rate_limited, dt in events:
        now += dt
        if rate_limited is None:
            a.tick(now)
        else:
            a.on_reply(rate_limited, now)
        assert a.min_rate <= a.rate <= a.max_rate
