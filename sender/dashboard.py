"""The operators' dashboard at /dashboard (placeholder until built)."""

from __future__ import annotations


def routes(engine, admin_endpoint) -> list:
    return []
