"""What a lean replica needs, loaded in background threads from kiln-serve's first line.

Serve path, lean loader; imports nothing but the standard library and the settings at module
level. Loading libtorch (0.5 s on the H200), creating a CUDA context (0.15-0.25 s), hashing the
compiled library, opening it and its first calls (first kernels, cuDNN: 0.1-0.4 s) are C work;
done by threads through ctypes and hashlib, which free the GIL, they overlap the Python imports
that bring up the HTTP server. The preload thread imports the loader (numpy, the manifest's
pydantic models) once the libraries are in: the main thread imports those too, and whichever
gets there first pays once. The server's model load takes the thread's model
(kiln.runtime.loader.load_artifact through `model_for`), or its failure. `timeline()` is the
start-up log line that says what finished when.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import mmap
import os
import re
import threading
import time
from pathlib import Path

from kiln.enums import Loader
from kiln.runtime.settings import ServeSettings

RUNNER_DIR, MANIFEST_NAME = "runner", "manifest.json"  # kiln.manifest's names (that module brings pydantic)
CPU_LIBS = ("libc10.so", "libtorch_cpu.so")
CUDA_LIBS = ("libc10_cuda.so", "libtorch_cuda.so")
LAST_LIBS = ("libtorch.so",)


class LeanUnavailable(RuntimeError):
    """The lean path cannot run this artifact here; str() says why."""


def cpu_limit() -> int:
    """The pod's CPU limit, never the node's core count when a limit is set.

    From the cgroup (v2 cpu.max), else KILN_CPU_LIMIT (the operator sets it from the
    container's limits.cpu through the downward API, which works on cgroup v1 too),
    else the CPUs this process may run on.
    """
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    declared = os.environ.get("KILN_CPU_LIMIT", "")
    if declared.isdigit() and int(declared) > 0:
        return min(int(declared), len(os.sched_getaffinity(0)))
    return len(os.sched_getaffinity(0))


def torch_dir() -> Path:
    """torch's install folder, found without running its __init__."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise LeanUnavailable("torch's shared libraries are not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def torch_version() -> str:
    """torch.__version__ (e.g. 2.11.0+cu130), read from torch/version.py without importing torch."""
    text = (torch_dir() / "version.py").read_text()
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    if not found:
        raise LeanUnavailable("cannot read torch's version from torch/version.py")
    return found.group(1)


def _dlopen_global(path: Path, binding: int = os.RTLD_NOW) -> None:
    """dlopen with global symbols, the GIL released (ctypes.CDLL itself holds it for the whole load)."""
    libc = ctypes.CDLL(None)
    libc.dlopen.restype, libc.dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    if not libc.dlopen(str(path).encode(), binding | os.RTLD_GLOBAL):
        libc.dlerror.restype = ctypes.c_char_p
        raise LeanUnavailable(f"cannot load {path.name}: {(libc.dlerror() or b'').decode()}")


def cudart_path() -> str | None:
    """CUDA's runtime library as libtorch_cuda loaded it (None: not loaded)."""
    return next((p for p in mapped_libraries() if "libcudart.so" in p), None)


def _cuda_context(path: str | None) -> None:
    """GPU 0's primary context, made now rather than inside the first model call."""
    if path is not None:
        cudart = ctypes.CDLL(path)
        cudart.cudaSetDevice(0)
        cudart.cudaFree(None)


def bundled_cudart() -> str | None:
    """The CUDA runtime of torch's own nvidia wheels (on libtorch_cuda's RPATH), found before libtorch loads."""
    found = sorted((torch_dir().parent / "nvidia").glob("*/lib/libcudart.so.[0-9]*"))
    return str(found[-1]) if found else None


def mapped_libraries() -> list[str]:
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if ".so" in line})


