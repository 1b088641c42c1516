"""Suite options as users type them: a list option may be a list, one name, or names joined by commas."""

from __future__ import annotations


def as_names(value: str | list[str]) -> list[str]:
    """`"a"`, `"a,b"` or `["a", "b"]` -> the names, blanks dropped (`--blimp.paradigms wh_island` works)."""
    listed = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in listed if str(v).strip()]
