"""The service package's exception tree. Third-party errors are wrapped at the boundary."""
from __future__ import annotations


class AnnotatorError(Exception):
    """Base of every error this package raises on purpose."""


class BundleError(AnnotatorError):
    """A model bundle is missing, malformed, fails its checksums or does not match its ONNX files."""


class ImageError(AnnotatorError):
    """An image cannot be used: empty, truncated, not an image, too large, unreadable."""


class ConfigError(AnnotatorError):
    """A configuration value is missing or invalid; the message names the key."""
