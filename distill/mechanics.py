"""Training mechanics shared by every job that trains or times a model: distillation (distill.train),
teacher adaptation (distill.adapt), fine-tuning (distill.downstream.finetune), the flat API's AMPTrainer
and the benchmarks. One of each: the precision table, the Accelerator set-up, parameter groups and AdamW,
the optimizer step (clip -> step -> schedule -> zero), the finiteness check, the atomic directory write,
the latency timer and the process's peak memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.recipes import RecipeError

logger = logging.getLogger(__name__)

# Precision names (recipes spell the teacher's dtype `bfloat16`, mixed precision and AMPTrainer `bf16`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ devices
def make_accelerator(section, **kwargs):
    """An Accelerator with the recipe section's `mixed_precision` when it sets one (one line when the
    launcher asked for another), else Accelerate's own (launch flag, config file, environment).
    `section.mixed_precision` is set to what the run actually uses, so the run directory's recipe.yaml
    records it; a precision this device would silently not use is refused (`check_precision`)."""
    from accelerate import Accelerator

    wanted = section.mixed_precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if wanted is not None and launched not in (None, "no", wanted):
        logger.warning("train.mixed_precision=%s (the recipe) overrides Accelerate's %s", wanted, launched)
    accelerator = Accelerator(mixed_precision=wanted, **kwargs)
    used = accelerator.mixed_precision
    if used not in ("no", "bf16", "fp16"):
        raise RecipeError(f"mixed precision {used!r} from Accelerate is not supported; use no, bf16 or fp16")
    section.mixed_precision = used
    check_precision(used, accelerator.device)
    share_cpu_cores(accelerator, getattr(section, "cpu_threads", None))
    return accelerator


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse a precision the device would silently not use (Accelerate runs fp16-on-CPU as fp32)."""
    if mixed_precision == "fp16" and device.type == "cpu":
        raise RecipeError("train.mixed_precision=fp16 is not supported on CPUs (it would silently run in fp32); "
                          "use bf16 or no")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RecipeError(f"train.mixed_precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                          "use fp16 or no")


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a SLURM or cgroup cpuset), not the
    machine's count, so a job given 8 of 128 cores runs 8 threads, not 128."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpu_threads(processes: int, requested: int | None = None) -> tuple[int, str]:
    """The threads each of this machine's `processes` runs on CPU, and where the number comes from:
    1. the recipe's `train.cpu_threads`;
    2. else OMP_NUM_THREADS, where it is set and the process was not started by `accelerate launch` (one job
       per core: `OMP_NUM_THREADS=1 python distill/run.py ...` beside another). Accelerate's launcher always
       sets OMP_NUM_THREADS, to 1 unless told otherwise, so under it the variable cannot say what was asked;
    3. else the cores this process may use (`available_cores`), shared by the processes."""
    if requested is not None:
        return requested, "train.cpu_threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp and "ACCELERATE_MIXED_PRECISION" not in os.environ:  # (set by every accelerate launcher)
        if not omp.isdigit() or int(omp) == 0:
            raise RecipeError(f"OMP_NUM_THREADS={omp!r} is not a positive number of threads; set it to one "
                              "(e.g. OMP_NUM_THREADS=1) or unset it")
        return int(omp), "OMP_NUM_THREADS"
    cores = available_cores()
    return max(1, cores // processes), f"{cores} cores this process may use / {processes} processes"


def share_cpu_cores(accelerator, requested: int | None = None) -> int:
    """On CPU, set this process's torch threads (`cpu_threads`) with one log line, and warn when this machine's
    processes would run more threads than the cores they may use (oversubscribed OpenMP threads spin on one
    another: two 2-thread jobs on 2 cores measured 4x slower per step than each alone). Returns the threads."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # this machine's (torchrun)
    threads, source = cpu_threads(processes, requested)
    torch.set_num_threads(threads)
    logger.info("CPU: %d thread%s per process (%s)", threads, "s" * (threads != 1), source)
    cores = available_cores()
    if threads * processes > cores:
        logger.warning("%d processes x %d threads (%s) exceed the %d cores this process may use: steps will be "
                       "slower than with fewer threads", processes, threads, source, cores)
    return threads


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: Linux's VmHWM, the high-water mark of this program's own
    address space. `getrusage(RUSAGE_SELF).ru_maxrss` is not that: exec keeps the replaced address space's
    peak, and a child spawned with vfork (Python's subprocess) replaces its parent's, so a small benchmark or
    test process started from a 1.5 GB pytest reports 1.5 GB. ru_maxrss only where there is no /proc (macOS,
    where it counts bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------ optimizer
def parameter_groups(model: nn.Module, weight_decay: float, head: str | None = None,
                     head_lr: float | None = None) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (the original scripts' grouping);
    with `head` (a parameter-name prefix) those parameters form a third group at `head_lr`, without decay
    (a new MLM head learns faster than the pretrained body). A tensor shared with the body (a decoder tied
    to the word embeddings) trains with the body."""
    decay, no_decay, head_params, seen = [], [], [], set()
    for name, p in model.named_parameters():  # (shared tensors are listed once, under their first name)
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if head is not None and name.startswith(head):
            head_params.append(p)
        elif p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head is not None:
        groups.append({"params": head_params, "weight_decay": 0.0, "lr": head_lr})
    return groups


def adamw(groups: list[dict], lr: float, betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8,
          fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `groups`; fused: None = PyTorch's default implementation."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


class NonFiniteLoss(FloatingPointError):
    """A loss that is inf or NaN; raised before the optimizer applies its gradients."""

    def __init__(self, message: str, values: dict[str, float] | None = None):
        super().__init__(message)
        self.values = values or {}


def require_finite(values: dict[str, float] | float, step: int, hint: str) -> None:
    """Raise NonFiniteLoss (one line: the step, the values, what to do) unless every value is finite."""
    numbers = values if isinstance(values, dict) else {"loss": values}
    if all(math.isfinite(v) for v in numbers.values()):
        return
    shown = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
    raise NonFiniteLoss(f"non-finite loss at step {step} ({shown}); stopped without updating. {hint}", numbers)


class OptimizerStep:
    """clip -> optimizer step -> LR schedule -> zero the gradients, the same in every trainer.

    Clipping goes through the Accelerator when there is one (it unscales fp16 gradients and handles
    sharded parameters), else through a `torch.amp.GradScaler` when given (unscale first) or plainly.
    `clip` and `apply` are separate so a caller can read the gradient norm and the loss once, and refuse a
    non-finite loss (`discard`) before the update."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None, max_grad_norm: float | None = None,
                 *, accelerator: Any = None, scaler: torch.amp.GradScaler | None = None):
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.accelerator, self.scaler = accelerator, scaler

    def clip(self, parameters: Iterable[torch.Tensor]) -> torch.Tensor | None:
        """Clip the gradients to `max_grad_norm`; returns their norm before clipping (a device tensor)."""
        if not self.max_grad_norm:
            return None
        if self.accelerator is not None:
            return self.accelerator.clip_grad_norm_(parameters, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)

    def apply(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, parameters: Iterable[torch.Tensor]) -> torch.Tensor | None:
        norm = self.clip(parameters)
        self.apply()
        return norm


# ------------------------------------------------------------------------------------------ files
def temp_directory(final: Path) -> Path:
    """A fresh, empty sibling of `final` to write into before `commit_directory` (a leftover from a killed
    writer is removed first)."""
    tmp = final.with_name(f"{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_directory(tmp: Path, final: Path) -> None:
    """Flush `tmp`'s files to disk and rename it to `final` (replacing it): readers see the old directory
    or the complete new one, never a half-written one, even after a crash."""
    fsync_directory(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_directory(final.parent)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` write into tmp; on success it becomes `out` atomically, on an
    exception it is removed and `out` is left as it was."""
    final = Path(final)
    tmp = temp_directory(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, final)


def fsync_directory(path: Path) -> None:
    """Flush a directory's files and the directory entry itself to disk."""
    for p in [*(f for f in path.iterdir() if f.is_file()), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Latency:
    """Milliseconds per call: median and interquartile range of `torch.utils.benchmark` blocks."""

    median: float
    iqr: float
    blocks: int

    def __str__(self) -> str:
        return f"{self.median:.3g} (IQR {self.iqr:.2g})"


def latency(models: dict[str, Any], batches: list[int], repeats: int, device: torch.device | str = "cpu",
            seq_len: int = 128) -> dict[str, dict[int, Latency]]:
    """Forward latency of `models` (name -> fn(input_ids, attention_mask)) per batch size, on random ids of
    `seq_len` tokens: `repeats` interleaved rounds of `Timer.blocked_autorange` (each round a block-timed
    measurement, CUDA synchronised by the timer); the blocks of all rounds are pooled into one median and
    IQR, so drift over time affects every model alike; at least 3 blocks per model."""
    from torch.utils import benchmark

    device = torch.device(device)
    out: dict[str, dict[int, Latency]] = {name: {} for name in models}
    for B in batches:
        ids = torch.randint(1000, 30000, (B, seq_len), device=device)
        mask = torch.ones_like(ids)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for fn in models.values():
                fn(ids, mask)  # warm-up
            rounds = max(1, repeats // 4 if B > 1 else repeats // 2)
            # (more rounds while any model has fewer than 3 blocks: a median and IQR of one block say nothing;
            # slow calls on a loaded machine give one block per round)
            while rounds > 0 or min(map(len, times.values()), default=3) < 3:
                rounds -= 1
                for name, fn in models.items():
                    timer = benchmark.Timer(stmt="fn(ids, mask)", globals={"fn": fn, "ids": ids, "mask": mask},
                                            num_threads=torch.get_num_threads())
                    times[name] += timer.blocked_autorange(min_run_time=0.05).times
        for name, t in times.items():
            q = torch.tensor(t, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
            out[name][B] = Latency(median=1e3 * q[1].item(), iqr=1e3 * (q[2] - q[0]).item(), blocks=len(t))
    return out
