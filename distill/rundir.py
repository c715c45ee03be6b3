"""A run directory's guards: one run at a time (a lock file), a trainer that stops when its launcher dies,
finished runs that are not overwritten by accident, a metrics log without records past the resumed step,
and a `teacher` link that always names the teacher actually used.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK = ".lock"
# What a run writes into its directory (removed by an explicit --overwrite; nothing else is touched).
RUN_FILES = ("checkpoints", "student", "metrics.jsonl", "heldout.json", "recipe.yaml", "teacher", "wandb")


class RunDirError(ValueError):
    """The run directory cannot be used as asked (reported as one line)."""


# ------------------------------------------------------------------------------------------ the lock
def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux): [0] the state, [19] the start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks (Linux), which tells a live owner from a reused pid."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, start: str | None) -> bool:
    """Whether the lock's owner still runs: its pid exists, is not a zombie (ended, not yet reaped by its
    parent) and, where the lock recorded one, has the same start time (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat(pid)
    if fields is None:
        return start is None  # no /proc (not Linux): the pid exists, and nothing more can be told
    return fields[0] not in ("Z", "X") and (start is None or fields[19] == start)


class _LiveOwner(Exception):
    """RunLock._acquire: a live process on this host holds the lock; `in_use` names the directory and owner."""

    def __init__(self, run_dir: Path, owner: dict[str, Any]):
        super().__init__(run_dir)
        self.in_use = f"{run_dir} is in use by another run (pid {owner.get('pid')}, since {owner.get('since')})"


class RunLock:
    """`run_dir/.lock`: JSON with the owner's pid, host and start time, created atomically (write a
    temporary file, hard-link it into place: the link fails if a lock exists). A lock whose owner is dead
    (same host, pid gone or reused) is taken over with one warning line; a live owner's is refused, or, with
    `acquire(wait_s=...)`, waited for (on this host only: elsewhere its liveness cannot be checked)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock. A live owner on this host is refused with RunDirError, or with `wait_s` > 0 polled
        every `wait_s` seconds until it releases the lock or dies (one log line when the wait begins)."""
        waiting = False
        while True:
            try:
                return self._acquire()
            except _LiveOwner as busy:
                if wait_s <= 0:
                    raise RunDirError(f"{busy.in_use}; wait for it to end, or use another output_dir") from None
                if not waiting:
                    logger.info("%s; waiting for it to end", busy.in_use)
                    waiting = True
                time.sleep(wait_s)

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}")
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    pass
                owner = self._owner()
                if owner is None:
                    continue  # vanished, or being written: try again
                if owner.get("host") != me["host"]:
                    raise RunDirError(f"{self.path.parent} is locked by a run on host {owner.get('host')} (pid "
                                      f"{owner.get('pid')}, since {owner.get('since')}); if that run is over, "
                                      f"delete {self.path}")
                if _alive(int(owner.get("pid", -1)), owner.get("start")):
                    raise _LiveOwner(self.path.parent, owner)
                logger.warning("taking over the lock of a run that ended without releasing it (pid %s)",
                               owner.get("pid"))
                self.path.unlink(missing_ok=True)
            raise RunDirError(f"could not lock {self.path.parent}; delete {self.path} if no run uses it")
        finally:
            tmp.unlink(missing_ok=True)

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": socket.gethostname(), "pid": -1}  # unreadable: no live owner can be named
        return owner if isinstance(owner, dict) else {"host": socket.gethostname(), "pid": -1}

    def release(self) -> None:
        if self.held:
            owner = self._owner() or {}
            if owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