def load_torch_libraries(device: str, threads: int, binding: int = os.RTLD_LAZY) -> None:
    """dlopen torch's libraries with global symbols, as compiled libraries expect to find them.

    Lazily bound: their calls to each other resolve at first use (what a C++ program linked against
    libtorch gets), 25-30 ms less of the loader lock than binding all at once (bench/ready_path.py,
    this CPU and the H200). The compiled library is still opened with RTLD_NOW: a shim function this
    torch lacks fails its load, and the replica falls back to torch's runner, not a request."""
    if threads:  # read by OpenMP when libtorch_cpu brings it in: the pod's CPU limit, not the node's cores
        os.environ["OMP_NUM_THREADS"] = str(threads)
    lib = torch_dir() / "lib"
    for name in (*CPU_LIBS, *(CUDA_LIBS if device == "cuda" else ()), *LAST_LIBS):
        _dlopen_global(lib / name, binding)
    mark("torch libraries loaded")
    if device == "cuda":
        _cuda_context(cudart_path())  # made already where the preload found torch's bundled runtime
        mark("CUDA context ready")


class Preload:
    """Threads that load what a lean replica needs while the main thread imports the server.

    kiln-preload: once `release()` says the main thread's C extensions are in, torch's libraries,
    then the lean model of `artifact`, called at each warm-up batch size. glibc lets one thread
    dlopen at a time and libtorch holds that lock for half a second, so the main thread loads its
    own extension modules (numpy, pydantic_core, _ssl) first. kiln-cuda (GPU): GPU 0's context
    through torch's bundled CUDA runtime, beside libtorch's load rather than before it (made first,
    it often ended after the C extensions and held libtorch back: docs/benchmarks.md §18).
    kiln-sha256: the compiled library's digest (hundreds of MB for BERT), checked before it is
    opened. `wait()` re-raises what the libraries' load raised; `model_for` what the model's did."""

    def __init__(self, device: str, threads: int, artifact: Path, max_batch_size: int) -> None:
        self.device, self.threads, self.artifact, self.max_batch_size = device, threads, artifact, max_batch_size
        self.error: BaseException | None = None  # the libraries did not load
        self.model_error: BaseException | None = None  # they did; the model did not open
        self.model: object | None = None  # a kiln.runtime.loader.LoadedModel
        self.container: object | None = None  # a kiln.runtime.aoti_shim.Container, opened early
        self.container_so: Path | None = None
        self.libraries, self.released = threading.Event(), threading.Event()
        self.digests: dict[Path, str] = {}
        self.thread = threading.Thread(target=self._run, name="kiln-preload", daemon=True)
        self.hasher = threading.Thread(target=self._hash_libraries, name="kiln-sha256", daemon=True)
        self.context = threading.Thread(target=self._make_context, name="kiln-cuda", daemon=True)

    def start(self) -> None:
        self.hasher.start()
        if self.device == "cuda":
            self.context.start()
        self.thread.start()

    def release(self) -> None:
        """The main thread has loaded its C extensions: torch's libraries may take the loader's lock."""
        self.released.set()

    def _hash_libraries(self) -> None:
        for so in sorted((self.artifact / RUNNER_DIR).glob("*.so")):
            # One call, so one GIL release for the whole file: chunked reads would queue for the GIL
            # behind the main thread's imports at every chunk. Errors: the loader reports them.
            with (
                contextlib.suppress(OSError, ValueError),
                so.open("rb") as fh,
                mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mapped,
            ):
                self.digests[so] = hashlib.sha256(mapped).hexdigest()
        mark("compiled library hashed")

    def _make_context(self) -> None:
        # Not bundled: made once libtorch_cuda has brought its own (load_torch_libraries).
        with contextlib.suppress(OSError, LeanUnavailable):
            if (cudart := bundled_cudart()) is not None:
                _cuda_context(cudart)
                mark("CUDA context made")

    def _run(self) -> None:
        try:
            self.released.wait()
            load_torch_libraries(self.device, self.threads)
        except BaseException as exc:  # handed to whoever waits
            self.error = exc
            return
        finally:
            self.libraries.set()
        self.container = self._early_container()
        try:
            from kiln.runtime.loader import open_lean

            mark("loader imported")
            self.model = open_lean(self.artifact, self.device, self.threads, self.max_batch_size)
            mark("model opened and warmed up")
        except BaseException as exc:
            self.model_error = exc

    def _early_container(self) -> object | None:
        """The compiled library opened and its model container made (weights loaded) while the main
        thread still imports the loader's pydantic models (None: left to the loader).

        Reads only the fields it needs from manifest.json and opens the library only if its sha256
        matches; the loader validates the whole manifest (torch version, GPU) before any call."""
        try:
            raw = json.loads((self.artifact / MANIFEST_NAME).read_text())
            so = self.artifact / str(raw["runner_so"])
            if raw.get("engine") != "aotinductor" or raw.get("device") != self.device:
                return None
            self.hasher.join()
            if self.digests.get(so) != raw.get("runner_so_sha256"):
                return None  # the loader says which file is corrupt
            from kiln.runtime.aoti_shim import MODELS_PER_CONTAINER, Container

            container = Container(so, self.device, MODELS_PER_CONTAINER[self.device])
        except Exception:  # the loader opens it again and reports what is wrong
            return None
        self.container_so = so
        mark("compiled library opened")
        return container

    def wait(self) -> None:
        """The libraries are loaded (or their failure raised); from the thread itself too."""
        self.libraries.wait()
        if self.error is not None:
            raise self.error


