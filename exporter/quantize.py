"""Int8 copies of a bundle's models for faster CPU inference (``annotator quantize``).

Static post-training quantization with onnxruntime (QDQ format: ``QuantizeLinear`` /
``DequantizeLinear`` pairs that onnxruntime fuses into integer kernels when it loads the model):
weights int8 per output channel, activations uint8 with ranges observed on calibration images
that are decoded and letterboxed exactly as the daemon's engine does (``service.imageio``,
``service.geometry``), so the ranges are those the daemon will meet. The daemon needs nothing
new: an int8 bundle is an ONNX bundle.

What stays float32, because 8 bits there move the labels (measured on the demo bundle, 300
held-out images; README "Int8 bundles"):

- the head module's post-processing (the anchor grid, DFL, sigmoid, the key-point decode, the
  concatenations: ultralytics names the head ``/model.<last>/``). Quantizing every node turned
  the pose model's person confidences by 0.78 on average; with these float, by 0.017;
- every convolution that no activation follows: the final prediction convolutions of the box,
  class and key-point branches (and a few projections of the attention block);
- the pose head's key-point branch (``cv4``): quantized, OKS AP fell 0.802 -> 0.785 for 1.34x;
  float, 0.799 for 1.26x.

``reduce_range`` (7-bit weights) is on: x86 CPUs without VNNI (AVX2 only, like the development
machine) saturate in the u8 x s8 multiply otherwise; on VNNI CPUs it costs a little precision.

The copy gets its own id and a lineage note; its thresholds and confidence calibration are the
source's, and so are its training checkpoints (``weights/``, float32), so that ``annotator train
--init current`` goes on from an int8 bundle in use as from its source. The int8 models'
confidences move a little, so ``annotator calibrate`` on labelled images of the user's cameras
refits them (README, "Int8 bundles"). ``annotator train --int8`` makes the copy of every bundle
it trains (its validation images give the ranges), so that the loop keeps the faster models.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from service.bundle import Bundle

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm")
DEFAULT_COUNT = 200  # calibration images per model: enough for min/max ranges to settle
_MODULE = re.compile(r"^/model\.(\d+)/")


def calibration_files(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Up to ``count`` image files under ``folder`` (recursively), a seeded sample when there are more."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) > count:
        keep = np.random.default_rng(seed).choice(len(files), size=count, replace=False)
        files = [files[i] for i in sorted(keep)]
    return files


def excluded_nodes(model: "object") -> list[str]:
    """Names of the nodes left float32 (module doc): in the last ``/model.N/`` module (the
    head) every node but the activated convolutions of its box and class branches, and
    everywhere every convolution that no ``Sigmoid`` (SiLU) reads."""
    graph = model.graph  # type: ignore[attr-defined]
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    modules = [int(m.group(1)) for m in (_MODULE.match(n.name) for n in graph.node) if m]
    head = f"/model.{max(modules)}/" if modules else None

    def activated(node: "object") -> bool:
        return node.op_type == "Conv" and "Sigmoid" in readers.get(node.output[0], [])  # type: ignore[attr-defined]

    def in_head(node: "object") -> bool:
        return head is not None and node.name.startswith(head)  # type: ignore[attr-defined]

    return [n.name for n in graph.node
            if not activated(n) and (n.op_type == "Conv" or in_head(n)) or in_head(n) and "/cv4" in n.name]


def _decodable(files: Sequence[Path]) -> list[Path]:
    """The files that decode (each other one named once in the log)."""
    from service.errors import ImageError
    from service.imageio import decode_image

    out = []
    for path in files:
        try:
            decode_image(path.read_bytes())
        except (ImageError, OSError) as exc:
            log.warning("calibration image %s skipped: %s", path, exc)
            continue
        out.append(path)
    return out


def _tensors(files: Sequence[Path], size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Each calibration file as the engine feeds it (square letterbox of the model's input)."""
    from service.errors import ImageError
    from service.geometry import letterbox, to_tensor
    from service.imageio import decode_image

    for path in files:
        try:
            decoded = decode_image(path.read_bytes())
        except (ImageError, OSError) as exc:
            log.warning("calibration image %s skipped: %s", path, exc)
            continue
        boxed, _ = letterbox(decoded.pixels, size)
        yield to_tensor([boxed])


