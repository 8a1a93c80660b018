"""Deploying any operators: deployment files, a whole Triton model repository, --set, and the original example's
model contract (a 0-d ``input_copies``)."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys

import numpy as np
import pytest
from conftest import MODELS, OPERATORS, ROOT, python_env
from test_cli import Proc, check_client_output, run_client

from tdask.cli.deploy import build_parser, operator_configs
from tdask.deploy import spec
from tdask.errors import ConfigError
from tdask.operator import OperatorConfig

TEST_MODELS = ROOT / "tests" / "models"


def test_the_hello_world_file_is_what_deploy_places_by_default():
    from_file = spec.load(OPERATORS / "hello_world.yaml")
    by_default = operator_configs(build_parser().parse_args([]))
    assert from_file == by_default
    assert [op.name for op in from_file] == ["encoder", "decoder", "encoder_decoder"]
    assert from_file[0].repository == str(MODELS) and from_file[2].repository == str(OPERATORS)
    from tdask import Deployment

    assert Deployment.from_file(None, OPERATORS / "hello_world.yaml").operators == from_file  # the Python API


def test_a_file_with_two_operators_loads_with_repositories_relative_to_it(tmp_path):
    (tmp_path / "deploy.yaml").write_text(
        f"operators:\n"
        f"  - name: add_sub\n    repository: {TEST_MODELS}\n    instances: 2\n    device: cpu\n"
        f"    parameters: {{scale: 2}}\n"
        f"  - name: echo\n    implementation: sample_operators:Echo\n    repository: ../support\n"
        f"    replicas: 2\n    idempotent: true\n    resources: {{echo: 1}}\n")
    (tmp_path / "support").mkdir()
    add_sub, echo = spec.load(tmp_path / "deploy.yaml")
    assert add_sub == OperatorConfig("add_sub", repository=TEST_MODELS, instances=2, parameters={"scale": 2})
    assert echo.implementation == "sample_operators:Echo" and echo.repository == str(tmp_path.parent / "support")
    assert (echo.replicas, echo.idempotent, dict(echo.resources)) == (2, True, {"echo": 1})


@pytest.mark.parametrize("entry, message", [
    ("  - name: encoder\n    repository: m\n    replicas: two\n",
     "operator 'encoder': field 'replicas' must be an integer >= 1, got 'two'"),
    ("  - name: encoder\n    repository: m\n    max_in_flight: 4\n",
     "operator 'encoder': unknown field(s) ['max_in_flight']"),
    ("  - name: encoder\n    repository: m\n    device: TPU\n",
     "operator 'encoder': field 'device' must be CPU or GPU, got 'TPU'"),
    ("  - name: encoder\n    repository: m\n    parameters: [1, 2]\n",
     "operator 'encoder': field 'parameters' must be a mapping"),
    ("  - repository: m\n", "operator #1: "),
    ("  - name: encoder\n", "operator 'encoder': operator 'encoder': a Triton operator needs the model repository"),
])
def test_a_mistake_in_a_file_names_the_file_the_operator_and_the_field(tmp_path, entry, message):
    path = tmp_path / "broken.yaml"
    path.write_text("operators:\n" + entry)
    with pytest.raises(ConfigError) as info:
        spec.load(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_a_dict_loads_like_a_file_and_top_level_mistakes_are_named():
    (op,) = spec.load({"operators": [{"name": "add_sub", "repository": str(TEST_MODELS)}]})
    assert op == OperatorConfig("add_sub", repository=TEST_MODELS)
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['operator'\]"):
        spec.load({"operator": []})
    with pytest.raises(ConfigError, match="'operators' must be a non-empty list"):
        spec.load({"operators": []})


def test_a_model_repository_becomes_one_operator_per_model_and_set_overrides_fields():
    args = build_parser().parse_args(["--model-repository", str(TEST_MODELS), "--set", "add_sub.instances=2",
                                      "--set", "add_sub.device=CPU", "--set", "add_sub.parameters.scale=3",
                                      "--set", "stub_environment.replicas=2"])
    ops = {op.name: op for op in operator_configs(args)}
    assert set(ops) == {"add_sub", "stub_environment"}
    assert (ops["add_sub"].instances, dict(ops["add_sub"].parameters)) == (2, {"scale": 3})
    assert ops["stub_environment"].replicas == 2 and ops["add_sub"].repository == str(TEST_MODELS)
    for bad, message in [("nope.replicas=2", "no operator 'nope'"), ("add_sub.replicas=0", "integer >= 1"),
                         ("add_sub", "expected NAME.FIELD=VALUE")]:
        with pytest.raises(ConfigError, match=message):
            operator_configs(build_parser().parse_args(["--model-repository", str(TEST_MODELS), "--set", bad]))


def _scheduler(deploy: Proc) -> str:
    return re.search(r"scheduler (tcp://\S+),", deploy.text()).group(1)


@pytest.mark.slow
def test_the_original_examples_encoder_with_a_0d_input_copies_works_through_deploy_and_client(tmp_path):
    """The original example's encoder answers ``input_copies`` as a 0-d array; deploy and the client work with it
    unchanged, with input_copies 2 given to both models by deploy."""
    repository = tmp_path / "models"
    shutil.copytree(MODELS, repository, ignore=shutil.ignore_patterns("__pycache__"))
    model = repository / "encoder" / "1" / "model.py"
    source = model.read_text()
    one_d, zero_d = "np.array([input_copies], dtype=np.int64)", "np.array(input_copies, dtype=np.int64)"
    assert source.count(one_d) == 1
    model.write_text(source.replace(one_d, zero_d))
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))
    deploy = Proc([sys.executable, "-m", "deploy", "--triton-model-repository", str(repository),
                   "--encoder-input-copies", "2", "--scheduler-port", "0", "--dashboard-address", ":0"],
                  tmp_path / "deploy.log", env)
    try:
        deploy.wait_for("press Ctrl-C to Exit")

        async def raw() -> np.ndarray:
            import tdask

            async with await tdask.connect(_scheduler(deploy)) as session:
                encoder = await session.operator("encoder")
                return (await encoder.infer({"input": np.arange(5, dtype=np.int64)}))["input_copies"]

        copies = asyncio.run(raw())
        assert copies.shape == () and int(copies) == 2  # the original contract: a 0-d answer
        check_client_output(run_client(env, "--requests-per-client", "10"), 10)
        deploy.p.send_signal(signal.SIGTERM)
        assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
    finally:
        deploy.stop()


def test_a_file_may_set_the_front_door_and_the_command_line_wins(tmp_path):
    from tdask.cli.frontdoor import front_door_settings

    path = tmp_path / "deploy.yaml"
    path.write_text(f"operators:\n  - name: add_sub\n    repository: {TEST_MODELS}\n"
                    "frontdoor:\n  http-port: 9000\n  host: 0.0.0.0\n")
    assert [op.name for op in spec.load(path)] == ["add_sub"]
    from_file = spec.front_door(path)
    assert from_file == {"http-port": 9000, "host": "0.0.0.0"}
    args = build_parser().parse_args(["--config", str(path), "--grpc-port", "0", "--front-door-host", "127.0.0.1"])
    # the file's port, the option's host and gRPC port; the rest from tdask's settings
    assert front_door_settings(args, from_file) == {"host": "127.0.0.1", "http-port": 9000, "grpc-port": 0}
    assert spec.front_door({"operators": []}) == {}
    for section, message in [("[1]", "'frontdoor' must be a mapping"),
                             ("{http_port: 1}", "frontdoor: unknown field(s) ['http_port']"),
                             ("{grpc-port: 70000}", "field 'grpc-port' must be a port number"),
                             ("{host: ''}", "field 'host' must be a host name")]:
        path.write_text(f"operators:\n  - name: add_sub\n    repository: {TEST_MODELS}\nfrontdoor: {section}\n")
        with pytest.raises(ConfigError) as info:
            spec.front_door(path)
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
