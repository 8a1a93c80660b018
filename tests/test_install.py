"""The install envelope: Triton's stubs in an environment of their own (NumPy 1.x) beside tdask's NumPy 2, a stub
that cannot start failing at once, the UCX extra named when it is missing, and a non-editable install serving the
hello world from a folder outside the repository."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, python_env
from test_cli import Proc, alive, check_client_output

from tdask.triton import environment

MODELS = ROOT / "tests" / "models"


def test_triton_stubs_run_numpy_1_in_their_own_environment_while_workers_run_numpy_2(loop, client, session):
    """The model reports, from inside its stub, the NumPy it imported and the environment it runs in; the
    workers (and this caller) run tdask's own NumPy 2."""
    from tdask import Deployment, OperatorConfig

    deployment = Deployment(client, [OperatorConfig("stub_environment", "TritonCoreOperator", repository=MODELS)])
    loop.run(deployment.start(), timeout=300)
    try:
        async def ask():
            op = await session.operator("stub_environment")
            return await op.infer({"input": np.arange(3, dtype=np.int64)})

        result = loop.run(ask())
    finally:
        loop.run(deployment.stop(), timeout=120)
    stub_numpy = tuple(int(v) for v in result["numpy_version"])
    stub_prefix = Path(bytes(result["prefix"]).decode())
    workers = loop.run(lambda: client.run(lambda: (np.__version__, sys.prefix)))
    made = environment.ensure()
    assert stub_numpy[0] == 1 and ".".join(map(str, stub_numpy)) == made.versions()["numpy"]
    assert stub_prefix.resolve() == made.path.resolve()  # the environment tdask made, not the worker's
    assert int(np.__version__.split(".")[0]) == 2
    assert {int(version.split(".")[0]) for version, _ in workers.values()} == {2}
    assert all(Path(prefix).resolve() != made.path.resolve() for _, prefix in workers.values())


def _broken_environment(root: Path) -> Path:
    """tdask's Triton environment, with its ``libpython`` replaced by a truncated file (a damaged install):
    the stub cannot load it."""
    real = environment.ensure()
    broken = root / real.path.name
    (broken / "lib").mkdir(parents=True)
    (broken / "bin").symlink_to(real.path / "bin")
    (broken / "lib" / f"python{real.python_version}").symlink_to(real.path / "lib" / f"python{real.python_version}")
    (broken / "lib" / f"libpython{real.python_version}.so.1.0").write_bytes(b"")
    shutil.copy(real.path / ".tdask-complete", broken / ".tdask-complete")
    return root


@pytest.mark.slow
def test_a_stub_that_cannot_start_fails_the_deployment_at_once_naming_the_cause(tmp_path):
    """Before tdask checked the stub, Triton waited for it until the load timed out (seen: 280 s, and then it
    ignored SIGTERM). Now deploy stops with the loader's own words, and leaves no process behind."""
    env = python_env(DASK_TDASK__TRITON__ENVIRONMENT_DIR=str(_broken_environment(tmp_path / "triton")),
                     DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"),
                     DASK_TDASK__TRITON__STARTUP_TIMEOUT="600s")  # the error must not come from a timeout
    deploy = Proc([sys.executable, "-m", "deploy", "--scheduler-port", "0", "--dashboard-address", ":0"],
                  tmp_path / "deploy.log", env)
    try:
        code = deploy.p.wait(300)
        out = deploy.text()
        assert code != 0, out[-3000:]
        assert "Triton's Python stub cannot start" in out, out[-3000:]
        assert "libpython" in out and "file too short" in out, out[-3000:]
        assert "not ready after" not in out
    finally:
        deploy.stop()


def test_protocol_ucx_without_the_extra_is_an_error_naming_it():
    """With distributed-ucxx not importable (``sys.modules[...] = None``), deploy and the client refuse ucx and
    say which extra to install."""
    hide = "import sys; sys.modules['distributed_ucxx'] = None; "
    deploy = subprocess.run(
        [sys.executable, "-c", hide + "from tdask.cli.deploy import main; sys.exit(main(['--protocol', 'ucx']))"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    client = subprocess.run(
        [sys.executable, "-c", hide + "from tdask.cli.client import main; "
         "sys.exit(main(['--scheduler-address', 'ucx://127.0.0.1:8786']))"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    for result in (deploy, client):
        assert result.returncode == 2, result.stderr
        assert "tdask[ucx-cu12]" in result.stderr and "tdask[ucx-cu13]" in result.stderr


@pytest.mark.slow
def test_a_non_editable_install_serves_the_hello_world_from_a_folder_outside_the_repository(tmp_path):
    """``pip install .`` (not editable) into a fresh environment whose only tdask is the installed one: its
    console scripts deploy the operators shipped in the package, from a folder that is not the repository."""
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # tdask's dependencies come from this environment (a .pth path, which does not run this one's editable hook)
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "tdask-test-dependencies.pth").write_text(ours + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                              str(ROOT)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    where = subprocess.run([str(python), "-c", "import tdask, tdask.hello_world as h; print(tdask.__file__); "
                            "print(h.__path__[0])"], capture_output=True, text=True, check=True, cwd=tmp_path)
    package, operators = where.stdout.split()
    assert package.startswith(site) and operators.startswith(site)
    assert not (Path(site) / "deploy").exists()  # no top-level package named like another one on the index

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))
    env["PATH"] = f"{target / 'bin'}:{env['PATH']}"
    env.pop("PYTHONPATH", None)
    deploy = Proc([str(target / "bin" / "tdask-deploy"), "--scheduler-port", "0", "--dashboard-address", ":0"],
                  tmp_path / "deploy.log", env, cwd=outside)
    try:
        deploy.wait_for("press Ctrl-C to Exit")
        servers = [p for p in deploy.descendants() if p.name() == "tritonserver"]
        repositories = {arg.split("=", 1)[1] for p in servers for arg in p.cmdline()
                        if arg.startswith("--model-repository=")}
        assert repositories == {str(Path(operators) / "triton_core_models")}
        result = subprocess.run([str(target / "bin" / "tdask-client"), "--requests-per-client", "10"], cwd=outside,
                                env=env, capture_output=True, text=True, timeout=300)
        check_client_output(result, 10)
        children = deploy.descendants()
        deploy.p.send_signal(signal.SIGTERM)
        assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
        assert alive(children) == []
    finally:
        deploy.stop()
