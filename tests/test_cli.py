"""``python -m deploy`` and ``python -m tdask.client`` as real processes, also on ``dask scheduler``/``dask worker``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, python_env, triton_processes

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess whose output goes to a file we can wait on."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], new_group: bool = True,
                 cwd: Path = ROOT) -> None:
        self.log = log
        self.file = open(log, "w")
        self.p = subprocess.Popen(args, cwd=cwd, env=env, stdout=self.file, stderr=subprocess.STDOUT,
                                  start_new_session=new_group)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 180) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if needle in self.text():
                return
            if self.p.poll() is not None:
                raise AssertionError(f"process exited ({self.p.returncode}) before {needle!r}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {needle!r} within {timeout} s:\n{self.text()[-3000:]}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.p.pid).children(recursive=True)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)
        self.file.close()


@contextlib.contextmanager
def dask_cli_cluster(tmp_path: Path, env: dict[str, str], workers: int, *worker_args: str) -> Iterator[tuple]:
    """A ``dask scheduler`` and ``workers`` ``dask worker`` processes: (address, scheduler, workers); all stopped at
    the end, whatever the test did to them."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask_bin = os.path.join(os.path.dirname(PY), "dask")
    scheduler = Proc([dask_bin, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                     tmp_path / "scheduler.log", env)
    procs: list[Proc] = []
    try:
        scheduler.wait_for("Scheduler at:")
        procs = [Proc([dask_bin, "worker", address, "--nthreads", "1", "--name", f"w{i}", "--host", "127.0.0.1",
                       *worker_args], tmp_path / f"worker{i}.log", env) for i in range(workers)]
        for w in procs:
            w.wait_for("Starting established connection")
        yield address, scheduler, procs
    finally:
        for proc in (*procs, scheduler):
            if proc.p.poll() is None:
                proc.p.send_signal(signal.SIGTERM)
        for proc in (*procs, scheduler):
            try:
                proc.p.wait(60)
            finally:
                proc.stop()


def alive(procs: list[psutil.Process], wait: float = 15) -> list[psutil.Process]:
    """Those of ``procs`` still running after up to ``wait`` seconds."""
    end = time.time() + wait
    while True:
        left = _running(procs)
        if not left or time.time() > end:
            return left
        time.sleep(0.25)


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def run_client(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "tdask.client", "--no-progress", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_client_output(result: subprocess.CompletedProcess, n: int) -> None:
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[-1] == "Clients Stopped Exit Code 0"
    assert lines[-2].startswith("Throughput: ") and " Total Time: " in lines[-2]
    assert f"Requests: {n} Errors: 0" in result.stdout


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_deploy_embedded_then_client_then_clean_exit(tmp_path, how):
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))
    log_dir = tmp_path / "logs"
    deploy = Proc([PY, "-m", "deploy", "--scheduler-port", "0", "--dashboard-address", ":0",
                   "--log-dir", str(log_dir), "--clear-logs"], tmp_path / "deploy.log", env)
    try:
        deploy.wait_for("press Ctrl-C to Exit")
        out = deploy.text()
        for name in ("encoder", "decoder", "encoder_decoder"):
            assert f"Started {name} replica" in out
        assert "device CPU, model instances 1, max in-flight 1" in out
        # the client finds the embedded scheduler through the address file deploy wrote
        result = run_client(env, "--requests-per-client", "10")
        check_client_output(result, 10)
        logs = sorted(p.name for p in log_dir.iterdir())
        assert sum(n.startswith("worker-") for n in logs) == 3 and sum(n.startswith("triton-") for n in logs) == 2
        children = deploy.descendants()
        servers = [p for p in children if p.name() == "tritonserver"]
        assert len(servers) == 2
        if how == "ctrl-c":  # a terminal signals the whole process group
            os.killpg(deploy.p.pid, signal.SIGINT)
        else:
            deploy.p.send_signal(signal.SIGTERM)
        assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
        time.sleep(1)
        assert alive(children) == [], f"left behind: {[p.cmdline()[:3] for p in alive(children)]}"
        assert not (tmp_path / "addr.json").exists()
    finally:
        deploy.stop()


def test_client_exits_non_zero_when_requests_fail(tmp_path):
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "none.json"))
    result = run_client(env, "--scheduler-address", f"tcp://127.0.0.1:{free_port()}", "--requests-per-client", "1",
                        timeout=120)
    assert result.returncode != 0
    assert "cannot reach the scheduler" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("Clients Stopped Exit Code ")


