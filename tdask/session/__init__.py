"""The caller's API: a session on a cluster, handles to deployed operators, and requests as futures."""

from tdask.session.futures import InferFuture, InferResult
from tdask.session.remote_operator import RemoteOperator
from tdask.session.session import Session, WorkerSide, connect
from tdask.session.streaming import ResponseStream

__all__ = ["InferFuture", "InferResult", "RemoteOperator", "ResponseStream", "Session", "WorkerSide", "connect"]
