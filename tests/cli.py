"""Running the kit's command lines from tests: one way, offline, from the repository root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"
LAUNCH = ("-m", "accelerate.commands.launch")  # `accelerate launch`, with this interpreter


def env(**extra: str) -> dict[str, str]:
    """The environment of a command under test: offline, wandb disabled, this checkout importable, and
    no inherited OMP_NUM_THREADS (the kit sets its threads itself)."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), **extra}
    if "OMP_NUM_THREADS" not in extra:
        e.pop("OMP_NUM_THREADS", None)
    return e


def python(*args: str | Path, check: bool = True, timeout: float = 600,
           **extra_env: str) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root; text output captured. With `check`, the exit status must be 0
    (else the test fails with the end of stderr)."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kit(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    """`python distill/run.py ARGS` (see `python`)."""
    return python("distill/run.py", *args, **kwargs)


def launch(*args: str | Path, cpu: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS`, on CPUs unless cpu=False (see `python`)."""
    return python(*LAUNCH, *args, **({"ACCELERATE_USE_CPU": "1"} if cpu else {}), **kwargs)


def popen(*args: str | Path, pipe: bool = True, **extra_env: str) -> subprocess.Popen:
    """`python ARGS` started in the background from the repository root (text pipes, or none)."""
    out = subprocess.PIPE if pipe else subprocess.DEVNULL
    # An ignored SIGINT is inherited through exec (pytest started as a shell's background job, or under
    # nohup), and Python then installs no KeyboardInterrupt handler: the child starts with the default
    # disposition, as at a terminal, so the Ctrl-C tests test the kit and not how pytest was started.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(**extra_env), stdout=out,
                                stderr=out, text=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
