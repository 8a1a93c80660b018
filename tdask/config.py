"""tdask's defaults live in ``tdask.yaml`` and are read through ``dask.config``."""

from __future__ import annotations

import os

import dask.config
import yaml

_fn = os.path.join(os.path.dirname(__file__), "tdask.yaml")
with open(_fn) as _f:
    defaults = yaml.safe_load(_f)

dask.config.update_defaults(defaults)


def get(key: str, default: object = dask.config.no_default) -> object:
    """Read ``tdask.<key>`` from Dask's configuration."""
    return dask.config.get(f"tdask.{key}", default=default)


def lookup(*path: str) -> object:
    """``get`` for the request path: a plain walk of Dask's config dict (``dask.config.get`` costs
    microseconds per call), still seeing every ``dask.config.set``; falls back to ``get``."""
    node: object = dask.config.config.get("tdask")
    try:
        for part in path:
            node = node[part]  # type: ignore[index]
    except (KeyError, TypeError):
        return get(".".join(path))
    return node


def seconds(key: str) -> float:
    """Read a duration setting such as ``request.timeout`` in seconds."""
    from dask.utils import parse_timedelta

    return float(parse_timedelta(get(key), default="seconds"))
