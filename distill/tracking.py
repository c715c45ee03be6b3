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


def group_of(cfg: TrackingConfig, run_dir: Path, model: str | None = None) -> str:
    """The wandb group: the recipe's, else the distillation run a fine-tuned model came from (its
    `student/` export or `teacher` link inside a run directory), else this run's directory name."""
    if cfg.group:
        return cfg.group
    if model is not None:
        path = Path(model)
        parent = path.parent
        if path.name in ("student", "teacher") and (parent / "recipe.yaml").exists():
            import yaml

            try:
                saved = yaml.safe_load((parent / "recipe.yaml").read_text()) or {}
                return (saved.get("tracking") or {}).get("group") or parent.name
            except (yaml.YAMLError, OSError, AttributeError):
                return parent.name
    return run_dir.name


def start(accelerator: Accelerator, cfg: TrackingConfig, run_dir: Path, config: dict[str, Any],
          resume_id: str | None, group: str | None = None, job_type: str = "distill") -> str | None:
    """Initialise the trackers; returns the wandb run id (to resume the same run after a restart)."""
    if not accelerator.log_with:
        return None
    mode = wandb_mode()
    kwargs = {"name": cfg.run_name or run_dir.name, "tags": list(cfg.tags), "mode": mode, "dir": str(run_dir),
              "group": group or group_of(cfg, run_dir), "job_type": job_type}
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


# --------------------------------------------------------------------- wandb beyond scalar curves
def run_of(accelerator: Accelerator):
    """The wandb run of this process (main process with wandb on), else None."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return None
    try:
        return accelerator.get_tracker("wandb", unwrap=True)
    except (ValueError, KeyError):
        return None


def log_config(accelerator: Accelerator, values: dict[str, Any]) -> None:
    """Facts known only once the run has started (corpus statistics, the resolved precision)."""
    run = run_of(accelerator)
    if run is not None:
        run.config.update(values, allow_val_change=True)


def log_summary(accelerator: Accelerator, values: dict[str, Any]) -> None:
    """Final numbers, shown in the run table (flattened: {"test": {"accuracy": x}} -> test/accuracy)."""
    run = run_of(accelerator)
    if run is not None:
        run.summary.update(flatten(values))


def log_classification(accelerator: Accelerator, label_names: list[str], results: dict, prefix: str = "test",
                       figure: Path | None = None) -> None:
    """Per-class precision/recall/F1/support and the confusion matrix as wandb tables (and the figure)."""
    run = run_of(accelerator)
    if run is None:
        return
    import wandb

    per = results["per_class"]
    classes = wandb.Table(columns=["class", "precision", "recall", "f1", "support"],
                          data=[[name, per["precision"][i], per["recall"][i], per["f1"][i], per["support"][i]]
                                for i, name in enumerate(label_names)])
    cm = wandb.Table(columns=["true", *label_names],
                     data=[[name, *row] for name, row in zip(label_names, results["confusion_matrix"])])
    payload = {f"{prefix}/per_class": classes, f"{prefix}/confusion_matrix": cm}
    if figure is not None and Path(figure).exists():
        payload[f"{prefix}/confusion_matrix_figure"] = wandb.Image(str(figure))
    run.log(payload)


def log_images(accelerator: Accelerator, images: dict[str, Path]) -> None:
    run = run_of(accelerator)
    if run is not None and images:
        import wandb

        run.log({name: wandb.Image(str(path)) for name, path in images.items()})


def log_model(accelerator: Accelerator, cfg: TrackingConfig, directory: Path, name: str,
              metadata: dict[str, Any]) -> None:
    """The export as a wandb artifact of type `model` (opt-in: tracking.log_model)."""
    run = run_of(accelerator)
    if run is None or not cfg.log_model:
        return
    import wandb

    artifact = wandb.Artifact(name, type="model", metadata=flatten(metadata))
    for f in sorted(Path(directory).iterdir()):  # the model's files only: no tracker folders, logs or locks
        if f.is_file() and not f.name.startswith(".") and f.name not in RUN_ONLY_FILES:
            artifact.add_file(str(f))
    run.log_artifact(artifact)


RUN_ONLY_FILES = ("metrics.jsonl", "recipe.yaml", "results.json")


def flatten(values: dict[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level: {"test": {"accuracy": x}} -> {"test/accuracy": x}."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricsFile:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl (main process)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
