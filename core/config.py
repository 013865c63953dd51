"""Typed, validated configuration: YAML recipes backed by dataclasses.

A recipe is a YAML mapping whose shape is given by dataclasses with documented fields. Loading
checks every key (an unknown key is an error naming the closest valid key and the file), applies
``a.b.c=value`` overrides from the command line, and the resolved config is written into every
run folder so a run can be rebuilt exactly.

Sections whose fields depend on a name (``method: {name: lora, ...}``) are *tagged*: the base
dataclass carries a registry, and the value of the tag field picks the subclass to validate with.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A recipe or override does not fit the config schema.

    ``key`` is the dotted key the error is about (``train.lr``); ``detail`` the message without the
    recipe file, so an error caused by a command-line override can name the override instead.
    """

    def __init__(self, message: str, key: str = "", detail: str = ""):
        super().__init__(message)
        self.key = key
        self.detail = detail or message


def _error(where: str, source: str, text: str, key: str = "") -> ConfigError:
    """A ConfigError about ``key`` (default ``where``) located in section ``where`` of ``source``."""
    return ConfigError(f"{_describe(where, source)}: {text}", key=key or where, detail=f"{_describe(where, '')}: {text}")


# Names other tools (transformers' TrainingArguments, Lightning, timm, open_clip's trainer) use,
# and a few of the kit's own keys put in the wrong section -> the kit's key (and a note).
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    "learning_rate": ("train.lr", ""), "lr": ("train.lr", ""), "base_lr": ("train.lr", ""),
    "per_device_train_batch_size": ("data.batch_size", "images per process per step"),
    "train_batch_size": ("data.batch_size", ""), "batch_size": ("data.batch_size", ""),
    "num_train_epochs": ("train.epochs", ""), "max_epochs": ("train.epochs", ""), "epochs": ("train.epochs", ""),
    "max_steps": ("train.max_steps", ""), "num_steps": ("train.max_steps", ""),
    "weight_decay_rate": ("train.weight_decay", ""), "wd": ("train.weight_decay", ""),
    "weightdecay": ("train.weight_decay", ""), "weight_decay": ("train.weight_decay", ""),
    "gradient_accumulation_steps": ("train.grad_accum", ""), "accumulate_grad_batches": ("train.grad_accum", ""),
    "accum_freq": ("train.grad_accum", ""),
    "warmup_ratio": ("train.warmup_steps", "the kit counts warm-up in optimizer steps: ratio x total steps"),
    "num_warmup_steps": ("train.warmup_steps", ""), "warmup": ("train.warmup_steps", ""),
    "warmup_steps": ("train.warmup_steps", ""),
    "max_grad_norm": ("train.grad_clip", ""), "gradient_clip_val": ("train.grad_clip", ""),
    "clip_grad_norm": ("train.grad_clip", ""),
    "adam_epsilon": ("train.eps", ""), "adam_beta1": ("train.betas", "a list [beta1, beta2]"),
    "adam_beta2": ("train.betas", "a list [beta1, beta2]"),
    "fp16": ("train.precision", "precision: fp16"), "bf16": ("train.precision", "precision: bf16"),
    "mixed_precision": ("train.precision", ""), "precision": ("train.precision", ""),
    "gradient_checkpointing": ("train.grad_checkpointing", ""), "seed": ("train.seed", ""),
    "logging_steps": ("train.log_every", ""), "save_steps": ("train.save_every", ""),
    "eval_steps": ("train.eval_every", ""), "save_total_limit": ("train.keep_checkpoints", ""),
    "resume_from_checkpoint": ("train.resume", ""),
    "dataloader_num_workers": ("data.num_workers", ""), "workers": ("data.num_workers", ""),
    "num_workers": ("data.num_workers", ""),
    "model_name_or_path": ("model.name", ""), "output_path": ("output_dir", ""), "run_name": ("name", ""),
}


class TaggedConfig:
    """Mixin for config sections whose subclass is chosen by a tag field.

    Subclasses set ``TAG`` (the field name, e.g. ``"name"``) on the base and register concrete
    classes with :func:`register_tagged`.
    """

    TAG: typing.ClassVar[str] = "name"
    REGISTRY: typing.ClassVar[dict[str, type]] = {}


def register_tagged(base: type, tag_value: str) -> typing.Callable[[type[T]], type[T]]:
    """Class decorator: register ``cls`` as the config of ``base`` when its tag equals ``tag_value``."""

    def decorator(cls: type[T]) -> type[T]:
        if "REGISTRY" not in base.__dict__:
            base.REGISTRY = {}
        if tag_value in base.REGISTRY and base.REGISTRY[tag_value] is not cls:
            raise ValueError(f"{base.__name__} {base.TAG}={tag_value!r} is registered twice")
        base.REGISTRY[tag_value] = cls
        return cls

    return decorator


