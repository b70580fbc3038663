"""``sender simulate``: a warmup plan against simulated providers on a virtual clock."""

from __future__ import annotations

import pytest

from sender.cli import main
from sender.config import ConfigError
from sender.simulate import load_simulation

PLAN = """
[source.old]
address = "127.0.0.2"
[source.new]
address = "127.0.0.3"
warmup = "w"
warmup_start = "2020-01-01"        # replaced: the simulation starts every plan on day 1
[warmup.w]
days = [20, 40]
[pool.shared]
sources = { old = 1, new = 9 }
[egress]
default_pool = "shared"
[simulation]
volume = 200
batches = 4
[simulation.provider.google]
share = 0.75
[simulation.provider.yahoo]
share = 0.25
daily_limit = 10
"""


def test_a_three_day_run_prints_each_day_per_source(tmp_path, capsys):
    path = tmp_path / "sim.toml"
    path.write_text(PLAN)
    assert main(["simulate", "--days", "3", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {(int(cols[0]), cols[1]): [int(c.replace(",", "")) if c != "-" else None for c in cols[2:]]
            for line in out.splitlines() if (cols := line.split()) and cols[0].isdigit()}
    # day -> (google, yahoo, deferred, cap) of the new source: its cap holds each day, then none
    new = {day: rows[(day, "127.0.0.3")] for day in (1, 2, 3)}
    # The cap counts attempts: a message Yahoo deferred counted too.
    assert [sum(new[d][:3]) for d in (1, 2)] == [20, 40]
    assert [new[d][3] for d in (1, 2, 3)] == [20, 40, None]
    assert sum(new[3][:2]) > 40
    # Yahoo takes 10 a day from each IP and defers the rest: some mail was deferred.
    assert all(rows[(d, ip)][1] <= 10 for d in (1, 2, 3) for ip in ("127.0.0.2", "127.0.0.3"))
    assert sum(rows[(d, ip)][2] for d in (1, 2, 3) for ip in ("127.0.0.2", "127.0.0.3")) > 0
    assert "offered 600" in out and "simulated 3 days in" in out


@pytest.mark.parametrize("change, message", [
    ("[simulation.provider.hotmail]\nshare = 1", "simulation.provider.hotmail: unknown provider"),
    ("[simulation.provider.google]\nshare = 0", "simulation.provider.google.share: must be above 0"),
    ("[simulation.provider.google]\nratelimit = \"1/s\"", "simulation.provider.google.ratelimit: unknown key"),
    ("[simulation.provider.google]\nrate_limit = \"fast\"", "simulation.provider.google"),
    ("[simulation]\nvolume = 0\n[simulation.provider.google]", "simulation.volume"),
    ("[simulation]", "simulation.provider: name at least one provider"),
])
def test_bad_simulation_tables_name_the_key(tmp_path, change, message):
    path = tmp_path / "sim.toml"
    path.write_text(change)
    with pytest.raises(ConfigError) as e:
        load_simulation(path)
    assert str(e.value).startswith(message), str(e.value)
