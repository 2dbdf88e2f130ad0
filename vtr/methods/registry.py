"""Name -> method class."""
from __future__ import annotations

import difflib

REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make a method available to ``vtr.patch(model, method=cls.name)``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


def lookup(name: str) -> type:
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, list(REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown method {name!r}.{hint} Registered methods: {', '.join(sorted(REGISTRY))}")
