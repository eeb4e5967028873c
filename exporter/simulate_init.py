"""Kept for ``exporter.simulate``: the cabin-19 starting weights now live in ``exporter.cabin_init``."""
from __future__ import annotations

from .cabin_init import SOURCES, write_cabin_init  # noqa: F401

__all__ = ["SOURCES", "write_cabin_init"]
