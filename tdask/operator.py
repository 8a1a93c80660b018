"""The operator contract: configuration, requests and the base class users subclass."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tdask.errors import ConfigError, InvalidRequestError

DEVICES = ("CPU", "GPU")
TRITON_ALIASES = ("TritonCoreOperator", "triton", "tdask:TritonCoreOperator")
TRITON_IMPLEMENTATION = "tdask.triton.operator:TritonCoreOperator"  # what the aliases name


@dataclass(frozen=True)
class OperatorConfig:
    """How one operator is implemented and placed.

    Parameters
    ----------
    name
        The name callers look the operator up by (for Triton operators also the model name).
    implementation
        A class, a ``"module:Class"`` string found in ``repository``, or
        ``"TritonCoreOperator"`` for a Triton model repository entry.
    repository
        The operator repository (Python operators) or Triton model repository.
    version
        Operators are found by name and version; the latest version when none is asked.
    max_inflight
        Requests one replica executes at once; more wait in its bounded queue.
    parameters
        Operator parameters; for Triton models they are merged into ``config.pbtxt``.
    device
        ``"CPU"`` or ``"GPU"``. GPU replicas only go to workers with a ``GPU`` resource.
    instances
        Model instances per replica (Triton's ``instance_group`` count).
    replicas
        Number of replicas (actors) placed on workers.
    resources
        Extra resource tags a worker must have to host a replica, e.g. ``{"encoder": 1}``.
    max_queue_size
        Requests waiting per replica beyond ``max_inflight``; ``None`` takes the config default.
    idempotent
        Running a request twice is harmless, so a request whose replica was lost mid-way may
        be retried on another replica. Otherwise only requests that never started are retried.

    >>> OperatorConfig("encoder", "TritonCoreOperator", repository="operators/triton_core_models")
    OperatorConfig(name='encoder', ...)
    """

    name: str
    implementation: type | str = "TritonCoreOperator"
    repository: str | None = None
    version: int = 1
    max_inflight: int = 1
    parameters: Mapping[str, Any] = field(default_factory=dict)
    device: str = "CPU"
    instances: int = 1
    replicas: int = 1
    resources: Mapping[str, float] = field(default_factory=dict)
    max_queue_size: int | None = None
    idempotent: bool = False

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"operator name must be a non-empty string, got {self.name!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"operator {self.name!r}: device must be CPU or GPU, got {self.device!r}")
        for attr in ("max_inflight", "instances", "replicas", "version"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"operator {self.name!r}: {attr} must be an integer >= 1, got {value!r}")
        if self.max_queue_size is not None and self.max_queue_size < 0:
            raise ConfigError(f"operator {self.name!r}: max_queue_size must be >= 0")
        if self.repository is not None:
            object.__setattr__(self, "repository", os.path.abspath(os.fspath(self.repository)))
        if self.is_triton and self.repository is None:
            raise ConfigError(f"operator {self.name!r}: a Triton operator needs the model repository path")

    @property
    def is_triton(self) -> bool:
        """Whether replicas serve a model of a Triton model repository (``TritonCoreOperator`` or a subclass)."""
        impl = self.implementation
        return impl in TRITON_ALIASES or bool(getattr(impl, "serves_triton_model", False))

    def required_resources(self) -> dict[str, float]:
        """Worker resources a replica needs: GPU replicas need one ``GPU`` each."""
        needed = dict(self.resources)
        if self.device == "GPU":
            needed["GPU"] = max(1.0, float(needed.get("GPU", 1)))
        return needed

    def load_class(self) -> type[Operator]:
        """Resolve ``implementation`` to a class; runs where the replica runs."""
        impl = self.implementation
        if impl in TRITON_ALIASES:
            impl = TRITON_IMPLEMENTATION
        if isinstance(impl, type):
            cls = impl
        else:
            module_name, sep, attr = str(impl).partition(":")
            if not sep or not module_name or not attr:
                raise ConfigError(f"operator {self.name!r}: implementation must be 'module:Class', got {impl!r}")
            if self.repository and not self.is_triton and self.repository not in sys.path:
                sys.path.insert(0, self.repository)  # a Python operator's module lies in its repository
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise ConfigError(
                    f"operator {self.name!r}: cannot import {module_name!r} (repository {self.repository}): {e}"
                ) from e
            try:
                cls = getattr(module, attr)
            except AttributeError as e:
                raise ConfigError(f"operator {self.name!r}: module {module_name!r} has no {attr!r}") from e
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise ConfigError(f"operator {self.name!r}: {cls!r} is not a tdask.Operator subclass")
        return cls

    def describe(self) -> dict[str, Any]:
        """A plain summary for printing and for the registry."""
        impl = self.implementation
        if isinstance(impl, type):
            impl = f"{impl.__module__}:{impl.__qualname__}"
        return {
            "name": self.name,
            "version": self.version,
            "implementation": impl,
            "device": self.device,
            "instances": self.instances,
            "max_inflight": self.max_inflight,
            "replicas": self.replicas,
            "idempotent": self.idempotent,
        }


class ResponseSink(Protocol):
    """Where the responses of a streamed request go: a :class:`ResponseChannel` in the caller's process, or the
    request stream to a caller elsewhere. ``put`` waits while the caller has ``tdask.request.stream-window``
    responses it has not read yet."""

    async def put(self, outputs: dict[str, Any] | None, final: bool) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class ResponseChannel:
    """The responses of one streamed request in the process that reads them: at most ``capacity`` wait, and
    :meth:`put` waits for room (a slow reader slows its producer instead of filling memory). ``None`` outputs
    with ``final`` end the stream without a response; :meth:`fail` ends it with an error."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.items: deque[tuple[dict[str, Any] | None, bool, BaseException | None]] = deque()
        self.ended = False
        self.most_buffered = 0  # the most responses that ever waited here (tests read it)
        self._reader: asyncio.Future | None = None
        self._room: asyncio.Future | None = None

    async def put(self, outputs: dict[str, Any] | None, final: bool) -> None:
        while len(self.items) >= self.capacity and not self.ended:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        if self.ended:  # the reader went away: nothing more is read
            raise asyncio.CancelledError("the stream's reader is gone")
        self._push((outputs, final, None))
        self.ended = final

    def fail(self, error: BaseException) -> None:
        if not self.ended:
            self._push((None, True, error))
            self.ended = True

    def push(self, outputs: dict[str, Any] | None, final: bool, error: BaseException | None = None) -> None:
        """Without waiting (the request stream's reader: its sender was given room beforehand)."""
        if not self.ended:
            self._push((outputs, final or error is not None, error))
            self.ended = final or error is not None

    def _push(self, item: tuple[dict[str, Any] | None, bool, BaseException | None]) -> None:
        self.items.append(item)
        self.most_buffered = max(self.most_buffered, len(self.items))
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    async def get(self) -> tuple[dict[str, Any] | None, bool, BaseException | None]:
        """The next ``(outputs, final, error)``."""
        while not self.items:
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader
        item = self.items.popleft()
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        return item

    def close(self) -> None:
        """The reader stops: a producer waiting for room stops too."""
        self.ended = True
        if self._room is not None and not self._room.done():
            self._room.set_result(None)


class Request:
    """One request as an operator sees it: named input tensors, parameters and an id.

    The operator answers with :meth:`respond` (one response), or, to a caller that streams it
    (:meth:`tdask.RemoteOperator.stream`), with any number of :meth:`send` and then a final one or :meth:`end`;
    :meth:`fail` ends it with an error, also after responses were sent.
    """

    __slots__ = ("request_id", "inputs", "parameters", "_outputs", "_error", "_done", "_sink", "sent")

    def __init__(self, request_id: str, inputs: dict[str, Any], parameters: dict[str, Any],
                 sink: ResponseSink | None = None) -> None:
        self.request_id = request_id
        self.inputs = inputs
        self.parameters = parameters
        self._outputs: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._done = False
        self._sink = sink  # None: the caller waits for a single answer (infer)
        self.sent = 0  # responses sent

    def input(self, name: str) -> Any:
        """The input tensor ``name``; a clear error when the caller did not send it."""
        try:
            return self.inputs[name]
        except KeyError:
            raise InvalidRequestError(
                f"request {self.request_id}: missing input tensor {name!r} (got {sorted(self.inputs)})"
            ) from None

    @property
    def streamed(self) -> bool:
        """Whether the caller takes several responses (it called ``stream()``)."""
        return self._sink is not None

    async def send(self, outputs: Mapping[str, Any], final: bool = False) -> None:
        """Send one response; ``final`` ends the request. Waits while the caller has not read earlier ones."""
        if self._done:
            raise RuntimeError(f"request {self.request_id} was already answered")
        if self._sink is None:
            if not final:
                raise InvalidRequestError(f"request {self.request_id} is answered with several responses: call the "
                                          "operator with stream(), not infer()")
            self._outputs = dict(outputs)
            self._done = True
            return
        self._done = final
        await self._sink.put(dict(outputs), final)
        self.sent += 1

    async def respond(self, outputs: Mapping[str, Any]) -> None:
        """Send the output tensors back to the caller: the one (or last) response."""
        await self.send(outputs, final=True)

    async def end(self) -> None:
        """End a streamed request after the responses sent (no final response of its own)."""
        if self._done:
            raise RuntimeError(f"request {self.request_id} was already answered")
        if self._sink is None:
            raise InvalidRequestError(f"request {self.request_id} ended without a response")
        self._done = True
        await self._sink.put(None, True)

    def fail(self, error: BaseException) -> None:
        """Answer the request with an error instead of outputs (a stream ends with it)."""
        if self._done:
            raise RuntimeError(f"request {self.request_id} was already answered")
        self._error = error
        self._done = True

    @property
    def done(self) -> bool:
        return self._done


class Operators(Protocol):
    """Where a running operator finds the other operators: its worker's :class:`tdask.Session`."""

    async def operator(self, name: str, version: int | None = None) -> Any: ...


class OperatorContext:
    """What a running operator may use, handed to it by its replica when it is built.

    ``session``: the worker's session, to call other operators worker to worker. ``services``: what its
    worker offers operators by name (``"triton"``: the worker's Triton servers, which
    :class:`~tdask.TritonCoreOperator` loads its model into).
    """

    def __init__(self, config: OperatorConfig, replica_id: str, worker: Any, session: Operators,
                 services: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.replica_id = replica_id
        self.worker = worker
        self.session = session
        self.services = dict(services or {})

    async def operator(self, name: str, version: int | None = None) -> Any:
        """A handle (:class:`tdask.RemoteOperator`) to another deployed operator, called worker to worker."""
        return await self.session.operator(name, version)


class Operator:
    """Base class of operators: subclass it and implement :meth:`execute`.

    >>> class Echo(Operator):
    ...     async def execute(self, requests):
    ...         for request in requests:
    ...             await request.respond({"output": request.input("input")})
    """

    serves_triton_model = False  # True for TritonCoreOperator: its replicas load a model of a Triton repository
    # what the operator takes and answers, each {"name", "datatype" (KServe's: INT64, FP32, ...), "shape" (-1: any
    # size)}: front doors check requests against it and clients make data from it; none declared: anything goes
    inputs: tuple[dict[str, Any], ...] = ()
    outputs: tuple[dict[str, Any], ...] = ()

    def __init__(self, config: OperatorConfig, context: OperatorContext) -> None:
        self.config = config
        self.context = context

    async def setup(self) -> None:
        """Acquire what the operator needs (servers, models, handles) before serving."""

    async def execute(self, requests: list[Request]) -> None:
        """Answer every request with :meth:`Request.respond` or :meth:`Request.fail`."""
        raise NotImplementedError

    async def teardown(self) -> None:
        """Release what :meth:`setup` acquired."""

    def lane(self) -> dict[str, Any] | None:
        """What a caller needs to run requests of this operator itself (:mod:`tdask.worker.lanes`); None: not
        offered."""
        return None

    def info(self) -> dict[str, Any]:
        """Extra facts shown on the dashboard and printed at deploy time."""
        return {}

    def metadata(self) -> dict[str, Any]:
        """The operator's inputs and outputs as the KServe v2 model metadata gives them (after :meth:`setup`)."""
        return {"platform": "tdask_python", "inputs": [dict(t) for t in self.inputs],
                "outputs": [dict(t) for t in self.outputs]}
