"""The driver's own record of a sweep, and how it stops.

`<experiment>/driver.json` says whether a driver is running the sweep, and if
not, how the last one ended: finished, interrupted (SIGINT, SIGTERM, the Ray
node lost, the storage full) or failed, with the reason and time. A running
driver refreshes it every HEARTBEAT_SECONDS, so a driver killed outright
(`kill -9`, a lost machine) reads as interrupted once its record is older
than STALE_SECONDS: the readers never show a trial RUNNING that nothing runs.

Signals: the first Ctrl-C (or SIGTERM) asks Ray Tune to stop gracefully
(through SIGUSR1, Tune's own stop signal: it saves the experiment state one
last time, and every trial's last checkpoint is already in storage); a second
one stops at once. Either way the experiment stays resumable.

Ray is imported only by the watch on a running sweep: readers of driver.json start without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickletools
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from model.config import ConfigError

from .storage import Storage, put_bytes, write_text

DRIVER_FILE = "driver.json"
# A running driver refreshes driver.json this often; one silent for STALE_SECONDS is gone (tests shorten both).
HEARTBEAT_SECONDS = float(os.environ.get("SWEEP_HEARTBEAT_SECONDS", 30))
STALE_SECONDS = float(os.environ.get("SWEEP_DRIVER_STALE_SECONDS", 120))
# Copies of Tune's state files as they last read whole: a full disk cuts Tune's own copy short, and
# `sweep resume` then restores from these (sweep.driver.restore_tune_state).
TUNE_STATE_COPIES = ".tune-state"
TUNE_STATE_FILE = re.compile(
    r"^(experiment_state|basic-variant-state|search_gen_state|searcher-state|callback-states)-.*\.(json|pkl)$"
)
STATE_COPY_SECONDS = 2.0  # after the first minute; every 0.5 s before it (a small disk fills in seconds)
# The exit status of a process ended by a signal, as shells report it.
SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


class SweepInterrupted(Exception):
    """The driver stopped before the sweep finished; the experiment can be resumed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DriverRecord:
    """driver.json of one running driver: written at start, refreshed, and closed with how it ended."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self.path = storage.path(name, DRIVER_FILE)
        self.started = time.time()
        self.signal: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_handlers: dict[int, Any] = {}

    def write(self, state: str, reason: str | None = None) -> None:
        record = {
            "state": state,
            "reason": reason,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _iso(self.started),
            "updated": _iso(time.time()),
            "heartbeat": time.time(),
        }
        write_text(self.storage, self.path, json.dumps(record, indent=1))

    def __enter__(self) -> DriverRecord:
        global _ACTIVE
        _ACTIVE = self
        self.write("running")
        self._thread = threading.Thread(target=self._beat, name="driver-heartbeat", daemon=True)
        self._thread.start()
        self._install_signal_handlers()
        return self

    def __exit__(self, *exc_info) -> None:
        global _ACTIVE
        _ACTIVE = None
        self._stop.set()
        for number, handler in self._previous_handlers.items():
            # Once a signal stopped the sweep, the process is on its way out with its one line: a second Ctrl-C
            # landing while Ray shuts down at exit is ignored (it would print a traceback after that line), and
            # a SIGTERM ends it at once with the same status.
            if self.signal:
                handler = signal.SIG_IGN if number == signal.SIGINT else _exit_now
            signal.signal(number, handler)

    def _beat(self) -> None:
        copies = TuneStateCopies(self.storage, self.name)
        last_beat = time.monotonic()
        while not self._stop.wait(min(HEARTBEAT_SECONDS, STATE_COPY_SECONDS if self._age() > 60 else 0.5)):
            copies.refresh()
            if time.monotonic() - last_beat < HEARTBEAT_SECONDS:
                continue
            last_beat = time.monotonic()
            try:
                self.write("running")
            except ConfigError:
                pass  # a full or unreachable storage: the sweep itself says so

    def _age(self) -> float:
        return time.time() - self.started

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # Tune's own SIGINT handler would swallow the first Ctrl-C without a word; ours asks it to stop through SIGUSR1.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[number] = signal.getsignal(number)
            signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame) -> None:
        if self.signal is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(number).name
        if hasattr(signal, "SIGUSR1"):
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune: save the state once more and stop the trials
        else:
            raise KeyboardInterrupt

    def close(self, state: str, reason: str | None = None) -> None:
        """Record how the driver stopped. On a full local disk the record is rewritten in place (its pages
        are already there); where even that fails, readers see the driver gone (its process, or its heartbeat)."""
        try:
            self.write(state, reason)
        except ConfigError:
            if self.storage.is_s3:
                return
            record = {"state": state, "reason": reason, "updated": _iso(time.time()), "heartbeat": time.time()}
            try:
                with open(self.path, "r+b") as handle:
                    handle.write(json.dumps(record).encode())
                    handle.truncate()
            except OSError:
                pass

    def interrupted(self, reason: str) -> SweepInterrupted:
        """Record the interruption and the error that says it (exit 130 for SIGINT, 143 for SIGTERM, else 1)."""
        self.close("interrupted", reason)
        what = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM"}.get(reason, reason)
        return SweepInterrupted(
            f"interrupted ({what}): every trial's last checkpoint is kept; run `sweep resume {self.name}` "
            f"(storage {self.storage.uri}) to finish it",
            SIGNAL_EXIT.get(reason, 1),
        )


_ACTIVE: DriverRecord | None = None


def _exit_now(number: int, frame) -> None:
    sys.stderr.flush()
    os._exit(SIGNAL_EXIT.get(signal.Signals(number).name, 1))


def interruption() -> str | None:
    """The signal that is stopping this process's sweep, if one is (the progress view words its summary by it)."""
    return _ACTIVE.signal if _ACTIVE is not None else None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def driver_alive(record: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether a driver runs the sweep: it says so, refreshed its record within STALE_SECONDS, and, when
    it ran on this machine, its process is still there."""
    if not record or record.get("state") != "running":
        return False
    if record.get("host") == socket.gethostname() and not _process_exists(int(record.get("pid", 0))):
        return False
    return (now or time.time()) - float(record.get("heartbeat", 0)) < STALE_SECONDS


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stopped_reason(record: dict[str, Any] | None, now: float | None = None) -> str | None:
    """Why no driver runs the sweep, or None when one does (or the experiment predates driver records)."""
    if not record or driver_alive(record, now):
        return None
    if record.get("state") == "running":
        return f"driver lost (its process is gone; last heard of at {record.get('updated')})"
    if record.get("state") in ("interrupted", "failed"):
        return f"{record['state']}: {record.get('reason')} at {record.get('updated')}"
    return None


@contextlib.contextmanager
def ray_output_to(log_path: Path | None):
    """Send Ray's output to `log_path` while the sweep runs: what its C++ core writes to the process's
    stderr (state dumps of a lost node) and its Python loggers (Tune's hints, trial tracebacks, which
    error.txt in storage keeps too). Python's sys.stderr, where the sweep's own lines go, keeps the
    terminal. None: leave everything as it is (-v)."""
    if log_path is None:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    previous = sys.stderr
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(previous, "encoding", None) or "utf-8")
    ray_logger = logging.getLogger("ray")
    handlers, propagate = list(ray_logger.handlers), ray_logger.propagate
    with open(log_path, "ab") as log:
        file_handler = logging.StreamHandler(open(log_path, "a", encoding="utf-8"))  # noqa: SIM115 (closed below)
        os.dup2(log.fileno(), 2)
        sys.stderr = terminal
        ray_logger.handlers, ray_logger.propagate = [file_handler], False
        try:
            yield
        finally:
            ray_logger.handlers, ray_logger.propagate = handlers, propagate
            file_handler.stream.close()
            terminal.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sys.stderr = previous
            terminal.close()


class RayWatch:
    """Watches the Ray the sweep runs on. When its GCS stops answering (the cluster or the local node is gone),
    or the local node's raylet dies, Ray's own core would end this process a minute later from C++, with
    nothing but a state dump; the watch says it first, in one line, records it, and exits with status 1."""

    def __init__(self, record: DriverRecord, say, interval: float = 1.0, misses: int = 3) -> None:
        self.record, self.say, self.interval, self.misses = record, say, interval, misses
        self._stop = threading.Event()

    def __enter__(self) -> RayWatch:
        import ray

        worker = ray._private.worker.global_worker
        node = getattr(worker, "node", None)
        host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
        self.gcs = (host, int(port))
        # a local Ray started by this driver: its processes are ours to watch
        self.node = node if getattr(node, "head", False) and getattr(node, "all_processes", None) else None
        self.local = (
            {
                name: [info.process for info in infos]
                for name, infos in self.node.all_processes.items()
                if name in ("raylet", "gcs_server")
            }
            if self.node is not None
            else {}
        )
        threading.Thread(target=self._watch, name="ray-watch", daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()

    def lost(self) -> str | None:
        for name, processes in self.local.items():
            if any(process is not None and process.poll() is not None for process in processes):
                return f"local node is gone (its {name} died)"
        try:
            socket.create_connection(self.gcs, timeout=2).close()
        except OSError:
            return f"cluster is gone (its GCS at {self.gcs[0]}:{self.gcs[1]} does not answer)"
        return None

    def _watch(self) -> None:
        missed = 0
        while not self._stop.wait(self.interval):
            what = self.lost()
            missed = missed + 1 if what else 0
            if missed >= self.misses and not self._stop.is_set():
                self.record.close("interrupted", f"Ray's {what}")
                self.say(
                    f"interrupted: Ray's {what}; every trial's last checkpoint is kept; "
                    f"run `sweep resume {self.record.name}` once Ray is back"
                )
                if self.node is not None:  # leave no orphan of the local Ray this driver started
                    try:
                        self.node.kill_all_processes(check_alive=False, allow_graceful=False)
                    except Exception:  # noqa: BLE001 (exiting anyway)
                        pass
                os._exit(1)


class TuneStateCopies:
    """Keeps `<experiment>/.tune-state/` a copy of Tune's state files as they last read whole.

    Tune rewrites its experiment_state file in place; a full disk cuts it short and Tune cannot restore
    from it. A copy is written whole or not at all (put_bytes), so the last good one survives the disk
    filling up."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.root = storage, storage.path(name)
        self.copied: dict[str, tuple[int, int]] = {}  # file -> (size, mtime) when copied

    def refresh(self) -> None:
        try:
            listing = self.storage.filesystem.get_file_info(pafs.FileSelector(self.root))
        except OSError:
            return
        for info in listing:
            name = info.path.rsplit("/", 1)[-1]
            stamp = (info.size, info.mtime_ns or 0)
            if info.type != pafs.FileType.File or not TUNE_STATE_FILE.match(name) or self.copied.get(name) == stamp:
                continue
            try:
                with self.storage.filesystem.open_input_stream(info.path) as stream:
                    data = stream.read()
                if not state_file_whole(name, data):  # caught mid-write, or cut short: not a copy worth keeping
                    continue
                put_bytes(self.storage, f"{self.root}/{TUNE_STATE_COPIES}/{name}", data)
                self.copied[name] = stamp
            except OSError:
                continue  # the disk is full: the last copy stands


def state_file_whole(name: str, data: bytes) -> bool:
    """Whether one of Tune's state files reads whole: experiment_state is JSON; the searchers' files (".json" or
    ".pkl") are pickles, walked opcode by opcode without running them. Tune uploads its state over the old file, so a
    full disk leaves it cut short, often empty; Tune then cannot restore it and starts the sweep over."""
    if name.startswith("experiment_state"):
        try:
            json.loads(data)
            return True
        except ValueError:
            return False
    try:
        return bool(data) and any(op.name == "STOP" for op, _, _ in pickletools.genops(data))
    except Exception:  # noqa: BLE001 (pickletools raises ValueError and others on a cut pickle)
        return False


def damaged_tune_state(storage: Storage, name: str) -> list[str]:
    """Tune's state files in the experiment's folder that do not read whole (state_file_whole)."""
    root = storage.path(name)
    try:
        current = _file_names(storage, root)
    except (OSError, FileNotFoundError):
        return []
    return [file for file in current if TUNE_STATE_FILE.match(file) and not _reads_whole(storage, f"{root}/{file}")]


def restore_tune_state(storage: Storage, name: str) -> list[str]:
    """Put the kept copy in place of each of Tune's state files that no longer reads whole (the damaged
    file is kept beside the copies, never deleted). Returns the files restored; [] when a damaged file
    has no whole copy, which leaves the experiment as it was."""
    root = storage.path(name)
    copies_root = f"{root}/{TUNE_STATE_COPIES}"
    damaged = damaged_tune_state(storage, name)
    if not damaged or any(not _reads_whole(storage, f"{copies_root}/{file}") for file in damaged):
        return []
    for file in damaged:
        storage.filesystem.move(f"{root}/{file}", f"{copies_root}/damaged-{int(time.time())}-{file}")
        storage.filesystem.copy_file(f"{copies_root}/{file}", f"{root}/{file}")
    return damaged


def _file_names(storage: Storage, folder: str) -> list[str]:
    listing = storage.filesystem.get_file_info(pafs.FileSelector(folder))
    return [info.base_name for info in listing if info.type == pafs.FileType.File]


def _reads_whole(storage: Storage, path: str) -> bool:
    try:
        with storage.filesystem.open_input_stream(path) as stream:
            return state_file_whole(path.rsplit("/", 1)[-1], stream.read())
    except (OSError, FileNotFoundError):
        return False
