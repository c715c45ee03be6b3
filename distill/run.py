"""Entry point: `accelerate launch distill/run.py RECIPE [key.path=value ...]` (or `python distill/run.py`).

    --print       print the resolved recipe (extends + overrides applied) and exit
    --adapt-only  adapt (or reuse the cached adaptation of) the recipe's teacher, print its report, exit
    --overwrite   start over in an output_dir that holds another (e.g. finished) run, removing its files
    --verbose     the libraries' INFO logs and progress bars too (transformers, datasets, accelerate)
Messages and progress go to stderr; stdout carries only the final JSON summary.
Recipes of kind `distill` run the distiller (distill.train.train); kind `finetune` fine-tunes and
evaluates a classifier (distill.downstream.finetune.finetune). Bad input ends with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--print", action="store_true", dest="print_recipe", help="print the resolved recipe and exit")
    parser.add_argument("--adapt-only", action="store_true",
                        help="adapt the recipe's teacher (teacher.adapt), print the report and exit")
    parser.add_argument("--verbose", action="store_true", help="the libraries' INFO logs and progress bars too")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in output_dir (default: resume a distillation, or refuse)")
    args = parser.parse_intermixed_args(argv)  # flags may sit between the recipe and its overrides
    configure_logging(args.verbose)

    from distill.recipe_loader import resolve
    from distill.recipes import RecipeError

    try:
        recipe = resolve(args.recipe, args.overrides)
    except RecipeError as e:
        return fail(e)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    try:
        if args.adapt_only:
            if recipe.kind != "distill":
                raise ValueError(f"--adapt-only needs a distill recipe; {args.recipe} is kind {recipe.kind!r}")
            from distill.train import adapt_only as job
            summary = job(recipe)
        elif recipe.kind == "finetune":
            from distill.downstream.finetune import finetune as job
            summary = job(recipe, overwrite=args.overwrite)
        else:
            from distill.train import train as job
            summary = job(recipe, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError, UnicodeDecodeError) as e:
        # User-facing problems (bad recipe values, missing files, unreachable teachers, divergence):
        # one line, no traceback. Anything else is a bug and keeps its traceback.
        return fail(e)
    except KeyboardInterrupt:
        print("error: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    print(json.dumps(summary, default=str))
    return 0


def configure_logging(verbose: bool) -> None:
    """Our INFO lines on stderr; the libraries' only from WARNING up, unless --verbose."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.raiseExceptions = False  # a library's malformed log call must not print a traceback
    if verbose:
        return
    for name in ("accelerate", "datasets", "transformers", "torch", "filelock", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    datasets.logging.set_verbosity_warning()


def fail(e: BaseException) -> int:
    """One line on stderr: what is wrong (the exception's first line, unquoted) and exit status 2."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    kind = "" if type(e).__name__ in QUIET_TYPES else f"{type(e).__name__}: "
    print(f"error: {kind}{first}", file=sys.stderr)
    return 2


# Our own error types: their messages are complete sentences, the class name adds nothing.
QUIET_TYPES = ("RecipeError", "TeacherError", "RunDirError", "CheckpointError", "DataError")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves a checkpoint and exits itself)
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
