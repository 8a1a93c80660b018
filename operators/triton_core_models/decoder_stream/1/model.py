"""Triton Python-backend decoupled decoder: the decoder's output, sent in chunks of ``chunk_size`` elements.

One response per chunk (an empty input gets one empty chunk), then the end (a final flag without a response).
A cancelled request (its caller went away) stops sending at once. Request parameters: ``input_copies``
(as the decoder), ``chunk_size`` (default from the model config, 1000) and ``delay`` (seconds per element,
slept per chunk). Self-contained, so it loads unchanged in a stock Triton server.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def _positive_int(name: str, value: Any) -> int:
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"parameter {name!r} must be a positive integer, got {value!r}")
    return int(text)


def _delay(value: Any) -> float:
    try:
        result = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else -1.0
    except ValueError:
        result = -1.0
    if not 0 <= result < float("inf"):
        raise ValueError(f"parameter 'delay' must be a non-negative number of seconds, got {value!r}")
    return result


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise RuntimeError("decoder_stream must be decoupled: model_transaction_policy { decoupled: true }")
        self.defaults = {"input_copies": "1", "chunk_size": "1000", "delay": "0"}
        for key, value in (config.get("parameters") or {}).items():
            if isinstance(value, dict) and "string_value" in value:
                self.defaults[key] = value["string_value"]

    def _settings(self, request: Any) -> tuple[int, int, float]:
        merged = dict(self.defaults)
        raw = request.parameters()
        if raw:
            merged.update(json.loads(raw) if isinstance(raw, str) else raw)
        return (_positive_int("input_copies", merged["input_copies"]),
                _positive_int("chunk_size", merged["chunk_size"]), _delay(merged["delay"]))

    def _stream(self, request: Any, sender: Any) -> None:
        input_copies, chunk_size, delay = self._settings(request)
        tensor = pb_utils.get_input_tensor_by_name(request, "input")
        if tensor is None:
            raise ValueError("missing required input tensor 'input'")
        data = tensor.as_numpy().ravel()
        if data.size % input_copies:
            raise ValueError(f"input length {data.size} is not a multiple of input_copies={input_copies}")
        decoded = np.invert(data[::input_copies])
        for start in range(0, max(decoded.size, 1), chunk_size):
            if sender.is_cancelled():
                return
            chunk = np.ascontiguousarray(decoded[start:start + chunk_size])
            if delay and chunk.size:
                time.sleep(delay * chunk.size)
            sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("output", chunk)]))

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._stream(request, sender)
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
                error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)  # the end (also after a cancel)
        return None

    def finalize(self) -> None:
        pass