_started: Preload | None = None
_began = time.perf_counter()  # kiln-serve imports this module on its first line
_marks: list[tuple[float, str]] = []


def mark(what: str) -> None:
    """Note that `what` just finished, for the start-up timeline kiln-serve logs once ready."""
    _marks.append((time.perf_counter() - _began, what))


def timeline() -> str:
    """What finished when since kiln-serve's first line, in order: `0.31 s torch libraries loaded, …`."""
    return ", ".join(f"{at:.2f} s {what}" for at, what in sorted(_marks))


def start(settings: ServeSettings) -> Preload | None:
    """Start loading what an aot replica on the lean path will need (None: it will not take that path).

    The libraries wait for `release()`."""
    global _started
    lean = os.environ.get("KILN_LOADER", Loader.lean) == Loader.lean and settings.mode == "aot" and settings.artifact
    if not lean or settings.device not in ("cpu", "cuda"):
        return None
    threads = settings.intra_op_threads or cpu_limit()
    _started = Preload(settings.device, threads, Path(settings.artifact), settings.max_batch_size)
    _started.start()
    return _started


def release() -> None:
    if _started is not None:
        _started.release()


def wait(device: str, threads: int) -> None:
    """torch's libraries loaded: by the preload thread if one ran for this device, else now."""
    if _started is not None and _started.device == device:
        _started.release()
        _started.wait()
    else:
        load_torch_libraries(device, threads)


def digests() -> dict[Path, str]:
    """sha256 of the artifact's compiled libraries, hashed by the preload's hasher thread (empty: none ran)."""
    if _started is None:
        return {}
    _started.hasher.join()
    return _started.digests


def container_for(so: Path, device: str) -> object | None:
    """The container the preload thread made for this library (taken: handed out once), or None."""
    started = _started
    if started is None or started.container_so != so or started.device != device:
        return None
    container, started.container = started.container, None
    return container


def model_for(artifact: Path, device: str, threads: int) -> object | None:
    """The model the preload thread opened for this artifact, device and thread count (None: it opened none).

    Re-raises what opening it raised, as loading it now would have."""
    started = _started
    if started is None or (started.artifact, started.device, started.threads) != (artifact, device, threads):
        return None
    started.release()
    started.thread.join()
    started.wait()
    if started.model_error is not None:
        raise started.model_error
    return started.model
