"""Several processes serving one listener (`--workers N`), and the supervisor that keeps them running.

One Python process tops out at one core; this is how the gateway uses more.
The supervisor opens a listening socket per process on one port with
SO_REUSEPORT (the kernel spreads new connections over them, unless process
0 steers them to itself: `steering.py`), forks the N processes, and then
only relays signals and replaces a process that dies. What must be one
across processes is made so before the fork: the memory rate limiter's
buckets live in shared memory, and /metrics merges every process's
snapshot. Redis limits are shared by nature. The inference plane is one:
the first process owns it (the queue, the workers' capacity, coalescing and
the prefix index); the others pass it their clients' connections with
`/v1/*` requests, or relay those they cannot pass, over unix sockets in the
runtime folder (`inference/handoff.py`, `inference/relay.py`). Each process
keeps its own upstream pool.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import GatewaySettings
from .inference.handoff import OwnerLoad
from .listeners import listening_url, open_listeners
from .observability.metrics_exchange import MetricsExchange
from .policy.ratelimit import RateLimiter, build_limiter
from .steering import ConnectionSteering

log = logging.getLogger("proxygate.prefork")

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_POLL = 0.2
# Until every process has reported ready: readiness comes through a pipe, which
# does not end the wait for a signal, and "listening on" should not lag it.
_STARTING_POLL = 0.005
# More failures than this within the window and the supervisor gives up.
CRASH_LIMIT, CRASH_WINDOW = 5, 60.0
# Beyond -shutdown-timeout, how long a draining process gets before SIGKILL.
KILL_GRACE = 5.0
# Observed from every process alike, so merged with max, not summed.
OBSERVED_GAUGES = ("inference_worker_",)


@dataclass(slots=True)
class ChildContext:
    index: int
    listeners: list[socket.socket]
    limiter: RateLimiter | None  # shared by every process; None: each makes its own
    exchange: MetricsExchange
    ready: Callable[[int], None]
    inference_socket: str  # the inference plane's socket: served by index 0, relayed to by the others
    owner_load: OwnerLoad  # index 0's connections (open and on their way to it), shared


@dataclass(slots=True)
class _Child:
    index: int
    pid: int
    ready: bool = False


def serve_child(settings: GatewaySettings, ctx: ChildContext) -> int:
    """One serving process: the gateway on the shared listener."""
    # Imported here: the supervisor itself never loads the event loop, gRPC
    # or anything that starts threads, so forking it stays safe.
    from .observability.metrics import GatewayMetrics
    from .runloop import run
    from .server import serve
    from .wiring import build_gateway

    ctx.owner_load.index = ctx.index  # this process's copy: it counts the connections it passes
    if ctx.index != 0:
        # Every process loads and reloads the same files; process 0 reports it, as
        # one process would (a failure is still reported by each).
        logging.getLogger("proxygate.config").setLevel(logging.WARNING)

    async def main() -> int:
        owner = ctx.index == 0
        gateway = build_gateway(
            settings,
            metrics=GatewayMetrics(exchange=ctx.exchange),
            limiter=ctx.limiter,
            inference_relay="" if owner else ctx.inference_socket,
            owner_load=ctx.owner_load,
            steering=ConnectionSteering(ctx.listeners) if owner else None,
        )
        return await serve(
            settings,
            gateway,
            listeners=ctx.listeners,
            on_listening=ctx.ready,
            inference_socket=ctx.inference_socket if owner else "",
        )

    return run(main)


class Supervisor:
    def __init__(
        self, settings: GatewaySettings, child_main: Callable[[GatewaySettings, ChildContext], int] = serve_child
    ) -> None:
        self.settings = settings
        self.child_main = child_main
        self.children: dict[int, _Child] = {}  # by pid
        self.stopping = False
        self.all_ready = False
        self.crashes: list[float] = []
        self.exit_code = 0

    def run(self, runtime_folder: str) -> int:
        """Serve with `settings.workers` processes sharing `runtime_folder`."""
        settings = self.settings
        self.metrics_dir = runtime_folder
        host, port = settings.listen
        try:
            self.listener_sets = _listener_sets(host, port, settings.workers)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc)
            return 1
        self.url = listening_url(settings.proto, self.listener_sets[0][0])
        # Memory limits are made here, in shared memory, so that every process
        # forked below uses one table; Redis limits are made per process.
        self.limiter = build_limiter(settings, processes=settings.workers) if settings.limiter == "memory" else None
        self.owner_load = OwnerLoad(settings.workers)
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for index in range(settings.workers):
                self._spawn(index)
            return self._supervise()
        finally:
            self._close_listeners()
            os.close(self.ready_r)
            os.close(self.ready_w)

    # ---- the children --------------------------------------------------------

    def _spawn(self, index: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.children[pid] = _Child(index, pid)
            return
        code = 1
        try:
            # Stop and reload stay blocked until the process has its handlers (`serve`
            # unblocks them): relayed to a process still starting, their default
            # action would end it.
            signal.pthread_sigmask(signal.SIG_SETMASK, _SIGNALS - {signal.SIGCHLD})
            _exit_with_parent(parent)
            os.close(self.ready_r)
            own = self.listener_sets[index]
            _close_sets([socks for socks in self.listener_sets if socks is not own])
            ctx = ChildContext(
                index=index,
                listeners=own,
                limiter=self.limiter,
                exchange=MetricsExchange(self.metrics_dir, index, OBSERVED_GAUGES),
                ready=lambda _port: _write_index(self.ready_w, index),
                inference_socket=os.path.join(self.metrics_dir, "inference.sock"),
                owner_load=self.owner_load,
            )
            code = self.child_main(self.settings, ctx)
        except BaseException:
            log.exception("serving process %d failed", index)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _supervise(self) -> int:
        kill_at = 0.0
        while self.children:
            info = signal.sigtimedwait(_SIGNALS, _POLL if self.all_ready else _STARTING_POLL)
            self._collect_ready()
            self._reap()
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    log.info("stopping %d serving processes", len(self.children))
                    self._stop()
                    kill_at = time.monotonic() + self.settings.shutdown_timeout + KILL_GRACE
            elif info is not None and info.si_signo == signal.SIGHUP:
                self._signal_all(signal.SIGHUP)
            if self.stopping and kill_at and time.monotonic() > kill_at:
                log.warning("killing %d serving processes that did not stop", len(self.children))
                self._signal_all(signal.SIGKILL)
                kill_at = 0.0
        return self.exit_code

    def _collect_ready(self) -> None:
        try:
            data = os.read(self.ready_r, 4096)
        except BlockingIOError:
            return
        indexes = set(data)
        for child in self.children.values():
            if child.index in indexes:
                child.ready = True
        if (
            not self.all_ready
            and len(self.children) == self.settings.workers
            and all(c.ready for c in self.children.values())
        ):
            self.all_ready = True
            # The same line as one process's, last: whoever waits for it finds the port the same way.
            log.info("%d serving processes ready", self.settings.workers)
            log.info("listening on %s", self.url)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            if not self.all_ready:
                # A process that cannot start (port, Redis, certificate) will
                # not start on a second try either: stop, with its exit code.
                log.error("serving process %d exited with %d while starting; stopping", child.index, code)
                self.exit_code = code or 1
                self._stop()
                continue
            now = time.monotonic()
            self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW] + [now]
            if len(self.crashes) > CRASH_LIMIT:
                log.error("serving processes keep exiting (%d in %gs); stopping", len(self.crashes), CRASH_WINDOW)
                self.exit_code = 1
                self._stop()
                continue
            log.warning("serving process %d (pid %d) exited with %d; starting another", child.index, pid, code)
            if child.index == 0:
                # It may have steered every new connection to itself: until its successor
                # decides again, the kernel spreads them (those given to it wait for it).
                ConnectionSteering(self.listener_sets[0]).release()
            self._spawn(child.index)

    def _stop(self) -> None:
        self.stopping = True
        # The processes stop accepting as they drain; with the supervisor's copies
        # closed too, new connections are refused instead of queued for nobody.
        self._close_listeners()
        self._signal_all(signal.SIGTERM)

    def _close_listeners(self) -> None:
        _close_sets(self.listener_sets)

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _listener_sets(host: str, port: int, processes: int) -> list[list[socket.socket]]:
    """Each process's listening sockets, opened here in process order and kept open.

    The order makes process 0's sockets the first of their SO_REUSEPORT group,
    which is what steering new connections to it names (`steering.py`);
    keeping them open here keeps that order when a process is replaced (its
    successor inherits its sockets), and connections the kernel gave a
    process that died wait for its successor instead of being reset.
    """
    sets = [open_listeners(host, port, reuse_port=True)]
    try:
        port = sets[0][0].getsockname()[1]
        for _ in range(processes - 1):
            sets.append(open_listeners(host, port, reuse_port=True))
    except OSError:
        _close_sets(sets)
        raise
    return sets


def _close_sets(sets: list[list[socket.socket]]) -> None:
    for socks in sets:
        for sock in socks:
            sock.close()


def _write_index(fd: int, index: int) -> None:
    os.write(fd, bytes([index % 256]))


def _exit_with_parent(parent: int) -> None:
    """Have the kernel SIGTERM this process when the supervisor dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl took effect
        os._exit(1)


