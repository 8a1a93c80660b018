"""Triton Python-backend encoder: repeat each element ``input_copies`` times, then invert.

The file is self-contained (it must also load unchanged in a stock Triton server), so the
small parameter helpers are duplicated in the decoder's model.py on purpose.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_PARAMETERS = {"input_copies": "1", "delay": "0"}


def _parse_input_copies(value: Any) -> int:
    """Accept a positive int or its decimal string; anything else is the caller's error."""
    text = str(value).strip() if isinstance(value, (int, str)) and value is not True else ""
    if value is False or not text.isdigit() or int(text) < 1:
        raise ValueError(f"parameter 'input_copies' must be a positive integer, got {value!r}")
    return int(text)


def _parse_delay(value: Any) -> float:
    """Accept a non-negative number (seconds per input element) or its string form."""
    message = f"parameter 'delay' must be a non-negative number of seconds, got {value!r}"
    valid_type = isinstance(value, (int, float, str)) and not isinstance(value, bool)
    try:
        result = float(value) if valid_type else -1.0
    except ValueError:
        raise ValueError(message) from None
    if not 0 <= result < float("inf"):
        raise ValueError(message)
    return result


def _config_parameters(model_config: dict) -> dict[str, str]:
    """Model-config parameters as plain strings, with the defaults for absent keys."""
    params = dict(DEFAULT_PARAMETERS)
    for key, value in (model_config.get("parameters") or {}).items():
        if isinstance(value, dict) and "string_value" in value:
            params[key] = value["string_value"]
    return params


def _request_parameters(request: Any) -> dict[str, Any]:
    """Triton hands request parameters over as a JSON string (or nothing)."""
    raw = request.parameters()
    if not raw:
        return {}
    parsed = json.loads(raw) if isinstance(raw, str) else raw
    return dict(parsed)


def _error_response(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    """Encoder operator; computes with NumPy on CPU instances and CuPy on GPU instances."""

    @staticmethod
    def auto_complete_config(auto_complete_model_config: Any) -> Any:
        """Fill in what a bare ``backend: "python"`` config.pbtxt leaves out."""
        auto_complete_model_config.set_max_batch_size(0)
        auto_complete_model_config.add_input({"name": "input", "data_type": "TYPE_INT64", "dims": [-1]})
        auto_complete_model_config.add_output({"name": "output", "data_type": "TYPE_INT64", "dims": [-1]})
        auto_complete_model_config.add_output(
            {"name": "input_copies", "data_type": "TYPE_INT64", "dims": [1]}
        )
        # Parameters cannot be auto-completed: Triton 2.51 keeps only max_batch_size, inputs,
        # outputs and the transaction policy from here (edits to as_dict()["parameters"] are
        # dropped, checked). DEFAULT_PARAMETERS apply in code when the config has none.
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        self.parameters = _config_parameters(self.model_config)
        # Validate the configured defaults once, so a bad config fails the load, not each call.
        _parse_input_copies(self.parameters["input_copies"])
        _parse_delay(self.parameters["delay"])
        self.gpu = args.get("model_instance_kind") == "GPU"
        self.cp = None
        if self.gpu:
            try:
                import cupy
            except ImportError as exc:
                raise RuntimeError(
                    "encoder: GPU instance requested but CuPy is not installed; "
                    "install cupy or load the model with a CPU instance group"
                ) from exc
            device_id = int(args.get("model_instance_device_id", 0))
            try:
                cupy.cuda.Device(device_id).use()
            except Exception as exc:
                raise RuntimeError(f"encoder: GPU {device_id} is not usable: {exc}") from exc
            self.cp = cupy
            self.device_id = device_id

    def _settings(self, request: Any) -> tuple[int, float]:
        merged: dict[str, Any] = dict(self.parameters)
        merged.update(_request_parameters(request))
        return _parse_input_copies(merged["input_copies"]), _parse_delay(merged["delay"])

    def _execute_one(self, request: Any) -> Any:
        try:
            input_copies, delay = self._settings(request)
        except ValueError as exc:
            return _error_response(str(exc))
        tensor = pb_utils.get_input_tensor_by_name(request, "input")
        if tensor is None:
            return _error_response("missing required input tensor 'input'")
        copies = pb_utils.Tensor("input_copies", np.array([input_copies], dtype=np.int64))
        if self.cp is not None:
            cp = self.cp
            with cp.cuda.Device(self.device_id):
                data = (
                    cp.asarray(tensor.as_numpy())
                    if tensor.is_cpu()
                    else cp.from_dlpack(tensor.to_dlpack())
                )
                n = int(data.size)
                result = cp.ascontiguousarray(~cp.repeat(data.ravel(), input_copies))
                output = pb_utils.Tensor.from_dlpack("output", result)
        else:
            data = tensor.as_numpy()
            n = int(data.size)
            # invert the n inputs, then repeat them (the same as repeating, then inverting n x copies);
            # one copy needs no repeat: np.repeat moves element by element, far slower than the invert
            inverted = np.invert(data.ravel())
            output = pb_utils.Tensor("output", inverted if input_copies == 1 else np.repeat(inverted, input_copies))
        if delay and n:
            time.sleep(delay * n)
        return pb_utils.InferenceResponse(output_tensors=[output, copies])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._execute_one(request))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
                responses.append(_error_response(f"{type(exc).__name__}: {exc}"))
        return responses

    def finalize(self) -> None:
        pass
