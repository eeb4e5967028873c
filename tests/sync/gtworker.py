"""A simulated Ground Truth worker and the cloud side of a custom labeling job (test helper).

``answer`` is the crowd-form answer of a worker who draws given heads and persons;
``output_line`` runs it through the real consolidation Lambda and returns the line Ground
Truth appends to ``<output>/<job>/manifests/output/output.manifest`` for an input line.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Sequence

from review_contract import HEIGHT, WIDTH
from sync.groundtruth import post_annotation_handler
from sync.review import ReviewedPerson

ATTRIBUTE = "reviewed"


def answer(heads: Sequence[Sequence[float]], persons: Sequence[ReviewedPerson], names: Sequence[str],
           size: tuple[int, int] = (WIDTH, HEIGHT)) -> dict[str, Any]:
    """A worker's crowd-form answer that draws exactly these heads and persons."""
    boxes = [{"label": "head", "left": h[0], "top": h[1], "width": h[2] - h[0], "height": h[3] - h[1]} for h in heads]
    points, content = [], {}
    for n, p in enumerate(persons, start=1):
        boxes.append({"label": f"person {n}", "left": p.box[0], "top": p.box[1],
                      "width": p.box[2] - p.box[0], "height": p.box[3] - p.box[1]})
        for name, k in zip(names, p.keypoints):
            if k.visibility != "outside":
                points.append({"label": f"{n} {name}", "x": k.x, "y": k.y})
            for state in ("visible", "occluded", "outside"):
                content[f"vis-{n}-{name}-{state}"] = {"on": state == k.visibility}
    image = {"width": size[0], "height": size[1]}
    return {**content, "boxes": {"boundingBoxes": boxes, "inputImageProperties": image},
            "points": {"keypoints": points, "inputImageProperties": image}}


def output_line(line: dict[str, Any], content: dict[str, Any], job: str, worker: str = "worker-42",
                attribute: str = ATTRIBUTE) -> dict[str, Any]:
    """The output-manifest line of ``line`` (an input-manifest line) after ``worker`` answered
    ``content``: the consolidation Lambda's result plus Ground Truth's custom-job metadata."""
    payload = [{"datasetObjectId": "0", "dataObject": {"s3Uri": line["source-ref"]},
                "annotations": [{"workerId": worker, "annotationData": {"content": json.dumps(content)}}]}]
    event = {"version": "2018-10-16", "labelingJobArn": f"arn:aws:sagemaker:eu-west-1:1:labeling-job/{job}",
             "labelCategories": ["head"], "labelAttributeName": attribute, "roleArn": "arn:aws:iam::1:role/r",
             "payload": {"s3Uri": "s3://bkt/annotations/consolidation-request/iteration-1/x.json"}}
    (consolidated,) = post_annotation_handler(event, None, lambda uri: json.dumps(payload).encode())
    return {**line, **consolidated["consolidatedAnnotation"]["content"],
            f"{attribute}-metadata": {"job_name": f"labeling-job/{job}", "type": "groundTruth/custom",
                                      "human-annotated": "yes",
                                      "creation_date": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat()}}