def _closest(key: str, valid: typing.Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _suggest(key: str, valid: typing.Iterable[str], where: str) -> str:
    """Another tool's name (``learning_rate``) -> the kit's key; else the closest valid key."""
    target, note = FOREIGN_KEYS.get(key, ("", ""))
    if target and target != (f"{where}.{key}" if where else key):
        return f"; did you mean {target!r}?{f' ({note})' if note else ''}"
    return _closest(key, valid)


def _describe(where: str, source: str) -> str:
    location = f" in {source}" if source else ""
    return f"{where or 'the top level'}{location}"


def _resolve_tagged(cls: type, data: dict, where: str, source: str) -> type:
    registry = cls.__dict__.get("REGISTRY") or getattr(cls, "REGISTRY", {})
    tag = cls.TAG
    if tag not in data:
        default = next((f.default for f in dataclasses.fields(cls) if f.name == tag), None)
        if isinstance(default, str) and default in registry:
            return registry[default]
        raise _error(where, source, f"missing key {tag!r}; one of {sorted(registry)}")
    value = data[tag]
    if value not in registry:
        raise _error(where + "." + tag if where else tag, source,
                     f"unknown value {value!r}; valid: {sorted(registry)}{_closest(str(value), registry)}")
    return registry[value]


def _convert(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, source) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _error(where, source, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, where, source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _error(where, source, f"expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _error(where, source, f"expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _convert(val_tp, v, f"{where}.{k}", source) for k, v in value.items()}
    if tp in (int, float, str, bool):
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is float and (is_number or isinstance(value, str)):
            try:
                return float(value)
            except ValueError:
                pass
        elif tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif tp in (bool, str) and isinstance(value, tp):
            return value
        raise _error(where, source, f"expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    if isinstance(cls, type) and issubclass(cls, TaggedConfig):
        cls = _resolve_tagged(cls, data, where, source)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _error(where, source, f"unknown key {key!r}{_suggest(key, fields, where)} "
                                        f"(valid keys: {', '.join(sorted(fields))})",
                         key=f"{where}.{key}" if where else key)
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise _error(where, source, str(err)) from err


def to_dict(cfg: Any) -> Any:
    """A plain, YAML-safe mapping of a (nested) config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def field_default(field: dataclasses.Field) -> Any:
    """The default value of a dataclass field (its factory called), ``MISSING`` when it has none."""
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, for example train.lr=1e-4")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: the key before '=' is empty")
    return key.split("."), _override_value(raw, text)


YAML_NULLS = ("null", "Null", "NULL", "~", "''", '""')


def _override_value(raw: str, text: str) -> Any:
    """``raw`` read as YAML (numbers, lists, booleans), except where YAML would change a plain
    string: ``|`` and ``>`` start block scalars (read as ''), and `` #`` starts a comment
    (``name=my run #2`` would become ``my run``); those are kept as written."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error}); quote it") from None
    if value in (None, "") and raw.strip() not in YAML_NULLS:
        return raw
    if isinstance(value, str) and "#" in raw and value != raw.strip().strip("'\""):
        return raw
    return value


# sections whose `name` picks a registered class with its own keys: switching it drops the old keys
SWITCHED_SECTIONS = ("method", "loss")


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` overrides in a raw mapping (list items by index: ``eval.0.name=x``).

    An override of ``method.name`` or ``loss.name`` that switches to another method or loss first
    empties that section (the old one's keys belong to it), wherever it stands among the overrides.
    """
    overrides = list(overrides)
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 2 and path[0] in SWITCHED_SECTIONS and path[1] == "name":
            section = data.get(path[0])
            if isinstance(section, dict) and section.get("name", value) != value:
                data[path[0]] = {"name": value}
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, text, path[:i])]
                continue
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
        if isinstance(node, list):
            node[_list_index(node, path[-1], text, path[:-1])] = value
        else:
            node[path[-1]] = value
    return data


def _list_index(items: list, part: str, text: str, where: list[str]) -> int:
    """``part`` as an index into ``items``, or a ``ConfigError`` naming the override and the list's length."""
    name = ".".join(where) or "the list"
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"override {text!r}: {name} is a list; index it with a number (0 to {len(items) - 1}), "
                          f"got {part!r}")
    index = int(part)
    if not 0 <= index < len(items):
        raise ConfigError(f"override {text!r}: {name} has {len(items)} item(s); index {index} is not one of them")
    return index


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


RECIPE_DIR = "${recipe_dir}"
SHARED_DATA = "${shared_data}"
SHARED_DATA_ENV = "DOMAINCLIP_SHARED_DATA"


def shared_data_dir() -> Path:
    """The folder of the small real data sets: ``$DOMAINCLIP_SHARED_DATA`` when set, else
    ``shared/data`` beside the kit's checkout (``../shared/data`` from the repository root)."""
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def expand_recipe_dir(data: Any, recipe_dir: Path) -> Any:
    """Replace ``${recipe_dir}`` in every string with the recipe file's folder and ``${shared_data}``
    with :func:`shared_data_dir`.

    Bundled recipes point at their sample data and the shared data sets this way, so they run from
    any working directory.
    """
    if isinstance(data, str):
        if SHARED_DATA in data:
            data = data.replace(SHARED_DATA, str(shared_data_dir()))
        return data.replace(RECIPE_DIR, str(recipe_dir))
    if isinstance(data, list):
        return [expand_recipe_dir(v, recipe_dir) for v in data]
    if isinstance(data, dict):
        return {k: expand_recipe_dir(v, recipe_dir) for k, v in data.items()}
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (),
         base: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional), a base mapping and command-line overrides."""
    data = dict(base or {})
    source = ""
    if path is not None:
        data.update(read_yaml(path))
        source = str(path)
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    if path is not None:
        data = expand_recipe_dir(data, Path(path).resolve().parent)
    try:
        return from_dict(cls, data, source=source)
    except ConfigError as err:
        culprit = _override_behind(err, overrides)
        if culprit is None:
            raise
        raise ConfigError(f"override {culprit!r}: {err.detail}", key=err.key, detail=err.detail) from None


def _override_behind(err: ConfigError, overrides: list[str]) -> str | None:
    """The ``KEY=VALUE`` override that set the key ``err`` is about (or that its message names)."""
    about = err.key.replace("[", ".").replace("]", "")  # eval[0].name -> eval.0.name, as overrides spell it
    for text in reversed(overrides):
        key = ".".join(parse_override(text)[0])
        if about == key or about.startswith(key + ".") or (err.key and f"{key} " in err.detail):
            return text
    return None


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (keys in field order)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
