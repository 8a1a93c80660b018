"""tdask's settings: defaults in ``tdask.yaml``, described in ``tdask-schema.yaml``, read through ``dask.config``.

There is one way to read a setting: :func:`get` (or :func:`seconds`) at the point of use. Nothing caches a
setting, so a ``dask.config.set`` made at any time is seen by the next read, in that process. Settings that
shape a worker (its Triton servers, its listeners) are read when that part starts; set them before the
worker starts (``DASK_TDASK__...`` environment variables, a config file, or deploy's worker plugin).
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

_HERE = os.path.dirname(__file__)
DEFAULTS_FILE = os.path.join(_HERE, "tdask.yaml")
SCHEMA_FILE = os.path.join(_HERE, "tdask-schema.yaml")

with open(DEFAULTS_FILE) as _f:
    defaults = yaml.safe_load(_f)

dask.config.update_defaults(defaults)

_paths: dict[str, tuple[str, ...]] = {}
_durations: dict[object, float] = {}  # a duration's value -> seconds (parsed once per distinct value)


def get(key: str) -> Any:
    """The setting ``tdask.<key>`` as it is now.

    A plain walk of Dask's config dict, cheap enough for the request path; a key spelt another way
    (``request_stream`` for ``request-stream``) is looked up by ``dask.config.get``, which knows both.
    """
    path = _paths.get(key)
    if path is None:
        path = _paths[key] = tuple(key.split("."))
    node: Any = dask.config.config.get("tdask")
    try:
        for part in path:
            node = node[part]
    except (KeyError, TypeError):
        return dask.config.get(f"tdask.{key}")
    return node


def seconds(key: str) -> float:
    """A duration setting such as ``request.timeout``, in seconds."""
    value = get(key)
    try:
        return _durations[value]
    except (KeyError, TypeError):  # a value not parsed yet (or unhashable)
        parsed = float(parse_timedelta(value, default="seconds"))
        if len(_durations) < 1024:
            try:
                _durations[value] = parsed
            except TypeError:
                pass
        return parsed