def quantize_model(src: Path, dst: Path, files: Sequence[Path], size: tuple[int, int],
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Write an int8 (QDQ) copy of the ONNX model ``src`` to ``dst``; returns how many
    calibration images were used. Raises ``ValueError`` when none of ``files`` decodes."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # The fp16-stored weights (``annotator compact``) are folded back to float32 here.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        input_name = model.graph.input[0].name
        # a model exported with a fixed batch (for the GPU's padded batches) gets that many copies
        batch = max(1, model.graph.input[0].type.tensor_type.shape.dim[0].dim_value)
        used = 0

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.tensors = _tensors(files, size)

            def get_next(self) -> dict[str, np.ndarray] | None:
                nonlocal used
                tensor = next(self.tensors, None)
                if tensor is None:
                    return None
                used += 1
                if progress is not None and used < len(files):
                    progress(used, len(files))
                return {input_name: np.repeat(tensor, batch, axis=0) if batch > 1 else tensor}

        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded_nodes(model),
                        # ranges merged every 16 images: all of them held at once took GBs
                        extra_options={"CalibMaxIntermediateOutputs": 16})
    if progress is not None:
        progress(len(files), len(files))  # the bar ends even when some images did not decode
    if used == 0:
        dst.unlink(missing_ok=True)
        raise ValueError("no calibration image could be decoded")
    # quantize_static drops the ultralytics metadata the engine and ``annotator bundle`` read.
    src_meta = onnx.load(str(src), load_external_data=False).metadata_props
    out = onnx.load(str(dst))
    del out.metadata_props[:]
    out.metadata_props.extend(src_meta)
    onnx.save(out, str(dst))
    return used


def quantize_bundle(src: Path, dst: Path, images: Path, count: int = DEFAULT_COUNT, seed: int = 0,
                    progress: Callable[[str], Callable[[int, int], None]] | None = None) -> "Bundle":
    """Copy the bundle at ``src`` to ``dst`` with int8 models (module doc); returns the verified copy.

    ``images``: a folder of images like those the daemon will label (a capture's or the
    synthetic set's ``images/``); up to ``count`` of them calibrate every model."""
    from service.bundle import ModelEntry, load_bundle, new_bundle_id, write_bundle
    from service.durable import fsync_dir, fsync_tree

    bundle = load_bundle(src)
    files = _decodable(calibration_files(images, count, seed))
    if not files:
        raise ValueError(f"{images}: no image ({', '.join(IMAGE_SUFFIXES)}) that decodes, to calibrate the int8 "
                         "ranges on")
    if dst.resolve() == Path(src).resolve():
        raise ValueError(f"{dst}: the copy must go to another folder than the bundle it is made of")
    if dst.exists() and not (dst / "bundle.json").is_file() and any(dst.iterdir()):
        raise ValueError(f"{dst}: exists and is not a bundle; give a new folder")
    # Built beside ``dst`` and renamed into place once it loads: a failure or a kill half-way
    # leaves an earlier bundle at ``dst`` as it was (a daemon's engine.bundle may name it).
    for left in dst.parent.glob(f".{dst.name}.quantize-*"):  # what a killed run left
        shutil.rmtree(left, ignore_errors=True)
    work = dst.parent / f".{dst.name}.quantize-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    try:
        models = {}
        for role, entry in bundle.models.items():
            quantize_model(bundle.model_path(role), work / entry.file, files, entry.imgsz,
                           progress(role) if progress is not None else None)
            models[role] = ModelEntry(**{**entry.__dict__, "sha256": ""})
        lineage = {**bundle.lineage, "parent_bundle": bundle.id,
                   "notes": list(bundle.lineage.get("notes", [])) + [
                       f"int8 (QDQ, static, per-channel) copy of bundle {bundle.id}, ranges from {len(files)} "
                       f"images of {images}; thresholds and confidence calibration are the parent's"]}
        if (Path(src) / "weights").is_dir():  # the training checkpoints: `annotator train --init` goes on from them
            shutil.copytree(Path(src) / "weights", work / "weights")
        write_bundle(dataclasses.replace(bundle, path=work, id=new_bundle_id(bundle.id), models=models,
                                         lineage=lineage))
        load_bundle(work)
        fsync_tree(work)
        old = dst.parent / f".{dst.name}.quantize-old-{secrets.token_hex(4)}" if dst.exists() else None
        if old is not None:
            os.replace(dst, old)
        os.replace(work, dst)
        fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return load_bundle(dst)
