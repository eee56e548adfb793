"""Typed settings from plain mappings (YAML, JSON, CLI): one builder, every mistake collected.

A settings class is a dataclass. Each field's type is checked; a field whose metadata holds
``choices`` (a tuple defined once, next to the code that uses the value) only takes those values;
``__post_init__`` may raise ``LeanLMError`` for rules between fields. ``build`` never stops at the
first problem: it appends each one to ``errors`` (so a recipe reports all of them at once).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from leanlm.errors import LeanLMError


def choices(values: tuple, help: str) -> dict:
    """Field metadata for a setting that takes one of ``values``: ``field(default=..., metadata=choices(...))``."""
    return {"help": f"{help} ({' | '.join(map(str, values))})", "choices": tuple(values)}


def field_choices(cls, name: str) -> tuple | None:
    """The allowed values of field ``name`` of dataclass ``cls`` (for argparse ``choices=``)."""
    return next(f.metadata.get("choices") for f in dataclasses.fields(cls) if f.name == name)


Nested = Callable[[Any, str, list[str]], Any]  # a custom builder for a field: (value, where, errors) -> value


def build(cls, data, where: str, errors: list[str], nested: dict[str, Nested] | None = None):
    """An instance of dataclass ``cls`` from mapping ``data``, or None; problems go to ``errors``.

    ``where`` prefixes key names in messages (e.g. ``"recover.distill."``). ``nested`` maps field
    names to custom builders (e.g. a list of transforms that are looked up by name).
    """
    if not isinstance(data, dict):
        errors.append(f"'{where.rstrip('.') or 'recipe'}' must be a mapping, got {type(data).__name__}")
        return None
    before = len(errors)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            errors.append(f"unknown key '{where}{key}' (expected one of: {', '.join(fields)})")
    values = {}
    for name, value in data.items():
        if name not in fields:
            continue
        built = _value(fields[name], hints[name], value, f"{where}{name}", errors, (nested or {}).get(name))
        if built is not _FAILED:
            values[name] = built
    missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in data]
    errors += [f"missing key '{where}{name}'" for name in missing]
    try:  # also with some values missing (they keep their defaults): their rules are checked all the same
        built = cls(**values)
    except LeanLMError as err:  # a range or a rule between fields, from __post_init__
        errors.append(f"{where.rstrip('.') or 'recipe'}: {err}")
        return None
    except TypeError:  # a required field was missing: already reported
        return None
    return None if len(errors) > before else built


_FAILED = object()


def _value(f: dataclasses.Field, hint, value, where: str, errors: list[str], custom: Nested | None):
    if custom is not None:
        built = custom(value, where, errors)
        return _FAILED if built is None and value is not None else built
    nested_cls = _dataclass_in(hint)
    if nested_cls is not None and isinstance(value, dict):
        built = build(nested_cls, value, f"{where}.", errors)
        return _FAILED if built is None else built
    if not type_ok(hint, value):
        errors.append(f"'{where}' should be {type_name(hint)}, got {value!r}")
        return _FAILED
    allowed = f.metadata.get("choices")
    items = value if isinstance(value, (list, tuple)) else [value]  # a list setting: each item is checked
    if allowed is not None and any(item not in allowed for item in items):
        errors.append(f"'{where}' must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return _FAILED
    return tuple(value) if _origin(hint) is tuple else value


def _origin(hint):
    options = [o for o in _options(hint) if o is not type(None)]
    return typing.get_origin(options[0]) if len(options) == 1 else typing.get_origin(hint)


def _options(hint) -> tuple:
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def _dataclass_in(hint):
    return next((o for o in _options(hint) if dataclasses.is_dataclass(o)), None)


def type_ok(hint, value) -> bool:
    """Whether a YAML value fits a type hint (a YAML list is accepted for a tuple)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(option, value) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    if origin in (list, tuple):
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(type_ok(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def to_plain(settings) -> dict:
    """A settings dataclass as a YAML/JSON-able dict (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(settings).items()}
