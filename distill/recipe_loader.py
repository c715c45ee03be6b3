"""Reading recipes: YAML (`yaml.safe_load` only: a recipe is data and never runs code) into the typed
dataclasses of distill.recipes.

A recipe may name one parent with `extends: other.yaml` (relative to the recipe) and override any of its
keys; command-line overrides `key.path=value` come last. Unknown keys are errors naming the closest valid
key; values are type-checked; `resolve()` returns the final recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from distill.recipes import RECIPE_KINDS, RecipeError


def _closest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Type-check (and mildly coerce: int -> float, YAML's '5e-4' string -> float) one value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{key} must not be null")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false (yes/on/true) as booleans
            words = ("no", "off", "false") if value is False else ("yes", "on", "true")
            value = next((a for a in typing.get_args(tp) if a in words), value)
        if value not in typing.get_args(tp):
            raise RecipeError(f"{key} is {value!r}; choose one of {list(typing.get_args(tp))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp)
        return {_convert(k, k_tp, f"{key} key"): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is float:
        number = None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None:
            raise RecipeError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):  # .inf / .nan pass every "> 0" check below and poison the run
            raise RecipeError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{key} must be an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported recipe field type {tp} at {key}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise RecipeError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise RecipeError(f"unknown recipe key {path!r}{_closest(key, names)}")
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive: dataclass signature errors
        raise RecipeError(f"{prefix or 'recipe'}: {e}") from e


def deep_merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; override wins, mappings merge, everything else is replaced."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml_chain(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and its `extends:` ancestors into one merged mapping."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found")
    if path.resolve() in _seen:
        raise RecipeError(f"recipe {path} extends itself (cycle: {' -> '.join(map(str, _seen))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping at top level")
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"recipe {path}: extends must be one file name")
        data = deep_merge(load_yaml_chain(path.parent / parent, (*_seen, path.resolve())), data)
    return data


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `key.path=value` (value parsed as YAML) to a recipe mapping."""
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r} must look like key.path=value")
    key, _, raw = assignment.partition("=")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise RecipeError(f"override {assignment!r}: value is not valid YAML") from e
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {assignment!r}: {part} is not a section")
    node[parts[-1]] = value
    return data


def resolve(path: str | Path, overrides: list[str] = (), cls: type | None = None) -> Any:
    """The final, validated recipe: file + extends chain + overrides, as dataclass `cls` (default: the
    class named by the recipe's `kind:` key, `distill` when absent)."""
    data = load_yaml_chain(path)
    for o in overrides:
        data = apply_override(data, o)
    kind = data.pop("kind", "distill")
    if cls is None:
        if kind not in RECIPE_KINDS:
            raise RecipeError(f"kind {kind!r} is not one of {sorted(RECIPE_KINDS)}")
        cls = RECIPE_KINDS[kind]
    return from_dict(cls, data)
