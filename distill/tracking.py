"""Experiment tracking: wandb through Accelerate's trackers (main process only, imported only when
enabled) and a local metrics.jsonl that is always written."""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distill.recipes import TrackingConfig

logger = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE if set; else online when logged in; else offline (with a hint on syncing)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
        if mode not in WANDB_MODES:
            raise ValueError(f"WANDB_MODE={mode!r} is not one of {WANDB_MODES}")
        return mode
    return "online" if wandb_logged_in() else "offline"


def log_with(cfg: TrackingConfig) -> list[str] | None:
    """Trackers for `Accelerator(log_with=...)`."""
    return ["wandb"] if cfg.wandb and wandb_mode() != "disabled" else None


def start(accelerator: Accelerator, cfg: TrackingConfig, run_dir: Path, config: dict[str, Any],
          resume_id: str | None) -> str | None:
    """Initialise the trackers; returns the wandb run id (to resume the same run after a restart)."""
    if not accelerator.log_with:
        return None
    mode = wandb_mode()
    kwargs = {"name": cfg.run_name or run_dir.name, "tags": list(cfg.tags), "mode": mode, "dir": str(run_dir)}
    if resume_id:
        kwargs.update(id=resume_id, resume="allow")
    accelerator.init_trackers(cfg.project, config=config, init_kwargs={"wandb": kwargs})
    run_id = None
    if accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run_id = run.id
        if mode == "offline" and not os.environ.get("WANDB_MODE"):  # offline by our choice, not the user's
            logger.warning("wandb is offline (no API key found); sync later with: wandb sync %s/wandb/latest-run",
                           run_dir)
    return run_id


class MetricsFile:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl (main process)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