def test_dask_scheduler_and_worker_clis_with_deploy_and_client(tmp_path):
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))
    with dask_cli_cluster(tmp_path, env, 3, "--resources", "CPU=1") as (address, _, workers):
        deploy = Proc([PY, "-m", "deploy", "--scheduler-address", address, "--log-dir", str(tmp_path / "logs")],
                      tmp_path / "deploy.log", env)
        try:
            deploy.wait_for("press Ctrl-C to Exit")
            check_client_output(run_client(env, "--scheduler-address", address, "--requests-per-client", "10"), 10)
            servers = {p.pid for w in workers for p in w.descendants() if p.name() == "tritonserver"}
            assert len(servers) == 2, "Triton servers run under the user's workers"
            deploy.p.send_signal(signal.SIGTERM)
            assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
            end = time.time() + 30
            while time.time() < end and servers & triton_processes():
                time.sleep(0.5)
            assert not servers & triton_processes(), "deploy must stop the Triton servers it started"
            assert all(w.p.poll() is None for w in workers), "the user's workers keep running"
            # and they are still usable: a second deploy works on them
            again = Proc([PY, "-m", "deploy", "--scheduler-address", address], tmp_path / "deploy2.log", env)
            try:
                again.wait_for("press Ctrl-C to Exit")
                check_client_output(run_client(env, "--scheduler-address", address, "--requests-per-client", "5"), 5)
                again.p.send_signal(signal.SIGINT)
                assert again.p.wait(120) == 0
            finally:
                again.stop()
            # a deploy that dies without cleaning up (SIGKILL): its replicas are released by Dask and
            # the workers stop them, Triton servers included, while the workers keep running
            killed = Proc([PY, "-m", "deploy", "--scheduler-address", address], tmp_path / "deploy3.log", env)
            try:
                killed.wait_for("press Ctrl-C to Exit")
                servers = {p.pid for w in workers for p in w.descendants() if p.name() == "tritonserver"}
                assert len(servers) == 2
                killed.p.kill()
                killed.p.wait(30)
                end = time.time() + 60
                while time.time() < end and servers & triton_processes():
                    time.sleep(0.5)
                assert not servers & triton_processes(), "orphaned replicas' Triton servers must stop"
                assert all(w.p.poll() is None for w in workers)
            finally:
                killed.stop()
        finally:
            deploy.stop()


def test_sigterm_drains_in_flight_requests_before_stopping(tmp_path):
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))
    # 100 elements x 5 ms: each request sleeps 0.5 s in the encoder; max in-flight 1 serializes them
    deploy = Proc([PY, "-m", "deploy", "--scheduler-port", "0", "--dashboard-address", ":0",
                   "--encoder-delay-per-token", "0.005"], tmp_path / "deploy.log", env)
    try:
        deploy.wait_for("press Ctrl-C to Exit")
        children = deploy.descendants()
        client = subprocess.Popen([PY, "-m", "tdask.client", "--no-progress", "--requests-per-client", "8",
                                   "--input-size-mean", "100"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        time.sleep(2.0)  # a few answered, the rest in flight
        deploy.p.send_signal(signal.SIGTERM)
        out, _ = client.communicate(timeout=120)
        assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
        assert client.returncode == 0, out[-3000:]
        assert "Requests: 8 Errors: 0" in out
        assert deploy.text().index("Stopping operators") < deploy.text().index("Stopped")
        assert alive(children) == []
    finally:
        deploy.stop()


def _triton_successes(metrics_url: str) -> int:
    import urllib.request

    try:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    except OSError:
        return 0
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("nv_inference_request_success{"))


def test_a_scheduler_killed_under_load_ends_every_request_and_deploy_exits_non_zero(tmp_path):
    """Every request the client sends ends (answered or an explicit error) and it prints its last lines; deploy
    says in one line that the scheduler is gone and exits non-zero, with no traceback."""
    import re

    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))
    deploy = load = None
    with dask_cli_cluster(tmp_path, env, 2) as (address, scheduler, _), contextlib.ExitStack() as stack:
        stack.callback(lambda: [proc.stop() for proc in (load, deploy) if proc is not None])
        deploy = Proc([PY, "-m", "deploy", "--scheduler-address", address, "--encoders", "1", "4", "1", "CPU",
                       "--decoders", "1", "4", "1", "CPU", "--encoder-decoders", "1", "8"],
                      tmp_path / "deploy.log", env)
        deploy.wait_for("press Ctrl-C to Exit")
        metrics = re.search(r"Started encoder replica .*\(metrics (\S+)\)", deploy.text()).group(1)
        load = Proc([PY, "-m", "tdask.client", "--no-progress", "--scheduler-address", address, "--concurrency", "8",
                     "--requests-per-client", "3000", "--timeout", "10"], tmp_path / "client.log", env)
        end = time.time() + 120
        while _triton_successes(metrics) < 50 and time.time() < end:  # the load flows
            time.sleep(0.2)
        assert _triton_successes(metrics) >= 50, load.text()[-2000:]
        scheduler.p.kill()
        assert deploy.p.wait(120) != 0, deploy.text()[-3000:]
        assert f"Error: the scheduler at {address} is gone" in deploy.text()
        assert "Traceback" not in deploy.text() and "AttributeError" not in deploy.text(), deploy.text()[-3000:]
        load.p.wait(180)
        out = load.text()
        lines = out.strip().splitlines()
        assert lines[-1].startswith("Clients Stopped Exit Code "), out[-3000:]
        assert lines[-2].startswith("Throughput: "), out[-3000:]
        assert re.search(r"^Requests: 3000 Errors: \d+", out, re.M), out[-3000:]  # every request ended
        assert "Traceback" not in out, out[-3000:]


