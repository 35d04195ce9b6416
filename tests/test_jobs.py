"""Jobs that would share the CPU cores: each heavy command announces itself and warns about the others."""
import json
import logging
import os
import subprocess
import sys

import pytest

from realisid import jobs


@pytest.fixture
def folder(tmp_path, monkeypatch):
    d = tmp_path / "jobs"
    monkeypatch.setenv("REALISID_JOBS_DIR", str(d))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return d


@pytest.fixture
def sleeper():
    """Another live process, standing in for another job."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def _record(folder, pid, start, command="train", args=("joint",)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{pid}.json").write_text(json.dumps({"pid": pid, "start": start, "command": command, "args": list(args),
                                                    "since": "2026-12-07 06:21:26"}))


def test_a_job_alone_announces_itself_and_withdraws(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="realisid.jobs"):
        path, others = jobs.announce("bench", ["joint", "--run", "runs/x"])
    assert others == [] and not caplog.records
    rec = json.loads(open(path).read())
    assert rec["pid"] == os.getpid() and rec["command"] == "bench" and rec["args"] == ["joint", "--run", "runs/x"]
    assert jobs.running_jobs(str(folder)) == [rec]  # itself, seen from outside
    assert jobs.running_jobs(str(folder), exclude_pid=os.getpid()) == []
    jobs.withdraw(path)
    assert not os.path.exists(path) and jobs.running_jobs(str(folder)) == []


def test_another_live_job_is_named_in_a_warning_and_forgotten_when_it_ends(folder, sleeper, caplog):
    _record(folder, sleeper.pid, jobs.process_start(sleeper.pid), "pretrain", ["pretrain.unet_more.steps=8000"])
    (folder / "junk.json").write_text("{not json")  # a half-written or foreign file is skipped, not fatal
    with caplog.at_level(logging.WARNING, logger="realisid.jobs"):
        path, others = jobs.announce("train", ["joint"])
    assert [o["pid"] for o in others] == [sleeper.pid]
    msg = caplog.records[0].getMessage()
    assert f"pid {sleeper.pid} (`realisid pretrain pretrain.unet_more.steps=8000`" in msg
    assert "kill -STOP" in msg and "realisid train:" in msg
    sleeper.kill()
    sleeper.wait()
    assert jobs.running_jobs(str(folder), exclude_pid=os.getpid()) == []
    assert not (folder / f"{sleeper.pid}.json").exists()  # the stale record was removed by the reader
    jobs.withdraw(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to tell a reused pid")
def test_a_pid_taken_by_another_process_is_stale(folder, sleeper):
    real = jobs.process_start(sleeper.pid)
    assert real is not None and real == jobs.process_start(sleeper.pid)
    _record(folder, sleeper.pid, str(int(real) - 1))  # the recorded job started at another time: not this process
    assert jobs.running_jobs(str(folder)) == []
    assert not (folder / f"{sleeper.pid}.json").exists()


def test_other_ranks_of_one_ddp_job_do_not_announce(folder, monkeypatch, sleeper):
    _record(folder, sleeper.pid, jobs.process_start(sleeper.pid))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert jobs.announce("train", []) == (None, [])
    assert sorted(p.name for p in folder.iterdir()) == [f"{sleeper.pid}.json"]


def test_the_command_line_warns_and_leaves_no_record(folder, sleeper, capfd, caplog):
    """`realisid train` beside another job: the warning comes first, even when the command then fails on its config,
    and the command's own record is gone once it returns. Light commands never announce."""
    from realisid.cli import main

    _record(folder, sleeper.pid, jobs.process_start(sleeper.pid), "sweep", ["experiments/sweeps/branches.yaml"])
    with caplog.at_level(logging.WARNING, logger="realisid.jobs"):
        assert main(["train", "joint", "no.such.key=1"]) == 2
    assert f"pid {sleeper.pid} (`realisid sweep experiments/sweeps/branches.yaml`" in caplog.text
    assert "no.such.key" in capfd.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [f"{sleeper.pid}.json"]
    assert "faces" not in jobs.HEAVY_COMMANDS and "build-shards" not in jobs.HEAVY_COMMANDS
