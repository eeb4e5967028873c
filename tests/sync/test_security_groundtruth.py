"""Ground Truth output in a bucket that someone else can write (issue: security audit): a job
folder named ``..`` and a line of arrays nested thousands deep each stopped every collect (a
``ValueError`` from the key check, a ``RecursionError`` from ``json``), so no review of any
job came back. Each is refused on its own now and the good manifests still give their labels.

A real S3 endpoint on loopback (moto), as the bucket would hold these keys.
"""
from __future__ import annotations

import json

from sync.groundtruth import OUTPUT_MANIFEST, GroundTruthBackend
from sync.s3store import S3Store

GOOD = {"source-ref": "s3://bucket/good.png", "image-id": "good",
        "head-box": {"image_size": [{"width": 500, "height": 400, "depth": 3}],
                     "annotations": [{"class_id": 0, "left": 111, "top": 134, "width": 61, "height": 128}]},
        "head-box-metadata": {"class-map": {"0": "head"}, "type": "groundtruth/object-detection",
                              "human-annotated": "yes", "creation-date": "2026-10-18T22:18:13",
                              "job-name": "identify-heads"}}


def test_hostile_output_manifests_are_refused_and_the_good_ones_still_collected(moto_server) -> None:
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    put = lambda key, body: client.put_object(Bucket=bucket, Key=key, Body=body)  # noqa: E731
    put(f"groundtruth/output/../{OUTPUT_MANIFEST}", (json.dumps(GOOD) + "\n").encode())
    put(f"groundtruth/output/deep/{OUTPUT_MANIFEST}", b"[" * 100_000 + b"\n" + json.dumps(GOOD).encode() + b"\n")
    put(f"groundtruth/output/plain/{OUTPUT_MANIFEST}", (json.dumps(dict(GOOD, **{"image-id": "plain"})) + "\n").encode())
    backend = GroundTruthBackend(S3Store(bucket, client=client))
    assert sorted(label.image_id for label in backend.collect()) == ["good", "plain"]
    assert set(backend.rejected) == {f"groundtruth/output/../{OUTPUT_MANIFEST}:0",
                                     f"groundtruth/output/deep/{OUTPUT_MANIFEST}:1"}
    assert "RecursionError" in backend.rejected[f"groundtruth/output/deep/{OUTPUT_MANIFEST}:1"]
