"""Ground Truth Lambda handlers for the custom key-point task (standard library only).

This module is deployable on its own (zip this one file as the Lambda code); it imports
nothing from the appliance, and boto3 (which the Lambda runtime provides) only when the
consolidation Lambda reads its payload. Formats are in ``shared/GROUND_TRUTH.md``.

- ``pre_annotation_handler(event, context)``: turns one input-manifest line (``dataObject``,
  written by ``sync.groundtruth.manifest_line``) into the ``taskInput`` that
  ``sync/templates/keypoints.liquid.html`` renders: box labels ``head`` and ``person N``, point
  labels ``N name`` (person number, then the key-point name), the pre-annotated boxes and
  points (outside points are not placed), and one visibility row per person and point.
- ``post_annotation_handler(event, context)``: reads the workers' answers from the payload
  file (``s3Uri``, with boto3; tests pass ``s3_reader``) and returns one consolidated
  annotation per object in the custom output format below (the first worker's answer is
  used; jobs here have one worker per object).

Custom output format (the value under the job's label attribute name)::

    {"image_size": {"width": W, "height": H},
     "heads": [[x1, y1, x2, y2], ...],
     "persons": [{"number": 1, "box": [x1, y1, x2, y2],
                  "keypoints": [{"label": "nose", "x": 12.0, "y": 30.5, "visibility": "visible"}]}],
     "workerId": "...", "workerCount": 1, "problems": ["..."]}

Pixels of the image as the worker saw it; points that were not placed and are not marked
visible/occluded are left out (they are ``outside``). A placed point is in the picture: its
radio decides only visible or occluded (the template pre-checks ``outside`` for every point
the model put outside and for the spare person's, so a worker who places such a point and
leaves the radio alone must not lose it).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

VISIBILITY_STATES = ("visible", "occluded", "outside")
SPARE_PERSONS = 1
BOX_FIELD, POINT_FIELD = "boxes", "points"
_VIS_KEY = re.compile(r"^vis-(\d+)-([A-Za-z0-9_]+)(?:-(visible|occluded|outside))?$")


def _person_label(number: int) -> str:
    return f"person {number}"


def _point_label(number: int, name: str) -> str:
    return f"{number} {name}"


def task_input(line: Mapping[str, Any], spare_persons: int = SPARE_PERSONS) -> dict[str, Any]:
    """The ``taskInput`` for one manifest line (see the module docstring); pixels throughout."""
    kpts = line.get("auto-kpts") or {}
    head = line.get("auto-head") or {}
    size = kpts.get("image_size") or (head.get("image_size") or [{}])[0]
    names = list(kpts.get("keypoint_names") or [])
    persons_in = list(kpts.get("persons") or [])
    for p in persons_in:
        for k in p.get("keypoints", []):
            if k["label"] not in names:
                names.append(k["label"])
    boxes = [{"label": "head", "left": a["left"], "top": a["top"], "width": a["width"], "height": a["height"]}
             for a in head.get("annotations", [])]
    points: list[dict[str, Any]] = []
    persons: list[dict[str, Any]] = []
    for number, p in enumerate(persons_in, start=1):
        # Each edge rounded: rounding left and width apart put the right edge 1 px off.
        x1, y1, x2, y2 = (round(float(v)) for v in p["box"])
        boxes.append({"label": _person_label(number), "left": x1, "top": y1, "width": x2 - x1, "height": y2 - y1})
        given = {k["label"]: k for k in p.get("keypoints", [])}
        rows = []
        for name in names:
            k = given.get(name)
            visibility = k["visibility"] if k else "outside"
            if k and visibility != "outside":
                points.append({"label": _point_label(number, name), "x": k["x"], "y": k["y"]})
            rows.append({"name": name, "label": _point_label(number, name), "visibility": visibility})
        persons.append({"number": number, "label": _person_label(number), "points": rows})
    for number in range(len(persons_in) + 1, len(persons_in) + 1 + spare_persons):
        persons.append({"number": number, "label": _person_label(number),
                        "points": [{"name": n, "label": _point_label(number, n), "visibility": "outside"}
                                   for n in names]})
    return {
        "taskObject": line["source-ref"], "imageId": line.get("image-id"),
        "bundle": line.get("edge-bundle"), "score": line.get("edge-score"),
        "reasons": list(line.get("edge-reasons") or []), "audit": bool(line.get("edge-audit", False)),
        "width": size.get("width"), "height": size.get("height"), "keypointNames": names,
        "boxLabels": ["head"] + [p["label"] for p in persons],
        "pointLabels": [r["label"] for p in persons for r in p["points"]],
        "initialBoxes": boxes, "initialPoints": points, "persons": persons,
    }


def pre_annotation_handler(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """Ground Truth pre-annotation Lambda: ``{"dataObject": line}`` -> ``{"taskInput", ...}``."""
    line = event["dataObject"]
    if "source-ref" not in line:
        raise ValueError(f"pre-annotation: dataObject has no 'source-ref'; keys are {sorted(line)}")
    return {"taskInput": task_input(line), "isHumanAnnotationRequired": True}


def _visibility_choices(content: Mapping[str, Any]) -> dict[tuple[int, str], str]:
    """(person number, name) -> state, from radio buttons ``vis-N-name-state: {"on": true}``
    (crowd-radio-group output) or a plain ``vis-N-name: "state"`` field."""
    out: dict[tuple[int, str], str] = {}
    for key, value in content.items():
        m = _VIS_KEY.match(key)
        if not m:
            continue
        number, name, state = int(m.group(1)), m.group(2), m.group(3)
        if state is None:
            if isinstance(value, Mapping):
                value = value.get("label", value.get("value"))
            if value in VISIBILITY_STATES:
                out[(number, name)] = str(value)
        elif isinstance(value, Mapping) and value.get("on") or value is True:
            out[(number, name)] = state
    return out


def consolidate(content: Mapping[str, Any]) -> dict[str, Any]:
    """One worker's form answer -> the custom output format (module docstring)."""
    problems: list[str] = []
    box_out = content.get(BOX_FIELD) or {}
    pt_out = content.get(POINT_FIELD) or {}
    size = box_out.get("inputImageProperties") or pt_out.get("inputImageProperties") or {}
    heads: list[list[float]] = []
    person_boxes: dict[int, list[float]] = {}
    for b in box_out.get("boundingBoxes", []):
        drawn = [float(b["left"]), float(b["top"]), float(b["left"]) + float(b["width"]),
                 float(b["top"]) + float(b["height"])]
        label = str(b.get("label", ""))
        if label == "head":
            heads.append(drawn)
        elif label.startswith("person ") and label[7:].isdigit():
            if int(label[7:]) in person_boxes:
                problems.append(f"two boxes labelled {label!r}; the first is kept")
                continue
            person_boxes[int(label[7:])] = drawn
        else:
            problems.append(f"box with unknown label {label!r} ignored")
    placed: dict[tuple[int, str], tuple[float, float]] = {}
    for k in pt_out.get("keypoints", []):
        prefix, _, name = str(k.get("label", "")).partition(" ")
        if not prefix.isdigit() or not name:
            problems.append(f"point with unknown label {k.get('label')!r} ignored")
            continue
        if (int(prefix), name) in placed:
            problems.append(f"point {k['label']!r} placed twice; the first is kept")
            continue
        placed[(int(prefix), name)] = (float(k["x"]), float(k["y"]))
    states = _visibility_choices(content)
    numbers = sorted({n for n, _ in placed} | {n for (n, _), s in states.items() if s != "outside"}
                     | set(person_boxes))
    persons: list[dict[str, Any]] = []
    for number in numbers:
        keypoints: list[dict[str, Any]] = []
        names = sorted({nm for n, nm in placed if n == number} | {nm for (n, nm) in states if n == number})
        for name in names:
            state = states.get((number, name))
            xy = placed.get((number, name))
            if xy is None:
                if state in ("visible", "occluded"):
                    problems.append(f"person {number} {name} marked {state} but not placed; taken as outside")
                continue
            if state == "outside":
                problems.append(f"person {number} {name} placed but marked outside; taken as visible")
                state = "visible"
            keypoints.append({"label": name, "x": xy[0], "y": xy[1], "visibility": state or "visible"})
        box: list[float] | None = person_boxes.get(number)
        if box is None:
            located = [(float(k["x"]), float(k["y"])) for k in keypoints]
            if not located:
                problems.append(f"person {number} has no box and no placed point; left out")
                continue
            xs, ys = [p[0] for p in located], [p[1] for p in located]
            box = [min(xs), min(ys), max(xs), max(ys)]
            problems.append(f"person {number} has no box; the extent of its points is used")
        persons.append({"number": number, "box": box, "keypoints": keypoints})
    return {"image_size": {"width": size.get("width"), "height": size.get("height")},
            "heads": heads, "persons": persons, "problems": problems}


