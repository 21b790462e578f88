"""Typed config trees on pydantic v2, from YAML + dotted overrides: the machinery behind `config.py`.

Where it fits: `pipelines.config` declares unigap's tree (what the fields are) as `Section` models;
this module knows nothing about unigap and only does the mechanics: how a nested dict and `a.b=value`
overrides become a checked model, and how pydantic's errors become one `ConfigError` naming the
dotted key (with "did you mean" for unknown keys).

Fields carry their doc and range (`doc_field` -> `Field(description=..., ge/gt/le)`); a section is
a nested model (`section_field`). The rules are pydantic's strict mode plus two YAML conveniences:
ints are accepted for floats (never bools for numbers), and a float written `3e-4` (which PyYAML
reads as a string) is read as the float. NaN and +-inf are refused, unknown keys are refused, an
empty YAML section (`train:`) means all defaults. `commented_yaml` writes a tree back as YAML with
each field's doc as its comment; `yaml_comment_drift` finds the keys of a YAML whose comment is not.

Example:
    >>> from pipelines.typed_config import Section, build, doc_field, ConfigError
    >>> class Opt(Section):
    ...     lr: float = doc_field(0.1, "learning rate", gt=0)
    >>> build(Opt, {}, ["lr=3e-4"]).lr
    0.0003
    >>> try:
    ...     build(Opt, {"lr": -1})
    ... except ConfigError as e:
    ...     print(e)
    lr: must be > 0, got -1
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
from typing import Any, Iterator, Literal, Mapping, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A config problem, always tied to the dotted key that causes it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class Section(BaseModel):
    """A config section: strict types, unknown keys refused, no NaN / inf, plain attribute access."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if data is None:  # an empty YAML section (`train:`) means "all defaults"
            return {}
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        for name, f in cls.model_fields.items():
            value = out.get(name)
            if isinstance(value, str) and _accepts(f.annotation, float) and _FLOAT_RE.fullmatch(value.strip()):
                out[name] = float(value)  # PyYAML reads `3e-4` (no dot) as a string
            if isinstance(value, Mapping) and get_origin(_strip_optional(f.annotation)) is dict:
                for k in value:
                    if not isinstance(k, str) or not k:
                        raise ValueError(f"{name}: keys must be non-empty strings, got {k!r}")
        return out


def doc_field(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
              le: float | None = None) -> Any:
    """A field whose documentation and allowed range sit beside its default (checked at load; for a
    dict field, put the range on the value type: `dict[str, Annotated[int, Field(ge=1)]]`)."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda: copy.deepcopy(default), description=doc, ge=ge, gt=gt, le=le)
    return Field(default, description=doc, ge=ge, gt=gt, le=le)


def section_field(cls: type, doc: str) -> Any:
    """A nested section (its own model), defaulting to all of its defaults."""
    return Field(default_factory=cls, description=doc)


def build(root: type[Section], data: Any, overrides: Sequence[str] = ()) -> Any:
    """Apply `key.sub=yaml-literal` overrides to `data` (a nested dict), then validate into `root`."""
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
    if not isinstance(raw, Mapping):
        raise ConfigError("<root>", f"expected a mapping, got {type(raw).__name__}")
    try:
        return root.model_validate(raw)
    except ValidationError as e:
        raise _config_error(root, e) from None


def walk(root: Any, prefix: str = "") -> Iterator[tuple[str, FieldInfo, Any]]:
    """(dotted key, pydantic field, value or annotation) for every field, sections included.

    `root` is a Section instance (values) or a Section class (annotations).
    """
    cls = root if isinstance(root, type) else type(root)
    for name, f in cls.model_fields.items():
        value = f.annotation if isinstance(root, type) else getattr(root, name)
        yield prefix + name, f, value
        if _is_section(value):
            yield from walk(value, prefix + name + ".")


def annotation_at(root: type, dotted: str) -> Any:
    """The type annotation of a dotted key; unknown keys fail here with a suggestion."""
    tp: Any = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not _is_section(tp):
            raise ConfigError(dotted, f"'{'.'.join(parts[:i])}' is a value, not a section")
        if part not in tp.model_fields:
            section = ".".join(parts[:i])
            raise ConfigError(dotted, "unknown key" + _suggest(part, list(tp.model_fields), section, root))
        tp = tp.model_fields[part].annotation
    return tp


def _is_section(x: Any) -> bool:
    return (isinstance(x, type) and issubclass(x, BaseModel)) or isinstance(x, BaseModel)


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        return members[0] if len(members) == 1 else tp
    return tp


def _accepts(tp: Any, kind: type) -> bool:
    """Whether annotation `tp` admits values of `kind` (str also through a Literal of strings)."""
    if tp is kind:
        return True
    if get_origin(tp) is Literal:
        return any(isinstance(a, kind) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return any(_accepts(a, kind) for a in get_args(tp))
    return False


def _parse_override(text: str, tp: Any) -> Any:
    """A YAML literal; for string-typed keys a bare scalar stays the raw text (`run.name=2024`,
    `wandb.mode=off` must not become an int or a bool)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if value is not None and not isinstance(value, (list, dict, str)) and _accepts(tp, str):
        return text.strip()
    return value


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


