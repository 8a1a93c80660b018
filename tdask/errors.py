"""One exception hierarchy, so callers can catch :class:`TdaskError` alone."""

from __future__ import annotations


class TdaskError(Exception):
    """Base class of every error tdask raises on purpose."""


class ConfigError(TdaskError, ValueError):
    """An operator or deployment configuration is invalid."""


class PlacementError(TdaskError):
    """No worker of the cluster can host a replica (missing resource, no GPU, ...)."""


class OperatorNotFoundError(TdaskError, LookupError):
    """No operator of that name (and version) is deployed."""


class InvalidRequestError(TdaskError, ValueError):
    """The request itself is malformed: wrong dtype or shape, missing or extra tensors."""


class OverloadedError(TdaskError):
    """Every replica's queue is full: the request was rejected at once, not queued."""


class ReplicaUnavailableError(TdaskError):
    """The replica (or its worker) is gone; the request may not have been executed."""


class RequestTimeoutError(TdaskError, TimeoutError):
    """The request did not finish within its timeout."""


class OperatorError(TdaskError):
    """The operator's own code failed while executing the request."""


class TritonError(OperatorError):
    """Triton Inference Server rejected or failed the request; the message is Triton's."""


class TritonServerError(TdaskError):
    """A Triton Inference Server process could not be started or died."""
