"""Comma lists from the command line (``--lr 1e-3,1e-2``) -> the tuples the configs hold.

Strict on purpose: an empty item (``1e-3,,1e-2``) or an empty list is an error, never silently
dropped, because a sweep that quietly trains fewer configurations than typed is a wrong result.
"""
from __future__ import annotations

from featcache.pipeline.errors import FeatcacheError


def _items(value: str, name: str, kind: str) -> list[str]:
    items = [v.strip() for v in str(value).split(",")]
    if not any(items) or not all(items):
        raise FeatcacheError(f"invalid value for {name}: expected {kind} or comma list, got {value!r}")
    return items


def float_list(value: str, name: str) -> tuple[float, ...]:
    """``"1e-3,1e-2"`` -> (0.001, 0.01). Non-finite values parse here; configs refuse them."""
    items = _items(value, name, "a number")
    try:
        return tuple(float(v) for v in items)
    except ValueError:
        raise FeatcacheError(f"invalid value for {name}: expected a number or comma list, got {value!r}") from None


def int_list(value: str, name: str) -> tuple[int, ...]:
    """``"512,256"`` -> (512, 256)."""
    items = _items(value, name, "an integer")
    try:
        return tuple(int(v) for v in items)
    except ValueError:
        raise FeatcacheError(f"invalid value for {name}: expected an integer or comma list, got {value!r}") from None


def str_list(value: str, name: str) -> tuple[str, ...]:
    """``"adam,sgd"`` -> ("adam", "sgd")."""
    return tuple(_items(value, name, "a name"))
