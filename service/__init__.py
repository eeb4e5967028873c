"""The daemon side of the edge annotation appliance: bundle contract, inference engine,
annotation records. Nothing in this package imports torch or ultralytics."""
from __future__ import annotations

__version__ = "0.1.0"
