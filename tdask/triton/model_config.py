"""Read a Triton model's ``config.pbtxt`` and derive the JSON config tdask loads it with.

Triton's repository API (``load_model(name, config=...)``) takes the *whole* model config as
JSON, so the operator's instance group and parameters are applied by merging them over the
repository's own config rather than by editing files on disk.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tdask.errors import ConfigError

logger = logging.getLogger(__name__)

_KINDS = {"CPU": "KIND_CPU", "GPU": "KIND_GPU"}


def _model_dir(repository: str | Path, name: str) -> Path:
    path = Path(repository) / name
    if not path.is_dir():
        raise ConfigError(f"model {name!r} not found: no directory {path}")
    return path


def read_model_config(repository: str | Path, name: str) -> dict[str, Any]:
    """Parse ``<repository>/<name>/config.pbtxt`` into a dict with proto field names."""
    path = _model_dir(repository, name) / "config.pbtxt"
    if not path.is_file():
        raise ConfigError(f"model {name!r} has no config file: {path} does not exist")
    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), message)
    except text_format.ParseError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def model_versions(repository: str | Path, name: str) -> list[int]:
    """Numeric version directories of a model, ascending (Triton's notion of versions)."""
    path = _model_dir(repository, name)
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def merge_model_config(
    base: dict[str, Any],
    *,
    name: str,
    instance_count: int | None = None,
    device: str | None = None,
    gpus: list[int] | None = None,
    parameters: dict[str, object] | None = None,
) -> dict[str, Any]:
    """Return a copy of ``base`` with tdask's deployment choices applied, ready for ``load_model``.

    Giving ``instance_count`` or ``device`` replaces every instance group with a single one, so
    the operator's settings are exactly what Triton runs (unset parts default to 1 and CPU).
    """
    if not name:
        raise ConfigError("model name must not be empty")
    if instance_count is not None and (
        isinstance(instance_count, bool) or not isinstance(instance_count, int) or instance_count < 1
    ):
        raise ConfigError(f"instance_count must be an integer >= 1, got {instance_count!r}")
    kind = None
    if device is not None:
        kind = _KINDS.get(str(device).upper())
        if kind is None:
            raise ConfigError(f"device must be 'CPU' or 'GPU', got {device!r}")
    if gpus is not None:
        if kind != "KIND_GPU":
            raise ConfigError("gpus may only be given with device='GPU'")
        if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
            raise ConfigError(f"gpus must be non-negative integers, got {gpus!r}")

    config = copy.deepcopy(base)
    config["name"] = name
    if instance_count is not None or kind is not None:
        group: dict[str, Any] = {
            "count": instance_count if instance_count is not None else 1,
            "kind": kind or "KIND_CPU",
        }
        if gpus is not None:
            group["gpus"] = list(gpus)
        config["instance_group"] = [group]
    if parameters:
        merged = dict(config.get("parameters") or {})
        for key, value in parameters.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"parameter names must be non-empty strings, got {key!r}")
            merged[key] = {"string_value": str(value)}
        config["parameters"] = merged
    logger.debug("merged config for %s: %s", name, config)
    return config
