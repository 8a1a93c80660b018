"""Run one real ``tritonserver`` process next to a Dask worker and manage its models.

Every call is async and never blocks the event loop, because the owner is a Dask worker whose
heartbeats share that loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tdask import config
from tdask.compat import TimeoutErrors
from tdask.errors import ConfigError, TritonServerError
from tdask.shm.names import SHM_DIR, STUB_PREFIX, owner_gone, pid_alive, sweep_orphaned_regions
from tdask.triton import environment
from tdask.triton.environment import TritonEnvironment
from tdask.triton.model_config import read_model_config

logger = logging.getLogger(__name__)

EXECUTION_ENV = "EXECUTION_ENV_PATH"  # the Python backend's model parameter: the environment its stub runs in


def _free_ports(count: int, host: str) -> list[int]:
    """Ports the OS says are free now; all are held open together so they are distinct."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@functools.cache
def _orphan_guard() -> list[str]:
    """A prefix that has the kernel SIGKILL tritonserver when the thread that spawned it goes away.

    ``setpriv --pdeathsig`` (util-linux) sets PR_SET_PDEATHSIG and then execs tritonserver. That
    fires when the *thread* that forked the child exits, not the process; tdask spawns from the
    Dask worker's event-loop thread, which lives as long as the worker, so this is an orphan guard
    for a worker that is SIGKILLed. Not a ``preexec_fn``: Python code between fork and exec crashes
    the child now and then while gRPC threads are busy (tests/test_triton_server.py spawns under load).
    """
    if not sys.platform.startswith("linux"):
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        logger.warning("setpriv (util-linux) not found: a tritonserver outlives a SIGKILLed worker; "
                       "tdask's own shutdown still stops it")
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


def _tail(path: Path | None, lines: int | None = None) -> str:
    if lines is None:
        lines = int(config.get("triton.log-tail-lines"))
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


