"""Helpers for tests that start real processes and listen on real loopback ports."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    """A port free on 127.0.0.1 right now (bind-and-release: a small race, fine for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace_s: float = 20.0
) -> int:
    """Stop one process we started, by its PID: signal, wait, then kill if it hangs."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return int(process.returncode)
