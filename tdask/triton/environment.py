"""Triton's own environment: its server and the NumPy 1.x that its Python stubs need, apart from tdask's.

Triton 2.51's Python backend (the newest Triton on the package index, in ``nvidia-pytriton``) gives zero-sized
outputs with NumPy 2, while tdask's processes run NumPy 2. So the server and its stubs get a virtual environment
of their own, made once per interpreter and versions under a user cache folder, and every model runs its stub
there through Triton's ``EXECUTION_ENV_PATH``. The stub links its Python's ``libpython3.X.so.1.0``: it is found
explicitly and linked into the environment's ``lib/``, which the stub launcher puts on the loader path.

``tdask-triton-env`` (``python -m tdask.cli.environment``) makes it ahead of time and prints where it is.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tdask import config
from tdask.errors import TritonServerError

logger = logging.getLogger(__name__)

PYTRITON = "nvidia-pytriton==0.7.0"  # Triton Inference Server 2.51, with a Python-backend stub per Python 3.8-3.13
STUB_NUMPY = "numpy>=1.21,<2"  # what that backend's stub can read tensors from
_STUB_PYTHONS = ((3, 8), (3, 13))  # Pythons with a stub in that wheel (NumPy 1.26 builds from source on 3.13)
_COMPLETE = ".tdask-complete"  # written last: an environment without it is half-made and is made again


@dataclass(frozen=True)
class TritonEnvironment:
    """A finished environment: where its server, stub and libraries are."""

    path: Path
    python_version: str  # "3.12": the stub that matches the environment's interpreter

    @property
    def site_packages(self) -> Path:
        return self.path / "lib" / f"python{self.python_version}" / "site-packages"

    @property
    def server_root(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.server_root / "bin" / "tritonserver"

    @property
    def library_dirs(self) -> list[Path]:
        """What the server and its stubs load from: the wheel's bundled libraries, then the linked libpython."""
        return [self.site_packages / "nvidia_pytriton.libs", self.path / "lib"]

    def versions(self) -> dict[str, str]:
        return json.loads((self.path / _COMPLETE).read_text())


def cache_dir() -> Path:
    """Where environments are kept: ``tdask.triton.environment-dir``, else the user's cache folder."""
    configured = config.get("triton.environment-dir")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tdask" / "triton"


def _interpreter() -> str:
    """The Python the environment is made from: ``tdask.triton.python``, else the one running tdask (its base
    interpreter when this is a virtual environment)."""
    configured = config.get("triton.python")
    if configured:
        return str(configured)
    if sys.prefix != sys.base_prefix:  # a virtual environment (whose _base_executable is itself on 3.10)
        base = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
        if os.access(base, os.X_OK):
            return base
    return getattr(sys, "_base_executable", None) or sys.executable


def _describe(python: str) -> dict[str, str]:
    """The interpreter's version and where its shared library lies, asked of that interpreter."""
    probe = (
        "import json, sys, sysconfig; v = sysconfig.get_config_var; "
        "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'implementation': sys.implementation.name, "
        "'executable': sys.executable, 'libdir': v('LIBDIR') or '', 'multiarch': v('MULTIARCH') or ''}))"
    )
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise TritonServerError(f"cannot run the Python for Triton's environment ({python}): {e}") from e
    return json.loads(out)


def libpython(info: dict[str, str]) -> Path:
    """The ``libpython3.X.so.1.0`` that a stub for this interpreter links: the interpreter's own library
    folder first, then the system's (a distribution's ``libpython3.X`` package). Never left to chance."""
    name = f"libpython{info['version']}.so.1.0"
    folders = [info["libdir"]]
    if info["multiarch"]:
        folders += [f"/usr/lib/{info['multiarch']}", f"/lib/{info['multiarch']}"]
    folders += ["/usr/lib64", "/usr/lib", "/usr/local/lib"]
    for folder in folders:
        candidate = Path(folder) / name
        if folder and candidate.is_file():
            return candidate.resolve()
    raise TritonServerError(
        f"Triton's Python stub for Python {info['version']} needs {name}, and {info['executable']} has none "
        f"(looked in {', '.join(f for f in folders if f)}): that interpreter was built without a shared library. "
        f"Install your distribution's libpython{info['version']} package, or set tdask.triton.python "
        "(DASK_TDASK__TRITON__PYTHON) to an interpreter built with --enable-shared"
    )


