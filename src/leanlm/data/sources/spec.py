"""The one ``data`` setting: which sources, with which weights, from a string or a recipe list.

String form (``--data``, or a recipe's ``data:`` as a string): see ``leanlm.data_syntax`` (``SPEC_HELP``).
List form (recipes): ``[{source: teacher, weight: 0.5, tokens: 80000}, {source: file, path: x.txt}]``,
items may also be spec strings.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from leanlm.data_syntax import HINT
from leanlm.data.sources.base import SOURCES, DataSource
from leanlm.errors import LeanLMError
from leanlm.settings import build



def _weight(text: str, item: str) -> tuple[str, float]:
    """Split 'SOURCE...@W' into ('SOURCE...', W); no '@' (or a non-number after it) means weight 1."""
    head, at, tail = text.rpartition("@")
    if not at:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return text, 1.0  # an '@' that is part of a path
    if not weight > 0:
        raise LeanLMError(f"data weight must be positive in '{item}'")
    return head, weight


def _typed(cls, key: str, value: str, item: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        raise LeanLMError(f"data source '{cls.name}' has no setting '{key}' in '{item}' (settings: {', '.join(names)})")
    hint = hints[key]
    for kind in (int, float):
        if hint is kind or kind in typing.get_args(hint):
            try:
                return kind(value)
            except ValueError:
                raise LeanLMError(f"'{key}' in '{item}' should be a number, got '{value}'") from None
    return value


def parse_item(item: str) -> tuple[DataSource, float]:
    """One string item → (source, weight)."""
    text, weight = _weight(item.strip(), item)
    name, _, rest = text.partition(":")
    if name == "file":
        return SOURCES["file"](path=rest), weight
    if name == "jsonl":
        path, colon, field = rest.rpartition(":") if ":" in rest else (rest, "", "text")
        return SOURCES["jsonl"](path=path if colon else rest, field=field or "text"), weight
    if name == "hf":
        parts = rest.split(":")
        if len(parts) not in (3, 4) or not all(parts):
            raise LeanLMError(f"'{item}': write hf:NAME[:CONFIG]:SPLIT:FIELD")
        config = parts[1] if len(parts) == 4 else None
        return SOURCES["hf"](dataset=parts[0], config=config, split=parts[-2], field=parts[-1]), weight
    if name in SOURCES:
        settings = {}
        for pair in filter(None, rest.split(":")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise LeanLMError(f"'{item}': settings of {name} are key=value, got '{pair}'")
            settings[key] = _typed(SOURCES[name], key, value, item)
        return SOURCES[name](**settings), weight
    if text and Path(text).expanduser().exists():
        return SOURCES["file"](path=text), weight
    raise LeanLMError(f"unknown data source '{item}': choose {HINT}")


def parse_spec(value) -> list[tuple[DataSource, float]]:
    """A spec string or a recipe list → [(source, weight)], every source's cheap checks run; LeanLMError."""
    if value is None:
        value = "wikitext"
    if isinstance(value, str):
        items = [item for item in value.split(",") if item.strip()]
        if not items:
            raise LeanLMError(f"empty data setting: choose {HINT}")
        parts = [parse_item(item) for item in items]
    elif isinstance(value, list) and value:
        errors: list[str] = []
        parts = [_from_mapping(entry, f"data[{i}]", errors) for i, entry in enumerate(value)]
        if errors:
            raise LeanLMError("; ".join(errors))
    else:
        raise LeanLMError(f"data must be a string like 'teacher@0.5,wikitext@0.5' or a list of {{source: ...}} items, got {value!r}")
    for source, _ in parts:
        source.check()
    return parts


def _from_mapping(entry, where: str, errors: list[str]):
    if isinstance(entry, str):
        try:
            return parse_item(entry)
        except LeanLMError as err:
            errors.append(f"{where}: {err}")
            return None
    if not isinstance(entry, dict) or entry.get("source") not in SOURCES:
        errors.append(f"'{where}' must be a string or a mapping with 'source:' one of {', '.join(SOURCES)}, got {entry!r}")
        return None
    entry = dict(entry)
    cls, weight = SOURCES[entry.pop("source")], entry.pop("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
        errors.append(f"'{where}.weight' must be a positive number, got {weight!r}")
        return None
    source = build(cls, entry, f"{where}.", errors)
    return None if source is None else (source, float(weight))
