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


class StoreError(AnnotatorError):
    """The durable store cannot do what was asked (unknown image, newer schema, bad state)."""


class StoreFull(StoreError):
    """Free disk space is below the configured floor; ingest is paused until space is freed."""


class LeaseLost(StoreError):
    """A worker tried to finish an image whose lease it no longer holds; nothing was changed.
    ``image_id``: which image (a batch's completion reports one per lost row)."""

    def __init__(self, message: str, image_id: str | None = None) -> None:
        super().__init__(message)
        self.image_id = image_id


class ImageNotFound(StoreError):
    """No image with this id is in the store (or the id is not a sha256 hex digest)."""


class ImageTooLarge(ImageError):
    """The image has more bytes or pixels than the configured limits (gRPC RESOURCE_EXHAUSTED)."""


class ShuttingDown(AnnotatorError):
    """The daemon is stopping and takes no new images (gRPC UNAVAILABLE: retry elsewhere or later)."""


class PathNotAllowed(AnnotatorError):
    """A path sent by a client lies outside the folder it is allowed to name (``..``, symlinks, absolute)."""
