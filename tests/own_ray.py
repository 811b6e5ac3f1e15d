"""A Ray instance of a test's own, stopped without touching any other Ray on the machine.

Run as a script, `python tests/own_ray.py TEMP_DIR` stops the Ray started with that temp dir: the SSH
test's "node" runs it where `ray up` and `ray down` would run a bare `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from waits import wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OwnRay:
    """A Ray instance of a test's own: its own temp dir and ports, so stopping it stops nothing else
    (`ray stop` would stop every Ray on the machine)."""

    def __init__(self, temp_dir: Path | None = None) -> None:
        # short: Ray's socket paths live under it and a Unix socket path is at most 107 bytes
        self.temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start_args(self) -> list[str]:
        return [f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1",
                f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]

    def process_ids(self) -> set[int]:
        """Its daemons name the temp dir on their command lines; their agents and workers are their children."""
        marker = str(self.temp_dir).encode()
        found, children = set(), {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
            if marker in command:
                found.add(int(entry.name))
        # this process and its callers (the SSH test's node runs `own_ray.py TEMP_DIR` in a shell) are not Ray
        parents = {child: parent for parent, kids in children.items() for child in kids}
        pid = os.getpid()
        while pid in parents:
            found.discard(pid)
            pid = parents[pid]
        queue = list(found)
        while queue:
            for child in children.get(queue.pop(), []):
                if child not in found:
                    found.add(child)
                    queue.append(child)
        return found

    def stop(self, timeout: float = 30) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.process_ids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wait_for(lambda: not self.process_ids(), timeout / 2, "this Ray stopping", interval=0.5, required=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


if __name__ == "__main__":
    OwnRay(Path(sys.argv[1])).stop()