# A unix socket's path has at most 107 bytes; the folder's own sockets add up to 15.
_FOLDER_PATH_MAX = 90


def _runtime_folder() -> str:
    """A new private folder for the processes' sockets and metrics: in the temporary
    folder, or in /tmp where that one's path is too long for a socket's."""
    folder = tempfile.mkdtemp(prefix="proxygate-metrics-")
    if len(os.fsencode(folder)) <= _FOLDER_PATH_MAX:
        return folder
    os.rmdir(folder)
    folder = tempfile.mkdtemp(prefix="proxygate-", dir="/tmp")
    if len(os.fsencode(folder)) > _FOLDER_PATH_MAX:
        os.rmdir(folder)
        raise OSError(f"no temporary folder with a path short enough for unix sockets ({folder})")
    return folder


def runtime_folder(settings: GatewaySettings) -> str | None:
    """The folder several serving processes share, made now; None, with a warning, where it
    cannot be made (a read-only file system with no writable temporary folder, say): the
    caller then serves with one process."""
    try:
        return _runtime_folder()
    except OSError as exc:
        log.warning(
            "cannot make a runtime folder for %d serving processes (%s); serving with one", settings.workers, exc
        )
        return None


def run_supervised(settings: GatewaySettings, folder: str) -> int:
    """Serve with `settings.workers` processes sharing `folder` (`runtime_folder`), removed at the end."""
    try:
        return Supervisor(settings).run(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
