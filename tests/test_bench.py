"""``tokensvc bench`` runs and reports each figure against its baseline. The
figures themselves are not asserted: timing belongs to the benchmark, not to
the tests."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tokensvc.bench.measures import Figure, Scale, broker_client, cold_fill, hot_path, table
from tokensvc.cli import main


def test_a_figure_is_met_by_its_ratio_in_the_direction_of_its_goal() -> None:
    faster = Figure("calls", 950, 1000, "no-op", 0.9, at_least=True)
    assert faster.ratio == 0.95 and faster.met
    assert not replace(faster, value=850).met
    slower = Figure("p99", 1.4, 1.0, "no-op", 1.5)
    assert slower.met and not replace(slower, value=1.6).met
    assert Figure("trips", 0, 120, "all calls", 0.0).met
    assert not Figure("trips", 1, 120, "all calls", 0.0).met
    # Measured in rounds: the median of the rounds' ratios decides, not value ÷ baseline.
    paired = replace(faster, value=850, paired=0.93)
    assert paired.ratio == 0.93 and paired.met
    assert not replace(faster, paired=0.85).met


async def test_the_hot_path_runs_as_a_broker_with_a_key_in_rounds_with_the_no_op_server() -> None:
    rate, p99, cpu = await hot_path(Scale.quick())
    for figure in (rate, p99, cpu):
        assert figure.value > 0 and figure.baseline > 0 and figure.paired is not None
    assert rate.unit == "calls/s" and p99.unit == "ms" and cpu.unit == "µs CPU"


def test_the_table_shows_value_baseline_ratio_and_verdict() -> None:
    text = table([Figure("GetToken", 950, 1000, "no-op server", 0.9, True, "calls/s")])
    header, row = text.splitlines()
    assert header.split() == ["measure", "tokensvc", "baseline", "ratio", "goal"]
    assert "950.00 calls/s" in row and "1,000.00 (no-op server)" in row
    assert "0.95" in row and "≥ 0.9" in row and row.endswith("met")


async def test_the_broker_client_measure_runs_against_a_real_service() -> None:
    (figure,) = await broker_client(replace(Scale.quick(), brokers=2, broker_seconds=1.0))
    assert figure.baseline >= 2  # calls were made, each through a real TokenClient
    assert 0 <= figure.value <= figure.baseline


async def test_the_cold_fill_measure_fills_every_server_and_times_a_broker_meanwhile() -> None:
    filled, waiting = await cold_fill(Scale.quick())
    assert filled.value > 0 and filled.baseline > 0  # every server got its first token
    assert waiting.baseline > 0  # the bare POSTs it is measured against were timed


def test_a_small_ratio_and_its_goal_keep_their_significant_digits() -> None:
    text = table([Figure("RegisterServer", 354, 4751, "no-op server", 500 / 7230, True)])
    row = text.splitlines()[1]
    assert "0.0745" in row and "≥ 0.0692" in row and row.endswith("met")


def test_bench_refuses_a_token_delay_out_of_range_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--token-delay", "-1", "cold-fill"]) == 2
    assert "--token-delay must be between 0 and 60 seconds" in capsys.readouterr().out