# ------------------------------------------------------------------------------------------ signals
class StopRequest:
    """SIGTERM/SIGINT while training: remember the signal; the loop finishes its step, saves a checkpoint
    and exits with 128 + signal. `restore()` puts the previous handlers back."""

    def __init__(self):
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, accelerator) -> bool:
        """Whether any process received a signal (all processes must stop at the same step)."""
        import torch

        flag = torch.tensor(float(self.signum > 0), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------ the launcher
PR_SET_PDEATHSIG = 1


def stop_with_launcher() -> bool:
    """Under `accelerate launch` (or torchrun) ask Linux to send this process SIGTERM when its launcher
    dies, so a killed launcher never leaves a trainer running (SIGTERM: save a checkpoint, exit). Not for
    a plain `python distill/run.py`, whose parent is a shell (nohup'ed runs must survive it)."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if not launched or not hasattr(os, "getppid"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


# ------------------------------------------------------------------------------------------ contents
def check_new_run(run_dir: Path, overwrite: bool) -> None:
    """A new run (nothing to resume) must not silently replace a finished one: a directory with an exported
    student is refused unless the user passed --overwrite, which removes the old run's files (only those a
    run writes). A run of the same recipe that ended before its first checkpoint simply starts again."""
    run_dir = Path(run_dir)
    if not overwrite:
        if (run_dir / "student").exists():
            raise RunDirError(f"{run_dir} holds an exported student (student/) and no checkpoint to resume; use "
                              "another output_dir, or pass --overwrite to replace that run")
        return
    remove([p for name in RUN_FILES if (p := run_dir / name).exists() or p.is_symlink()], run_dir)


# What a fine-tune writes into its directory: its own records and the best model's files (save_pretrained,
# the tokenizer, the model card, the confusion figure).
FINETUNE_FILES = ("results.json", "metrics.jsonl", "recipe.yaml", ".best", "wandb", "README.md")
FINETUNE_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "tokenizer*.json",
                        "special_tokens_map.json", "vocab.txt", "confusion_*.png")


def check_new_finetune(run_dir: Path, overwrite: bool, recipe: dict[str, Any], sources: dict[str, Path]) -> list[Path]:
    """What a new fine-tune in `run_dir` may replace, checked before anything is written. Fine-tunes do not
    resume: a directory holding a finished one (results.json), a model, or a fine-tune of another recipe is
    refused unless --overwrite; an unfinished fine-tune of the same recipe starts again. Never the directory
    of a model the run reads (`sources`: what -> directory). Returns the earlier files to remove once every
    other input is checked (the caller removes them with `remove`)."""
    run_dir = Path(run_dir)
    for what, src in sources.items():
        if run_dir.exists() and run_dir.resolve() == Path(src).resolve():
            raise RunDirError(f"output_dir {run_dir} is the {what}'s own directory: the fine-tune would replace the "
                              "model it reads; choose another output_dir")
    if not run_dir.is_dir():
        return []
    found = [p for name in FINETUNE_FILES if (p := run_dir / name).exists() or p.is_symlink()]
    found += sorted(p for pattern in FINETUNE_MODEL_FILES for p in run_dir.glob(pattern))
    if overwrite or not found:
        return found
    if (run_dir / "results.json").exists():
        raise RunDirError(f"{run_dir} holds a finished fine-tune (results.json); use another output_dir, or pass "
                          "--overwrite to replace it")
    if (run_dir / "config.json").exists():
        raise RunDirError(f"{run_dir} holds a model (config.json); use another output_dir, or pass --overwrite to "
                          "replace it")
    from distill.build import changed_keys, read_saved_recipe  # (build imports this module)

    saved = read_saved_recipe(run_dir)
    if saved is not None:
        changed = changed_keys(saved, recipe)
        if changed:
            raise RunDirError(f"{run_dir} holds an unfinished fine-tune of another recipe ({', '.join(changed[:3])} "
                              "differ); use another output_dir, or pass --overwrite to replace it")
    return found


def remove(paths: list[Path], run_dir: Path) -> None:
    """Remove an earlier run's files (those a run writes: check_new_run, check_new_finetune), with one warning
    line naming them."""
    if not paths:
        return
    logger.warning("removing the earlier run's files in %s: %s", run_dir, ", ".join(p.name for p in paths))
    for p in paths:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def lock_run(run_dir: Path, accelerator) -> RunLock:
    """Take `run_dir`'s lock on the main process; every process raises the same RunDirError if it is held."""
    from accelerate.utils import broadcast_object_list

    lock, error = RunLock(run_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunDirError as e:
            error = str(e)
    error = broadcast_object_list([error])[0] if accelerator.num_processes > 1 else error
    if error:
        raise RunDirError(error)
    return lock


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` (the resumed checkpoint) and drop the rest, and any torn last
    line, atomically. Returns how many records were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        tmp.replace(path)
    return dropped


def link_teacher(run_dir: Path, source: str) -> None:
    """`run_dir/teacher` -> the teacher directory actually used (replaced atomically when it named
    another); removed when the teacher is a hub name (recorded in recipe.yaml)."""
    link = Path(run_dir) / "teacher"
    if not Path(source).is_dir():
        if link.is_symlink():
            link.unlink()
        return
    target = Path(source).resolve()
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.exists() and not link.is_symlink():
        raise RunDirError(f"{link} exists and is not a link; move it away (the run links its teacher there)")
    tmp = link.with_name(f"teacher.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    tmp.replace(link)
