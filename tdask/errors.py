"""One exception hierarchy, so callers can catch :class:`TdaskError` alone, and its one wire form.

An error carries the facts a caller acts on as declared fields, and travels between processes as
:func:`to_wire` makes it and :func:`from_wire` reads it, nowhere else.
"""

from __future__ import annotations

from typing import Any


class TdaskError(Exception):
    """Base class of every error tdask raises on purpose.

    ``retryable``: the request never started where it was sent (refused, replica gone before it
    arrived, connection never made), so another replica may take it. ``started``: raised while the
    request ran (an operator's own call to another operator failed); such an error is never retryable,
    since retrying could run the request twice.
    """

    def __init__(self, message: str = "", *, retryable: bool = False, started: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.started = started

    def __reduce__(self) -> tuple[Any, ...]:  # keep the fields through pickle (Dask's actor calls)
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[TdaskError], args: tuple[Any, ...], fields: dict[str, Any]) -> TdaskError:
    error = cls(*args)
    error.__dict__.update(fields)
    return error


class ConfigError(TdaskError, ValueError):
    """An operator or deployment configuration is invalid."""


class PlacementError(TdaskError):
    """No worker of the cluster can host a replica (missing resource, no GPU, ...)."""


class OperatorNotFoundError(TdaskError, LookupError):
    """No operator of that name (and version) is deployed."""


class InvalidRequestError(TdaskError, ValueError):
    """The request itself is malformed: wrong dtype or shape, missing or extra tensors."""


class RequestTooLargeError(InvalidRequestError):
    """The request's inputs are over the per-request size limit (``tdask.replica.max-request-bytes``)."""


class OverloadedError(TdaskError):
    """Every replica's queue is full: the request was rejected at once, not queued."""


class ReplicaUnavailableError(TdaskError):
    """The replica (or its worker) is gone; unless ``retryable``, the request may or may not have run."""


class RequestTimeoutError(TdaskError, TimeoutError):
    """The request did not finish within its timeout."""


class ProtocolError(TdaskError):
    """The peer of a request stream speaks another version of its protocol, or something that is not it."""


class OperatorError(TdaskError):
    """The operator's own code failed while executing the request."""


class TritonError(OperatorError):
    """Triton Inference Server rejected or failed the request; the message is Triton's.

    ``status``: Triton's status code (``StatusCode.INVALID_ARGUMENT``, ...). ``connection``: set when the
    connection to the server failed, ``"refused"`` (nothing was sent) or ``"lost"`` (the request may or
    may not have run).
    """

    def __init__(self, message: str = "", *, status: str | None = None, connection: str | None = None,
                 retryable: bool = False, started: bool = False) -> None:
        super().__init__(message, retryable=retryable, started=started)
        self.status = status
        self.connection = connection


class TritonServerError(TdaskError):
    """A Triton Inference Server process could not be started or died."""


_BY_NAME: dict[str, type[TdaskError]] = {cls.__name__: cls for cls in (
    TdaskError, ConfigError, PlacementError, OperatorNotFoundError, InvalidRequestError, RequestTooLargeError,
    OverloadedError,
    ReplicaUnavailableError, RequestTimeoutError, ProtocolError, OperatorError, TritonError, TritonServerError)}


def to_wire(error: BaseException) -> dict[str, Any]:
    """An error as a message field. Anything but a :class:`TdaskError` is the operator's own failure."""
    if not isinstance(error, TdaskError):
        return {"type": "OperatorError", "message": f"{type(error).__name__}: {error}"}
    wire: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if error.started:
        wire["started"] = True
    elif error.retryable:
        wire["retryable"] = True
    if isinstance(error, TritonError) and error.status:
        wire["status"] = error.status
    return wire


def from_wire(wire: dict[str, Any]) -> TdaskError:
    """The error a :func:`to_wire` field stands for (an unknown type is an :class:`OperatorError`)."""
    cls = _BY_NAME.get(str(wire.get("type")), OperatorError)
    error = cls(str(wire.get("message", "unknown error")), retryable=bool(wire.get("retryable")),
                started=bool(wire.get("started")))
    if isinstance(error, TritonError):
        error.status = wire.get("status")
    return error
