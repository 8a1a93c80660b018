"""Deployment files and model repositories: operators described as data, checked field by field.

A deployment file is YAML (or the same as a dict)::

    operators:
      - name: encoder
        repository: triton_core_models     # relative to the file
        replicas: 2
        max_inflight: 4
        parameters: {input_copies: 1}
      - name: encoder_decoder
        implementation: encoder_decoder:EncoderDecoder
        repository: .
    frontdoor:                             # optional: deploy's KServe v2 front door (its options win)
      http-port: 8000
      grpc-port: 8001
      host: 127.0.0.1

Every field of :class:`~tdask.operator.OperatorConfig` may be given; anything else is an error that names the
file, the operator and the field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tdask.errors import ConfigError
from tdask.operator import DEVICES, OperatorConfig

FIELDS = tuple(f.name for f in dataclasses.fields(OperatorConfig))
_COUNTS = ("version", "max_inflight", "instances", "replicas")  # integers >= 1
_SCALARS = (str, int, float, bool)


FRONT_DOOR_FIELDS = ("host", "http-port", "grpc-port")


def _read(source: str | os.PathLike | Mapping[str, Any]) -> tuple[Any, str, Path]:
    """The document, the name its errors give, and the folder its repositories are relative to."""
    if isinstance(source, Mapping):
        return source, "deployment", Path.cwd()
    path = Path(source)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"deployment file {path}: cannot read it: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"deployment file {path}: not valid YAML: {e}") from e
    return document, str(path), path.resolve().parent


def load(source: str | os.PathLike | Mapping[str, Any]) -> list[OperatorConfig]:
    """The operators a deployment file (a path) or its contents (a mapping) list, checked."""
    document, where, base = _read(source)
    return operators_from(document, where=where, base=base)


def front_door(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The file's ``frontdoor`` settings (``host``, ``http-port``, ``grpc-port``), checked; {} when it has none."""
    document, where, _ = _read(source)
    section = document.get("frontdoor") if isinstance(document, Mapping) else None
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: 'frontdoor' must be a mapping of {list(FRONT_DOOR_FIELDS)}")
    unknown = sorted(set(section) - set(FRONT_DOOR_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: frontdoor: unknown field(s) {unknown}; the fields are {list(FRONT_DOOR_FIELDS)}")
    for key in ("http-port", "grpc-port"):
        value = section.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536):
            raise ConfigError(f"{where}: frontdoor: field {key!r} must be a port number (0: any free port), "
                              f"got {value!r}")
    if "host" in section and not (isinstance(section["host"], str) and section["host"]):
        raise ConfigError(f"{where}: frontdoor: field 'host' must be a host name or address, got {section['host']!r}")
    return dict(section)


def operators_from(document: Any, *, where: str, base: Path) -> list[OperatorConfig]:
    if not isinstance(document, Mapping):
        raise ConfigError(f"{where}: expected a mapping with an 'operators' list, got {type(document).__name__}")
    unknown = set(document) - {"operators", "frontdoor"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; a deployment lists 'operators' "
                          "(and may set its 'frontdoor')")
    entries = document.get("operators")
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise ConfigError(f"{where}: 'operators' must be a non-empty list")
    operators = [operator_from(entry, where=f"{where}: operator #{i + 1}", base=base)
                 for i, entry in enumerate(entries)]
    names = [op.name for op in operators]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: operators listed twice: {twice}")
    return operators


def operator_from(entry: Any, *, where: str, base: Path) -> OperatorConfig:
    """One operator's mapping as an :class:`OperatorConfig`; ``repository`` is taken relative to ``base``."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping of fields, got {entry!r}")
    name = entry.get("name")
    if isinstance(name, str) and name:
        where = f"{where.rsplit(': operator', 1)[0]}: operator {name!r}"
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; the fields are {list(FIELDS)}")
    fields: dict[str, Any] = {}
    for key, value in entry.items():
        fields[key] = _checked(key, value, where)
    if "repository" in fields:
        fields["repository"] = str((base / fields["repository"]).resolve())
    try:
        return OperatorConfig(**fields)
    except TypeError as e:  # a required field missing
        raise ConfigError(f"{where}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def _checked(key: str, value: Any, where: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: field {key!r} must be {expected}, got {value!r}")

    if key in ("name", "implementation", "repository"):
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if key in _COUNTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("an integer >= 1")
        return value
    if key == "max_queue_size":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad("an integer >= 0 (or null for the default)")
        return value
    if key == "device":
        if not isinstance(value, str) or value.upper() not in DEVICES:
            raise bad(" or ".join(DEVICES))
        return value.upper()
    if key == "idempotent":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "parameters":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, _SCALARS)
                                                     for k, v in value.items()):
            raise bad("a mapping of names to numbers, strings or booleans")
        return dict(value)
    if key == "resources":
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in value.items()):
            raise bad("a mapping of resource names to positive numbers")
        return dict(value)
    raise AssertionError(key)  # every field of OperatorConfig is checked above


def repository_models(repository: str | os.PathLike) -> list[str]:
    """The models of a Triton model repository, as ``tritonserver --model-repository`` sees them: the folders
    that hold a ``config.pbtxt``."""
    path = Path(repository)
    if not path.is_dir():
        raise ConfigError(f"model repository {path} is not a folder")
    models = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())
    if not models:
        raise ConfigError(f"model repository {path} holds no model (no <name>/config.pbtxt)")
    return models


def repository_operators(repository: str | os.PathLike) -> list[OperatorConfig]:
    """One Triton operator per model of ``repository``, named after its folder, with the defaults."""
    return [OperatorConfig(name, "TritonCoreOperator", repository=str(repository))
            for name in repository_models(repository)]


def with_settings(operators: list[OperatorConfig], settings: Sequence[str], *, where: str = "--set",
                  base: Path | None = None) -> list[OperatorConfig]:
    """``operators`` with ``NAME.FIELD=VALUE`` settings applied (``NAME.parameters.KEY=VALUE`` for one parameter);
    values are read as YAML scalars (``2``, ``GPU``, ``true``)."""
    by_name = {op.name: op for op in operators}
    changes: dict[str, dict[str, Any]] = {}
    for setting in settings:
        target, sep, raw = setting.partition("=")
        parts = target.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"{where} {setting!r}: expected NAME.FIELD=VALUE or NAME.parameters.KEY=VALUE")
        name, key = parts[0], parts[1]
        if name not in by_name:
            raise ConfigError(f"{where} {setting!r}: no operator {name!r} (operators: {sorted(by_name)})")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} {setting!r}: {e}") from e
        fields = changes.setdefault(name, {})
        if key in ("parameters", "resources") and len(parts) == 3:
            fields.setdefault(key, dict(getattr(by_name[name], key)))[parts[2]] = value
        elif len(parts) == 2:
            fields[key] = value
        else:
            raise ConfigError(f"{where} {setting!r}: only parameters and resources take a third part")
    out = []
    for op in operators:
        if op.name not in changes:
            out.append(op)
            continue
        entry = {f: getattr(op, f) for f in FIELDS if getattr(op, f) is not None}
        entry["parameters"], entry["resources"] = dict(op.parameters), dict(op.resources)
        entry.update(changes[op.name])
        if not isinstance(entry["implementation"], str):
            del entry["implementation"]
            out.append(dataclasses.replace(operator_from(entry, where=f"{where}: operator {op.name!r}",
                                                         base=base or Path.cwd()), implementation=op.implementation))
        else:
            out.append(operator_from(entry, where=f"{where}: operator {op.name!r}", base=base or Path.cwd()))
    return out
