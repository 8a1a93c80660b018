"""tdask's settings: tdask.yaml is described by tdask-schema.yaml, and every setting is read one way, where used."""

from __future__ import annotations

import re
from pathlib import Path

import dask.config
import jsonschema
import pytest
import yaml

from tdask import config

PACKAGE = Path(config.__file__).resolve().parent


def _leaves(node: dict, schema: dict, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict | None]]:
    """Every setting of ``node`` with its schema entry (None where the schema lacks it)."""
    out = []
    for key, value in node.items():
        entry = (schema.get("properties") or {}).get(key)
        if isinstance(value, dict) and entry is not None and "properties" in entry:
            out += _leaves(value, entry, (*path, key))
        else:
            out.append(((*path, key), entry))
    return out


def test_the_defaults_validate_against_the_schema_and_every_setting_is_described() -> None:
    schema = yaml.safe_load(Path(config.SCHEMA_FILE).read_text())
    defaults = yaml.safe_load(Path(config.DEFAULTS_FILE).read_text())
    jsonschema.validate(defaults, schema)
    leaves = _leaves(defaults, schema)
    assert len(leaves) > 40
    missing = [".".join(path) for path, entry in leaves if entry is None or not entry.get("description")]
    assert missing == [], f"settings without a description in tdask-schema.yaml: {missing}"
    described = _leaves(yaml.safe_load(yaml.safe_dump(_defaults_of(schema))), schema)
    assert {p for p, _ in described} == {p for p, _ in leaves}, "the schema names settings tdask.yaml lacks"


def _defaults_of(schema: dict) -> dict:
    """A dict with the schema's shape (its leaves set to None)."""
    return {key: _defaults_of(entry) if "properties" in entry else None
            for key, entry in (schema.get("properties") or {}).items()}


def test_a_wrong_value_is_refused_by_the_schema() -> None:
    schema = yaml.safe_load(Path(config.SCHEMA_FILE).read_text())
    with pytest.raises(jsonschema.ValidationError, match="'yes' is not of type 'boolean'"):
        jsonschema.validate({"tdask": {"lanes": {"enabled": "yes"}}}, schema)
    with pytest.raises(jsonschema.ValidationError, match="'sockets' is not one of"):
        jsonschema.validate({"tdask": {"transfer": {"request-stream": "sockets"}}}, schema)


def test_a_setting_changed_at_any_time_is_seen_at_its_next_read() -> None:
    assert config.seconds("request.timeout") == 120
    with dask.config.set({"tdask.request.timeout": "5s"}):
        assert config.seconds("request.timeout") == 5
    with dask.config.set({"tdask.transfer.request_stream": "dask"}):  # either spelling
        assert config.get("transfer.request-stream") == "dask"
    assert config.get("transfer.request-stream") == "socket"


def test_tdask_reads_its_settings_only_through_tdask_config() -> None:
    """One way to read a setting: no module asks dask.config for a tdask key itself, or keeps a setting in a
    module-level variable."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name == "config.py":
            continue
        for match in re.finditer(r"dask\.config\.get\(\s*f?[\"']tdask|^_[a-z_]+\s*(?::[^=]+)?=\s*(?:int|float)\("
                                 r"config\.", text, re.M):
            offenders.append(f"{path.relative_to(PACKAGE)}: {match.group(0)}")
    assert offenders == []
