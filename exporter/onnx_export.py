"""Export ultralytics checkpoints (.pt) to ONNX in the layout the engine decodes.

The ONNX file keeps ultralytics' raw head (``nms=False``): detect ``[N, 4+C, A]``, pose
``[N, 4+1+3K, A]`` (see ``service.postprocess``), and ultralytics' ``metadata_props``
(``names``, ``kpt_shape``, ``imgsz``, ... as Python literals), which ``bundle_build`` reads.
torch and ultralytics are imported inside the functions only.
"""
from __future__ import annotations

import ast
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Opset 17 runs on every onnxruntime >= 1.13 and on TensorRT 8.5+, which matters for the
# appliances that run older runtimes than the training machine.
DEFAULT_OPSET = 17


def ultralytics_env(config_dir: Path | None = None) -> dict[str, str]:
    """Environment for running ultralytics offline: private config dir, font already present.

    Sets (only where unset) ``YOLO_OFFLINE``, ``YOLO_CONFIG_DIR`` and ``MPLCONFIGDIR``, and copies
    matplotlib's DejaVu Sans to ``$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf`` so nothing is downloaded.
    Call before importing ultralytics. Returns the values in effect.
    """
    base = Path(config_dir) if config_dir else Path(tempfile.gettempdir()) / f"annotator-yolo-{os.getuid()}"
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(base))
    os.environ.setdefault("MPLCONFIGDIR", str(base / "mpl"))
    font = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        try:
            import matplotlib

            src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
            font.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, font)
        except (ImportError, OSError) as exc:  # training may then try the network; export does not
            log.warning("could not place a TTF at %s: %s", font, exc)
    Path(os.environ["MPLCONFIGDIR"]).mkdir(parents=True, exist_ok=True)
    return {k: os.environ[k] for k in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "MPLCONFIGDIR")}


def export_onnx(
    weights: Path, out_path: Path, imgsz: int, dynamic_batch: bool = True, opset: int | None = DEFAULT_OPSET
) -> Path:
    """Export ``weights`` (.pt) to ONNX at ``imgsz`` x ``imgsz`` and move it to ``out_path``.

    The checkpoint is copied into a temporary folder first, because ultralytics writes the
    ONNX file next to the weights (which may sit in a read-only or shared place).
    ``dynamic_batch`` makes the batch axis dynamic (ultralytics ``dynamic=True``, which also
    makes H and W dynamic; the bundle still declares ``imgsz``). Returns ``out_path``.
    """
    ultralytics_env()
    from ultralytics import YOLO  # heavy: only here

    weights, out_path = Path(weights), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as tmp:
        local = Path(tmp) / weights.name
        shutil.copyfile(weights, local)
        produced = YOLO(str(local)).export(
            format="onnx", imgsz=int(imgsz), dynamic=bool(dynamic_batch), simplify=True, nms=False,
            opset=opset, batch=1, device="cpu",
        )
        tmp_out = out_path.with_name(f".{out_path.name}.tmp")
        shutil.copyfile(produced, tmp_out)
        os.replace(tmp_out, out_path)
    log.info("exported %s -> %s (imgsz %d, dynamic batch %s)", weights, out_path, imgsz, dynamic_batch)
    return out_path


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """ultralytics' ``metadata_props`` of an ONNX file, values parsed as Python literals.

    Values that are not literals stay strings. Uses onnxruntime only (no onnx, no torch).
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = sess.get_modelmeta().custom_metadata_map
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            meta[key] = value
    return meta
