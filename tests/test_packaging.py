"""The package as pip builds it: its dependencies, its packages, its settings, its style."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys

import yaml
from conftest import ROOT

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_pins_the_same_versions_as_pyproject():
    """environment.yml cannot be exercised here (no conda): its pins are pyproject.toml's (markers aside)."""
    declared = sorted(d for d in PROJECT["project"]["dependencies"] if ";" not in d)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip if not p.startswith("-e")) == declared


def test_every_package_under_tdask_is_listed_for_the_wheel():
    listed = set(PROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tdask").rglob("__init__.py")}
    assert on_disk | {"tdask.hello_world"} == listed
    assert PROJECT["tool"]["setuptools"]["package-dir"] == {"tdask.hello_world": "operators"}


def _module_owners() -> dict[str, list[str]]:
    """Top-level module -> the distributions that install it, from their RECORD files (Python 3.10's
    ``packages_distributions`` reads only ``top_level.txt``, which NumPy's wheels do not have)."""
    owners: dict[str, list[str]] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            top = file.parts[0]
            if top.endswith(".py"):
                top = top[:-3]
            elif "." in top:  # name.dist-info, name.libs, name.pth, ...
                continue
            owners.setdefault(top, [])
            if dist.metadata["Name"] not in owners[top]:
                owners[top].append(dist.metadata["Name"])
    return owners


def _imported_distributions() -> dict[str, str]:
    """Third-party top-level modules that tdask's code imports (anywhere), each with the distribution giving it."""
    stdlib = set(sys.stdlib_module_names)
    owners = _module_owners()
    found: dict[str, str] = {}
    for path in (ROOT / "tdask").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "tdask" or top in found:
                    continue
                found[top] = owners.get(top, ["?"])[0]
    return found


def test_every_runtime_import_is_a_declared_dependency():
    """What tdask imports at run time is installed by ``pip install tdask``, not by luck or by the test extra.
    Optional imports (CuPy for GPU operators, distributed-ucxx from the UCX extras, the Python-3.10 backport)
    are the declared exceptions."""
    declared = {_name(d) for d in PROJECT["project"]["dependencies"]}
    optional_dependencies = PROJECT["project"]["optional-dependencies"]
    extras = {_name(d) for group in ("ucx-cu12", "ucx-cu13") for d in optional_dependencies[group]}
    optional = {"cupy", "distributed_ucxx", "async_timeout", "triton_python_backend_utils"}
    missing = {}
    for module, distribution in _imported_distributions().items():
        if module in optional:
            continue
        if _name(distribution) not in declared | extras:
            missing[module] = distribution
    assert missing == {}


def _name(requirement: str) -> str:
    for stop in "[<>=!~; ":
        requirement = requirement.split(stop)[0]
    return requirement.lower().replace("_", "-")


def test_tdask_yaml_defaults_are_loaded_into_dask_config():
    import dask.config

    import tdask  # noqa: F401

    assert dask.config.get("tdask.replica.max-queue-size") >= 1200  # 8 clients x 150 requests never rejected
    assert dask.config.get("tdask.triton.server-path") is None


def test_the_code_is_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
