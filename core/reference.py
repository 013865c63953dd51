"""Generate the recipe reference (``docs/recipes.md``) from the config dataclasses themselves.

The documentation of every recipe key is the docstring of the field's dataclass, so the reference
cannot drift from the code: a test regenerates it and compares with the committed file.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, get_type_hints

from .config import TaggedConfig, to_dict
from .run_config import RunConfig


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` sections of ``cls``'s docstring and its
    base classes' (a subclass's description wins), so inherited fields keep their documentation."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    doc = cls.__doc__ or ""  # not inspect.getdoc: it would return a base class's docstring
    doc = inspect.cleandoc(doc)
    if "Attributes:" not in doc:
        return {}
    docs: dict[str, str] = {}
    current = None
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.startswith("        "):
            docs[current] += " " + line.strip()
        elif line.strip():
            current = None
    return docs


def _type_name(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if not getattr(tp, "__args__", None) else None
    return text or re.sub(r"\b[\w]+\.(?=[\w.]*\w)", "", str(tp))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
        return "(section)" if dataclasses.is_dataclass(value) else to_dict(value)
    return ""


def section_markdown(cls: type, key: str, expanding: dict[type, str] | None = None) -> list[str]:
    """Markdown of ``cls``'s fields and, below, of its nested sections. A tagged section nested in
    one of its own kind (fare's ``tower_method`` is a method section) points to the outer one."""
    expanding = dict(expanding or {})
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"### `{key}`", "", summary, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        default = _default(field)
        shown = "" if default == "(section)" else f"`{default!r}`"
        lines.append(f"| `{field.name}` | `{_type_name(tp)}` | {shown} | {docs.get(field.name, '')} |")
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{key}.{field.name}" if key else field.name))
        elif getattr(tp, "__args__", None) and dataclasses.is_dataclass(tp.__args__[0]):
            nested.append((tp.__args__[0], f"{key}.{field.name}[]"))
    lines.append("")
    for tp, sub_key in nested:
        if isinstance(tp, type) and issubclass(tp, TaggedConfig):
            if tp in expanding:
                lines += [f"`{sub_key}` is a `{expanding[tp]}` section: see `{expanding[tp]} (name: ...)` above.", ""]
                continue
            for name, sub in sorted(tp.REGISTRY.items()):
                lines += section_markdown(sub, f"{sub_key} (name: {name})", {**expanding, tp: sub_key})
        else:
            lines += section_markdown(tp, sub_key, expanding)
    return lines


def recipe_reference_markdown() -> str:
    header = ["# Recipe reference", "",
              "Generated from the config dataclasses by `domainclip config --reference` "
              "(do not edit by hand; `tests/core/test_reference.py` checks it is current).", "",
              "Any key can be overridden on the command line as `section.key=value` "
              "(the value is parsed as YAML). An unknown key is an error naming the closest valid key. "
              "Strings may use `${recipe_dir}`, the folder of the recipe file, and `${shared_data}`, the shared "
              "data sets' folder (`$DOMAINCLIP_SHARED_DATA`, else `../shared/data` beside the repository).", ""]
    body = section_markdown(RunConfig, "")
    body[0] = "## Top level"
    return "\n".join(header + body).rstrip() + "\n"
