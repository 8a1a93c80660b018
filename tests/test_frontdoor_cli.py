"""The front door as users start it: ``python -m deploy --model-repository DIR`` serves a repository's models to
curl and stock ``tritonclient`` with one command, and a second front door (``tdask-frontdoor``) keeps serving when
the other one dies under load."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from conftest import ROOT, python_env, settled_count
from test_cli import Proc
from tritonclient.utils import InferenceServerException

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
TEST_MODELS = ROOT / "tests" / "models"
BIN = Path(sys.executable).parent


def triton_metric_successes(deploy: Proc, name: str) -> int:
    """Triton's own count of successful inferences of ``name``: its servers' metrics, which deploy printed."""
    urls = re.findall(rf"Started {name} replica .*\(metrics (\S+)\)", deploy.text())
    assert urls, deploy.text()[-2000:]
    total = 0
    for url in urls:
        for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
            if line.startswith("nv_inference_request_success{") and f'model="{name}"' in line:
                total += int(float(line.rsplit(" ", 1)[1]))
    return total


def addresses(proc: Proc) -> tuple[str, str]:
    """The front door's HTTP URL and gRPC address, as printed (literally) before the line that says it serves."""
    text = proc.text()
    http = re.search(r"^KServe v2 HTTP: (http://127\.0\.0\.1:\d+)$", text, re.M)
    grpc = re.search(r"^KServe v2 gRPC: (127\.0\.0\.1:\d+)$", text, re.M)
    assert http and grpc, text[-2000:]
    return http.group(1), grpc.group(1)