def _config_error(root: type[Section], exc: ValidationError) -> ConfigError:
    """pydantic's first problem (an unknown key first: a typo explains the rest) as a ConfigError on
    the dotted key, in the words the old loader used."""
    err = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")[0]
    key, tp, section = _locate(root, err["loc"])
    value, kind, ctx = err.get("input"), err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        return ConfigError(key, "unknown key" + _suggest(name, list(section.model_fields), key.rpartition(".")[0],
                                                         root))
    if kind == "value_error":  # raised by Section._from_yaml as "<field>: <problem>"
        name, _, problem = str(ctx.get("error", err["msg"])).partition(": ")
        return ConfigError(f"{key}.{name}" if key else name, problem)
    if kind == "finite_number":
        return ConfigError(key, f"must be a finite number, got {value}")
    if kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        return ConfigError(key, f"number too large for a float: {str(value)[:20]}...")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        return ConfigError(key, f"must be {bounds[kind]} {bound}, got {value}")
    if _is_section(tp) or kind == "model_type":
        return ConfigError(key or "<root>", f"expected a mapping, got {type(value).__name__}")
    if get_origin(_strip_optional(tp)) is Literal:
        return ConfigError(key, f"{value!r} is not one of {list(get_args(_strip_optional(tp)))}")
    return ConfigError(key, f"expected {_type_name(tp)}, got {_type_name(type(value))} {value!r}")


def _locate(root: type, loc: tuple) -> tuple[str, Any, Any]:
    """(dotted key, annotation there, the section that holds it) of a pydantic error location;
    union member tags ('str', 'list[str]') end the walk at the field they belong to."""
    key, tp, section = "", root, root
    for part in loc:
        inner = _strip_optional(tp)
        if _is_section(inner) and isinstance(part, str):
            section = inner
            if part not in inner.model_fields:
                return (f"{key}.{part}" if key else part), None, section
            key, tp = (f"{key}.{part}" if key else part), inner.model_fields[part].annotation
        elif get_origin(inner) is list and isinstance(part, int):
            key, tp = f"{key}[{part}]", get_args(inner)[0]
        elif get_origin(inner) is dict and isinstance(part, str):
            key, tp = f"{key}.{part}", get_args(inner)[1]
        else:
            break
    return key, tp, section


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if origin is dict:
        return f"dict[str, {_type_name(get_args(tp)[1])}]"
    if origin is not None and hasattr(tp, "__origin__") and get_args(tp):  # Annotated[int, ...]
        return _type_name(get_args(tp)[0])
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


COMMENT, NOTE = "  # ", "  ["  # `key: value  # <field doc>  [<this file's note>]`


def commented_yaml(root: BaseModel) -> str:
    """`root` as YAML, one line per field in declaration order, each with its doc as the comment (the
    form the shipped configs/*.yaml files keep; `yaml_comment_drift` checks them)."""
    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()

    def lines(node: BaseModel, depth: int) -> Iterator[str]:
        for name, f in type(node).model_fields.items():
            value, pad = getattr(node, name), "  " * depth
            if isinstance(value, BaseModel):
                yield f"{pad}{name}:{COMMENT}{f.description}"
                yield from lines(value, depth + 1)
                if depth == 0:
                    yield ""
            else:
                yield f"{pad}{name}: {scalar(value)}{COMMENT}{f.description}"

    return "\n".join(lines(root, 0)).rstrip() + "\n"


def yaml_comment_drift(text: str, docs: Mapping[str, str]) -> list[str]:
    """Keys of a commented YAML whose comment is not their field's doc (optionally followed by a
    file-specific note in brackets), or that carry no comment: what `commented_yaml` would fix."""
    path: list[str] = []
    drift = []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
        if not m:
            continue
        path = path[: len(m.group(1)) // 2] + [m.group(2)]
        key = ".".join(path)
        if key in docs:
            comment = m.group(3).partition(COMMENT)[2]
            if comment != docs[key] and not comment.startswith(docs[key] + NOTE):
                drift.append(key)
    return drift


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