def read_s3(uri: str) -> bytes:
    """The object at ``s3://bucket/key``, read with boto3 and the Lambda's role (Ground Truth
    hands the consolidation Lambda only the payload's URI). boto3 is imported here, not at the
    top, so that the appliance and the tests import this module without it."""
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise ValueError(f"consolidation: payload s3Uri is not s3://bucket/key: {uri!r}")
    return bytes(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def post_annotation_handler(event: Mapping[str, Any], context: Any = None,
                            s3_reader: Callable[[str], bytes | str] | None = None) -> list[dict[str, Any]]:
    """Ground Truth consolidation Lambda. AWS calls it as ``handler(event, context)``, so the
    payload file is read with ``read_s3`` by default; ``s3_reader(uri)`` (returning the file's
    bytes or text) replaces it in tests."""
    attribute = event["labelAttributeName"]
    payload = json.loads((s3_reader or read_s3)(event["payload"]["s3Uri"]))
    out = []
    for obj in payload:
        answers = [a for a in obj.get("annotations", []) if a.get("annotationData", {}).get("content")]
        if not answers:
            log.warning("object %s has no worker answer", obj.get("datasetObjectId"))
            continue
        first = answers[0]
        content = consolidate(json.loads(first["annotationData"]["content"]))
        content["workerId"] = first.get("workerId")
        content["workerCount"] = len(answers)
        out.append({"datasetObjectId": obj["datasetObjectId"],
                    "consolidatedAnnotation": {"content": {attribute: content}}})
    return out
