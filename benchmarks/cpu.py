"""CPU time by process kind, for benchmarks that run the fleet's processes side by side on one machine."""

from __future__ import annotations

import psutil

KINDS = {"kiln worker": "worker", "kiln dispatcher": "dispatcher", "postgres": "PostgreSQL", "redis-server": "Redis",
         "moto_server": "moto"}


def cpu_by_process(named: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the fleet's processes, by kind (KINDS: a worker with its GPU
    process, the dispatcher, PostgreSQL's backends, Redis, moto), and by the processes `named` (pid -> kind)."""
    used: dict[str, float] = {}
    for process in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        line = " ".join(process.info["cmdline"] or [])
        kind = (named or {}).get(process.info["pid"]) or next((k for needle, k in KINDS.items() if needle in line),
                                                                None)
        times = process.info["cpu_times"]
        if kind and times is not None:
            used[kind] = used.get(kind, 0.0) + times.user + times.system
    return used
