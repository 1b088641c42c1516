"""Turn jsonargparse's nested parse errors into one line that names the key, with the closest valid key.

jsonargparse reports a bad key inside a subclass (`--data.mask_ration`) as a tree of "Parser key"
and "class_path" lines; the user needs only the innermost problem and where it is. A YAML syntax
error it reports as in "<unicode string>": the file is found again and named.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^- Problem with given class_path '([^']+)':$")
_OPTION = re.compile(r"^Option '([^']+)' is not accepted$")
_UNRECOGNIZED = re.compile(r"^[Uu]nrecognized arguments: (\S+)")
# Keys that moved: the old spelling gets a one-line pointer to the new one instead of a guess.
RENAMED = {"data.masking.ratio": "data.mask_ratio"}  # the policy's ratio has one home (issue 15)
_NOISE = ("Does not validate against any of", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")


def _init_parameters(class_path: str) -> list[str]:
    """The keyword arguments of the class a key belongs to (its valid keys)."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [name for name in inspect.signature(cls).parameters if name not in ("self", "args", "kwargs")]


def _closest(word: str, candidates: list[str], prefix: str) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{match[0]}?" if match else ""


def one_line(message: str, option_strings: list[str]) -> str:
    """`message` (a jsonargparse ArgumentError) as one line. `option_strings` are the parser's
    top-level options, for suggestions when an unknown top-level key is given."""
    if found := _UNRECOGNIZED.match(message.strip()):
        option = found.group(1)
        option = option.removeprefix("--")
        names = [o.removeprefix("--") for o in option_strings if o.startswith("--")]
        return f"unknown key {option}{_closest(option, names, '')}"
    path: list[tuple[int, str]] = []  # (indent, key) of the enclosing "Parser key" lines
    class_path: str | None = None
    innermost: tuple[int, str, str, str | None] | None = None  # (indent, key, detail, class) of the deepest problem
    for raw in message.splitlines():
        indent, line = len(raw) - len(raw.lstrip()), raw.strip()
        path = [(i, k) for i, k in path if i < indent]
        if found := _KEY.match(line):
            path.append((indent, found.group(1)))
            line = found.group(2)
        elif found := _CLASS.match(line):
            class_path = found.group(1)
            continue
        if line and not line.startswith(_NOISE) and (innermost is None or indent > innermost[0]):
            innermost = (indent, ".".join(k for _, k in path), line, class_path)
    if innermost is None:
        return message.strip().splitlines()[0]
    _, key, detail, class_path = innermost
    if found := _OPTION.match(detail):
        option = found.group(1)
        if new_key := RENAMED.get(f"{key}.{option}"):
            return f"{key}.{option} was renamed: use {new_key}"
        valid = _init_parameters(class_path) if class_path else []
        where = f" (see --{key}.help {class_path})" if class_path else ""
        return f"unknown key {key}.{option}{_closest(option, valid, key + '.')}{where}"
    return f"{key}: {detail}" if key else detail


YAML_SUFFIXES = (".yaml", ".yml")


def config_args(args: list[str]) -> list[Path]:
    """The files given with `--config` on a command line."""
    files = [value for flag, value in itertools.pairwise(args) if flag == "--config"]
    return [Path(f) for f in files + [a.removeprefix("--config=") for a in args if a.startswith("--config=")]]


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def yaml_problem(files: list[Path], seen: set[Path] | None = None) -> str | None:
    """`<file>: <problem> at line L, column C` for the first of `files` (or of the YAML files they
    name, e.g. `model: models/tiny_decoder.yaml`, relative to the naming file) that is not valid YAML."""
    seen = set() if seen is None else seen
    for file in files:
        if file.resolve() in seen or not file.is_file():
            continue
        seen.add(file.resolve())
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.MarkedYAMLError as err:
            mark, context = err.problem_mark, ""
            if err.context and err.context_mark:
                context = f" ({err.context} at line {err.context_mark.line + 1})"
            return f"{file}: {err.problem} at line {mark.line + 1}, column {mark.column + 1}{context}"
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        named = [file.parent / s for s in _strings(loaded) if s.endswith(YAML_SUFFIXES)]
        if problem := yaml_problem(named, seen):
            return problem
    return None


def parse_error(message: str, option_strings: list[str], config_files: list[Path]) -> str:
    """The one line for a jsonargparse parse error; a YAML syntax error names its file."""
    if "<unicode string>" in message and (problem := yaml_problem(config_files)):
        return f"config: {problem}"
    return one_line(message, option_strings)
