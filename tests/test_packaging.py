"""environment.yml cannot be exercised here (no conda): keep its pins equal to pyproject.toml's."""

from __future__ import annotations

import tomllib

import yaml
from conftest import ROOT


def test_environment_yml_pins_the_same_versions_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "python=3.11" in env["dependencies"]
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(project)


def test_tdask_yaml_defaults_are_loaded_into_dask_config():
    import dask.config

    import tdask  # noqa: F401

    assert dask.config.get("tdask.replica.max-queue-size") >= 1200  # 8 clients x 150 requests never rejected
    assert dask.config.get("tdask.triton.server-path") is None


def test_the_code_is_ruff_clean():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
