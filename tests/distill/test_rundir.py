"""Run directories: damaged-checkpoint fallback (bit-exact), one run per directory, finished runs kept,
moved directories resumable, a trainer that stops with its launcher."""

import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from distill import rundir
from distill import train as train_mod
from tests.cli import LAUNCH, TINY, kit, popen, python
from tests.distill.test_train import recipe, weights

pytestmark = pytest.mark.slow

COMMON = ["train.max_steps=6", "train.save_every=3", "train.eval_every=100", "train.log_every=1",
          "loss.alpha_mse=0.5"]


def records(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_mod.train(recipe(tiny_teacher_dir, out, *COMMON))
    return out


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.safetensors", "rng-0.safetensors"])
def test_damaged_newest_checkpoint_falls_back_bit_exactly(tiny_teacher_dir, tmp_path, uninterrupted, damaged,
                                                          capsys):
    out = tmp_path / "run"
    train_mod.train(recipe(tiny_teacher_dir, out, *COMMON))  # checkpoints 3 and 6
    f = out / "checkpoints" / "step-00000006" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a truncated file
    capsys.readouterr()
    train_mod.train(recipe(tiny_teacher_dir, out, *COMMON))
    err = capsys.readouterr().err
    warnings = [x for x in err.splitlines() if x.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and damaged in warnings[0] and "step-00000006" in warnings[0], err
    assert (out / "checkpoints" / "step-00000006.damaged").is_dir()
    a, b = weights(uninterrupted, 6), weights(out, 6)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0
    # metrics.jsonl: no records past the resumed step survive; the steps after it are written once
    steps = [r["step"] for r in records(out) if "loss/total" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["loss/total"] for r in records(out) if "loss/total" in r] == \
        [r["loss/total"] for r in records(uninterrupted) if "loss/total" in r]


def test_finished_run_is_not_overwritten_without_asking(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    kit(TINY, f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={out}", "train.max_steps=2")
    shutil.rmtree(out / "checkpoints")  # a finished run whose checkpoints were cleaned up
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_teacher_dir, other)
    again = [TINY, f"teacher.name_or_path={other}", f"output_dir={out}", "train.max_steps=2"]
    proc = kit(*again, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "pass --overwrite" in proc.stderr.strip().splitlines()[-1]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    kit(*again, "--overwrite")
    assert (out / "teacher").resolve() == other.resolve()  # the link names the teacher actually used
    assert [r["step"] for r in records(out) if "loss/total" in r] == [2]


def test_a_moved_run_directory_resumes_and_a_longer_schedule_is_announced(tiny_teacher_dir, tmp_path, caplog):
    old = tmp_path / "old"
    train_mod.train(recipe(tiny_teacher_dir, old, *COMMON, "train.max_steps=3"))
    new = tmp_path / "moved"
    old.rename(new)
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        summary = train_mod.train(recipe(tiny_teacher_dir, new, *COMMON))
    assert summary["step"] == 6
    assert any("train.max_steps changed from 3 to 6" in r.getMessage() and "learning-rate schedule" in r.getMessage()
               for r in caplog.records)
    assert [r["step"] for r in records(new) if "loss/total" in r] == [1, 2, 3, 4, 5, 6]


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    lock = rundir.RunLock(tmp_path)
    lock.acquire()
    with pytest.raises(rundir.RunDirError, match="in use by another run"):
        rundir.RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    dead = popen("-c", "pass", pipe=False)
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": "1"}))
    lock = rundir.RunLock(tmp_path)
    lock.acquire()  # stale: taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(rundir.RunDirError, match="locked by a run on host elsewhere"):
        rundir.RunLock(tmp_path).acquire()


def test_lock_waits_for_a_live_owner_when_asked_and_is_then_taken(tmp_path):
    owner = popen("-c", "import time; time.sleep(1)", pipe=False)
    (tmp_path / ".lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(),
                                                "start": rundir._start_time(owner.pid), "since": "now"}))
    with pytest.raises(rundir.RunDirError, match=f"in use by another run \\(pid {owner.pid}"):
        rundir.RunLock(tmp_path).acquire()  # no wait asked for: refused at once
    lock = rundir.RunLock(tmp_path)
    lock.acquire(wait_s=0.05)  # returns once the owner has ended (its lock is then a dead one's)
    assert owner.poll() is not None
    assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(rundir.RunDirError, match="locked by a run on host elsewhere"):
        rundir.RunLock(tmp_path).acquire(wait_s=0.05)  # another host's liveness is unknown: never waited for


def test_a_zombie_owner_counts_as_ended_and_a_running_one_as_alive():
    running = popen("-c", "import time; time.sleep(30)", pipe=False)
    ended = popen("-c", "pass", pipe=False)  # not reaped: a zombie until ended.wait() below
    try:
        assert wait_for(lambda: (rundir._stat(ended.pid) or ["?"])[0] == "Z", timeout=30)
        assert not rundir._alive(ended.pid, rundir._start_time(ended.pid))
        assert rundir._alive(running.pid, rundir._start_time(running.pid))
        assert not rundir._alive(running.pid, "1")  # a reused pid: another start time
    finally:
        running.kill()
        running.wait()
        ended.wait()


def wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_second_run_into_a_busy_directory_is_refused_and_the_trainer_stops_with_its_launcher(
        tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    args = ["distill/run.py", str(TINY), f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={out}",
            "train.max_steps=100000", "train.save_every=100000", "train.log_every=1"]
    launcher = popen(*LAUNCH, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no", *args, pipe=False, ACCELERATE_USE_CPU="1")
    try:
        metrics = out / "metrics.jsonl"
        assert wait_for(lambda: metrics.exists() and "loss/total" in metrics.read_text())
        trainer = json.loads((out / ".lock").read_text())["pid"]
        assert trainer != launcher.pid
        before = (out / "recipe.yaml").read_bytes()
        second = python(*args, check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert "in use by another run" in second.stderr.strip().splitlines()[-1]
        assert (out / "recipe.yaml").read_bytes() == before
        launcher.send_signal(signal.SIGKILL)  # the launcher dies; its trainer must not keep running
        launcher.wait()
        assert wait_for(lambda: not Path(f"/proc/{trainer}").exists() or _zombie(trainer), timeout=120)
        # it stopped as on SIGTERM: a checkpoint of the step it was in, and the lock released
        assert list((out / "checkpoints").glob("step-*"))
        assert not (out / ".lock").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_metrics_truncation_drops_later_and_torn_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "teacher": 1}\n{"step": 2}\n{"step": 4}\n{"step": 3, "eval": 1}\n{"ste')
    assert rundir.truncate_metrics(path, 3) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 2, 3]
