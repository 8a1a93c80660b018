"""Unit tests of reading a Triton model config and merging tdask's deployment choices over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdask.errors import ConfigError
from tdask.triton.model_config import merge_model_config, model_versions, read_model_config

REPOSITORY = Path(__file__).resolve().parents[1] / "operators" / "triton_core_models"


def _model(tmp_path: Path, name: str, text: str, versions: tuple[str, ...] = ("1",)) -> Path:
    model = tmp_path / name
    model.mkdir()
    (model / "config.pbtxt").write_text(text)
    for version in versions:
        (model / version).mkdir()
    return tmp_path


def test_read_shipped_models_are_bare_python_configs() -> None:
    for name in ("encoder", "decoder"):
        assert read_model_config(REPOSITORY, name) == {"backend": "python"}
        assert model_versions(REPOSITORY, name) == [1]


def test_read_full_config_uses_proto_field_names(tmp_path: Path) -> None:
    repo = _model(
        tmp_path,
        "m",
        """
        backend: "python"
        max_batch_size: 0
        input [{ name: "input" data_type: TYPE_INT64 dims: [-1] }]
        instance_group [{ count: 3 kind: KIND_CPU }]
        parameters { key: "delay" value { string_value: "0.5" } }
        """,
    )
    config = read_model_config(repo, "m")
    assert config["input"] == [{"name": "input", "data_type": "TYPE_INT64", "dims": ["-1"]}]
    assert config["instance_group"] == [{"count": 3, "kind": "KIND_CPU"}]
    assert config["parameters"] == {"delay": {"string_value": "0.5"}}


def test_missing_model_and_config_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        read_model_config(tmp_path, "nope")
    with pytest.raises(ConfigError, match="nope"):
        model_versions(tmp_path, "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty/config\.pbtxt"):
        read_model_config(tmp_path, "empty")


def test_unparsable_config_is_a_config_error(tmp_path: Path) -> None:
    repo = _model(tmp_path, "bad", "backend: python python\nnot_a_field: 1\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        read_model_config(repo, "bad")


def test_model_versions_are_numeric_and_sorted(tmp_path: Path) -> None:
    repo = _model(tmp_path, "m", 'backend: "python"', versions=("10", "2", "1", "latest"))
    (tmp_path / "m" / "3").write_text("a file, not a version")
    assert model_versions(repo, "m") == [1, 2, 10]


def test_merge_sets_name_instance_group_and_parameters_without_mutating_base() -> None:
    base = {
        "backend": "python",
        "instance_group": [{"count": 4, "kind": "KIND_GPU"}, {"count": 1}],
        "parameters": {"delay": {"string_value": "1"}, "keep": {"string_value": "x"}},
    }
    snapshot = repr(base)
    merged = merge_model_config(
        base, name="enc", instance_count=2, device="cpu", parameters={"delay": 0.5, "input_copies": 3}
    )
    assert repr(base) == snapshot
    assert merged["name"] == "enc"
    assert merged["backend"] == "python"
    assert merged["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert merged["parameters"] == {
        "delay": {"string_value": "0.5"},
        "keep": {"string_value": "x"},
        "input_copies": {"string_value": "3"},
    }


def test_merge_gpu_group_and_defaults() -> None:
    merged = merge_model_config({}, name="m", device="GPU", gpus=[0, 1])
    assert merged["instance_group"] == [{"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}]
    assert merge_model_config({}, name="m", instance_count=3)["instance_group"] == [
        {"count": 3, "kind": "KIND_CPU"}
    ]


def test_merge_without_choices_keeps_base_groups() -> None:
    base = {"instance_group": [{"count": 5, "kind": "KIND_CPU"}]}
    assert merge_model_config(base, name="m") == {**base, "name": "m"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"instance_count": 0},
        {"instance_count": -1},
        {"instance_count": 1.5},
        {"instance_count": True},
        {"device": "TPU"},
        {"gpus": [0]},
        {"device": "GPU", "gpus": [-1]},
        {"name": ""},
        {"parameters": {"": 1}},
    ],
)
def test_merge_rejects_invalid_choices(kwargs: dict) -> None:
    kwargs = {"name": "m", **kwargs}
    with pytest.raises(ConfigError):
        merge_model_config({}, **kwargs)
