"""One parser for every value typed on a command line, driven by the dataclass field types.

`key=value` config overrides (`resnetkit describe resnet50 stride_in_1x1=true`), training
options (`resnetkit train --epochs 5 --channels_last auto`), a model's overrides inside a
training option (`--model_overrides "widths=8,16,32;stem_width=8"`) and the `NAME:k=v,k=v`
model specs of `resnetkit compare` all go through `parse_value`, so they accept the same
spellings: booleans true/false/yes/no/1/0, "none" for optional fields, comma-separated
sequences, "auto" where a field allows it."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Mapping, Union

from .config import ResNetConfig
from .errors import UserError

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def kind_name(tp: Any) -> str:
    """The type's name as the error messages give it: int, float, bool, tuple, ..."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(kind_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return " or ".join(map(str, typing.get_args(tp)))
    return getattr(origin or tp, "__name__", str(tp))


def convert(tp: Any, raw: str) -> Any:
    """raw as a value of type tp; ValueError when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    low = raw.strip().lower()
    if origin in (Union, types.UnionType):
        # the literal arms ("auto", None) first, so "none" is not read as a string
        arms = sorted(args, key=lambda a: 0 if a is type(None) or
                      typing.get_origin(a) is Literal else 1)
        for arm in arms:
            try:
                return convert(arm, raw)
            except ValueError:
                continue
        raise ValueError(raw)
    if tp is type(None):
        if low == "none":
            return None
        raise ValueError(raw)
    if origin is Literal:
        for choice in args:
            if low == str(choice).lower():
                return choice
        raise ValueError(raw)
    if tp is bool:
        if low not in _TRUE + _FALSE:
            raise ValueError(raw)
        return low in _TRUE
    if origin in (tuple, list):
        items = [v.strip() for v in raw.strip().strip("()[]").split(",") if v.strip()]
        return origin(convert(args[0], v) for v in items)
    if origin is dict or tp is dict:
        return parse_overrides([t for t in raw.split(";") if t.strip()])
    if tp in (int, float):
        return tp(raw.strip())
    if tp is str or tp is Any:
        return raw.strip()
    raise TypeError(f"no parser for type {tp!r}")  # a field type of ours without a parser: a bug


def fits(value: Any, tp: Any) -> bool:
    """Whether a value read from a file (JSON, TOML) fits a dataclass field type: lists
    stand for tuples, a bool is not an int, a float must be finite. The check for data that
    did not come through `convert`."""
    import math
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)) and all(fits(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value)
    return isinstance(value, tp)


def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved type} of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_value(cls: type, name: str, raw: str, what: str) -> Any:
    """The typed value of field `name` of dataclass `cls` from its text. `what` names the
    kind of field in messages ("config field", "train option")."""
    types_ = field_types(cls)
    if name not in types_:
        raise UserError(f"unknown {what} {name!r}; fields are: {', '.join(types_)}")
    try:
        return convert(types_[name], raw)
    except UserError:  # a nested value's own message (a model override inside a train option)
        raise
    except ValueError:
        raise UserError(f"{what} {name} expects a {kind_name(types_[name])}, got {raw!r}") from None


def parse_fields(cls: type, items: Mapping[str, str], what: str) -> dict[str, Any]:
    """{name: typed value} for a mapping of field names to their texts."""
    known = field_types(cls)
    unknown = sorted(set(items) - set(known))
    if unknown:
        raise UserError(f"unknown {what}(s) {', '.join(unknown)}; options: {', '.join(known)}")
    return {k: parse_value(cls, k, v, what) for k, v in items.items()}


def parse_override(text: str) -> tuple[str, Any]:
    """"key=value" (as typed on a command line) -> a typed ResNetConfig override."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value, e.g. stride_in_1x1=true")
    key, raw = (s.strip() for s in text.split("=", 1))
    return key, parse_value(ResNetConfig, key, raw, "config field")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """["key=value", ...] -> {key: typed value} for ResNetConfig."""
    return dict(parse_override(t) for t in items or [])


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"NAME" or "NAME:key=value,key=value" -> (name, typed overrides). A value may hold
    commas itself (layers=2,2,2,2): a new override starts only where "key=" follows."""
    name, _, rest = spec.partition(":")
    parts = [p for p in re.split(r",(?=\s*\w+\s*=)", rest) if p.strip()]
    return name.strip(), parse_overrides(parts)