async def _http_status(host: str, port: int, path: str, timeout: float = 1.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers (plain asyncio: no extra deps)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (*TimeoutErrors, OSError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (*TimeoutErrors, OSError, ValueError):
        return None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


_TMPDIR_PREFIX = "tdask-triton-"  # + owner pid + "-": a server's backend directory and log


def _sweep_orphaned_tmpdirs() -> None:
    """Remove the temporary directories (backend copy, log) of servers whose owning process is gone:
    a SIGKILLed worker cannot remove its own."""
    for path in Path(tempfile.gettempdir()).glob(f"{_TMPDIR_PREFIX}*-*"):
        if owner_gone(path.name, _TMPDIR_PREFIX, "-") and path.is_dir():
            logger.info("removing %s: the process that owned it is gone", path)
            shutil.rmtree(path, ignore_errors=True)


def _sweep_orphaned_stubs() -> None:
    """SIGKILL Python backend stubs of tdask's servers that are gone (a server killed with its SIGKILLed
    worker leaves them, and no tdask code runs then). A stub's arguments name its shared-memory region
    (tdask's prefix) and its server's pid; stubs of servers not started by tdask are never touched."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            if (len(argv) > 5 and argv[0].endswith("triton_python_backend_stub") and argv[2].startswith(STUB_PREFIX)
                    and argv[5].isdigit() and not pid_alive(int(argv[5]))):
                logger.info("killing Python backend stub pid %s: its tritonserver (pid %s) is gone", proc.pid, argv[5])
                proc.kill()
        except (psutil.Error, OSError):
            pass


def sweep_orphans() -> None:
    """Remove what dead tdask processes on this host left: stubs, /dev/shm regions, temporary directories.

    Run where tdask starts something (a replica, a Triton server), since a SIGKILLed worker runs no code to
    clean up after itself."""
    _sweep_orphaned_stubs()
    sweep_orphaned_regions()
    _sweep_orphaned_tmpdirs()


class TritonServer:
    """One ``tritonserver`` process in explicit model-control mode, on private free ports.

    Without ``server_path`` it is tdask's own Triton, from :mod:`tdask.triton.environment`, and every model's stub
    runs in that environment (a model whose config names an ``EXECUTION_ENV_PATH`` of its own keeps it). With
    ``server_path`` it is the user's Triton, used as it is. It and its stubs inherit this process's environment
    variables, with ``environ`` over them (a tdask worker's servers get the worker's allocator settings that way).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        server_path: str | None = None,
        log_file: str | None = None,
        log_verbose: int = 0,
        startup_timeout: float = 60.0,
        host: str = "127.0.0.1",
        environ: dict[str, str] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.server_path: Path | None = None
        if server_path is not None:
            self._use_binary(Path(server_path))
        self.environment: TritonEnvironment | None = None  # tdask's own Triton: known once started
        self._requested_log_file = Path(log_file) if log_file else None
        self.log_verbose = int(log_verbose)
        self.startup_timeout = float(startup_timeout)
        self.host = host
        self.environ = {key: str(value) for key, value in (environ or {}).items()}  # over this process's
        self._process: asyncio.subprocess.Process | None = None
        self._instances: dict[str, int] = {}  # model -> instances loaded, which Triton stops one by one
        self._stubs_killed = False  # the stopped server's process group was swept (once: its number may be reused)
        self._tmpdir: Path | None = None
        self._log_path: Path | None = None
        self._ports: dict[str, int] = {}
        self._grpc_client: Any = None
        # the Python backend's stubs name their /dev/shm regions with this: a region whose owner is gone
        # can be told apart from a live server's, and swept (a SIGKILLed worker takes Triton down with it)
        self.shm_prefix = f"{STUB_PREFIX}{os.getpid()}_{id(self):x}_"

    # ------------------------------------------------------------------ properties
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self._port('grpc')}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self._port('http')}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self._port('metrics')}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def log_file(self) -> Path | None:
        return self._log_path

    def _port(self, name: str) -> int:
        if name not in self._ports:
            raise TritonServerError("the Triton server has not been started")
        return self._ports[name]

    async def wait(self) -> int | None:
        """Until the process exits (for whatever reason); its exit code."""
        if self._process is None:
            return None
        return await self._process.wait()

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def is_alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    # ------------------------------------------------------------------ lifecycle
    def _use_binary(self, binary: Path) -> None:
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise TritonServerError(f"tritonserver binary not found or not executable: {binary}")
        self.server_path = binary
        self._server_root = binary.resolve().parent.parent

    def _make_backend_dir(self, tmpdir: Path) -> Path:
        """A backend directory holding the Python backend plus the stub for the stubs' Python (tdask's
        environment's, else this process's)."""
        source = self._server_root / "backends" / "python"
        if self.environment is not None:
            version = self.environment.python_version
        else:
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self._server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not (source / "libtriton_python.so").is_file():
            raise TritonServerError(f"Triton Python backend not found: {source}/libtriton_python.so")
        if not stub.is_file():
            if (source / "triton_python_backend_stub").is_file():
                return self._server_root / "backends"  # stock Triton layout: stub already there
            raise TritonServerError(
                f"no Triton Python backend stub for Python {version}: {stub} does not exist"
            )
        backends = tmpdir / "backends"
        target = backends / "python"
        target.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            (target / name).symlink_to(source / name)
        shutil.copy2(stub, target / "triton_python_backend_stub")
        return backends

    async def start(self) -> None:
        """Start tritonserver and wait until it reports ready; raise with its log otherwise."""
        if self._process is not None:
            raise TritonServerError("this TritonServer was already started")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository not found: {self.model_repository}")
        await asyncio.to_thread(sweep_orphans)  # walks the process table: not on the event loop
        if self.server_path is None:
            self.environment = await asyncio.to_thread(environment.ensure)  # pip, the first time: not on the loop
            self._use_binary(self.environment.tritonserver)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f"{_TMPDIR_PREFIX}{os.getpid()}-"))
        try:
            await self._spawn()
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _spawn(self) -> None:
        assert self._tmpdir is not None
        backend_dir = self._make_backend_dir(self._tmpdir)
        http, grpc, metrics = _free_ports(3, self.host)
        self._ports = {"http": http, "grpc": grpc, "metrics": metrics}
        self._log_path = self._requested_log_file or self._tmpdir / "tritonserver.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [
            *_orphan_guard(),
            str(self.server_path),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={grpc}",
            "--allow-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={metrics}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        env = self._process_environ()
        if self.environment is not None:
            await self._check_stub(backend_dir / "python" / "triton_python_backend_stub", env)
        logger.info("starting tritonserver: %s", " ".join(args))
        log_fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                # Own session: a terminal's Ctrl-C (sent to the whole foreground process
                # group) must not kill Triton under in-flight requests; tdask stops it, and
                # PR_SET_PDEATHSIG still takes it down if its worker dies.
                start_new_session=True,
            )
        finally:
            os.close(log_fd)

    def _process_environ(self) -> dict[str, str]:
        env = {**os.environ, **self.environ}
        if self.environment is not None:
            # the copied stub lost its RPATH to the wheel's bundled libraries; the environment's lib/ holds the
            # libpython it links (the launcher puts it first again for each model's stub)
            paths = [str(p) for p in self.environment.library_dirs]
        else:
            # a user's Triton: its stubs take their site-packages from the first python3 on PATH (they ignore
            # PYTHONPATH), so this interpreter's come first, with its libpython
            env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
            bundled = self._server_root.parent.parent / "nvidia_pytriton.libs"  # in a pytriton wheel's layout
            paths = [str(bundled)] if bundled.is_dir() else []
        if env.get("LD_LIBRARY_PATH"):
            paths.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        return env

    async def _check_stub(self, stub: Path, env: dict[str, str]) -> None:
        """Start the stub the way the Python backend will, before the server: one that cannot load (a missing
        library, a broken environment) is an error now, naming the cause, not a model load that never ends."""
        assert self.environment is not None
        activate = self.environment.path / "bin" / "activate"
        script = f'source "{activate}" && exec "{stub}"'
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", script, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), config.seconds("triton.startup-timeout"))
        except TimeoutErrors:
            process.kill()
            await process.wait()
            raise TritonServerError(f"Triton's Python stub {stub} did not start") from None
        text = output.decode(errors="replace")
        if "Expected 9 arguments" not in text:  # what a stub that loaded says when given no arguments
            raise TritonServerError(
                f"Triton's Python stub cannot start in {self.environment.path} (exit code {process.returncode}):\n"
                f"{text.strip()[-2000:]}")

    async def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.returncode is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self._process.returncode} during startup; "
                    f"log {self._log_path}:\n{_tail(self._log_path)}"
                )
            status = await _http_status(self.host, self._ports["http"], "/v2/health/ready")
            if status == 200:
                logger.info("tritonserver pid %s ready at %s", self.pid, self.grpc_url)
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {self.startup_timeout:g} s; "
                    f"log {self._log_path}:\n{_tail(self._log_path)}"
                )
            await asyncio.sleep(0.1)

    def stop_timeout(self) -> float:
        """How long a graceful stop may take: Triton finalizes a model's Python-backend instances one after
        another (``tdask.triton.stop-seconds-per-instance`` each, after a fixed ``stop-timeout``), and models side
        by side."""
        return config.seconds("triton.stop-timeout") + config.seconds("triton.stop-seconds-per-instance") * max(
            self._instances.values(), default=1)

    async def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (default :meth:`stop_timeout`); remove the private files.
        Idempotent.

        Await it on the loop that ran :meth:`start` (asyncio processes belong to their loop);
        use :meth:`kill` where that loop is gone.
        """
        if timeout is None:
            timeout = self.stop_timeout()
        if self._grpc_client is not None:
            client, self._grpc_client = self._grpc_client, None
            try:
                await client.close()
            except Exception:
                logger.debug("closing the control client failed", exc_info=True)
        process = self._process
        if process is not None and process.returncode is None:
            try:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.wait(), timeout)
            except ProcessLookupError:
                pass
            except TimeoutErrors:
                logger.warning("tritonserver pid %s ignored SIGTERM for %g s; killing", process.pid, timeout)
                try:
                    process.kill()
                except ProcessLookupError:
                    pass
                await process.wait()
        self._kill_leftover_stubs()
        self._cleanup_files()

    def kill(self) -> None:
        """Synchronous SIGKILL for atexit-style cleanup, where no event loop may be running."""
        process = self._process
        if process is not None and process.returncode is None:
            try:
                os.kill(process.pid, signal.SIGKILL)
                os.waitpid(process.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self._kill_leftover_stubs()
        self._cleanup_files()

    def _kill_leftover_stubs(self) -> None:
        """SIGKILL what is left of the reaped server's process group: its Python backend stubs.

        The server leads its own session, and its stubs are in its group. Triton stops them when it shuts
        down, but a server that was SIGKILLed (a crash, the OOM killer) leaves them orphaned: some then
        wait for it forever, ignoring SIGTERM (seen after the crash tests and the chaos benchmark). The
        first call only, while the group can only be this server's (its number may be reused later).
        """
        if self._process is not None and not self._stubs_killed:
            self._stubs_killed = True
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # nothing left

    def _cleanup_files(self) -> None:
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):  # left by stubs that died with the server
            region.unlink(missing_ok=True)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            if self._requested_log_file is None:
                self._log_path = None

    # ------------------------------------------------------------------ models
    def _client(self) -> Any:
        if self._grpc_client is None:
            import tritonclient.grpc.aio as grpcclient

            self._grpc_client = grpcclient.InferenceServerClient(self.grpc_url)
        return self._grpc_client

    async def load_model(
        self, name: str, config: dict | None = None, *, timeout: float | None = 300.0
    ) -> None:
        """Load (or reload) a model; ``config`` is the full model config as a dict.

        ``timeout`` bounds the wait: a Python-backend stub that never comes up would otherwise
        hold the caller for as long as Triton keeps retrying.
        """
        from tritonclient.utils import InferenceServerException

        if self.environment is not None:
            config = self._in_environment(name, config)
        try:
            await self._client().load_model(
                name,
                config=json.dumps(config) if config is not None else None,
                client_timeout=timeout,
            )
        except InferenceServerException as exc:
            raise TritonServerError(
                f"failed to load model {name!r}: {exc.message()}; "
                f"log {self._log_path}:\n{_tail(self._log_path)}"
            ) from exc
        groups = (config or {}).get("instance_group") or [{}]
        self._instances[name] = sum(int(group.get("count", 1)) for group in groups)
        logger.info("loaded model %s on tritonserver pid %s", name, self.pid)

    def _in_environment(self, name: str, config: dict | None) -> dict | None:
        """``config`` (the repository's when None) with its stub in tdask's environment, unless it names its own."""
        if config is None:
            try:
                config = read_model_config(self.model_repository, name)
            except ConfigError:
                return None  # no such model: Triton says so
        parameters = config.get("parameters") or {}
        if EXECUTION_ENV in parameters:
            return config
        return {**config, "parameters": {**parameters, EXECUTION_ENV: {"string_value": str(self.environment.path)}}}

    async def unload_model(self, name: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            await self._client().unload_model(name)
        except InferenceServerException as exc:
            raise TritonServerError(f"failed to unload model {name!r}: {exc.message()}") from exc
        self._instances.pop(name, None)

    async def model_config(self, name: str) -> dict:
        """The config Triton actually serves (after auto-complete and merging)."""
        from tritonclient.utils import InferenceServerException

        try:
            result = await self._client().get_model_config(name, as_json=True)
        except InferenceServerException as exc:
            raise TritonServerError(f"no config for model {name!r}: {exc.message()}") from exc
        return result.get("config", result)

    async def model_statistics(self, name: str, version: str = "") -> dict:
        """Triton's per-model statistics, as Triton's JSON (int64 counters arrive as strings)."""
        from tritonclient.utils import InferenceServerException

        try:
            return await self._client().get_inference_statistics(name, version, as_json=True)
        except InferenceServerException as exc:
            raise TritonServerError(f"no statistics for model {name!r}: {exc.message()}") from exc


def success_count(statistics: dict) -> int:
    """Successful inferences summed over every version in a :meth:`model_statistics` result."""
    total = 0
    for entry in statistics.get("model_stats", []):
        total += int(entry.get("inference_stats", {}).get("success", {}).get("count", 0) or 0)
    return total