def _packages() -> list[str]:
    """More packages for the stubs (what the models import besides NumPy): ``tdask.triton.environment-packages``."""
    return [str(p) for p in config.get("triton.environment-packages") or []]


def _key(info: dict[str, str]) -> str:
    what = "|".join([info["executable"], PYTRITON, STUB_NUMPY, *_packages()])
    digest = hashlib.sha256(what.encode()).hexdigest()[:10]
    return f"py{info['version']}-{PYTRITON.split('==')[1]}-{digest}"


def _check_supported(info: dict[str, str]) -> None:
    major, minor = (int(p) for p in info["version"].split("."))
    low, high = _STUB_PYTHONS
    if info["implementation"] != "cpython" or not low <= (major, minor) <= high:
        raise TritonServerError(
            f"Triton's Python backend ({PYTRITON}) has stubs for CPython {low[0]}.{low[1]} to {high[0]}.{high[1]}, not "
            f"for {info['implementation']} {info['version']} ({info['executable']}): set tdask.triton.python "
            "(DASK_TDASK__TRITON__PYTHON) to such an interpreter for Triton's environment (tdask runs on this one)"
        )


def ensure(progress=None) -> TritonEnvironment:
    """The environment for this interpreter and versions, made first if it does not exist yet.

    Blocks (a first make installs about 70 MB with pip, a minute or so): call it off the event loop. Processes
    of one host that ask at once wait for one another on a lock file, and the first one makes it.
    """
    info = _describe(_interpreter())
    _check_supported(info)
    root = cache_dir()
    path = root / _key(info)
    environment = TritonEnvironment(path, info["version"])
    if (path / _COMPLETE).is_file():
        return environment
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / _COMPLETE).is_file():
            _make(path, info, progress or _say)
    return environment


def _say(message: str) -> None:
    """The progress line: on the terminal of whoever waits (a worker's goes to its log)."""
    logger.info("%s", message)
    sys.stderr.write(f"tdask: {message}\n")
    sys.stderr.flush()


def _make(path: Path, info: dict[str, str], progress) -> None:
    library = libpython(info)  # before a minute of installing: an interpreter without one fails now
    progress(f"making Triton's environment (once): {PYTRITON} and {STUB_NUMPY} for Python {info['version']} "
             f"in {path} ...")
    if info["version"] == "3.13":
        progress("NumPy 1.x has no wheel for Python 3.13: pip builds NumPy 1.26 from source (a C compiler is needed; "
                 "about 10 minutes on 2 cores, once per machine, then pip's cache has it)")
    if path.exists():
        shutil.rmtree(path)
    log = path.parent / f"{path.name}.log"
    with open(log, "w") as out:
        steps = [
            [info["executable"], "-m", "venv", str(path)],
            # --no-deps: only the server binary and NumPy are used here, not pytriton's Python API
            [str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
             PYTRITON, STUB_NUMPY],
        ]
        if _packages():  # with their dependencies, NumPy held below 2
            steps.append([str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          STUB_NUMPY, *_packages()])
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise TritonServerError(
                    f"making Triton's environment failed at: {' '.join(step)}\n{tail}\n(log: {log})")
    numpy = subprocess.run([str(path / "bin" / "python"), "-c", "import numpy; print(numpy.__version__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    (path / "lib" / library.name).symlink_to(library)
    versions = {"python": info["version"], "interpreter": info["executable"], "pytriton": PYTRITON.split("==")[1],
                "numpy": numpy, "libpython": str(library), "packages": _packages()}
    (path / _COMPLETE).write_text(json.dumps(versions))
    progress(f"Triton's environment is ready: {path} (NumPy {numpy})")
