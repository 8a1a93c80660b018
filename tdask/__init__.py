"""tdask: serve model pipelines (Triton Core models and Python operators) on a Dask cluster."""

from __future__ import annotations

from tdask import config  # noqa: F401  (loads tdask.yaml into dask.config)
from tdask.deployment import Deployment
from tdask.errors import (
    ConfigError,
    InvalidRequestError,
    OperatorError,
    OperatorNotFoundError,
    OverloadedError,
    PlacementError,
    ReplicaUnavailableError,
    RequestTimeoutError,
    TdaskError,
    TritonError,
    TritonServerError,
)
from tdask.operator import Operator, OperatorConfig, OperatorContext, Request
from tdask.remote import InferFuture, InferResult, RemoteOperator, Session, connect
from tdask.tensors import TensorRef
from tdask.triton_operator import TritonCoreOperator

__all__ = [
    "ConfigError",
    "Deployment",
    "InferFuture",
    "InferResult",
    "InvalidRequestError",
    "Operator",
    "OperatorConfig",
    "OperatorContext",
    "OperatorError",
    "OperatorNotFoundError",
    "OverloadedError",
    "PlacementError",
    "RemoteOperator",
    "ReplicaUnavailableError",
    "Request",
    "RequestTimeoutError",
    "Session",
    "TdaskError",
    "TensorRef",
    "TritonCoreOperator",
    "TritonError",
    "TritonServerError",
    "connect",
]
