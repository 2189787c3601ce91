"""Reading a sweep file and applying `--set` overrides to it, before any validation.

Overrides act on the YAML document, not on built cells, so the document saved as the run's
config.yaml is exactly what ran and `--resume` needs nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bench.config.limits import oversize, size_problem
from bench.config.schema import SECTIONS, ConfigError, rule_for, suggest

TOP_KEYS = ["name", "base", "matrix", "exclude", "include", "canaries", "baseline"]
DEFAULT_LABEL = "bench/default.yaml"
# libyaml's parser when PyYAML has it (its wheels do): the pure-Python one takes seconds per
# megabyte, and a sweep file must be answered, even refused, within a second.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Messages:
    """Problems placed in one file, in the order found, without repeats."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.lines: list[str] = []

    def add(self, path: str, text: str) -> None:
        line = f"{self.label}: {path}: {text}"
        if line not in self.lines:
            self.lines.append(line)

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def read_doc(path: Path | None) -> tuple[dict[str, Any], str]:
    """The YAML document and the label used in messages; None reads the embedded default."""
    label = str(path) if path is not None else DEFAULT_LABEL
    try:
        text = path.read_text() if path is not None else (resources.files("bench") / "default.yaml").read_text()
        doc = yaml.load(text, Loader=LOADER)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise ConfigError([f"{label}: cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{label}: not valid YAML: {' '.join(str(exc).split())}"]) from None
    except RecursionError:
        raise ConfigError([f"{label}: not valid YAML: nested too deeply to read"]) from None
    if (too_big := size_problem(doc, label)) is not None:  # before anything copies or prints it
        raise ConfigError([too_big])
    if not isinstance(doc, dict):
        raise ConfigError([f"{label}: expected a mapping with keys {', '.join(TOP_KEYS)}"])
    return doc, label


def key_problem(dotted: Any) -> str | None:
    """Why `dotted` is not a config key such as 'parallel.sp', or None."""
    if not isinstance(dotted, str):
        return f"keys are strings such as 'parallel.sp', got {dotted!r}"
    section, _, name = dotted.partition(".")
    if section not in SECTIONS:
        return suggest(section, list(SECTIONS)).replace("keys", "sections")
    if rule_for(dotted) is None:
        return suggest(name, [f.name for f in dataclasses.fields(SECTIONS[section])])
    return None


def apply_overrides(doc: dict[str, Any], overrides: list[str], label: str) -> dict[str, Any]:
    """--set key=value: `name`, `matrix.<key>` (an axis; [] drops it) or a cell key, which then
    holds in every cell: base, a matrix axis over it and include entries all take the value."""
    doc = copy.deepcopy(doc)
    out = Messages(label)
    for item in overrides:
        key, eq, text = item.partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value, eq = None, ""
        if not eq or not key:
            out.add(f"--set {item[:60]}", "expected key=value with a YAML value, e.g. parallel.world_size=2")
            continue
        if (too_big := oversize(value)) is not None:
            out.add(f"--set {'.'.join(filter(None, (key, too_big[0])))}", too_big[1])
            continue
        if key == "name":
            doc["name"] = value
            continue
        axis = key.removeprefix("matrix.") if key.startswith("matrix.") else None
        dotted = axis or key.removeprefix("base.")
        values = value if axis is not None and isinstance(value, list) else [value]
        rule = rule_for(dotted)
        bad = [why for v in values if rule is not None and (why := rule.check(v)[1])]
        if (problem := key_problem(dotted)) is not None:
            out.add(f"--set {key}", problem)
        elif bad:
            out.add(f"--set {key}", bad[0])
        elif axis is not None:
            matrix = doc.setdefault("matrix", {}) if isinstance(doc.get("matrix"), dict) else {}
            doc["matrix"] = matrix
            if value == []:
                matrix.pop(axis, None)
            else:
                matrix[axis] = value if isinstance(value, list) else [value]
        else:
            _set_everywhere(doc, dotted, value)
    out.raise_if_any()
    return doc


def _set_everywhere(doc: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    base = doc.setdefault("base", {})
    if isinstance(base, dict):
        base.setdefault(section, {})
        if isinstance(base[section], dict):
            base[section][name] = value
    if isinstance(doc.get("matrix"), dict) and dotted in doc["matrix"]:
        doc["matrix"][dotted] = [value]
    canaries = doc.get("canaries")
    for entry in [*(doc.get("include") or []), *(canaries.values() if isinstance(canaries, dict) else [])]:
        if isinstance(entry, dict) and dotted in entry:
            entry[dotted] = value