def _pair(module, a: np.ndarray, b: np.ndarray) -> list:
    inputs = [module.InferInput("INPUT0", [4], "FP32"), module.InferInput("INPUT1", [4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def test_deploy_serves_a_model_repository_to_curl_and_tritonclient_and_two_front_doors_outlive_one(tmp_path):
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))
    deploy = Proc([sys.executable, "-m", "deploy", "--model-repository", str(TEST_MODELS), "--set",
                   "add_sub.instances=2", "--scheduler-port", "0", "--dashboard-address", ":0"],
                  tmp_path / "deploy.log", env)
    second = None
    try:
        deploy.wait_for("press Ctrl-C to Exit")
        text = deploy.text()
        assert "Started add_sub replica" in text and "model instances 2" in text
        assert text.index("KServe v2 HTTP: ") < text.index("KServe v2 gRPC: ") < text.index("Workers started")
        http_url, grpc_address = addresses(deploy)
        scheduler = re.search(r"scheduler (tcp://\S+),", text).group(1)
        before = triton_metric_successes(deploy, "add_sub")

        # metadata is the model's config.pbtxt, through both stock clients
        http = httpclient.InferenceServerClient(http_url.removeprefix("http://"))
        grpc_ = grpcclient.InferenceServerClient(grpc_address)
        metadata = http.get_model_metadata("add_sub")
        assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
            ("INPUT0", "FP32", [4]), ("INPUT1", "FP32", [4])]
        assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
            ("OUTPUT0", "FP32", [4]), ("OUTPUT1", "FP32", [4])]
        assert grpc_.get_model_metadata("add_sub", as_json=True)["inputs"][1] == {
            "name": "INPUT1", "datatype": "FP32", "shape": ["4"]}

        rng = np.random.default_rng(7)
        sent = 0
        for module, client in ((httpclient, http), (grpcclient, grpc_)):
            for _ in range(3):
                a, b = rng.random(4, dtype=np.float32), rng.random(4, dtype=np.float32)
                answer = client.infer("add_sub", _pair(module, a, b))
                np.testing.assert_array_equal(answer.as_numpy("OUTPUT0"), a + b)
                np.testing.assert_array_equal(answer.as_numpy("OUTPUT1"), a - b)
                sent += 1
        body = json.dumps({"inputs": [
            {"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "INPUT1", "shape": [4], "datatype": "FP32", "data": [0.5, 0.5, 0.5, 0.5]}]})
        out = subprocess.run(["curl", "-s", "-X", "POST", "-d", body, f"{http_url}/v2/models/add_sub/infer"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        outputs = {o["name"]: o["data"] for o in json.loads(out)["outputs"]}
        assert outputs == {"OUTPUT0": [1.5, 2.5, 3.5, 4.5], "OUTPUT1": [0.5, 1.5, 2.5, 3.5]}
        sent += 1
        for protocol in ("http", "grpc"):  # the client finds the front door deploy announced; data from metadata
            result = subprocess.run([sys.executable, "-m", "tdask.client", "--no-progress", "--protocol", protocol,
                                     "--operator", "add_sub", "--requests-per-client", "5"], env=env,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0 and "Requests: 5 Errors: 0" in result.stdout, result.stdout + result.stderr
            sent += 5
        expected = before + sent
        assert settled_count(lambda: triton_metric_successes(deploy, "add_sub"), expected) == expected

        # a second front door on the same deployment; it dies under load, the first goes on
        second = Proc([str(BIN / "tdask-frontdoor"), "--scheduler-address", scheduler], tmp_path / "door2.log", env)
        second.wait_for("press Ctrl-C to Exit", timeout=60)
        _, grpc_second = addresses(second)
        outcome = asyncio.run(_load_while_one_door_dies(grpc_address, grpc_second, second))
        first, other = outcome["first"], outcome["second"]
        assert first == {"ok": 200, "wrong": 0, "errors": []}  # the surviving door answered every request
        assert other["ok"] >= 20 and other["wrong"] == 0
        assert other["ok"] + len(other["errors"]) == 200  # nothing lost silently: answered, or an explicit error
        assert all(e.startswith("StatusCode.UNAVAILABLE") for e in other["errors"]), other["errors"][:5]
        np.testing.assert_array_equal(grpc_.infer("add_sub", _pair(grpcclient, np.ones(4, np.float32),
                                                                   np.ones(4, np.float32))).as_numpy("OUTPUT1"),
                                      np.zeros(4, np.float32))

        # front doors inside the workers: placed by a command that exits, serving until removed
        _front_doors_on_the_workers(scheduler, env, before_add_sub=lambda: triton_metric_successes(deploy, "add_sub"))
        deploy.p.send_signal(signal.SIGTERM)
        assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
    finally:
        if second is not None:
            second.stop()
        deploy.stop()


def _front_doors_on_the_workers(scheduler: str, env: dict[str, str], before_add_sub) -> None:
    """``tdask-frontdoor --on-workers`` prints one front door per worker and exits; each answers stock clients
    (Triton counts every request) after that command is gone; ``--on-workers --remove`` closes them."""
    door = [str(BIN / "tdask-frontdoor"), "--scheduler-address", scheduler, "--on-workers"]
    placed = subprocess.run(door, env=env, capture_output=True, text=True, timeout=120)
    assert placed.returncode == 0, placed.stdout + placed.stderr
    doors = re.findall(r"^Front door in worker (\S+): KServe v2 HTTP: (http://\S+), KServe v2 gRPC: (\S+)$",
                       placed.stdout, re.M)
    assert doors and "tdask-frontdoor --on-workers --remove" in placed.stdout, placed.stdout
    before = before_add_sub()
    a, b = np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)
    for _, http_url, grpc_address in doors:
        answer = grpcclient.InferenceServerClient(grpc_address).infer("add_sub", _pair(grpcclient, a, b))
        np.testing.assert_array_equal(answer.as_numpy("OUTPUT0"), a + b)
        http = httpclient.InferenceServerClient(http_url.removeprefix("http://"))
        np.testing.assert_array_equal(http.infer("add_sub", _pair(httpclient, a, b)).as_numpy("OUTPUT1"), a - b)
    expected = before + 2 * len(doors)
    assert settled_count(before_add_sub, expected) == expected
    removed = subprocess.run([*door, "--remove"], env=env, capture_output=True, text=True, timeout=120)
    assert removed.returncode == 0 and "Removed the workers' front doors" in removed.stdout, removed.stderr
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(doors[0][2]).is_server_live()
    again = subprocess.run([*door, "--remove"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "the workers have no front doors" in again.stderr, again.stderr
    with socket.socket() as taken:  # a port no worker can take: an error, and no front door stays anywhere
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        refused = subprocess.run([*door, "--http-port", str(taken.getsockname()[1])], env=env, capture_output=True,
                                 text=True, timeout=120)
    assert refused.returncode == 1 and "Error: front doors on the workers:" in refused.stderr, refused.stderr
    still = subprocess.run([*door, "--remove"], env=env, capture_output=True, text=True, timeout=120)
    assert still.returncode == 1 and "the workers have no front doors" in still.stderr, still.stderr


async def _load_while_one_door_dies(first: str, second: str, second_proc: Proc) -> dict:
    """200 requests through each front door, 8 at a time; the second door is SIGKILLed after its 20th answer."""
    outcome = {}

    async def drive(address: str, name: str, kill_after: int | None) -> None:
        client = grpcaio.InferenceServerClient(address)
        stats = {"ok": 0, "wrong": 0, "errors": []}
        todo = iter(range(200))

        async def worker() -> None:
            for i in todo:
                a = np.full(4, i, dtype=np.float32)
                b = np.arange(4, dtype=np.float32)
                try:
                    answer = await client.infer("add_sub", _pair(grpcaio, a, b), client_timeout=60)
                except InferenceServerException as e:
                    stats["errors"].append(f"{e.status()}: {e.message()}")
                    continue
                ok = np.array_equal(answer.as_numpy("OUTPUT0"), a + b)
                stats["ok" if ok else "wrong"] += 1
                if kill_after is not None and stats["ok"] == kill_after:
                    second_proc.p.send_signal(signal.SIGKILL)

        await asyncio.gather(*(worker() for _ in range(8)))
        await client.close()
        outcome[name] = stats

    await asyncio.gather(drive(first, "first", None), drive(second, "second", 20))
    return outcome
