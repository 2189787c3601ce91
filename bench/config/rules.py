"""The machinery of the schema: a `Rule` per field (type, range, choices), the problems it
finds, and the `Section` base class that checks its fields when built. The sections
themselves are in schema.py."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class ConfigError(ValueError):
    """Every problem found in a config, each one self-contained line for the user."""

    def __init__(self, messages: list[str], problems: list[Problem] | None = None) -> None:
        self.messages = list(messages)
        self.problems = list(problems or [])  # unplaced form, for callers that add their own key path
        super().__init__("\n".join(self.messages))


@dataclass(frozen=True)
class Problem:
    """One problem before it is placed: `key` is relative to what was checked."""

    key: str
    text: str


@dataclass(frozen=True)
class Rule:
    """What one field accepts. `kind` is one of int, float, bool, str, auto_bool, ranks,
    subset (a non-empty list of distinct `choices`, kept as a tuple), bytes (an int, or '1K', '256M',
    '1G', kept as the int)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    gt: float | None = None  # exclusive lower bound: "> 0" where 0 itself makes no sense
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    words: tuple[str, ...] = ()  # strings a YAML file may use in place of an int (see WORLD)

    def allowed(self) -> str:
        if self.choices:
            text = ", ".join(repr(c) for c in self.choices)
            text = f"a non-empty list of distinct values from {text}" if self.kind == "subset" else text
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "auto_bool":
            text = "'auto', true or false"
        elif self.kind == "ranks":
            text = "'all' or a list of ints >= 0"
        elif self.kind == "bytes":
            text = f"an int >= {self.lo:g} or a string such as '1K', '256M', '1G' (powers of 1024)"
        else:
            bounds = [] if self.gt is None else [f"> {self.gt:g}"]
            if self.lo is not None:
                bounds.append(f">= {self.lo:g}")
            if self.hi is not None:
                bounds.append(f"<= {self.hi:g}")
            text = f"{'an int' if self.kind == 'int' else 'a number'} {' and '.join(bounds)}".strip()
        extras = [repr(w) for w in self.words] + (["null"] if self.nullable else [])
        return text + "".join(f" or {e}" for e in extras)

    def check(self, value: Any) -> tuple[Any, str | None]:
        """Return the value normalised (int -> float for float fields) and a problem or None."""
        if value is None and self.nullable:
            return None, None
        if isinstance(value, str) and value in self.words:
            return value, None
        ok, value = _type_ok(self.kind, value)
        if not ok:
            return value, f"got {_show(value)}; allowed: {self.allowed()}"
        if self.kind == "subset" and (bad := [v for v in value if v not in self.choices]):
            return value, f"{_show(bad)} is not allowed; allowed: {self.allowed()}"
        if self.choices and self.kind != "subset" and value not in self.choices:
            return value, f"{_show(value)} is not allowed; allowed: {self.allowed()}"
        if self.kind in ("int", "float", "bytes") and not _in_range(value, self.lo, self.hi, self.gt):
            return value, f"{_show(value)} is out of range; allowed: {self.allowed()}"
        return value, None


def _type_ok(kind: str, value: Any) -> tuple[bool, Any]:
    # bool is a subclass of int in Python; a YAML `true` where a size belongs is a mistake.
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return math.isfinite(value), float(value)
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        return isinstance(value, str), value
    if kind == "auto_bool":
        return isinstance(value, bool) or value == "auto", value
    if kind == "subset":
        ok = isinstance(value, (list, tuple)) and bool(value) and len({repr(v) for v in value}) == len(value)
        return ok, tuple(value) if ok else value
    if kind == "bytes":
        if isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", value.upper())):
            return True, int(m.group(1)) * _BYTE_UNITS[m.group(2)]
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == "ranks":
        if value == "all":
            return True, value
        ok = isinstance(value, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in value)
        return ok, value
    raise AssertionError(f"unknown rule kind {kind}")


def _in_range(value: float, lo: float | None, hi: float | None, gt: float | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value <= hi) and (gt is None or value > gt)


def _show(value: Any) -> str:
    kind = "bool" if isinstance(value, bool) else type(value).__name__
    return f"{kind} {_clip(repr(value))}"


def _clip(text: str, limit: int = 80) -> str:
    """`text`, or its start and its length when longer: one line must stay one line a person reads."""
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def _f(default: Any, kind: str, doc: str, **rule: Any) -> Any:
    """A dataclass field with its rule and a one-line doc (docs/config.md repeats these)."""
    return field(default=default, metadata={"rule": Rule(kind, **rule), "doc": doc})


def suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed keys: {', '.join(known)}"


class Section:
    """Shared behaviour of the six sections: field rules checked on construction."""

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, text = f.metadata["rule"].check(getattr(self, f.name))
            if text:
                problems.append(f"{self.NAME}.{f.name}: {text}")
            else:  # frozen, so normalise (int -> float) through object.__setattr__
                object.__setattr__(self, f.name, value)
        if problems:
            raise ConfigError(problems)


def field_problems(cls: type, values: dict[str, Any]) -> list[Problem]:
    """Problems with the given values of `cls`'s fields; unknown keys included."""
    rules = {f.name: f.metadata["rule"] for f in dataclasses.fields(cls)}
    problems = []
    for key, value in values.items():
        if key not in rules:
            problems.append(Problem(key, suggest(key, list(rules))))
            continue
        _, text = rules[key].check(value)
        if text:
            problems.append(Problem(key, text))
    return problems
