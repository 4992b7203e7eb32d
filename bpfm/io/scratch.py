"""Scratch files and folders named after the host and process that write them, so that a later
process can tell the leftovers of a killed one (its cleanup never ran) from those of a process
still writing, also where several hosts or containers share one folder."""

from __future__ import annotations

import os
import socket

import psutil


def owner() -> str:
    """`<host>-<pid>` of this process, the suffix of its scratch names."""
    return f"{socket.gethostname()}-{os.getpid()}"


def process_runs(pid: int) -> bool:
    """Whether a process with this ID runs on this host (another user's counts too)."""
    return psutil.pid_exists(pid)


def left_by_dead_process(host: str | None, pid: int) -> bool:
    """Whether a scratch name of (`host`, `pid`) was left by a process of this host that no longer
    runs. `host` None: a name from before hosts were recorded, taken as this host's."""
    return (host is None or host == socket.gethostname()) and not process_runs(pid)
