"""Tells from inside Triton's Python stub which NumPy it imported and which environment it runs in."""

import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        version = np.array([int(part) for part in np.__version__.split(".")[:3]], dtype=np.int64)
        prefix = np.frombuffer(sys.prefix.encode(), dtype=np.uint8)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("numpy_version", version),
                                            pb_utils.Tensor("prefix", prefix)]) for _ in requests]
