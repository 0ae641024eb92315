"""One registry mechanism for every pluggable family: teachers, students, losses, aggregations,
quantization modes, data adapters, chunk codecs.

A registry maps a name to an object (a builder, a class, a function) plus free-form ``info``
(a family, a task, supported dimensions, ...). Objects register themselves with a decorator in
the module that defines them (one file per family, as in timm); callers build by name. Unknown
names raise a ``ValueError`` that names the kind and lists the known names.

Every registry created here is also listed by :func:`all_registries`, so the catalog of names
that the job spec validates against (``medkd/spec/catalog.json``) is generated from the
registries themselves and cannot drift from them.

Examples:
    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("kd")
    ... def make_kd(temperature=4.0):
    ...     return ("kd", temperature)
    >>> LOSSES.create("kd", temperature=2.0)
    ('kd', 2.0)
    >>> LOSSES.names()
    ['kd']
    >>> LOSSES.get("dkd")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: unknown loss 'dkd'; known losses: kd
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F")

_ALL: dict[str, Registry[Any]] = {}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object and what the registry knows about it."""

    name: str
    obj: T
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return getattr(self.obj, "__module__", "")

    def same_definition(self, other: Any) -> bool:
        """True when ``other`` is this entry's object defined again (a reloaded module)."""
        key = (getattr(self.obj, "__module__", None), getattr(self.obj, "__qualname__", None))
        return self.obj is other or (
            key[1] is not None and key == (getattr(other, "__module__", None), getattr(other, "__qualname__", None))
        )


class Registry(Generic[T]):
    """A named table of objects filled by :meth:`register`.

    Args:
        kind: what the registry holds, singular ("teacher", "loss"); used in error messages.
        plural: the plural of ``kind`` for messages; defaults to ``kind + "s"``.
    """

    def __init__(self, kind: str, *, plural: str | None = None) -> None:
        if not kind:
            raise ValueError("kind must be a non-empty string")
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, Entry[T]] = {}
        _ALL[kind] = self

    def register(self, name: str | None = None, **info: Any) -> Callable[[F], F]:
        """Decorator that registers an object under ``name`` (default: its ``__name__``).

        Raises:
            ValueError: an empty name, or a name already registered by a different object.
        """

        def decorator(obj: F) -> F:
            self.add(name or getattr(obj, "__name__", ""), obj, **info)  # type: ignore[arg-type]
            return obj

        return decorator

    def add(self, name: str, obj: T, **info: Any) -> T:
        """Register ``obj`` under ``name`` (the non-decorator form of :meth:`register`)."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None and not existing.same_definition(obj):
            raise ValueError(f"{self.kind} {name!r} is already registered by {existing.module or repr(existing.obj)}")
        self._entries[name] = Entry(name, obj, dict(info))
        return obj

    def get(self, name: str) -> Entry[T]:
        """The entry registered as ``name``; ``ValueError`` listing the known names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names()) or "(none registered)"
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {known}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the object registered as ``name`` with the given arguments."""
        return self.get(name).obj(*args, **kwargs)  # type: ignore[operator]

    def names(self, **info: Any) -> list[str]:
        """Sorted names, optionally only those whose ``info`` matches every given key."""
        return sorted(n for n, e in self._entries.items() if all(e.info.get(k) == v for k, v in info.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def entries(self) -> list[Entry[T]]:
        """Every entry, sorted by name."""
        return [self._entries[name] for name in self.names()]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def all_registries() -> dict[str, Registry[Any]]:
    """Every registry created so far, by kind (filled as the modules that own them are imported)."""
    return dict(_ALL)
