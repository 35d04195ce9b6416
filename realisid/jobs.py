"""Other realisid jobs on this machine: torch jobs that share the CPU cores slow each other several-fold.

Two torch jobs on the same cores each start a thread pool sized for all of them; oversubscribed, both run 5-10x
slower on a 2-core machine (a 2.5-minute benchmark took over 10 minutes beside a training run), and every wall time
either of them reports is then wrong. Each heavy command (train, sweep, bench, generate, precompute, pretrain,
check-embedded, prepare) therefore announces itself while it runs, as ``<pid>.json`` in a per-user folder of the
system's temporary directory (``REALISID_JOBS_DIR`` names another), and warns when another announced job is alive.

A record is stale when its process is gone or its pid now belongs to another process (the start time kept in the
record differs from the one in ``/proc``); stale records are removed by whoever reads them. Under DDP only local
rank 0 announces: the other ranks of a job are not other jobs.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import tempfile
import time
from typing import Sequence

from realisid.io import atomic_write_json

log = logging.getLogger("realisid.jobs")

HEAVY_COMMANDS = ("train", "sweep", "bench", "generate", "precompute", "pretrain", "check-embedded", "prepare")


def jobs_dir() -> str:
    """The folder of announced jobs: ``REALISID_JOBS_DIR``, else ``<tmp>/realisid-jobs-<uid>``."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.environ.get("REALISID_JOBS_DIR") or os.path.join(tempfile.gettempdir(), f"realisid-jobs-{uid}")


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), which tells a pid reused by
    another process apart; None where there is no ``/proc`` (the record then counts while the pid is alive)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after "(comm)" start at field 3; field 22 is index 19


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def running_jobs(folder: str | None = None, exclude_pid: int | None = None) -> list[dict]:
    """The live jobs announced in ``folder`` (default :func:`jobs_dir`), oldest pid first, without ``exclude_pid``.
    Records of processes that are gone, or whose pid another process has taken, are removed; files that are not
    records (half written, foreign) are skipped."""
    folder = folder or jobs_dir()
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    jobs = []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                rec = json.load(f)
            pid = int(rec["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid == exclude_pid:
            continue
        start = process_start(pid)
        if not _alive(pid) or (rec.get("start") is not None and start is not None and rec["start"] != start):
            _remove(path)
            continue
        jobs.append(rec)
    return jobs


def overlap_message(others: Sequence[dict], command: str) -> str:
    """The warning for ``command`` starting beside ``others``: names each job and says what to do."""
    def line(o: dict) -> str:
        args = shlex.join(str(a) for a in o.get("args") or [])
        args = args if len(args) <= 100 else args[:100] + " ..."
        return f"pid {o['pid']} (`realisid {o.get('command', '?')}{' ' + args if args else ''}`, since {o.get('since', '?')})"

    listed = "; ".join(line(o) for o in others)
    one = len(others) == 1
    return (f"realisid {command}: {'another realisid job is' if one else f'{len(others)} other realisid jobs are'} running on this "
            f"machine: {listed}. Jobs that share the {os.cpu_count()} CPU cores slow each other several-fold (on 2 cores 5-10x: "
            "each sizes its thread pool for all of them), and every wall time they report is then wrong. Wait for "
            f"{'it' if one else 'them'} to end, or pause one with `kill -STOP <pid>` and resume it with `kill -CONT <pid>`.")


def announce(command: str, args: Sequence[str] = ()) -> tuple[str | None, list[dict]]:
    """Record this process as running ``realisid command args`` and warn (log) if other jobs are running.

    Returns (the record's path, or None where nothing was recorded; the other live jobs). :func:`withdraw` removes
    the record; it is also removed at exit, and a record left by a killed process counts as stale once its process
    is gone. Never fails the command: a folder that cannot be written only loses the warning."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        return None, []
    folder = jobs_dir()
    pid = os.getpid()
    others = running_jobs(folder, exclude_pid=pid)
    if others:
        log.warning(overlap_message(others, command))
    path = os.path.join(folder, f"{pid}.json")
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write_json(path, {"pid": pid, "start": process_start(pid), "command": command, "args": list(args),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OSError as err:
        log.debug("could not announce this job in %s (%s); overlapping jobs will not be warned about", folder, err)
        return None, others
    atexit.register(_remove, path)
    return path, others


def withdraw(path: str | None) -> None:
    """Remove a record :func:`announce` wrote (None: nothing was written)."""
    if path:
        _remove(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
