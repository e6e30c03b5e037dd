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


def _parse(value: str, name: str, kind: str, convert) -> tuple:
    try:
        return tuple(convert(v) for v in _items(value, name, kind))
    except ValueError:
        raise FeatcacheError(f"invalid value for {name}: expected {kind} or comma list, got {value!r}") from None


def float_list(value: str, name: str) -> tuple[float, ...]:
    """``"1e-3,1e-2"`` -> (0.001, 0.01). Non-finite values parse here; configs refuse them."""
    return _parse(value, name, "a number", float)


def int_list(value: str, name: str) -> tuple[int, ...]:
    """``"512,256"`` -> (512, 256)."""
    return _parse(value, name, "an integer", int)


def str_list(value: str, name: str) -> tuple[str, ...]:
    """``"adam,sgd"`` -> ("adam", "sgd")."""
    return tuple(_items(value, name, "a name"))
