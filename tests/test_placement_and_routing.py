"""Unit tests of the pure logic: placement of replicas, replica choice, configs, CLI parsing."""

from __future__ import annotations

import numpy as np
import pytest

from tdask import ConfigError, OperatorConfig, OperatorNotFoundError, PlacementError
from tdask.deploy.placement import plan_placement
from tdask.registry import pick_version
from tdask.session.routing import choose_replica

CPU3 = {f"tcp://w{i}": {"name": i, "resources": {}} for i in range(3)}


def op(name: str, **kw) -> OperatorConfig:
    return OperatorConfig(name, "m:C", **kw)


def test_placement_gives_each_replica_its_own_worker_when_there_are_enough():
    plan = plan_placement([op("a"), op("b"), op("c")], CPU3)
    assert sorted(addr for _, _, addr in plan) == ["tcp://w0", "tcp://w1", "tcp://w2"]


def test_placement_shares_workers_when_replicas_outnumber_them():
    plan = plan_placement([op("a", replicas=4), op("b", replicas=2)], CPU3)
    counts = {}
    for _, _, addr in plan:
        counts[addr] = counts.get(addr, 0) + 1
    assert sorted(counts.values()) == [2, 2, 2]


def test_placement_counts_replicas_already_deployed():
    plan = plan_placement([op("a")], CPU3, existing={"tcp://w0": {"replicas": 1}, "tcp://w1": {"replicas": 1}})
    assert plan[0][2] == "tcp://w2"


def test_gpu_operator_goes_only_to_gpu_workers_one_replica_per_gpu():
    workers = {**CPU3, "tcp://g0": {"name": "g0", "resources": {"GPU": 1}},
               "tcp://g1": {"name": "g1", "resources": {"GPU": 1}}}
    plan = plan_placement([op("enc", device="GPU", replicas=2)], workers)
    assert sorted(addr for _, _, addr in plan) == ["tcp://g0", "tcp://g1"]
    with pytest.raises(PlacementError, match="needs a GPU of its own"):
        plan_placement([op("enc", device="GPU", replicas=3)], workers)


def test_gpu_replicas_already_deployed_hold_their_gpu():
    workers = {"tcp://g0": {"name": "g0", "resources": {"GPU": 1}}}
    with pytest.raises(PlacementError, match="no GPU is free"):
        plan_placement([op("enc", device="GPU")], workers, existing={"tcp://g0": {"replicas": 1, "gpus_used": 1}})


def test_missing_resource_is_an_immediate_clear_error():
    with pytest.raises(PlacementError, match=r"needs worker resources \{'TPU': 1"):
        plan_placement([op("a", resources={"TPU": 1})], CPU3)
    with pytest.raises(PlacementError, match="GPU"):
        plan_placement([op("a", device="GPU")], CPU3)


def test_per_operator_resource_tags_restrict_placement():
    workers = {**CPU3, "tcp://e": {"name": "e", "resources": {"encoder": 1}}}
    plan = plan_placement([op("enc", resources={"encoder": 1}, replicas=2)], workers)
    assert {addr for _, _, addr in plan} == {"tcp://e"}


def test_choose_replica_prefers_least_outstanding():
    assert choose_replica(["a", "b", "c"], {"a": 3, "b": 1, "c": 2}, 0) == "b"


def test_choose_replica_rotates_between_equal_replicas():
    picks = [choose_replica(["a", "b"], {}, i) for i in range(4)]
    assert picks == ["a", "b", "a", "b"]


def test_choose_replica_skips_excluded_and_returns_none_when_all_are():
    assert choose_replica(["a", "b"], {"b": 9}, 0, exclude={"a"}) == "b"
    assert choose_replica(["a"], {}, 0, exclude={"a"}) is None


def test_operator_config_rejects_bad_values_with_named_fields():
    with pytest.raises(ConfigError, match="device"):
        op("a", device="TPU")
    with pytest.raises(ConfigError, match="max_inflight"):
        op("a", max_inflight=0)
    with pytest.raises(ConfigError, match="replicas"):
        op("a", replicas=-1)
    with pytest.raises(ConfigError, match="model repository"):
        OperatorConfig("encoder", "TritonCoreOperator")