def test_deploy_to_a_scheduler_that_refuses_the_connection_is_an_error_within_seconds(tmp_path):
    port = free_port()  # nothing listens there
    start = time.monotonic()
    result = subprocess.run([PY, "-m", "deploy", "--scheduler-address", f"tcp://127.0.0.1:{port}",
                             "--connect-timeout", "2"], cwd=ROOT, env=python_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot reach the scheduler at tcp://127.0.0.1:{port} within 2 s" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert time.monotonic() - start < 30


def test_a_detached_deployment_outlives_its_command_places_lost_replicas_again_and_is_removed(tmp_path):
    import re

    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))

    def deploy(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "deploy", "--scheduler-address", address, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    with dask_cli_cluster(tmp_path, env, 2) as (address, _, workers):
        placed = deploy("--detach")
        assert placed.returncode == 0, placed.stdout + placed.stderr
        assert "Workers started" in placed.stdout and "detached as 'default'" in placed.stdout
        # the command is gone; the deployment serves
        check_client_output(run_client(env, "--scheduler-address", address, "--requests-per-client", "10"), 10)
        listing = deploy("--list")
        assert listing.returncode == 0 and "Deployment default: 3 replicas" in listing.stdout, listing.stdout
        encoder_worker = re.search(r"Started encoder replica \S+ on worker (\S+):", listing.stdout).group(1)
        lost = next(w for w in workers if re.search(rf"Start worker at:\s+{re.escape(encoder_worker)}\s", w.text()))
        os.killpg(lost.p.pid, signal.SIGKILL)  # the worker and its nanny: no restart, the other worker takes over
        lost.p.wait(30)
        end = time.time() + 180
        while time.time() < end:
            listing = deploy("--list")
            if listing.stdout.count(" on worker ") == 3 and encoder_worker not in listing.stdout:
                break
            time.sleep(1)
        assert encoder_worker not in listing.stdout and listing.stdout.count(" on worker ") == 3, listing.stdout
        check_client_output(run_client(env, "--scheduler-address", address, "--requests-per-client", "10"), 10)
        updated = deploy("--detach", "--encoder-max-inflight", "3")  # the same name again: replaced
        assert updated.returncode == 0, updated.stdout + updated.stderr
        listing = deploy("--list")
        assert "Deployment default: 3 replicas" in listing.stdout, listing.stdout
        assert re.search(r"Started encoder replica .* max in-flight 3", listing.stdout), listing.stdout
        check_client_output(run_client(env, "--scheduler-address", address, "--requests-per-client", "10"), 10)
        removed = deploy("--remove")
        assert removed.returncode == 0 and "Removed default" in removed.stdout, removed.stdout + removed.stderr
        after = run_client(env, "--scheduler-address", address, "--requests-per-client", "3")
        assert after.returncode != 0 and "no operator named 'encoder_decoder'" in after.stderr, after.stderr
        survivor = next(w for w in workers if w is not lost)
        end = time.time() + 60
        while time.time() < end and any(p.name() == "tritonserver" for p in survivor.descendants()):
            time.sleep(0.5)
        assert not any(p.name() == "tritonserver" for p in survivor.descendants()), "remove stops the Triton servers"
        assert deploy("--list").stdout.strip().endswith("No detached deployments")
