"""The model process's intake processes: started first, replaced when one dies, drained on SIGTERM.

Serve path, beside the HTTP routes (no HTTP here). With intake processes kiln-serve is one
model process (the preload, the loader, the batcher, this pool) and N intake processes
(kiln.runtime.intake) that serve the connections the model process accepts. Each intake has a Unix
socket pair for frames (kiln.runtime.frames), one the model process hands it accepted connections
over (SCM_RIGHTS), and two memfd arenas (kiln.runtime.shm): its own, for request tensors, and one
the model process allocates its answers in.

Why the model process accepts: with one listening socket shared by the intakes, whichever intake's
loop woke first took each connection, and a client's keep-alive connections stayed wherever they
landed (64 connections split 41/12/11/0 over four intakes; docs/benchmarks.md §10). Each new
connection now goes to the intake with the fewest open ones, HTTP and gRPC alike (the message that
carries it says which). An intake that dies takes its connections with it: its clients see a closed
connection, its requests still in the model are answered into its old arena (never a new intake's), and
a replacement starts on a fresh socket pair and arenas; connections accepted meanwhile go to the others.

Until an intake is up (their imports can end after the model is ready on a slow host), HTTP connections
are served by the model process itself (`standby`: kiln.runtime.server's HttpServer); once one comes up,
each is closed after its next answer, so their clients reconnect to the intakes. gRPC connections wait in the
listener's backlog meanwhile: its port listens from the start, so readiness never comes before it does.

Spawning needs only the standard library: kiln-serve starts the intakes once its own C extensions are
in, before pydantic's models or libtorch load, so they import in parallel with the model's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from kiln.runtime import frames

if TYPE_CHECKING:
    from kiln.runtime.dataplane import DataPlane
    from kiln.runtime.metrics import Metrics
    from kiln.runtime.shm import Arena

log = logging.getLogger("kiln.intakes")

# What an intake inherits: fds of the listening socket, its frames, its request and answer arenas; its index; how many.
INTAKE_ENV = "KILN_INTAKE"
# prometheus_client's multiprocess mode: every process writes its values to files in this folder
# (set before prometheus_client is imported anywhere); any intake's /metrics adds them up.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Chosen by measurement (docs/benchmarks.md §2): on the H200's 16 cores 4 intakes served ResNet-50 and BERT
# as fast as 8 and start sooner; on 2 cores one intake beside the model process was slower than none.
MAX_AUTO, MIN_CPUS = 4, 4
# On a GPU the first bytes of each request arena are page-locked, so inputs go up by DMA without a
# staging copy (first-fit allocation keeps most requests there); the rest stays pageable.
PINNED_BYTES = 32 << 20
# Page-locking holds the driver while a replica's first copies wait: ResNet-50's first answer came 0.11-0.15 s
# after ready when the arenas were locked at ready, 0.05-0.07 s with this delay (H200, docs/benchmarks.md §19).
PIN_AFTER_S = 1.0
# kiln.runtime.shm's arena header, as the model process reads it before numpy is imported:
# the intake's count of connections closed so far, at byte 8.
CLOSED = struct.Struct("<q")
CLOSED_AT = 8


# The first byte of a handoff message: which protocol the connection it carries speaks.
HTTP, GRPC = b"h", b"g"


class Standby(Protocol):
    """The model process's own HTTP server (kiln.runtime.server.HttpServer on standby)."""

    def adopt(self, sock: socket.socket) -> None: ...

    def retire_adopted(self) -> None: ...


def intake_count(requested: int, cpus: int) -> int:
    """Intake processes to run: `requested`, or (-1) one per CPU beyond the model's, at most 4, none below 4 CPUs."""
    if requested >= 0:
        return requested
    return min(MAX_AUTO, cpus - 1) if cpus >= MIN_CPUS else 0


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)  # accepted on the model process's event loop
    return sock


def memfd(name: str, size: int) -> int:
    """Anonymous shared memory of `size` bytes; pages are committed only when written."""
    fd = os.memfd_create(name, 0)  # without MFD_CLOEXEC: handed to the intake through pass_fds
    os.ftruncate(fd, size)
    return fd


@dataclass
class Intake:
    index: int
    proc: subprocess.Popen[bytes]
    channel: socket.socket  # the model process's end of the frame socket pair
    requests_fd: int
    answers_fd: int
    handoff: socket.socket  # accepted connections go to the intake over this one
    header: mmap.mmap  # the request arena's header: connections the intake has closed
    handed: int = 0  # connections handed to it
    up: bool = False  # its event loop runs (its `up` frame came): it can take connections now

    @property
    def open_connections(self) -> int:
        if self.header.closed:  # forgotten (it died): last in line until its replacement starts
            return sys.maxsize
        closed: int = CLOSED.unpack_from(self.header, CLOSED_AT)[0]
        return self.handed - closed


