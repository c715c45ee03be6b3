"""Entry point: `accelerate launch distill/run.py RECIPE [key.path=value ...]` (or `python distill/run.py`).

    --print       print the resolved recipe (extends + overrides applied) and exit
    --adapt-only  adapt (or reuse the cached adaptation of) the recipe's teacher, print its report, exit
Recipes of kind `distill` run the distiller (distill.train.train); kind `finetune` fine-tunes and
evaluates a classifier (distill.finetune.finetune). Bad input ends with one line on stderr and exit 2.
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
    args = parser.parse_intermixed_args(argv)  # flags may sit between the recipe and its overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from distill.recipes import RecipeError, resolve

    try:
        recipe = resolve(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    try:
        if args.adapt_only:
            if recipe.kind != "distill":
                raise ValueError(f"--adapt-only needs a distill recipe; {args.recipe} is kind {recipe.kind!r}")
            from distill.train import adapt_only as job
        elif recipe.kind == "finetune":
            from distill.finetune import finetune as job
        else:
            from distill.train import train as job
        summary = job(recipe)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        # User-facing problems (bad recipe values, missing files, unreachable teachers, divergence):
        # one line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
