"""Reading an editable YAML file into its pydantic model, with messages a clinician can act on.

A fault names the file, the entry (``valuesets.cancer.entries[2]``, ``procedures[1] (mri-wo)``)
and the fix: a misspelled key or value gets a did-you-mean, a missing field its description.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from cds_service.knowledge.checks import closest, fix_for

Model = TypeVar("Model", bound=BaseModel)
MAX_PROBLEMS = 10  # listed per file; the rest are counted


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that gives a key twice (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice (first on line {seen[key] + 1}): "
                    "keep one", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: Path, error: type[Exception]) -> dict[str, Any]:
    """A YAML file holding a mapping; any fault raises ``error`` naming the file."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping at the top level")
    return data


def read_model(model: type[Model], path: Path, error: type[Exception]) -> tuple[Model, Any]:
    """The file read into its model (and the raw mapping, to name entries in later checks)."""
    data = read_yaml_mapping(path, error)
    return validated(model, data, path, error), data


def validated(model: type[Model], data: Any, path: Path, error: type[Exception]) -> Model:
    """``data`` as ``model``; a fault raises ``error`` listing each problem with its entry."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(describe(exc, model, data, path)) from None


def describe(exc: ValidationError, model: type[BaseModel], data: Any, path: Path) -> str:
    """One line per problem: ``<file>: <entry>: <what is wrong and the fix>``."""
    errors = exc.errors(include_url=False)
    lines = [f"{path}: {_problem(err, model, data)}" for err in errors[:MAX_PROBLEMS]]
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"{path}: ... and {len(errors) - MAX_PROBLEMS} more problems")
    return "\n".join(lines)


def _problem(err: Any, model: type[BaseModel], data: Any) -> str:
    loc = tuple(err["loc"])
    where = entry_name(loc[:-1], data)
    last = loc[-1] if loc else ""
    kind = err["type"]
    if kind == "missing":
        info = field_at(model, loc)
        about = f" ({info.description})" if info is not None and info.description else ""
        return _at(where, f"{last} is required{about}")
    if kind == "extra_forbidden":
        return _at(where, _unknown_key(last, err.get("input"), model, loc))
    here = entry_name(loc, data)
    if kind == "literal_error":
        choices = typing.get_args(annotation_at(model, loc))
        near = closest(err.get("input"), [str(c) for c in choices])
        return _at(where, f"{last} must be one of {', '.join(map(str, choices))}, not "
                          f"{err.get('input')!r}" + (f": did you mean {near!r}?" if near else ""))
    message = str(err["msg"]).removeprefix("Value error, ")
    if kind != "value_error" and "input" in err and not isinstance(err["input"], dict | list):
        message += f" (got {err['input']!r})"
    return _at(here, message)


def _at(where: str, text: str) -> str:
    return f"{where}: {text}" if where else text


def _unknown_key(key: Any, value: Any, model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    owner = model_at(model, loc[:-1])
    keys = [f.alias or name for name, f in owner.model_fields.items()] if owner else []
    fix = fix_for(key, keys, listed="the keys are")
    if value is None and not fix.startswith("did you mean"):
        fix = ("a key with no value: a comma inside an unquoted value splits it into keys; put "
               "the whole value in quotes")
    return f"unknown key {key!r}: {fix}"


def entry_name(loc: tuple[Any, ...], data: Any) -> str:
    """``valuesets.cancer.entries[2]``; a list item named by its id: ``procedures[1] (mri-wo)``."""
    text, node = "", data
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            name = _item_id(node)
            if name:
                text += f" ({name})"
        else:
            text += f".{part}" if text else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text


def _item_id(node: Any) -> str | None:
    if isinstance(node, dict):
        for key in ("id", "linkId", "code", "prefix"):
            if isinstance(node.get(key), str | int) and not isinstance(node.get(key), bool):
                return str(node[key])
    return None


def unwrap(annotation: Any) -> Any:
    """X from ``X | None`` and ``Annotated[X, ...]``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def annotation_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The type of the value at ``loc`` in ``model`` (None when it cannot be told)."""
    annotation: Any = model
    for part in loc:
        annotation = unwrap(annotation)
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = _field(annotation, part)
            if info is None:
                return None
            annotation = info.annotation
        elif origin in (list, tuple):
            annotation = typing.get_args(annotation)[0]
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return None
    return unwrap(annotation)


def model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    found = annotation_at(model, loc)
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> FieldInfo | None:
    owner = model_at(model, loc[:-1]) if loc else None
    return _field(owner, loc[-1]) if owner is not None else None


def _field(model: type[BaseModel], key: Any) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None