def handoff_order(intakes: Iterable[Intake]) -> list[Intake]:
    """Which intake a new connection goes to, best first: those up (an intake still starting, at start-up
    or replacing one that died, would hold the connection until its imports are done), then the fewest
    open connections."""
    return sorted(intakes, key=lambda i: (not i.up, i.open_connections))


class IntakePool:
    def __init__(self, count: int, shm_bytes: int, argv: list[str], host: str, port: int, grpc_port: int = 0) -> None:
        # In /tmp: a writable emptyDir in kiln's pods, under a read-only root.
        os.environ[METRICS_DIR_ENV] = self.metrics_dir = tempfile.mkdtemp(prefix="kiln-metrics-")
        self.listener = listening_socket(host, port)
        self.grpc_listener = listening_socket(host, grpc_port) if grpc_port else None
        self.grpc_accepting = False  # from the first intake up on
        self.shm_bytes, self.argv = shm_bytes, argv
        self.total = count
        self.intakes: dict[int, Intake] = {}
        self.request_arenas: dict[int, Arena] = {}  # of the intakes being served, by index
        self.draining = False
        # The model process's own HTTP server, for connections that come while no intake is up (None: hold them).
        self.standby: Standby | None = None

    def start(self) -> None:
        """Spawn the intakes. kiln-serve calls it once its own C extensions are in: five interpreters
        importing at once slowed the model process's imports, which lie on the way to ready, by
        0.1-0.3 s on the H200's hosts (docs/benchmarks.md §12); the intakes' own imports then overlap
        libtorch's load and the model's first call."""
        self.intakes = {i: self.spawn(i) for i in range(self.total)}

    def spawn(self, index: int) -> Intake:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        give, take = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message per connection
        give.setblocking(False)
        requests = memfd(f"kiln-requests-{index}", self.shm_bytes)
        answers = memfd(f"kiln-answers-{index}", self.shm_bytes)
        fds = (take.fileno(), theirs.fileno(), requests, answers)
        env = {**os.environ, INTAKE_ENV: ",".join(map(str, (*fds, index, self.total)))}
        proc = subprocess.Popen([sys.executable, "-m", "kiln.runtime.intake", *self.argv], pass_fds=fds, env=env)
        theirs.close()
        take.close()
        return Intake(index, proc, ours, requests, answers, give, mmap.mmap(requests, mmap.PAGESIZE))

    def accept(self, listener: socket.socket, kind: bytes) -> None:
        """Hand each pending connection to the live intake with the fewest open (the listener is ready);
        an HTTP one is served here instead while no intake is up and a standby server is set."""
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds, or the listener closed: the next readiness retries
                log.warning("accepting a connection failed: %s", exc)
                return
            if kind == HTTP and self.standby is not None and not any(i.up for i in self.intakes.values()):
                self.standby.adopt(conn)  # none can take it now (starting, or replacing dead ones): served here
                continue
            with conn:  # the intake gets its own copy of the descriptor
                for intake in handoff_order(self.intakes.values()):
                    try:
                        socket.send_fds(intake.handoff, [kind], [conn.fileno()])
                    except OSError:  # exited or not reading (its buffer is full): the next one
                        continue
                    intake.handed += 1
                    break

    def arriving(self) -> int:
        """Request bodies the intakes are still receiving: the batcher waits for them within its delay.

        Called from the model thread while the event loop may add or drop an intake: tuple() copies
        the arenas in one step under the GIL, so the dict never changes under the loop here."""
        return sum(arena.arriving for arena in tuple(self.request_arenas.values()))

    # -- serving (on the model process's event loop) ----------------------------------------
    async def serve(self, plane: DataPlane, metrics: Metrics, ready: asyncio.Event) -> None:
        """Answer every intake's frames until drained, replacing intakes that die."""
        asyncio.get_running_loop().add_reader(self.listener.fileno(), self.accept, self.listener, HTTP)
        await asyncio.gather(*(self.serve_slot(i, plane, metrics, ready) for i in list(self.intakes)))

    async def serve_slot(self, index: int, plane: DataPlane, metrics: Metrics, ready: asyncio.Event) -> None:
        while True:
            intake = self.intakes[index]
            await self.serve_intake(intake, plane, metrics, ready)
            code = await asyncio.to_thread(intake.proc.wait)
            self.forget(intake)
            if self.draining:
                return
            log.warning("intake %d (pid %d) exited with %s; starting another", index, intake.proc.pid, code)
            self.intakes[index] = self.spawn(index)

    async def serve_intake(self, intake: Intake, plane: DataPlane, metrics: Metrics, ready: asyncio.Event) -> None:
        # numpy (through shm) is imported by now: the model process needed it to load the model.
        from kiln.runtime.shm import Arena

        requests, answers = Arena(intake.requests_fd), Arena(intake.answers_fd)
        self.request_arenas[intake.index] = requests
        reader, stream = await asyncio.open_unix_connection(sock=intake.channel)
        writer = frames.FrameWriter(stream)
        announcing = asyncio.create_task(self.announce(intake, requests, writer, plane, ready))
        tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        while (frame := await frames.read(reader)) is not None:
            if frame["kind"] == "infer":
                infer = cast(frames.Infer, frame)
                task = asyncio.create_task(self.answer(infer, requests, answers, writer, plane, metrics))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif frame["kind"] == "release":
                for block in frame["blocks"]:
                    answers.free(block)
            elif frame["kind"] == "up":
                intake.up = True
                self.accept_grpc()
                if self.standby is not None:  # its clients reconnect, to the intakes
                    self.standby.retire_adopted()
        writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)  # no copy reads the arena any more
        if not ready.is_set():
            announcing.cancel()  # else it finishes: a page-locking in flight must be undone below
        (pinned,) = await asyncio.gather(announcing, return_exceptions=True)
        pipeline = plane.model.pipeline if plane.model is not None else None
        if pinned is True and pipeline is not None:
            pipeline.unpin(requests.base)

    @staticmethod
    async def announce(
        intake: Intake, requests: Arena, writer: frames.FrameWriter, plane: DataPlane, ready: asyncio.Event
    ) -> bool:
        """Once the model is ready: tell the intake, then (PIN_AFTER_S later) page-lock the first PINNED_BYTES
        of its request arena in a thread while requests flow (copies from it are staged by the driver until then, DMA
        after; 32 MB take the driver ~20 ms). True: page-locked."""
        await ready.wait()
        assert plane.info is not None
        writer.send({"kind": "ready", "info": plane.info.model_dump(mode="json")})
        pipeline = plane.model.pipeline if plane.model is not None else None
        if pipeline is None:
            return False
        await asyncio.sleep(PIN_AFTER_S)
        pinned = await asyncio.to_thread(pipeline.pin, requests.base, min(requests.size, PINNED_BYTES))
        log.info("intake %d: %s", intake.index, "request arena page-locked" if pinned else "page-locking refused")
        return pinned

    async def answer(
        self,
        frame: frames.Infer,
        requests: Arena,
        answers: Arena,
        writer: frames.FrameWriter,
        plane: DataPlane,
        metrics: Metrics,
    ) -> None:
        from kiln.runtime.errors import KilnError, ModelFailed, Overloaded

        start = time.perf_counter()
        reply: frames.Answer | frames.Failed
        try:
            results = await plane.run([requests.array(ref) for ref in frame["inputs"]], frame["rows"])
            refs = [answers.put(r) for r in results]
            if any(ref is None for ref in refs):
                for ref in refs:
                    if ref is not None:
                        answers.free(ref[0])
                raise Overloaded("shared memory for answers is full; retry shortly (or raise --shm-bytes)")
            reply = {"kind": "answer", "id": frame["id"], "outputs": [r for r in refs if r is not None]}
        except KilnError as exc:
            reply = {"kind": "failed", "id": frame["id"], "error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # the model raised: the intake answers a JSON 500, this process keeps serving
            log.exception("model %s failed on a request", plane.name)
            failed = ModelFailed.of(plane.name, exc)
            reply = {"kind": "failed", "id": frame["id"], "error": "ModelFailed", "message": str(failed)}
        metrics.model_seconds.labels(plane.name).observe(time.perf_counter() - start)
        if plane.batcher is not None:
            metrics.queue_depth.labels(plane.name).set(plane.batcher.depth)
        writer.send(reply)

    def accept_grpc(self) -> None:
        """Start handing gRPC connections over (until now they waited in the backlog: no intake was up)."""
        if self.grpc_listener is not None and not self.grpc_accepting and not self.draining:
            self.grpc_accepting = True
            asyncio.get_running_loop().add_reader(self.grpc_listener.fileno(), self.accept, self.grpc_listener, GRPC)

    def forget(self, intake: Intake) -> None:
        """A dead intake's fds go; its arenas' mappings go with the last array viewing them."""
        self.request_arenas.pop(intake.index, None)  # its count of arriving bodies died with it
        for fd in (intake.requests_fd, intake.answers_fd):
            os.close(fd)
        intake.channel.close()
        intake.handoff.close()
        intake.header.close()
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(intake.proc.pid)  # type: ignore[no-untyped-call]

    async def drain(self, timeout: float) -> None:
        """SIGTERM to every intake (each drains and finishes its requests), then wait for them to exit."""
        self.draining = True
        for intake in self.intakes.values():
            with contextlib.suppress(ProcessLookupError):
                intake.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for intake in self.intakes.values():
            try:
                await asyncio.to_thread(intake.proc.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("intake %d did not exit in %.0f s; killing it", intake.index, timeout)
                intake.proc.kill()
        for listener in (self.listener, self.grpc_listener):
            if listener is not None:
                with contextlib.suppress(RuntimeError):  # not serving: no reader to remove
                    asyncio.get_running_loop().remove_reader(listener.fileno())
                listener.close()

    def close(self) -> None:
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
