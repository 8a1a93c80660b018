"""What the command lines share: option types (every value checked by argparse, with a one-line error), the
scheduler options, and reaching the scheduler."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import dask.config
from distributed import Client

from tdask.compat import TimeoutErrors


def at_least(cast: type, minimum: float, what: str, strictly: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``cast(value) >= minimum`` (``>`` when ``strictly``), else an error naming ``what``."""

    def parse(value: str) -> Any:
        try:
            number = cast(value)
        except ValueError:
            number = None
        if number is None or number < minimum or (strictly and number == minimum) or number != number:  # NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number

    parse.__name__ = what
    return parse


positive_int = at_least(int, 1, "a positive integer")
non_negative_float = at_least(float, 0, "a number >= 0")
positive_float = at_least(float, 0, "a number > 0", strictly=True)


def parameter(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, the value an int or float where it reads as one, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def device(value: str) -> str:
    v = value.upper()
    if v not in ("CPU", "GPU"):
        raise argparse.ArgumentTypeError(f"device must be CPU or GPU, got {value!r}")
    return v


def check_protocol(protocol: str) -> str | None:
    """A clear word instead of a failed cluster start: what the protocol needs and how to give it."""
    if protocol == "tls" and not dask.config.get("distributed.comm.tls.ca-file", None):
        return ("--protocol tls needs certificates: set distributed.comm.tls.ca-file and "
                "distributed.comm.tls.{scheduler,worker,client}.{cert,key} in Dask's config, e.g. "
                "DASK_DISTRIBUTED__COMM__TLS__CA_FILE=ca.pem DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT=node.pem ... "
                "(see the README)")
    if protocol == "ucx":
        try:
            import distributed_ucxx  # noqa: F401
        except ImportError:
            return ("--protocol ucx needs tdask's UCX extra, which is not installed: pip install 'tdask[ucx-cu12]' "
                    "(CUDA 12) or 'tdask[ucx-cu13]' (CUDA 13)")
    return None


def add_scheduler_options(p: argparse.ArgumentParser) -> None:
    """``--scheduler-address`` (default: the embedded deploy's) and ``--connect-timeout``."""
    p.add_argument("--scheduler-address", default=None,
                   help="scheduler to use (default: the embedded deploy's announced address, else "
                        "tcp://127.0.0.1:8786)")
    p.add_argument("--connect-timeout", type=positive_float, default=5.0,
                   help="seconds to reach the scheduler before giving up")


async def reach_scheduler(address: str, timeout: float, **kwargs: Any) -> Client | None:
    """An async client of the scheduler at ``address``; None once it said on stderr why there is none."""
    try:
        return await Client(address, asynchronous=True, timeout=timeout, **kwargs)
    except (OSError, *TimeoutErrors) as e:
        print(f"Error: cannot reach the scheduler at {address} within {timeout:g} s: {e}", file=sys.stderr,
              flush=True)
        return None
