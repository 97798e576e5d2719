"""Reading configuration text: JSON and TOML parsed into plain values, with one-line errors.

Nesting is bounded (:data:`MAX_NESTING`) so that hostile input cannot exhaust Python's recursion
limit; TOML files must be UTF-8.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffreg.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Deepest nesting of lists and tables accepted in an option value (real options nest 1-2 levels;
#: a bound keeps hostile input from exhausting Python's recursion limit).
MAX_NESTING = 32


def _json_value(value: Any, where: str, depth: int = 0) -> Any:
    """Check that ``value`` is a JSON/TOML value (tuples become lists) nested at most
    :data:`MAX_NESTING` levels."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth >= MAX_NESTING:
        raise ConfigError(f"{where}: option values are nested more than {MAX_NESTING} levels deep")
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, where, depth + 1) for k, v in value.items()}
    raise ConfigError(f"{where}: option values must be JSON values, got {type(value).__name__}")


def parse_json(text: str, what: str = "JSON configuration") -> Any:
    """``json.loads`` with one-line :class:`ConfigError` for invalid or too deeply nested text."""
    return _parse(json.loads, json.JSONDecodeError, text, what, "lists or tables")


def parse_toml(text: str, what: str = "TOML configuration") -> dict[str, Any]:
    """``tomllib.loads`` with one-line :class:`ConfigError` for invalid or too deeply nested text."""
    return _parse(tomllib.loads, tomllib.TOMLDecodeError, text, what, "arrays or tables")


def _parse(loads: Any, decode_error: type[Exception], text: str, what: str, containers: str) -> Any:
    try:
        return loads(text)
    except decode_error as exc:
        raise ConfigError(f"invalid {what}: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"invalid {what}: {containers} nested too deeply (at most {MAX_NESTING} levels)") from None


def read_toml_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML file ``path`` as a dict. TOML is UTF-8 by definition (TOML 1.0, "Spec").

    Raises:
        FileNotFoundError: no such file. ConfigError: not UTF-8 (naming the byte offset), invalid
        TOML, or nested too deeply; each naming the file.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"configuration {str(path)!r} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "TOML files must be UTF-8"
        ) from None
    return parse_toml(text, f"TOML in {str(path)!r}")
