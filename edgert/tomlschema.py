"""One collecting TOML validator for daemon configs, the ``[mqtt]`` table and device profiles.

Typed getters read a decoded TOML table and record every problem instead of stopping at the
first one; each problem names the file, the key and what is allowed. :meth:`Problems.raise_if_any`
then raises one :class:`ConfigProblems` listing them all::

    3 errors in /etc/edgert/edgert.toml:
      /etc/edgert/edgert.toml: daemon.log_level: got 'loud' (allowed: debug, info, warning, error)
      ...

A getter that records a problem returns its default, so parsing goes on and finds the next one.
Validation does no I/O. Ground floor: imports only :mod:`edgert.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

from edgert.errors import ConfigError

__all__ = ["ConfigProblems", "Problems", "Table", "parse_listen"]

T = TypeVar("T")

_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans", dict: "tables"}
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a table"}


class ConfigProblems(ConfigError):
    """Every problem found in one config file; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: Iterable[str], *, hint: str | None = None) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            message = f"{len(self.problems)} errors in {source}:\n{lines}"
        super().__init__(message, hint=hint)


class Problems:
    """Collects the problems of one file; :meth:`raise_if_any` raises them together."""

    def __init__(self, source: str, hint: str | None = None) -> None:
        self.source, self.hint = source, hint
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        """Record that ``where`` (a dotted key, "" for the file itself) is wrong because ``what``."""
        line = f"{self.source}: {where}: {what}" if where else f"{self.source}: {what}"
        if line not in self.items:
            self.items.append(line)

    def extend(self, other: Problems) -> None:
        """Take over the problems another collector found (e.g. an [mqtt] table parsed on its own)."""
        for line in other.items:
            if line not in self.items:
                self.items.append(line)

    def table(self, data: Any, prefix: str = "") -> Table:
        """A typed view of ``data``, the table at ``prefix`` ("" for the document root)."""
        return Table(self, prefix, data)

    def raise_if_any(self) -> None:
        """Raise one :class:`ConfigProblems` listing every recorded problem, if there are any."""
        if self.items:
            raise ConfigProblems(self.source, self.items, hint=self.hint)


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, bool) else repr(value).lower()


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8000`` for IPv6) into host and port; raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return host, port


