"""The whole flow on a TLS-secured cluster (``tls://``), with certificates made for the test.

Security is Dask's own: certificates come from ``distributed.comm.tls.*`` settings (here as
``DASK_DISTRIBUTED__COMM__TLS__*`` environment variables), which the ``dask`` CLIs, ``python -m
deploy`` and ``python -m tdask.client`` all read; tdask's request streams reuse the client's and
workers' connection arguments, so they are encrypted too.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_env
from test_cli import Proc, check_client_output, run_client

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def make_certificates(folder: Path) -> dict[str, str]:
    """A CA and one certificate for 127.0.0.1 signed by it, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=tdask-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "node.pem", "-days", "2", "-extfile", "san.ext")
    env = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(folder / "ca.pem"),
           "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = str(folder / "node.pem")
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = str(folder / "node.key")
    return env


def test_embedded_deploy_and_client_over_tls(tmp_path):
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"), **make_certificates(tmp_path))
    deploy = Proc([sys.executable, "-m", "deploy", "--protocol", "tls", "--scheduler-port", "0",
                   "--dashboard-address", ":0"], tmp_path / "deploy.log", env)
    try:
        deploy.wait_for("press Ctrl-C to Exit")
        address = re.search(r"scheduler (tls://\S+),", deploy.text()).group(1)
        assert all(w.startswith("tls://") for w in re.findall(r"on worker (\S+):", deploy.text()))
        check_client_output(run_client(env, "--scheduler-address", address, "--requests-per-client", "10"), 10)
        # without the certificates, the cluster cannot be reached
        plain = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"),
                           DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="5s")
        refused = run_client(plain, "--scheduler-address", address, "--requests-per-client", "1", timeout=120)
        assert refused.returncode != 0
        deploy.p.send_signal(signal.SIGTERM)
        assert deploy.p.wait(120) == 0
    finally:
        deploy.stop()
