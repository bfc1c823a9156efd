"""YAML recipes: a recipe is a mapping of a command's config fields; command-line options override it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import EffconvError

ConfigT = TypeVar("ConfigT")


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EffconvError(f"recipe not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EffconvError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise EffconvError(f"recipe {path} must be a mapping of settings, got {type(content).__name__}")
    return content


def build_config(cls: type[ConfigT], recipe: str | Path | None, overrides: dict[str, Any]) -> ConfigT:
    """cls's defaults <- recipe values <- overrides that are not None. Unknown recipe keys are errors.

    Recipes may carry documentation-only keys under `about:` (device, budget, measured results)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if recipe is not None:
        content = load_recipe(recipe)
        content.pop("about", None)
        unknown = sorted(set(content) - set(fields))
        if unknown:
            raise EffconvError(f"recipe {recipe} has unknown settings {unknown}; known: {', '.join(fields)}")
        values.update(content)
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_type(name, value, hints[name])
    return cls(**values)


def _check_type(name: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) or (hint,)
    ok = False
    for t in allowed:
        origin = typing.get_origin(t) or t
        if t is type(None) and value is None:
            ok = True
        elif origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = True
        elif origin is int and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        elif origin in (str, bool, list) and isinstance(value, origin):
            ok = True
    if not ok:
        raise EffconvError(f"setting {name!r} must be {hint}, got {value!r}")
