"""Which replica gets the next request: pure logic, unit-tested on its own."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence


def choose_replica(
    replicas: Sequence[str],
    outstanding: Mapping[str, int],
    counter: int,
    exclude: Collection[str] = (),
) -> str | None:
    """The replica with the fewest requests outstanding from this caller.

    Ties rotate with ``counter`` so equal replicas share the load evenly; replicas in
    ``exclude`` (already tried, or known to be down) are skipped. ``None`` when none is left.
    """
    candidates = [r for r in replicas if r not in exclude]
    if not candidates:
        return None
    n = len(candidates)
    start = counter % n
    best = min(range(n), key=lambda i: (outstanding.get(candidates[(start + i) % n], 0), i))
    return candidates[(start + best) % n]
