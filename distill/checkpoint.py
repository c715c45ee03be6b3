"""Checkpoints: one self-describing directory per save, no pickle, verified before use, written atomically.

A checkpoint `checkpoints/step-N/` holds only safetensors and JSON, so loading one can never run code:

    model.safetensors         the trained module's full tensors (tied tensors stored once)
    optimizer.safetensors     optimizer state tensors, keyed `state/<parameter name>/<name>`
    optimizer.json            param groups and non-tensor state
    scheduler.json            the LR scheduler's state_dict
    scaler.json               the fp16 grad scaler's state (fp16 runs only)
    rng-<rank>.safetensors    torch CPU/CUDA generator states of each process
    rng-<rank>.json           Python's and NumPy's generator states of each process
    trainer_state.json        step, data position, tracker id, ...
    manifest.json             size and sha256 of every file above, written last

Everything is written into `step-N.tmp` and renamed to `step-N` after the manifest, so a run killed
mid-save never leaves a checkpoint that looks complete. Model and optimizer states go through
`torch.distributed.checkpoint.state_dict` as full (unsharded) state dicts, so one format serves one
process, DDP and FSDP2 alike (FSDP shards are gathered to the main process on save and re-sharded on
load). `find()` verifies the manifest and parses every file before anything is applied; a damaged
newest checkpoint is set aside (`step-N.damaged`) with one warning line naming the file, and the
previous complete one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from distill.mechanics import commit_directory, temp_directory

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
FORMAT = "distilbert-kit-checkpoint/2"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """No usable checkpoint where one is needed (reported as one line)."""


class Damaged(Exception):
    """One checkpoint cannot be used; the message names the file and what is wrong with it."""


@dataclass
class Parts:
    """What a checkpoint saves and restores. `rank`/`world`/`barrier` describe the processes (one process:
    the defaults); each process saves and restores its own generator states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any = None
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ------------------------------------------------------------------------------------------ listing
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (those with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).exists()]
    return [p for _, p in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def legacy_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints of earlier versions (Accelerate's pickle files, no manifest): never loaded."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and not (p / MANIFEST).exists()
                  and (p / STATE_FILE).exists())


# ------------------------------------------------------------------------------------------ saving
def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=True))


