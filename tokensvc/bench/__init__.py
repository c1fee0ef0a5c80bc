"""``tokensvc bench``: how fast tokensvc is on this machine, each figure beside
a baseline measured in the same run (a bare grpc.aio server, a bare broadcast,
a bare HTTP client), so that a shared, noisy machine still gives ratios that
hold. Everything runs on loopback: tokensvc on SQLite in a temporary
directory, the demo authorization server and the load in processes of their own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace

from tokensvc.bench.measures import MEASURES, Figure, Scale, table

__all__ = ["MEASURES", "run"]


async def run(
    names: Sequence[str],
    quick: bool = False,
    database_url: str = "",
    token_delay: float | None = None,
) -> list[Figure]:
    """Runs the named measures (all if none) and prints the table; returns the figures."""
    scale = Scale.quick(database_url) if quick else Scale(database_url=database_url)
    if token_delay is not None:
        scale = replace(scale, fill_delay=token_delay)
    figures: list[Figure] = []
    for name in names or list(MEASURES):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        figures.extend(await MEASURES[name](scale))
    print(table(figures))
    return figures
