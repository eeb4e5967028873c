"""Fit a bundle's confidence calibration (``service.confcal``) on labelled validation images.

Two small ReLU perceptrons are fitted with numpy alone (Adam on mini-batches, L2, early stopping
on a fifth of the images held out): ``in_view`` on every point of a matched ground-truth person
(target: labelled, i.e. visible or occluded), ``visible`` on the labelled points of persons the
visible-only model also found (target: visible). Inputs are ``service.confcal.point_features``
of the *uncalibrated* engine output, so the daemon computes exactly the same thing.

Each calibrator is the average (in logit) of three perceptrons fitted from different seeds and
held-out images, stored as one wider perceptron (``Mlp.average``): on the demo models, +0.002
visibility accuracy over one, for three times the (small) fitting and daemon cost.

Mini-batches (2,048 points) instead of the full batch: the same held-out loss in a fraction of
the time, so calibrating on thousands of images (190,000 points for 4,000) takes seconds per
perceptron, not tens of minutes.

Runtime + numpy only: no torch.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.confcal import FEATURES, FEATURES_V1, ConfidenceCalibration, Mlp, feature_count

from .calibrate import VisibilitySamples

log = logging.getLogger(__name__)

HIDDEN = (64, 64)
MIN_POINTS = 2000  # fewer matched points than this: no calibration (the thresholds alone)
# Fewer matched points than this: the per-point layout (cabin-v1) instead of the person context
# (cabin-v2), whose 4 K more inputs overfit small sets. Demo models, 300 test images: fitted on
# 100 / 200 / 1,000 images (~5k / 10k / 47k points) v2 scores -0.003 / -0.001 / +0.011 against v1.
CONTEXT_MIN_POINTS = 20000


@dataclass(frozen=True)
class FitSettings:
    hidden: tuple[int, ...] = HIDDEN
    l2: float = 1e-4
    lr: float = 3e-3
    batch: int = 2048  # points per step (all of them when fewer)
    max_steps: int = 4000
    check_every: int = 100  # steps between held-out losses
    patience: int = 6  # checks without improvement of the held-out loss
    holdout: float = 0.2  # share of images for early stopping
    seed: int = 0
    members: int = 3  # perceptrons per calibrator (seeds seed, seed + 1, ...), averaged in logit


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def fit_mlp(x: np.ndarray, y: np.ndarray, groups: np.ndarray, settings: FitSettings = FitSettings()) -> tuple[Mlp, dict[str, Any]]:
    """A ``Mlp`` for ``P(y = 1 | x)``: ``x [N, F]``, ``y [N]`` in {0, 1}, ``groups [N]`` (image ids:
    the held-out part for early stopping is whole images). Returns it with a small report."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(settings.seed)
    uniq = np.unique(groups)
    held = set(rng.choice(uniq, size=max(1, int(round(len(uniq) * settings.holdout))), replace=False).tolist()) \
        if len(uniq) > 1 else set()
    hold = np.isin(groups, list(held))
    tr = ~hold if hold.any() and (~hold).any() else np.ones(len(y), bool)
    mean = x[tr].mean(0)
    scale = x[tr].std(0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    z = (x - mean) / scale
    sizes = [x.shape[1], *settings.hidden, 1]
    ws = [rng.normal(0, np.sqrt(2.0 / a), (a, b)) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [np.zeros(b) for b in sizes[1:]]
    params = ws + bs
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]

    def forward(inp: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        acts = [inp]
        h = inp
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = h @ w + b
            if i < len(ws) - 1:
                h = np.maximum(h, 0.0)
            acts.append(h)
        return h[:, 0], acts

    zt, yt = z[tr], y[tr]
    ev = hold if hold.any() else tr
    batch = min(settings.batch, len(yt))
    order = rng.permutation(len(yt))
    at = 0
    best = (np.inf, [p.copy() for p in params], 0)
    since = 0
    step = 0
    for step in range(1, settings.max_steps + 1):
        if at + batch > len(order):  # a new epoch: a new order
            order, at = rng.permutation(len(yt)), 0
        idx = order[at:at + batch]
        at += batch
        out, acts = forward(zt[idx])
        grad = (1.0 / (1.0 + np.exp(-np.clip(out, -60, 60))) - yt[idx])[:, None] / len(idx)
        gws, gbs = [None] * len(ws), [None] * len(bs)
        for i in range(len(ws) - 1, -1, -1):
            gws[i] = acts[i].T @ grad + settings.l2 * ws[i]
            gbs[i] = grad.sum(0)
            if i > 0:
                grad = (grad @ ws[i].T) * (acts[i] > 0)
        for j, (p, g) in enumerate(zip(params, gws + gbs)):
            m1[j] = 0.9 * m1[j] + 0.1 * g
            m2[j] = 0.999 * m2[j] + 0.001 * g * g
            p -= settings.lr * (m1[j] / (1 - 0.9 ** step)) / (np.sqrt(m2[j] / (1 - 0.999 ** step)) + 1e-8)
        if step % settings.check_every == 0:
            loss = _bce(forward(z[ev])[0], y[ev])
            if loss < best[0] - 1e-5:
                best, since = (loss, [p.copy() for p in params], step), 0
            else:
                since += 1
                if since >= settings.patience:
                    break
    final = best[1] if np.isfinite(best[0]) else params
    n = len(ws)
    mlp = Mlp(mean, scale, tuple(final[:n]), tuple(final[n:]))
    report = {"points": int(len(y)), "held_out_points": int(hold.sum()), "steps": step, "best_step": best[2],
              "held_out_loss": None if not np.isfinite(best[0]) else round(best[0], 5), "positives": float(y.mean())}
    return mlp, report


def fit_ensemble(x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                 settings: FitSettings = FitSettings()) -> tuple[Mlp, dict[str, Any]]:
    """``settings.members`` perceptrons (``fit_mlp`` with seeds ``seed``, ``seed + 1``, ...) as
    one ``Mlp.average``; the report is the first member's with every member's held-out loss."""
    fits = [fit_mlp(x, y, groups, dataclasses.replace(settings, seed=settings.seed + i))
            for i in range(max(1, settings.members))]
    report = {**fits[0][1], "members": len(fits), "held_out_losses": [r["held_out_loss"] for _, r in fits]}
    return Mlp.average([m for m, _ in fits]), report


def fit_confidence_calibration(samples: VisibilitySamples, settings: FitSettings = FitSettings(),
                               min_points: int = MIN_POINTS) -> tuple[ConfidenceCalibration | None, dict[str, Any]]:
    """Fit both calibrators on ``samples`` (collected with ``features=True`` from an
    uncalibrated engine). Returns (None, reason) with fewer than ``min_points`` matched points."""
    if samples.features is None or samples.vis_matched is None or samples.image_id is None:
        raise ValueError("samples: collect them with features=True")
    sel = samples.matched
    n = int(np.count_nonzero(sel))
    if n < min_points:
        return None, {"skipped": f"{n} matched points, fewer than {min_points}"}
    x, gt, img = samples.features[sel], samples.gt_flag[sel], samples.image_id[sel]
    layout = samples.layout
    if layout == FEATURES and n < CONTEXT_MIN_POINTS:  # v1's columns are v2's first ones
        k = int(samples.kpt_index.max()) + 1
        layout, x = FEATURES_V1, x[:, :feature_count(k, FEATURES_V1)]
        log.info("confidence calibration: %d matched points (< %d): per-point features (%s) only", n,
                 CONTEXT_MIN_POINTS, layout)
    in_view, rep_in = fit_ensemble(x, (gt > 0).astype(float), img, settings)
    lab = (gt > 0) & samples.vis_matched[sel]
    visible, rep_vis = fit_ensemble(x[lab], (gt[lab] == 2).astype(float), img[lab], settings)
    images = len(np.unique(img))
    each = f"the mean logit of {settings.members} " if settings.members > 1 else ""
    method = (f"two calibrators, each {each}ReLU perceptron(s) {list(settings.hidden)} on {layout} features, "
              f"fitted with numpy on "
              f"{n} matched points of {images} labelled images (early stopping on {settings.holdout:.0%} of the images)")
    log.info("confidence calibration: %s", method)
    return (ConfidenceCalibration(in_view, visible, layout, method),
            {"in_view": rep_in, "visible": rep_vis, "images": images, "features": layout})


def calibrated_samples(samples: VisibilitySamples, cal: ConfidenceCalibration) -> VisibilitySamples:
    """The samples with the matched rows' confidences replaced by the calibrated ones (the
    matching does not depend on confidences, so it stays as it was)."""
    assert samples.features is not None and samples.vis_matched is not None
    m, v = samples.main_conf.copy(), samples.visible_conf.copy()
    sel = samples.matched
    if sel.any():
        x = samples.features[sel][:, :cal.in_view.inputs]  # a v1 calibration takes v2's first columns
        cm, cv = cal.apply(x[:, None, :], samples.vis_matched[sel])
        m[sel], v[sel] = cm[:, 0], cv[:, 0]
    return VisibilitySamples(samples.gt_flag, m, v, samples.kpt_index, samples.matched, samples.pred_flag,
                             samples.features, samples.vis_matched, samples.image_id, samples.layout)