class Table:
    """Typed, recording access to one TOML table; remembers which keys were asked for."""

    def __init__(self, problems: Problems, prefix: str, data: Any) -> None:
        self.problems, self.prefix = problems, prefix
        self.used: set[str] = set()
        self.valid = isinstance(data, dict)
        if not self.valid:
            problems.add(prefix, f"must be a table, got {_describe(data)}")
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}

    def where(self, key: str) -> str:
        """The dotted name of ``key`` in this table (``http.listen``, ``models[0].name``)."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, what: str) -> None:
        """Record a problem with ``key`` of this table."""
        self.problems.add(self.where(key), what)

    def has(self, key: str) -> bool:
        """True when the table sets ``key`` (marks it as known)."""
        self.used.add(key)
        return key in self.data

    def value(self, key: str, kinds: type | tuple[type, ...], default: T) -> T | Any:
        """The raw value of ``key`` if it has one of ``kinds`` (bool never counts as a number)."""
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"must be {_kind_name(kinds)}, got {_describe(value)}")
            return default
        if not isinstance(value, kinds):
            self.fail(key, f"must be {_kind_name(kinds)}, got {_describe(value)}")
            return default
        return value

    def string(self, key: str, default: str = "", *, required: bool = False, nonempty: bool = False) -> str:
        """A string; ``required`` means the key must be present, ``nonempty`` that it must not be blank."""
        if required and key not in self.data:
            self.used.add(key)
            self.fail(key, "is required")
            return default
        value = str(self.value(key, str, default))
        if nonempty and key in self.data and isinstance(self.data[key], str) and not value.strip():
            self.fail(key, "must not be empty")
        return value

    def optional_string(self, key: str) -> str | None:
        """A non-empty string, or None when the key is absent."""
        if not self.has(key):
            return None
        value = self.value(key, str, None)
        if value is not None and not value.strip():
            self.fail(key, "must be a non-empty string (remove the key to leave it unset)")
            return None
        return value

    def integer(self, key: str, default: int, *, minimum: int | None = 0, maximum: int | None = None) -> int:
        """An integer in ``minimum..maximum`` (either bound may be None)."""
        value = self.value(key, int, default)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            self.fail(key, f"must be an integer {_range(minimum, maximum)}, got {value}")
            return default
        return int(value)

    def number(
        self, key: str, default: float, *, minimum: float | None = 0.0, maximum: float | None = None
    ) -> float:
        """A finite number in ``minimum..maximum`` (integers are accepted; booleans are not)."""
        value = float(self.value(key, (int, float), default))
        if (
            not math.isfinite(value)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            self.fail(key, f"must be a number {_range(minimum, maximum)}, got {value!r}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """true or false."""
        return bool(self.value(key, bool, default))

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        """One of ``allowed``."""
        value = self.value(key, str, default)
        if value not in allowed:
            self.fail(key, f"got {value!r} (allowed: {', '.join(allowed)})")
            return default
        return str(value)

    def list_of(
        self, key: str, kind: type, default: tuple[Any, ...] = (), *, what: str = ""
    ) -> tuple[Any, ...]:
        """A list whose items all have type ``kind``; each bad item is reported with its index."""
        self.used.add(key)
        raw = self.data.get(key)
        if key not in self.data:
            return tuple(default)
        if not isinstance(raw, list):
            self.fail(key, f"must be a list of {_PLURALS.get(kind, kind.__name__)}, got {_describe(raw)}")
            return tuple(default)
        out: list[Any] = []
        for i, item in enumerate(raw):
            if isinstance(item, kind) and not (isinstance(item, bool) and kind is not bool):
                out.append(item)
            else:
                self.problems.add(f"{self.where(key)}[{i}]",
                                  f"must be {what or _kind_name((kind,))}, got {_describe(item)}")
        return tuple(out)

    def listen(self, key: str, default: str) -> str:
        """A ``HOST:PORT`` listen address; "" (disabled) is allowed."""
        value = str(self.value(key, str, default))
        if value:
            try:
                parse_listen(value)
            except ValueError as exc:
                self.fail(key, f'is not a valid listen address: {exc} (allowed: HOST:PORT, or "" to disable)')
                return default
        return value

    def octal_mode(self, key: str, default: int) -> int:
        """A file mode written as an octal string ("0660") or an integer, 0..0o777."""
        raw = self.value(key, (str, int), None)
        if raw is None:
            return default
        try:
            mode = int(raw, 8) if isinstance(raw, str) else int(raw)
        except ValueError:
            self.fail(key, f'must be an octal string like "0660", got {raw!r}')
            return default
        if not 0 <= mode <= 0o777:
            self.fail(key, f"must be between 0000 and 0777, got {oct(mode)}")
            return default
        return mode

    def table(self, key: str, prefix: str | None = None) -> Table:
        """The sub-table ``key`` (empty when absent)."""
        self.used.add(key)
        return Table(self.problems, prefix or self.where(key), self.data.get(key, {}))

    def tables(self, key: str) -> list[Table]:
        """An array of tables (``[[models]]``), each named ``key[i]``."""
        items: list[Any] = self.value(key, list, [])
        return [Table(self.problems, f"{self.where(key)}[{i}]", item) for i, item in enumerate(items)]

    def check_unknown(self, extra_allowed: Iterable[str] = ()) -> None:
        """Record every key nobody asked for (typos would otherwise be silently ignored)."""
        allowed = self.used | set(extra_allowed)
        for key in sorted(set(self.data) - allowed):
            self.fail(key, f"is not a known key (allowed: {', '.join(sorted(allowed)) or 'none'})")


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in {minimum:g}..{maximum:g}"
    if minimum is not None:
        return f">= {minimum:g}"
    if maximum is not None:
        return f"<= {maximum:g}"
    return ""
