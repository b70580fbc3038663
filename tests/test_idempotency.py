"""Idempotency keys: answers kept 24 hours per (customer, key), durable across a restart."""

from __future__ import annotations

import pytest

from sender.idempotency import TTL, IdempotencyStore, KeyInFlight, KeyInvalid, KeyReused, digest


async def test_an_answer_is_kept_for_its_ttl_per_customer(tmp_path):
    store = IdempotencyStore(tmp_path / "idem.log")
    d = digest(b"/emails", b"{}")
    assert store.begin("acme", "k", d, 0.0) is None
    with pytest.raises(KeyInFlight):
        store.begin("acme", "k", d, 1.0)
    assert store.begin("other", "k", d, 1.0) is None        # another customer's key
    await store.finish("acme", "k", d, 200, '{"id":"A"}', 2.0)
    assert store.begin("acme", "k", d, 3.0) == (200, '{"id":"A"}')
    with pytest.raises(KeyReused):
        store.begin("acme", "k", digest(b"/emails", b"{1}"), 3.0)
    assert store.begin("acme", "k", digest(b"/emails", b"{1}"), 2.0 + TTL) is None   # expired: free again
    with pytest.raises(KeyInvalid):
        store.begin("acme", "", d, 3.0)


async def test_a_restart_keeps_the_answers_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "idem.log"
    store = IdempotencyStore(path)
    for i in range(3):
        store.begin("acme", f"k{i}", "d", 0.0)
        await store.finish("acme", f"k{i}", "d", 200, f'{{"id":"{i}"}}', 0.0)
    store.close()
    path.write_bytes(path.read_bytes() + b'["acme","k9","d",200,"{\\"id')     # a crash mid-write
    again = IdempotencyStore(path)
    assert [again.begin("acme", f"k{i}", "d", 1.0) for i in range(3)] == [(200, f'{{"id":"{i}"}}') for i in range(3)]
    assert again.begin("acme", "k9", "d", 1.0) is None
    await again.finish("acme", "k9", "d", 200, "{}", 1.0)
    again.close()
    assert IdempotencyStore(path).begin("acme", "k9", "d", 2.0) == (200, "{}")


async def test_the_log_is_rewritten_without_expired_answers(tmp_path):
    path = tmp_path / "idem.log"
    store = IdempotencyStore(path, ttl=10.0)
    for i in range(1500):
        store.begin("c", f"k{i}", "d", float(i))
        await store.finish("c", f"k{i}", "d", 200, "{}", float(i))
    assert len(path.read_bytes().splitlines()) < 1100           # rewritten along the way
    store.close()
    kept = IdempotencyStore(path, ttl=10.0)
    assert kept.begin("c", "k1499", "d", 1500.0) == (200, "{}")
    assert kept.begin("c", "k0", "d", 1500.0) is None
