"""Where deployed operators are recorded: the scheduler's metadata, under ``("tdask", "operators")``.

Any client or worker of the cluster reads it, so operators are found by name without a
separate service.
"""

from __future__ import annotations

from typing import Any

from tdask.errors import OperatorNotFoundError

ROOT = ["tdask", "operators"]
FRONTDOORS = ["tdask", "frontdoors"]  # each front door's addresses and counts, by its id (tdask.frontdoor)
TOKENS = ["tdask", "tokens"]  # each worker's request-stream token, by its address (tdask.comm.protocol)


def operator_key(name: str) -> list[str]:
    return [*ROOT, name]


def token_key(worker: str) -> list[str]:
    return [*TOKENS, worker]


def pick_version(name: str, versions: dict[str, Any] | None, version: int | None, known: list[str]) -> tuple[int, dict]:
    """The record of ``name`` at ``version`` (latest when ``None``), or a clear error."""
    if not versions:
        listing = ", ".join(sorted(known)) or "none"
        raise OperatorNotFoundError(f"no operator named {name!r} is deployed (deployed: {listing})")
    available = sorted(int(v) for v in versions)
    if version is None:
        version = available[-1]
    record = versions.get(str(version))
    if record is None:
        raise OperatorNotFoundError(
            f"operator {name!r} has no version {version!r} (deployed versions: {available})"
        )
    return int(version), record
