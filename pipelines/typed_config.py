"""Typed dataclass trees from YAML + dotted overrides: the generic machinery behind `config.py`.

Where it fits: `pipelines.config` declares unigap's tree (what the fields are); this module knows
nothing about unigap and only does the mechanics (how a nested dict and `a.b=value` overrides become
a checked dataclass). Split out so the tree stays readable on its own and each file stays short.

Fields carry their doc and range in `field(metadata=...)` (use `doc_field` / `section_field`).
Types understood: int, float (ints accepted; NaN and +-inf refused), bool, str, Literal[str...], list[T],
dict[str, T] (ranges apply to each value), Optional / unions and nested dataclasses. Every problem is a
`ConfigError` naming the dotted key.

Example:
    >>> from dataclasses import dataclass
    >>> from pipelines.typed_config import build, doc_field, ConfigError
    >>> @dataclass
    ... class Opt:
    ...     lr: float = doc_field(0.1, "learning rate", gt=0)
    >>> build(Opt, {}, ["lr=3e-4"]).lr
    0.0003
    >>> try:
    ...     build(Opt, {"lr": -1})
    ... except ConfigError as e:
    ...     print(e)
    lr: must be > 0, got -1.0
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import types
from dataclasses import field, fields, is_dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config problem, always tied to the dotted key that causes it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def doc_field(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
              le: float | None = None) -> Any:
    """A field whose documentation and allowed range sit beside its default (checked at load)."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section_field(cls: type, doc: str) -> Any:
    """A nested section (its own dataclass), defaulting to all of its defaults."""
    return field(default_factory=cls, metadata={"doc": doc})


def build(root: type, data: Any, overrides: Sequence[str] = ()) -> Any:
    """Apply `key.sub=yaml-literal` overrides to `data` (a nested dict), then type-check into `root`."""
    raw = copy.deepcopy(dict(data)) if isinstance(data, Mapping) else data
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "an override must look like section.key=value")
        value = _parse_override(text, annotation_at(root, key))
        if not isinstance(raw, dict):
            raise ConfigError("<root>", f"expected a mapping, got {type(raw).__name__}")
        _set_dotted(raw, key, value)
    return _build(root, raw, "", root)


def walk(root: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, dataclass field, value or annotation) for every field, sections included.

    `root` is a dataclass instance (values) or a dataclass type (annotations).
    """
    hints = get_type_hints(root if isinstance(root, type) else type(root))
    for f in fields(root):
        value = hints[f.name] if isinstance(root, type) else getattr(root, f.name)
        yield prefix + f.name, f, value
        if is_dataclass(value):
            yield from walk(value, prefix + f.name + ".")


def annotation_at(root: type, dotted: str) -> Any:
    """The type annotation of a dotted key; unknown keys fail here with a suggestion."""
    tp: Any = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not is_dataclass(tp):
            raise ConfigError(dotted, f"'{'.'.join(parts[:i])}' is a value, not a section")
        hints = get_type_hints(tp)
        if part not in hints:
            section = ".".join(parts[:i])
            raise ConfigError(dotted, "unknown key" + _suggest(part, list(hints), section, root))
        tp = hints[part]
    return tp


def _parse_override(text: str, tp: Any) -> Any:
    """A YAML literal; for string-typed keys a bare scalar stays the raw text (`run.name=2024`,
    `wandb.mode=off` must not become an int or a bool)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if value is not None and not isinstance(value, (list, dict, str)) and _admits_str(tp):
        return text.strip()
    return value


def _admits_str(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return any(_admits_str(a) for a in get_args(tp))
    return False


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _suggest(name: str, candidates: list[str], section: str, root: type) -> str:
    """' (did you mean ...?)': a close key in the same section, else the same key elsewhere
    (the common slip: `beta` written under `judge:` instead of `train:`)."""
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    elsewhere = [k for k, _, _ in walk(root) if k.rsplit(".", 1)[-1] == name]
    return f" (did you mean '{elsewhere[0]}'?)" if elsewhere else ""


def _build(cls: type, data: Any, prefix: str, root: type) -> Any:
    if data is None:  # an empty YAML section (`train:`) means "all defaults"
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    for key in data:
        if key not in hints:
            suggestion = _suggest(str(key), list(hints), prefix.rstrip("."), root)
            raise ConfigError(f"{prefix}{key}", "unknown key" + suggestion)
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            key = prefix + f.name
            tp = hints[f.name]
            value = data[f.name]
            kwargs[f.name] = _build(tp, value, key + ".", root) if is_dataclass(tp) else _coerce(value, tp, key)
            _check_range(kwargs[f.name], f.metadata, key)
    return cls(**kwargs)


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against annotation `tp` (ints accepted for floats; bools never for numbers)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(key, f"{value!r} is not one of {list(args)}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: X's own message is the clearest
            return _coerce(value, members[0], key)
        for arg in members:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            for k in value:
                if not isinstance(k, str) or not k:
                    raise ConfigError(key, f"keys must be non-empty strings, got {k!r}")
            return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    elif tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return _finite(float(value), key)  # PyYAML reads `3e-4` (no dot) as a string: accept it
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(value, key)
    elif tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {_type_name(type(value))} {value!r}")


def _finite(value: int | float, key: str) -> float:
    """A float field's value: NaN and +-inf are refused (a NaN tolerance or lr silently disables
    every comparison made with it), as are ints too large for a float."""
    try:
        out = float(value)
    except OverflowError:
        raise ConfigError(key, f"number too large for a float: {str(value)[:20]}...") from None
    if not math.isfinite(out):
        raise ConfigError(key, f"must be a finite number, got {value}")
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if get_origin(tp) is dict:
        return f"dict[str, {_type_name(get_args(tp)[1])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_range(v, meta, f"{key}.{k}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for name, bad, text in (("ge", lambda b: value < b, ">="), ("gt", lambda b: value <= b, ">"),
                            ("le", lambda b: value > b, "<=")):
        bound = meta.get(name)
        if bound is not None and bad(bound):
            raise ConfigError(key, f"must be {text} {bound}, got {value}")


def read_yaml(path: str | os.PathLike, seen: tuple[str, ...] = ()) -> dict:
    """A YAML config file as a dict, with `extends: <path relative to it>` resolved: the parent's
    sections first, this file's keys winning section by section; cycles and missing files are
    ConfigErrors."""
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError("extends", f"{path} extends itself (cycle: {' -> '.join(seen + (real,))})")
    if not os.path.isfile(path):
        raise ConfigError("extends" if seen else "config", f"config file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = read_yaml(os.path.join(os.path.dirname(path), str(parent)), seen + (real,))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return base
