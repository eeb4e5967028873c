"""Image decoding: orientation, channels, bit depth, reduced decode, refusals."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from service.errors import ImageError, ImageTooLarge
from service.imageio import DecodedImage, decode_image, read_image, to_uint8


def _photo(h: int = 120, w: int = 200) -> np.ndarray:
    """A smooth, asymmetric test image (JPEG-friendly), HxWx3 BGR."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=2).astype(np.uint8)
    img[: h // 4, : w // 4] = (0, 0, 255)  # a red top-left corner shows the orientation
    return img


def _jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def test_plain_jpeg() -> None:
    img = _photo()
    d = decode_image(_jpeg(img))
    assert (d.width, d.height, d.scale) == (200, 120, 1.0)
    assert d.pixels.shape == (120, 200, 3) and d.pixels.dtype == np.uint8
    assert np.abs(d.pixels.astype(int) - img).mean() < 3


@pytest.mark.parametrize(
    "orientation,stored_from_upright",
    [
        (1, lambda a: a),
        (3, lambda a: cv2.rotate(a, cv2.ROTATE_180)),
        (6, lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)),  # display = rotate 90 CW
        (8, lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE)),
    ],
)
@pytest.mark.parametrize("hint", [None, 50])
def test_exif_orientation(jpeg_with_orientation, orientation, stored_from_upright, hint) -> None:
    upright = cv2.resize(_photo(), (400, 240))
    data = jpeg_with_orientation(_jpeg(stored_from_upright(upright)), orientation)
    d = decode_image(data, max_side_hint=hint)
    assert (d.width, d.height) == (400, 240)
    ref = upright if hint is None else cv2.resize(upright, (d.pixels.shape[1], d.pixels.shape[0]))
    assert d.pixels.shape == ref.shape
    assert np.abs(d.pixels.astype(int) - ref).mean() < 6
    assert d.pixels[2, 2, 2] > 200 and d.pixels[2, 2, 0] < 60  # red corner is top-left again