def _jsonable(value: Any, what: str) -> Any:
    """Plain JSON values (tuples become lists); anything else is a programming error, not a pickle."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, what) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, what) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{what}: {type(value).__name__} is not storable as JSON")


def optimizer_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A full optimizer state dict (keyed by parameter names) as (tensors, JSON)."""
    tensors, scalars = {}, {}
    for fqn, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{fqn}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(fqn), {})[name] = _jsonable(value, f"optimizer state {name}")
    return tensors, {"param_groups": _jsonable(state["param_groups"], "optimizer param_groups"), "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, fqn, name = key.split("/", 2)
        state.setdefault(fqn, {})[name] = value
    for fqn, values in meta["scalars"].items():
        state.setdefault(fqn, {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer


def aliases(model: nn.Module) -> set[str]:
    """Names of tied parameters beyond their first name (the vocabulary projector tied to the embeddings)."""
    first = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - first


def full_states(parts: Parts) -> tuple[dict[str, torch.Tensor], dict]:
    """Full model and optimizer states on the CPU (a collective under FSDP: every process calls it; the
    main process receives the tensors)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=parts.world > 1)
    model = get_model_state_dict(parts.model, options=options)
    optim = get_optimizer_state_dict(parts.model, _torch_optimizer(parts.optimizer), options=options)
    tied = aliases(parts.model)
    return {k: v.detach().cpu().contiguous() for k, v in model.items() if k not in tied}, optim


def rng_files() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save(parts: Parts, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint for `step` (call on every process); returns its directory."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if parts.is_main:
        for stale in final.parent.glob("step-*.tmp") if final.parent.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)  # saves that a kill interrupted (never complete)
        tmp = temp_directory(final)
    parts.barrier()
    tensors, meta = rng_files()
    save_file(tensors, str(tmp / f"rng-{parts.rank}.safetensors"))
    _write_json(tmp / f"rng-{parts.rank}.json", meta)
    model_state, optim_state = full_states(parts)
    if parts.is_main:
        opt_tensors, opt_meta = optimizer_files(optim_state)
        save_file(model_state, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", opt_meta)
        _write_json(tmp / "scheduler.json", _jsonable(parts.scheduler.state_dict(), "scheduler state"))
        if parts.scaler is not None:
            _write_json(tmp / "scaler.json", _jsonable(parts.scaler.state_dict(), "grad scaler state"))
        _write_json(tmp / STATE_FILE, {**state, "step": step})
    parts.barrier()
    if parts.is_main:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"format": FORMAT, "step": step, "world": parts.world,
                    "files": {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}}
        _write_json(tmp / MANIFEST, manifest)
        commit_directory(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    parts.barrier()
    return final


class Checkpointer:
    """Saves on its own cadence: every `every` steps, at the last step, and when forced (a stop signal).
    Call `maybe_save` on every process after each step."""

    def __init__(self, parts: Parts, run_dir: Path, every: int, last_step: int, keep: int):
        self.parts, self.run_dir, self.every, self.last_step, self.keep = parts, Path(run_dir), every, last_step, keep

    def maybe_save(self, step: int, state: dict[str, Any], force: bool = False) -> Path | None:
        if not (force or step % self.every == 0 or step == self.last_step):
            return None
        state["step"] = step
        return save(self.parts, self.run_dir, step, state, self.keep)


# ------------------------------------------------------------------------------------------ loading
def verify(path: Path, world: int) -> dict:
    """Check a checkpoint against its manifest; returns the manifest or raises Damaged naming the file."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        assert manifest.get("format") == FORMAT and isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise Damaged(f"{MANIFEST} is unreadable") from None
    if manifest.get("world") != world:
        raise Damaged(f"it was saved by {manifest.get('world')} process(es) and this run has {world}; resume "
                      "with the number of processes that saved it")
    needed = {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", STATE_FILE,
              *(f"rng-{r}.{ext}" for r in range(world) for ext in ("safetensors", "json"))}
    missing = sorted(needed - set(files))
    if missing:
        raise Damaged(f"{missing[0]} is not in its manifest")
    for name, want in files.items():
        if "/" in name or name.startswith("."):
            raise Damaged(f"manifest names {name!r}, which is not a file of the checkpoint")
        p = path / name
        if not p.is_file():
            raise Damaged(f"{name} is missing")
        if p.stat().st_size != want.get("size"):
            raise Damaged(f"{name} has {p.stat().st_size} bytes, the manifest says {want.get('size')}")
        if file_sha256(p) != want.get("sha256"):
            raise Damaged(f"{name} does not match its sha256 in the manifest")
    return manifest


@dataclass
class Loaded:
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: tuple[dict[str, torch.Tensor], dict]
    state: dict[str, Any]


def read(path: Path, rank: int, world: int) -> Loaded:
    """Verify and parse one checkpoint into memory (nothing applied yet); raises Damaged."""
    verify(path, world)
    name = ""
    try:
        name = "model.safetensors"
        model = load_file(str(path / name))
        name = "optimizer.safetensors"
        opt_tensors = load_file(str(path / name))
        name = "optimizer.json"
        opt = optimizer_state(opt_tensors, json.loads((path / name).read_text()))
        name = "scheduler.json"
        scheduler = json.loads((path / name).read_text())
        name = "scaler.json"
        scaler = json.loads((path / name).read_text()) if (path / name).exists() else None
        rng = None
        for r in range(world):  # every process parses every file, so all reach the same verdict
            name = f"rng-{r}.safetensors"
            pair = (load_file(str(path / name)), json.loads((path / f"rng-{r}.json").read_text()))
            rng = pair if r == rank else rng
        name = STATE_FILE
        state = json.loads((path / name).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise Damaged(f"{name} cannot be read ({type(e).__name__})") from None
    return Loaded(path, model, opt, scheduler, scaler, rng, state)


def apply(loaded: Loaded, parts: Parts) -> dict[str, Any]:
    """Put a parsed checkpoint into the model, optimizer, scheduler, scaler and generators (every process
    holds the full states and loads its own part of them)."""
    try:
        options = StateDictOptions(full_state_dict=True, strict=False)
        missing, unexpected = set_model_state_dict(parts.model, loaded.model, options=options)
        missing = set(missing) - aliases(parts.model)
        if missing or unexpected:
            raise KeyError(f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        set_optimizer_state_dict(parts.model, _torch_optimizer(parts.optimizer), loaded.optimizer,
                                 options=StateDictOptions(full_state_dict=True))
        parts.scheduler.load_state_dict(loaded.scheduler)
        if parts.scaler is not None and loaded.scaler is not None:
            parts.scaler.load_state_dict(loaded.scaler)
        set_rng(*loaded.rng)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {loaded.path} does not fit this run ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    return loaded.state


def find(run_dir: Path, rank: int = 0, world: int = 1, warn: Callable[[str], None] = logger.warning,
         barrier: Callable[[], None] = lambda: None) -> Loaded | None:
    """The newest usable checkpoint, verified and parsed (not applied). Damaged newer ones get one warning
    line each naming the file, and are renamed `step-N.damaged` (kept for inspection) once an older usable
    one is found. None when the run has no checkpoint; CheckpointError, with nothing on disk changed,
    when checkpoints exist and none is usable."""
    dirs = checkpoint_dirs(run_dir)
    legacy = legacy_dirs(run_dir)
    if not dirs and legacy:
        raise CheckpointError(f"{legacy[-1]} is an earlier version's checkpoint (pickle files, which could run "
                              "code when loaded); it is not loaded. Start the run in a new output_dir")
    damaged: list[tuple[Path, str]] = []
    for path in reversed(dirs):
        try:
            loaded = read(path, rank, world)
        except Damaged as e:
            damaged.append((path, str(e)))
            continue
        for bad, why in damaged:
            if rank == 0:
                warn(f"checkpoint {bad} is damaged: {why}; resuming from {path.name} (the damaged one is kept "
                     f"as {bad.name}.damaged)")
        barrier()
        if rank == 0:
            for bad, _ in damaged:
                aside = bad.with_name(bad.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                bad.rename(aside)
        barrier()
        return loaded
    if damaged:
        names = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'} ({names}); start over "
                              "with --overwrite or in a new output_dir")
    return None


def restore(run_dir: Path, parts: Parts, warn: Callable[[str], None] = logger.warning) -> dict[str, Any] | None:
    """`find` then `apply`: the trainer state of the newest usable checkpoint (None: no checkpoint)."""
    loaded = find(run_dir, parts.rank, parts.world, warn, parts.barrier)
    return None if loaded is None else apply(loaded, parts)
