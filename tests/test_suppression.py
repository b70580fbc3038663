"""Suppression lists: per customer, journaled, expiring by category, shared by shards."""

from __future__ import annotations

import math

from sender.suppression import SuppressionList


def test_a_bounce_suppresses_only_for_its_own_customer(tmp_path):
    sl = SuppressionList(tmp_path / "s.log")
    sl.add("acme", "Gone@Example.COM", "invalid_recipient", 100.0, source="M1", detail="550 5.1.1 no such user")
    e = sl.check("acme", "gone@example.com", 200.0)
    assert e is not None and (e.reason, e.source, e.expires_at) == ("invalid_recipient", "M1", math.inf)
    assert sl.check("other", "gone@example.com", 200.0) is None


def test_entries_expire_by_category_and_survive_a_restart(tmp_path):
    path = tmp_path / "s.log"
    sl = SuppressionList(path, ttl={"bad_domain": 3600.0})
    sl.add("acme", "a@nxdomain.test", "bad_domain", 0.0)
    sl.add("acme", "b@y.test", "complaint", 0.0)
    sl.add("acme", "c@y.test", "invalid_recipient", 0.0)
    assert sl.remove("acme", "c@y.test", 10.0) and not sl.remove("acme", "c@y.test", 10.0)
    sl.close()
    again = SuppressionList(path, ttl={"bad_domain": 3600.0})
    assert again.check("acme", "a@nxdomain.test", 3599.0) is not None
    assert again.check("acme", "a@nxdomain.test", 3600.0) is None          # expired
    assert again.check("acme", "b@y.test", 1e12) is not None                # complaints: for good
    assert again.check("acme", "c@y.test", 20.0) is None                    # removed by hand
    assert [e.address for e in again.entries(100.0, "acme")] == ["a@nxdomain.test", "b@y.test"]


def test_a_torn_tail_is_dropped_and_the_rest_kept(tmp_path):
    path = tmp_path / "s.log"
    sl = SuppressionList(path)
    sl.add("acme", "a@y.test", "complaint", 0.0)
    sl.add("acme", "b@y.test", "complaint", 0.0)
    sl.close()
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    again = SuppressionList(path)
    assert [e.address for e in again.entries(1.0)] == ["a@y.test"]
    again.add("acme", "c@y.test", "complaint", 2.0)                          # appends after the good part
    assert [e.address for e in SuppressionList(path).entries(3.0)] == ["a@y.test", "c@y.test"]


def test_shards_see_each_others_changes(tmp_path):
    path = tmp_path / "s.log"
    one, two = SuppressionList(path, shared=True), SuppressionList(path, shared=True)
    one.add("acme", "a@y.test", "complaint", 0.0)
    assert two.check("acme", "a@y.test", 1.0) is None          # not read yet
    two.refresh()
    assert two.check("acme", "a@y.test", 1.0) is not None
    two.remove("acme", "a@y.test", 2.0)
    one.refresh()
    assert one.check("acme", "a@y.test", 3.0) is None


def test_a_mostly_dead_file_is_rewritten_at_start(tmp_path):
    path = tmp_path / "s.log"
    sl = SuppressionList(path)
    for i in range(300):
        sl.add("acme", f"u{i}@y.test", "complaint", 0.0)
        sl.remove("acme", f"u{i}@y.test", 0.0)
    sl.add("acme", "kept@y.test", "complaint", 0.0)
    sl.close()
    size = path.stat().st_size
    again = SuppressionList(path)
    assert path.stat().st_size < size / 100
    assert [e.address for e in again.entries(1.0)] == ["kept@y.test"]