@pytest.mark.parametrize("hint,factor", [(None, 1), (1000, 1), (700, 1), (400, 2), (250, 2), (200, 4), (100, 8), (10, 8)])
def test_reduced_jpeg_decode(hint, factor) -> None:
    img = cv2.resize(_photo(), (800, 480))
    d = decode_image(_jpeg(img), max_side_hint=hint)
    assert (d.width, d.height) == (800, 480)
    assert d.pixels.shape[:2] == (480 // factor, 800 // factor)
    assert d.scale == pytest.approx(1 / factor)
    assert d.scale_xy == pytest.approx((1 / factor, 1 / factor))


@pytest.mark.parametrize("orientation", [1, 2, 3, 6, 8])
def test_reduced_decode_maps_back_exactly_when_a_side_is_not_a_multiple(jpeg_with_orientation,
                                                                       orientation: int) -> None:
    """A 1283 x 967 image at 1/8 has a partial last block; on an axis that EXIF orientation
    reverses it comes first, so x * 8 put every point up to 7 px off there (a stripe at 1204 came
    back at 1199 before session 39). Such an image is reduced only by a factor that divides both
    sides (here none): stripes come back where the full decode has them."""
    img = np.zeros((967, 1283, 3), np.uint8)
    img[:, 1200:1208] = 255
    img[896:904, :] = 255
    jpeg = _jpeg(img) if orientation == 1 else jpeg_with_orientation(_jpeg(img), orientation)

    def stripes(d) -> tuple[float, float]:
        g = d.pixels[..., 0].astype(float)
        sx, sy = d.scale_xy
        return (np.argmax(g.mean(0)) + 0.5) / sx, (np.argmax(g.mean(1)) + 0.5) / sy

    full, reduced = decode_image(jpeg), decode_image(jpeg, max_side_hint=160)
    assert (reduced.width, reduced.height) == (full.width, full.height)
    (fx, fy), (rx, ry) = stripes(full), stripes(reduced)
    assert abs(rx - fx) <= 1 and abs(ry - fy) <= 1
    even = decode_image(_jpeg(img[:960, :1280]), max_side_hint=160)  # multiples of 8: still 1/8
    assert even.reduce == 8 and even.pixels.shape[:2] == (120, 160)


def _exif_long_orientation(orientation: int) -> bytes:
    """A little-endian EXIF APP1 whose Orientation is stored as LONG (type 4): OpenCV honours
    it, this module's reader (SHORT only, as the standard says) does not."""
    entry = struct.pack("<HHII", 0x0112, 4, 1, orientation)
    tiff = b"II\x2a\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def test_reduced_decode_turns_the_size_as_the_pixels_were_turned() -> None:
    """The full and the reduced decode of one file agree on the original size, whichever EXIF
    reading OpenCV applied: a size turned the other way stretched x by 0.75 and y by 1.33."""
    jpeg = _jpeg(cv2.resize(_photo(), (2400, 1600)))
    odd = jpeg[:2] + _exif_long_orientation(6) + jpeg[2:]
    full, reduced = decode_image(odd), decode_image(odd, max_side_hint=320)
    assert (reduced.width, reduced.height) == (full.width, full.height) == full.pixels.shape[1::-1]
    assert reduced.pixels.shape[1] * 4 == reduced.width


def test_grayscale_png_and_jpeg_become_three_channels() -> None:
    gray = cv2.cvtColor(_photo(), cv2.COLOR_BGR2GRAY)
    for data in (_png(gray), _jpeg(gray)):
        d = decode_image(data)
        assert d.pixels.shape == (120, 200, 3)
        assert np.abs(d.pixels[..., 0].astype(int) - gray).max() <= 4
        np.testing.assert_array_equal(d.pixels[..., 0], d.pixels[..., 2])


@pytest.mark.parametrize("shift_in", [8, 4, 0])
def test_sixteen_bit_png_scaled_by_actual_depth(shift_in: int) -> None:
    img = _photo()
    img[0, 0] = 255  # the full 8-bit range is used, so the bit depth is unambiguous
    data = _png(img.astype(np.uint16) << shift_in)  # 16-bit, 12-bit in 16, 8-bit in 16
    d = decode_image(data)
    np.testing.assert_array_equal(d.pixels, img)


def test_sixteen_bit_gray_and_rgba() -> None:
    gray16 = (cv2.cvtColor(_photo(), cv2.COLOR_BGR2GRAY).astype(np.uint16) << 8) | 0xFF
    d = decode_image(_png(gray16))
    assert d.pixels.shape == (120, 200, 3)
    np.testing.assert_array_equal(d.pixels[..., 1], gray16 >> 8)
    rgba = np.dstack([_photo(), np.full((120, 200), 7, np.uint8)])
    d = decode_image(_png(rgba))
    np.testing.assert_array_equal(d.pixels, _photo())


def test_to_uint8_float() -> None:
    np.testing.assert_array_equal(to_uint8(np.array([[0.0, 0.5, 1.0]], np.float32)), [[0, 128, 255]])
    np.testing.assert_array_equal(to_uint8(np.array([[0.0, 50.0, 100.0]], np.float32)), [[0, 128, 255]])


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"hello, this is not an image at all", "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "corrupt PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "JPEG"),
    ],
)
def test_refused_bytes(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_truncated_files_are_refused() -> None:
    jpeg, png = _jpeg(_photo()), _png(_photo())
    with pytest.raises(ImageError, match="truncated JPEG"):
        decode_image(jpeg[: len(jpeg) * 2 // 3])
    with pytest.raises(ImageError, match="truncated PNG"):
        decode_image(png[: len(png) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_decompression_bomb_refused_from_header() -> None:
    # Only the header exists: decoding would fail differently, so the size check came first.
    with pytest.raises(ImageTooLarge, match="100000x100000 = 10000000000 pixels, more than the limit"):
        decode_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLarge, match="more than the limit of 1000"):
        decode_image(_jpeg(_photo()), max_pixels=1000)
    with pytest.raises(ImageTooLarge, match="more than the limit"):
        decode_image(cv2.imencode(".bmp", _photo())[1].tobytes(), max_pixels=1000)
    with pytest.raises(ImageTooLarge, match="more than the limit"):
        decode_image(cv2.imencode(".tiff", _photo())[1].tobytes(), max_pixels=1000)


def _tiff_header_only(width: int, height: int, order: str, typ: int, big: bool = False) -> bytes:
    """A TIFF (classic or BigTIFF) whose first directory declares ``width`` x ``height`` (tags of
    field type ``typ``) and holds no pixel data at all."""
    e = "<" if order == "II" else ">"
    code = {3: "H", 4: "I", 16: "Q"}[typ]
    entries = [(254, 4, 0), (256, typ, width), (257, typ, height), (258, 3, 8)]
    if big:
        out = order.encode() + struct.pack(e + "HHHQ", 43, 8, 0, 16) + struct.pack(e + "Q", len(entries))
        for tag, t, v in entries:
            c = code if t == typ else {3: "H", 4: "I"}[t]
            out += struct.pack(e + "HHQ", tag, t, 1) + struct.pack(e + c, v).ljust(8, b"\0")
        return out + struct.pack(e + "Q", 0)
    out = order.encode() + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", len(entries))
    for tag, t, v in entries:
        c = code if t == typ else {3: "H", 4: "I"}[t]
        out += struct.pack(e + "HHI", tag, t, 1) + struct.pack(e + c, v).ljust(4, b"\0")
    return out + struct.pack(e + "I", 0)


@pytest.mark.parametrize("order", ["II", "MM"])
@pytest.mark.parametrize("typ,big", [(3, False), (4, False), (3, True), (4, True), (16, True)])
def test_tiff_bomb_refused_from_header(order: str, typ: int, big: bool) -> None:
    # Only the header exists: the decoder would fail differently, so the size check came first.
    side = 60_000 if typ == 3 else 100_000
    with pytest.raises(ImageTooLarge, match=f"{side}x{side + 1} = {side * (side + 1)} pixels, more than the limit"):
        decode_image(_tiff_header_only(side, side + 1, order, typ, big), max_pixels=4_000_000)


def test_small_compressed_tiff_and_webp_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MB deflated TIFF of 8000x8000 pixels was decoded (64 MB, then 192 MB as BGR) before
    the limit was checked, and WebP likewise: the refusal must come without calling the decoder."""
    tiff = cv2.imencode(".tiff", np.zeros((3000, 2000), np.uint8))[1].tobytes()
    blank = np.zeros((3000, 2000, 3), np.uint8)
    webp_lossless = cv2.imencode(".webp", blank, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    webp_lossy = cv2.imencode(".webp", blank, [cv2.IMWRITE_WEBP_QUALITY, 80])[1].tobytes()
    assert webp_lossless[12:16] == b"VP8L" and webp_lossy[12:16] == b"VP8 "

    def no_decoding(*args: object) -> None:
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    for data in (tiff, webp_lossless, webp_lossy):
        assert len(data) < 200_000
        with pytest.raises(ImageTooLarge, match="2000x3000 = 6000000 pixels, more than the limit of 1000000"):
            decode_image(data, max_pixels=1_000_000)


def test_webp_extended_header_bomb_refused() -> None:
    canvas = (1 << 24) - 1  # VP8X stores width - 1 and height - 1 in 24 bits each
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + canvas.to_bytes(3, "little") + (9999).to_bytes(3, "little")
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    with pytest.raises(ImageTooLarge, match=f"{canvas + 1}x10000 = "):
        decode_image(data)


@pytest.mark.parametrize("ext,params", [(".tiff", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
                                        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80])])
def test_tiff_and_webp_within_the_limit_still_decode(ext: str, params: list[int]) -> None:
    data = cv2.imencode(ext, _photo(), params)[1].tobytes()
    d = decode_image(data, max_pixels=200 * 120)
    assert (d.width, d.height, d.pixels.shape) == (200, 120, (120, 200, 3))
    with pytest.raises(ImageTooLarge, match="200x120 = 24000 pixels"):
        decode_image(data, max_pixels=200 * 120 - 1)
    big_endian = _tiff_header_only(200, 120, "MM", 4)  # header only: the size is read, the decode then fails
    with pytest.raises(ImageError, match="not a decodable image|cannot decode"):
        decode_image(big_endian, max_pixels=200 * 120)


@pytest.mark.parametrize("data", [b"II*\x00\x08\x00\x00\x00\x00\x00", b"MM\x00*\x00\x00\xff\xff",
                                  b"RIFF\x00\x00\x00\x00WEBPVP8 \x00", b"RIFF\x00\x00\x00\x00WEBPJUNK"])
def test_tiff_and_webp_without_a_size_are_corrupt(data: bytes) -> None:
    with pytest.raises(ImageError, match="corrupt or truncated (TIFF|WebP)"):
        decode_image(data)


def test_byte_limit_is_image_too_large() -> None:
    data = _jpeg(_photo())
    with pytest.raises(ImageTooLarge, match=f"image is {len(data)} bytes, more than the limit of 100"):
        decode_image(data, max_bytes=100)
    assert decode_image(data, max_bytes=len(data)).width > 0
    assert not isinstance(ImageError("corrupt"), ImageTooLarge) and issubclass(ImageTooLarge, ImageError)


def test_read_image(tmp_path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png(_photo()))
    assert read_image(path).pixels.shape == (120, 200, 3)
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageError, match="bad.jpg: empty"):
        read_image(bad)


def test_from_array_and_validation() -> None:
    d = DecodedImage.from_array(np.zeros((5, 7), np.uint8))
    assert (d.width, d.height, d.pixels.shape) == (7, 5, (5, 7, 3))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        DecodedImage(np.zeros((5, 7), np.uint8), 7, 5)


_OTHER_FORMATS = [".pgm", ".ppm", ".pbm", ".pam", ".pfm", ".sr", ".hdr", ".jp2", ".gif", ".avif"]


@pytest.mark.parametrize("ext", _OTHER_FORMATS)
def test_every_other_format_opencv_reads_is_sized_from_its_header(ext: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PNM, PFM, Sun raster, HDR, JPEG 2000, GIF and AVIF were decoded in full before the pixel
    limit was checked: a small PGM that declares a huge image reached the decoder."""
    if not cv2.haveImageWriter("x" + ext):
        pytest.skip(f"this OpenCV has no {ext} codec (GIF and AVIF from 4.12, which needs numpy 2)")
    photo = _photo()  # 200 x 120
    image = photo[..., 0] if ext in (".pgm", ".pbm") else photo
    data = cv2.imencode(ext, image.astype(np.float32) / 255 if ext in (".pfm", ".hdr") else image)[1].tobytes()
    d = decode_image(data)
    assert (d.width, d.height, d.pixels.shape) == (200, 120, (120, 200, 3))

    def no_decoding(*args: object) -> None:
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ImageTooLarge, match="200x120 = 24000 pixels, more than the limit of 23999"):
        decode_image(data, max_pixels=200 * 120 - 1)


@pytest.mark.parametrize("data", [b"P5\n# a comment\n100000 100000\n255\n", b"P7\nWIDTH 100000\nHEIGHT 100000\nENDHDR\n",
                                  b"PF\n100000 100000\n-1\n", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 100000 +X 100000\n",
                                  b"\x59\xa6\x6a\x95" + struct.pack(">II", 100_000, 100_000),
                                  b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">IIII", 100_000, 100_000, 0, 0)])
def test_header_only_bombs_of_other_formats_are_refused(data: bytes) -> None:
    with pytest.raises(ImageTooLarge, match="100000x100000 = 10000000000 pixels"):
        decode_image(data)


def test_bytes_of_no_known_format_are_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ImageError, match="not a decodable image .* expected JPEG, PNG"):
        decode_image(b"\x00\x01\x02\x03 neither an image nor anything")
    with pytest.raises(ImageError, match="corrupt PNM header"):
        decode_image(b"P5\nwide tall\n255\n")
