"""Image decoding: bytes -> HxWx3 uint8 BGR pixels plus the original size after EXIF orientation.

Pure functions over bytes (``read_image`` only reads the file). What they guarantee:

- EXIF orientation is applied (OpenCV does so for ``IMREAD_COLOR`` and the reduced modes);
  ``width``/``height`` are the size after orientation.
- Grayscale / IR (1 channel) is replicated to 3 channels; alpha (RGBA, gray + alpha) is dropped.
- 16-bit PNG/TIFF are brought to 8 bit by the image's actual bit depth: the shift is
  ``bit_length(max value) - 8``, so a 12-bit sensor stored in 16 bits (max < 4096) is shifted by
  4, a full 16-bit image by 8, and a dark image is not stretched. Float TIFFs in 0..1 are
  multiplied by 255, other float images are divided by their maximum.
- Decompression bombs are refused before decoding: the size is read from the header of every
  format OpenCV reads here (JPEG, PNG, BMP, TIFF, WebP, PNM, PFM, Sun raster, HDR, JPEG 2000,
  GIF, AVIF), so a small file that declares a huge image (a deflated TIFF, a WebP, a PGM) never
  reaches the decoder; bytes of any other kind are refused without being decoded.
- Truncated JPEGs (no end-of-image marker after the scan) and PNGs (no IEND chunk) are refused,
  although OpenCV would return a partly grey image for them.
- ``max_side_hint``: when a JPEG is at least 2x larger than needed, it is decoded at 1/2, 1/4
  or 1/8 size (``IMREAD_REDUCED_COLOR_*``, much faster), by a factor that divides both sides;
  ``width``/``height`` stay those of the original and ``scale`` = 1 / factor.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import ImageError, ImageTooLarge

log = logging.getLogger(__name__)

MAX_PIXELS = 50_000_000
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels and the original geometry.

    pixels: HxWx3 uint8 BGR, possibly decoded at reduced size; width/height: the ORIGINAL
    size after EXIF orientation; scale: decoded / original pixels, 1.0 for a full decode and
    exactly 1 / f for libjpeg's 1/f decode (``reduce``), which maps decoded x to original x * f
    on both axes (``decode_image`` reduces only by a factor that divides both sides).
    """

    pixels: np.ndarray
    width: int
    height: int
    scale: float = 1.0
    reduce: int = 1

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[2] != 3 or self.pixels.dtype != np.uint8:
            raise ValueError(f"DecodedImage.pixels: expected HxWx3 uint8, got {self.pixels.shape} {self.pixels.dtype}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"DecodedImage: size must be positive, got {self.width}x{self.height}")

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Per-axis decoded / original ratios: 1 / f for a reduced JPEG decode (not the ratio
        of the sides, which round up: that drifted points by up to f - 1 pixels), else the
        ratio of the sides."""
        if self.reduce > 1:
            return 1.0 / self.reduce, 1.0 / self.reduce
        return self.pixels.shape[1] / self.width, self.pixels.shape[0] / self.height

    @classmethod
    def from_array(cls, image: np.ndarray) -> "DecodedImage":
        """Wrap an in-memory HxW / HxWx1 / HxWx3 / HxWx4 uint8 array (full size, no EXIF)."""
        from .geometry import as_bgr

        if image.dtype != np.uint8:
            image = to_uint8(image)
        pixels = as_bgr(image)
        return cls(pixels, int(pixels.shape[1]), int(pixels.shape[0]), 1.0)


def _jpeg_info(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, EXIF orientation, offset of the first scan) from JPEG markers."""
    i, n = 2, len(data)
    width = height = sos = 0
    orientation = 1
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageError(f"corrupt JPEG: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
        seg = data[i + 4:i + 2 + seg_len]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(seg[6:])
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(seg) >= 5:
            height, width = struct.unpack(">HH", seg[1:5])
        elif marker == 0xDA:
            sos = i
            break
        i += 2 + seg_len
    if not width or not height:
        raise ImageError("corrupt or truncated JPEG: no frame header with the image size")
    return width, height, orientation, sos


def jpeg_orientation(data: bytes) -> int:
    """A JPEG's EXIF orientation (1..8; 1 without the tag) as this module reads it."""
    return _jpeg_info(data)[2]


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8; 1 without one) of a JPEG, PNG (``eXIf`` chunk), WebP (``EXIF``
    chunk) or TIFF (its own Orientation tag): the formats whose orientation OpenCV applies, so
    the record's frame. ``jpeg_orientation`` reads JPEGs only, and a PNG or WebP stored mirrored
    or turned 180 degrees has its record's size: only its tag says that the stored pixels are
    not the frame a record's coordinates are in (``sync.reencode`` must then upload it upright)."""
    try:
        if data[:2] == b"\xff\xd8":
            return _jpeg_info(data)[2]
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _exif_orientation(data)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            at = 8
            while at + 8 <= len(data):
                size, kind = struct.unpack(">I4s", data[at:at + 8])
                if kind == b"eXIf":
                    return _exif_orientation(data[at + 8:at + 8 + size])
                if kind == b"IEND":  # not IDAT: OpenCV (libpng) applies an eXIf written after the image data too
                    break
                at += 12 + size
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            at = 12
            while at + 8 <= len(data):
                kind, size = struct.unpack("<4sI", data[at:at + 8])
                if kind == b"EXIF":
                    block = data[at + 8:at + 8 + size]
                    return _exif_orientation(block[6:] if block[:6] == b"Exif\x00\x00" else block)
                at += 8 + size + (size & 1)
    except (ImageError, struct.error):
        pass
    return 1


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; 1 if absent."""
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd = struct.unpack(endian + "I", tiff[4:8])[0]
        count = struct.unpack(endian + "H", tiff[ifd:ifd + 2])[0]
        for e in range(count):
            off = ifd + 2 + 12 * e
            tag, typ = struct.unpack(endian + "HH", tiff[off:off + 4])
            if tag == 0x0112 and typ == 3:
                value = struct.unpack(endian + "H", tiff[off + 8:off + 10])[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        log.debug("unreadable EXIF block; orientation taken as 1")
    return 1


_TIFF_WIDTH, _TIFF_LENGTH = 256, 257
# TIFF field types that may hold ImageWidth/ImageLength: SHORT, LONG, LONG8 (BigTIFF).
_TIFF_INT = {3: "H", 4: "I", 16: "Q"}


def _tiff_size(data: bytes) -> tuple[int, int]:
    """(ImageWidth, ImageLength) of the first IFD of a classic or BigTIFF file, either byte order.

    That IFD is the image OpenCV decodes. Both tags are required by the TIFF specification, so a
    file without them (or cut short before them) is corrupt, and refused before the decoder
    sees it rather than let through unchecked.
    """
    e = "<" if data[:2] == b"II" else ">"
    try:
        big = struct.unpack(e + "H", data[2:4])[0] == 43
        if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
            ifd = struct.unpack(e + "Q", data[8:16])[0]
            count = struct.unpack(e + "Q", data[ifd:ifd + 8])[0]
            first, entry, value_at, value_size = ifd + 8, 20, 12, 8
        else:
            ifd = struct.unpack(e + "I", data[4:8])[0]
            count = struct.unpack(e + "H", data[ifd:ifd + 2])[0]
            first, entry, value_at, value_size = ifd + 2, 12, 8, 4
        found: dict[int, int] = {}
        for k in range(min(count, (len(data) - first) // entry)):
            off = first + entry * k
            tag, typ = struct.unpack(e + "HH", data[off:off + 4])
            if tag in (_TIFF_WIDTH, _TIFF_LENGTH) and typ in _TIFF_INT:
                code = _TIFF_INT[typ]
                if struct.calcsize(code) <= value_size:  # stored in the entry itself (count 1)
                    found[tag] = struct.unpack(e + code, data[off + value_at:off + value_at + struct.calcsize(code)])[0]
            if len(found) == 2:
                return found[_TIFF_WIDTH], found[_TIFF_LENGTH]
    except struct.error:
        pass
    raise ImageError("corrupt or truncated TIFF: no ImageWidth/ImageLength in the first image directory")


def _webp_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first chunk of a WebP file: VP8 (lossy), VP8L (lossless) or VP8X
    (extended: the canvas size, which every frame of a still or animated image must fit in)."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise ImageError("corrupt or truncated WebP: no VP8, VP8L or VP8X header with the image size")


_PNM_MAGIC = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
_SUN_RASTER = b"\x59\xa6\x6a\x95"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # a JPEG 2000 codestream: SOC, then the SIZ marker


def _ascii_size(header: bytes, what: str) -> tuple[int, int]:
    """Width and height, the first two numbers of a PNM or PFM header after its magic (``#``
    comments and any whitespace between them)."""
    numbers: list[int] = []
    for line in header.split(b"\n"):
        for token in line.split(b"#", 1)[0].split():
            if not token.isdigit():
                raise ImageError(f"corrupt {what} header: {token[:16]!r} where the size was expected")
            numbers.append(int(token))
            if len(numbers) == 2:
                return numbers[0], numbers[1]
    raise ImageError(f"corrupt or truncated {what}: no width and height in its header")


def _pam_size(data: bytes) -> tuple[int, int]:
    fields = {}
    for line in data[3:4096].split(b"\n"):
        parts = line.split(b"#", 1)[0].split()
        if parts == [b"ENDHDR"]:
            break
        if len(parts) == 2 and parts[1].isdigit():
            fields[parts[0]] = int(parts[1])
    if b"WIDTH" not in fields or b"HEIGHT" not in fields:
        raise ImageError("corrupt or truncated PAM: no WIDTH and HEIGHT in its header")
    return fields[b"WIDTH"], fields[b"HEIGHT"]


def _hdr_size(data: bytes) -> tuple[int, int]:
    """Radiance HDR: header lines up to an empty line, then the resolution line (``-Y 480 +X 640``,
    or X first for an image stored by columns)."""
    head, sep, rest = data[:65536].partition(b"\n\n")
    parts = rest.split(b"\n", 1)[0].split() if sep else []
    if len(parts) == 4 and parts[0] in (b"-Y", b"+Y", b"-X", b"+X") and parts[1].isdigit() and parts[3].isdigit():
        a, b = int(parts[1]), int(parts[3])
        return (b, a) if parts[0].endswith(b"Y") else (a, b)
    raise ImageError("corrupt or truncated Radiance HDR: no resolution line after its header")


def _j2k_size(data: bytes) -> tuple[int, int]:
    """JPEG 2000 (a JP2 file or a bare codestream): the codestream's SIZ marker, the size OpenJPEG
    decodes (a JP2's ``ihdr`` box could declare less)."""
    at = data.find(_J2K_SOC_SIZ)
    if at < 0 or len(data) < at + 24:
        raise ImageError("corrupt or truncated JPEG 2000: no codestream size (SIZ) marker")
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[at + 8:at + 24])
    return xsiz - xo, ysiz - yo


def _avif_size(data: bytes) -> tuple[int, int]:
    """AVIF (ISO BMFF): the largest ``ispe`` (image spatial extents) property among its items,
    looked for in the top-level ``meta`` box only (the compressed ``mdat`` could hold the four
    bytes by chance)."""
    meta, at = b"", 0
    while at + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        head = 8
        if size == 1 and at + 16 <= len(data):
            size, head = struct.unpack(">Q", data[at + 8:at + 16])[0], 16
        elif size == 0:
            size = len(data) - at
        if kind == b"meta":
            meta = data[at:at + size]
            break
        if size < head:
            break
        at += size
    sizes, at = [], meta.find(b"ispe")
    while at >= 0 and len(meta) >= at + 16:
        sizes.append(struct.unpack(">II", meta[at + 8:at + 16]))
        at = meta.find(b"ispe", at + 4)
    if not sizes:
        raise ImageError("corrupt or truncated AVIF: no image size (ispe) property")
    return max(sizes, key=lambda wh: wh[0] * wh[1])


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as stored (before EXIF orientation), read from the header of every format
    OpenCV decodes here: JPEG, PNG, BMP, TIFF, WebP, PNM (PBM/PGM/PPM/PAM), PFM, Sun raster,
    Radiance HDR, JPEG 2000, GIF and AVIF; None for anything else (not an image OpenCV reads). A
    file of one of these formats whose header holds no size raises ``ImageError``."""
    if data[:2] == b"\xff\xd8":
        w, h, _, _ = _jpeg_info(data)
        return w, h
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError("corrupt PNG: no IHDR header")
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM":
        if len(data) < 26:
            raise ImageError("corrupt or truncated BMP: no image size in its header")
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] in _PNM_MAGIC and data[2:3].isspace():
        return _ascii_size(data[2:4096], "PNM")
    if data[:3] == b"P7\n":
        return _pam_size(data)
    if data[:2] in (b"PF", b"Pf") and data[2:3].isspace():
        return _ascii_size(data[2:4096], "PFM")
    if data[:4] == _SUN_RASTER:
        if len(data) < 12:
            raise ImageError("corrupt or truncated Sun raster: no image size in its header")
        return struct.unpack(">II", data[4:12])
    if data[:10] == b"#?RADIANCE" or data[:6] == b"#?RGBE":
        return _hdr_size(data)
    if data[:12] == _JP2_SIGNATURE or data[:4] == _J2K_SOC_SIZ:
        return _j2k_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        if len(data) < 10:
            raise ImageError("corrupt or truncated GIF: no screen size in its header")
        return struct.unpack("<HH", data[6:10])
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"mif1", b"msf1"):
        return _avif_size(data)
    return None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """16-bit or float image -> uint8 by its actual range (see the module docstring)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype in (np.uint16, np.int16, np.uint32, np.int32):
        top = int(image.max()) if image.size else 0
        shift = max(int(top).bit_length() - 8, 0)
        return (image.clip(min=0) >> shift).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        img = np.nan_to_num(image.astype(np.float32))
        top = float(img.max()) if img.size else 0.0
        factor = 255.0 if top <= 1.0 else 255.0 / top
        return (img * factor).clip(0, 255).round().astype(np.uint8)
    raise ImageError(f"unsupported pixel type {image.dtype}")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, max_side_hint: int | None = None,
                 max_bytes: int | None = None) -> DecodedImage:
    """Decode image bytes (JPEG, PNG, BMP, TIFF, WebP, ...) into a ``DecodedImage``.

    Raises ``ImageTooLarge`` (an ``ImageError``) for more than ``max_bytes`` bytes (None: no
    byte limit) or more than ``max_pixels`` pixels (checked from the header before decoding
    from the header, before decoding), and ``ImageError`` for empty, truncated, corrupt or
    unrecognised data.
    """
    if not data:
        raise ImageError("empty image data (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes, more than the limit of {max_bytes}")
    is_jpeg = data[:2] == b"\xff\xd8"
    orientation, reduce_by = 1, 1
    size = header_size(data)
    if size is None:  # no format OpenCV reads here: nothing is decoded
        raise ImageError(f"not a decodable image ({len(data)} bytes, starting {data[:8]!r}); "
                         "expected JPEG, PNG, TIFF, BMP, WebP, PNM, PFM, Sun raster, HDR, JPEG 2000, GIF or AVIF")
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"corrupt image header: size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLarge(f"image has {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    if is_jpeg:
        w, h, orientation, sos = _jpeg_info(data)
        if sos == 0 or data.rfind(b"\xff\xd9") < sos:
            raise ImageError("truncated JPEG: no end-of-image marker after the image data")
        if max_side_hint:
            for factor, _ in _REDUCED:
                # Only a factor that divides both sides: then decoded pixel i is original pixels
                # [i f, (i + 1) f) on both axes. Otherwise one block is partial, the last one, or
                # the first on an axis that EXIF orientation reverses, where x * f drifts every
                # point by up to f - 1 pixels. Camera sizes are multiples of 8 (1920x1080,
                # 1280x800, 4000x3000), so they keep the fast decode.
                if max(w, h) >= factor * max_side_hint and w % factor == 0 and h % factor == 0:
                    reduce_by = factor
                    break
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-32:]:
        raise ImageError("truncated PNG: no IEND chunk at the end")

    buf = np.frombuffer(data, dtype=np.uint8)
    if reduce_by > 1:
        flags = dict(_REDUCED)[reduce_by]
    elif is_jpeg:
        flags = cv2.IMREAD_COLOR
    else:  # keep depth and channel count so 16-bit and gray+alpha are handled here, not by OpenCV
        flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:
        if exc.code == cv2.Error.StsNoMem:  # the machine's memory, not the image: worth another try
            raise MemoryError(f"decoding a {len(data)}-byte image: {exc}") from exc
        raise ImageError(f"cannot decode image: {exc}") from exc
    if img is None or img.size == 0:
        raise ImageError(f"not a decodable image ({len(data)} bytes, starting {data[:8]!r})")
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha
        img = img[..., 0]
    pixels = _to_bgr8(img)
    if reduce_by == 1:
        height, width = pixels.shape[:2]
    else:  # the original size after orientation: the header's, turned as OpenCV turned the pixels
        width, height = _reduced_original(pixels.shape[:2], w, h, reduce_by, orientation)
    if width * height > max_pixels:
        raise ImageTooLarge(f"image has {width}x{height} = {width * height} pixels, "
                            f"more than the limit of {max_pixels}")
    return DecodedImage(np.ascontiguousarray(pixels), int(width), int(height), 1.0 / reduce_by, reduce_by)


def _reduced_original(shape: tuple[int, ...], w: int, h: int, f: int, orientation: int) -> tuple[int, int]:
    """(width, height) of the original after EXIF orientation, for pixels decoded at 1/f.

    Whether OpenCV turned the pixels is read from their shape, not from this module's EXIF
    reading: the two disagree on some files (the tag stored as LONG, two EXIF segments), and a
    size turned the other way than the pixels stretched every coordinate. Only a square reduced
    shape of a non-square image leaves the shape silent; the EXIF tag decides then."""
    rw, rh = -(-w // f), -(-h // f)
    if rw != rh:
        if tuple(shape) == (rh, rw):
            return w, h
        if tuple(shape) == (rw, rh):
            return h, w
    return (h, w) if orientation >= 5 else (w, h)


def _to_bgr8(img: np.ndarray) -> np.ndarray:
    from .geometry import as_bgr

    return as_bgr(to_uint8(img))


def read_image(
    path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS, max_side_hint: int | None = None
) -> DecodedImage:
    """Read a file and ``decode_image`` it; an unreadable file is an ``ImageError``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc}") from exc
    try:
        return decode_image(data, max_pixels=max_pixels, max_side_hint=max_side_hint)
    except ImageError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