def test_operator_config_resolves_module_class_from_its_repository(tmp_path):
    (tmp_path / "my_ops.py").write_text(
        "from tdask import Operator\nclass Mine(Operator):\n    pass\nclass NotOne:\n    pass\n")
    assert OperatorConfig("m", "my_ops:Mine", repository=tmp_path).load_class().__name__ == "Mine"
    with pytest.raises(ConfigError, match="not a tdask.Operator"):
        OperatorConfig("m", "my_ops:NotOne", repository=tmp_path).load_class()
    with pytest.raises(ConfigError, match="cannot import"):
        OperatorConfig("m", "nowhere_module:X", repository=tmp_path).load_class()
    with pytest.raises(ConfigError, match="module:Class"):
        OperatorConfig("m", "no_colon", repository=tmp_path).load_class()


def test_pick_version_takes_latest_and_names_what_exists():
    versions = {"1": {"v": 1}, "3": {"v": 3}}
    assert pick_version("enc", versions, None, []) == (3, {"v": 3})
    assert pick_version("enc", versions, 1, []) == (1, {"v": 1})
    with pytest.raises(OperatorNotFoundError, match=r"no version 2 .*\[1, 3\]"):
        pick_version("enc", versions, 2, [])
    with pytest.raises(OperatorNotFoundError, match="deployed: decoder, encoder"):
        pick_version("nope", None, None, ["encoder", "decoder"])


def test_deploy_defaults_are_the_original_examples():
    from tdask.cli.deploy import build_parser, operator_configs

    configs = {c.name: c for c in operator_configs(build_parser().parse_args([]))}
    assert set(configs) == {"encoder", "decoder", "encoder_decoder"}
    for c in configs.values():
        assert (c.replicas, c.max_inflight, c.instances, c.device) == (1, 1, 1, "CPU")
    assert configs["encoder"].parameters == {"delay": 0.0, "input_copies": 1}
    assert configs["decoder"].parameters == {"delay": 0.0, "input_copies": 1}  # both models, as the original


def test_deploy_positional_and_named_options():
    from tdask.cli.deploy import build_parser, operator_configs

    args = build_parser().parse_args([
        "--encoders", "2", "4", "3", "gpu", "--decoders", "1", "2", "1", "CPU", "--encoder-decoders", "3", "8",
        "--decoder-replicas", "5", "--encoder-delay-per-token", "0.01", "--encoder-input-copies", "3",
    ])
    c = {c.name: c for c in operator_configs(args)}
    assert (c["encoder"].replicas, c["encoder"].max_inflight, c["encoder"].instances, c["encoder"].device) == (
        2, 4, 3, "GPU")
    assert c["decoder"].replicas == 5 and c["decoder"].max_inflight == 2
    assert (c["encoder_decoder"].replicas, c["encoder_decoder"].max_inflight) == (3, 8)
    assert c["encoder"].parameters == {"delay": 0.01, "input_copies": 3}


def test_deploy_rejects_bad_positional_values():
    from tdask.cli.deploy import build_parser, operator_configs

    with pytest.raises(SystemExit, match="--encoders: device must be CPU or GPU"):
        operator_configs(build_parser().parse_args(["--encoders", "1", "1", "1", "TPU"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--encoder-input-copies", "0"])


def test_client_defaults_are_the_original_examples():
    from tdask.cli.client import build_parser

    args = build_parser().parse_args([])
    assert (args.clients, args.requests_per_client, args.input_size_mean, args.input_size_stdev, args.operator) == (
        1, 100, 1000, 0, "encoder_decoder")


def test_client_expected_outputs_match_the_models_definition():
    from tdask.cli.client import expected_output, make_input

    x = np.array([0, 1, 2], dtype=np.int64)
    assert np.array_equal(expected_output("encoder", x, 2), ~np.array([0, 0, 1, 1, 2, 2]))
    assert np.array_equal(make_input("decoder", x, 2), ~np.array([0, 0, 1, 1, 2, 2]))
    assert expected_output("something_else", x, 1) is None


def test_deploy_says_what_a_protocol_needs_instead_of_failing_to_start(monkeypatch):
    import dask.config

    from tdask.cli.deploy import check_protocol

    with dask.config.set({"distributed.comm.tls.ca-file": None}):
        assert "distributed.comm.tls.ca-file" in check_protocol("tls")
    with dask.config.set({"distributed.comm.tls.ca-file": "ca.pem"}):
        assert check_protocol("tls") is None
    assert check_protocol("tcp") is None
