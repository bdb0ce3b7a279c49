"""The configuration reference, generated from the config tree itself (pipeline/config.py): every key of every
section with its type, default and the docstring written under it. The docs site builds its "Configuration
reference" page from `reference_markdown()` (docs/hooks.py), so the page cannot drift from the code.

    .venv/bin/python -m pipeline.cli.config_reference > reference.md
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import Config


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the BaseModel a field holds, whether it holds a list of them), or (None, False) for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (arg,) = typing.get_args(annotation) or (None,)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, True
    return None, False


def type_text(annotation: Any) -> str:
    """A field's type as a reader writes it in TOML terms: `int`, `float`, `"none" | "penalty"`, `str | unset`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_text(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("unset" if a is type(None) else type_text(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return "table"
    if isinstance(annotation, type):
        return {"str": "string", "bool": "bool", "int": "int", "float": "float"}.get(annotation.__name__,
                                                                                    annotation.__name__)
    return str(annotation).replace("typing.", "")


def default_text(field: Any) -> str:
    """A field's default as it would be written in a config file (`unset` for None, `required` for none)."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def sections(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, type[BaseModel], bool]]:
    """(dotted name, model, whether it is an array of tables) for every section under `model`, depth first."""
    for name, field in model.model_fields.items():
        sub, is_list = _model_of(field.annotation)
        if sub is not None:
            dotted = f"{prefix}{name}"
            yield dotted, sub, is_list
            yield from sections(sub, f"{dotted}.")


def keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every settable key under `model` as a dotted name (`learner.lr`, `scorer.probes.path`)."""
    out = []
    for name, field in model.model_fields.items():
        sub, _ = _model_of(field.annotation)
        out.extend(keys(sub, f"{prefix}{name}.") if sub is not None else [f"{prefix}{name}"])
    return out


def _cell(text: str) -> str:
    """Markdown table cell: one line, pipes escaped."""
    return re.sub(r"\s+", " ", text).strip().replace("|", "\\|")


def reference_markdown() -> str:
    lines = ["# Configuration reference", "",
             "Every key a config file (or a `--section.key value` override) can set, generated from the config tree "
             "in `pipeline/config.py` when this site is built: the text is the docstring under each field. "
             "`probe-rl run --dry-run` prints the resolved value of each for a given config; an unknown key, a "
             "wrong type or a value out of range is refused at load with one line naming the key.", ""]
    for dotted, model, is_list in sections():
        header = f"[[{dotted}]]" if is_list else f"[{dotted}]"
        lines += [f"## `{header}`", ""]
        if model.__doc__ and model.__doc__ is not BaseModel.__doc__ and not model.__doc__.startswith("!!!"):
            lines += [inspect.cleandoc(model.__doc__), ""]
        if is_list:
            lines += ["A list: each `[[" + dotted + "]]` table in the file adds one entry.", ""]
        rows = [(n, f) for n, f in model.model_fields.items() if _model_of(f.annotation)[0] is None]
        if not rows:
            continue
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in rows:
            lines.append(f"| `{name}` | {_cell(type_text(field.annotation))} | `{_cell(default_text(field))}` | "
                         f"{_cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines)


def undocumented() -> list[str]:
    """Keys with no docstring under them (the reference would have an empty cell)."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub, _ = _model_of(field.annotation)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
            elif not (field.description or "").strip():
                out.append(f"{prefix}{name}")

    walk(Config, "")
    return out


if __name__ == "__main__":
    print(reference_markdown())
