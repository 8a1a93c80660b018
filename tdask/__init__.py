"""tdask: serve model pipelines (Triton Core models and Python operators) on a Dask cluster.

The public API is what this module exports; the layers below it, from the bottom up: settings, errors and
the operator contract (``config``, ``errors``, ``operator``, ``tensors``, ``registry``); shared memory
(``shm``); the request stream (``comm``); Triton (``triton``); the caller's session (``session``); tdask on a
worker (``worker``); deployments (``deploy``); metrics and the dashboard (``observe``); the command lines
(``cli``). docs/design.md draws them.
"""

from __future__ import annotations

from tdask import config  # noqa: F401  (loads tdask.yaml into dask.config)
from tdask.deploy.deployment import Deployment
from tdask.errors import (
    ConfigError,
    InvalidRequestError,
    OperatorError,
    OperatorNotFoundError,
    OverloadedError,
    PlacementError,
    ProtocolError,
    ReplicaUnavailableError,
    RequestTimeoutError,
    RequestTooLargeError,
    TdaskError,
    TritonError,
    TritonServerError,
)
from tdask.operator import Operator, OperatorConfig, OperatorContext, Request
from tdask.session import InferFuture, InferResult, RemoteOperator, ResponseStream, Session, connect
from tdask.tensors import TensorRef
from tdask.triton.operator import TritonCoreOperator
from tdask.worker.plugin import TdaskWorkerPlugin

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
    "ProtocolError",
    "RemoteOperator",
    "ReplicaUnavailableError",
    "Request",
    "ResponseStream",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "Session",
    "TdaskError",
    "TdaskWorkerPlugin",
    "TensorRef",
    "TritonCoreOperator",
    "TritonError",
    "TritonServerError",
    "connect",
]
