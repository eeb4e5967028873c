"""Ground Truth: manifests, the task template, the Lambdas, CreateLabelingJob, output parsing.

The simulated worker goes through the real chain: input manifest in the store -> pre-annotation
Lambda -> the template rendered (jinja2 stands in for Liquid) -> a crowd-form answer -> the
consolidation Lambda -> an output manifest in the store -> ``collect``.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Sequence

import pytest

from gtworker import answer, output_line
from review_contract import (WIDTH, HEIGHT, ReviewBackendContract, assert_label, collect, expected, image_id,
                             record)
from service.keypoints import CABIN19_NAMES, COCO17_NAMES, OUTSIDE
from sync import groundtruth_lambdas
from sync.config import load_sync_config
from sync.groundtruth import (MAX_JOB_PREFIX, OUTPUT_MANIFEST, GroundTruthBackend, LabelingJobSpec, ManifestError,
                              consolidate, create_labeling_job, job_name_for, label_category_config, manifest_line,
                              parse_output_line, post_annotation_handler, pre_annotation_handler)
from sync.errors import ConflictError, PermanentError, RetryableError, SyncConfigError
from sync.objectstore import LocalFolderStore
from sync.review import ReviewedKeypoint, ReviewedPerson, ReviewItem
from sync.review_settings import review_settings_from

jinja2 = pytest.importorskip("jinja2", reason="the template test renders Liquid with jinja2 (test extra)")
TEMPLATE = Path(__file__).resolve().parents[2] / "sync" / "templates" / "keypoints.liquid.html"
ATTRIBUTE = "reviewed"


def render(task_input: dict[str, Any]) -> str:
    """The template rendered like Ground Truth does (the Liquid filters it uses, in jinja2)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["to_json"] = lambda v: json.dumps(v)
    env.filters["grant_read_access"] = lambda uri: "https://signed.example/" + uri.removeprefix("s3://")
    env.filters["escape"] = lambda v: jinja2.utils.markupsafe.escape(str(v))
    return env.from_string(TEMPLATE.read_text()).render(task={"input": task_input})


class Page(HTMLParser):
    """The crowd elements of a rendered page: attributes by tag, radio buttons in order."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: dict[str, list[dict[str, str | None]]] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag.startswith("crowd-"):
            self.elements.setdefault(tag, []).append(dict(attrs))


def answer_from_page(page: Page) -> dict[str, Any]:
    """A worker who submits the page as shown: initial boxes and points, checked radios."""
    box = page.elements["crowd-bounding-box"][0]
    kp = page.elements["crowd-keypoint"][0]
    content: dict[str, Any] = {
        "boxes": {"boundingBoxes": json.loads(box["initial-value"] or "[]"),
                  "inputImageProperties": {"width": WIDTH, "height": HEIGHT}},
        "points": {"keypoints": json.loads(kp["initial-value"] or "[]"),
                   "inputImageProperties": {"width": WIDTH, "height": HEIGHT}}}
    for radio in page.elements["crowd-radio-button"]:
        content[str(radio["name"])] = {"on": "checked" in radio}
    return content


class GroundTruthHarness:
    """A Ground Truth job run by hand: the store plays the bucket, this class the cloud side."""

    reviewer_id = "worker-42"
    tolerance = 0.5  # boxes travel as whole pixels, points to 0.1 px

    def __init__(self, root: Path) -> None:
        self.store = LocalFolderStore(root, "edge")
        self.backend = GroundTruthBackend(self.store, appliance_id="box-1")

    def item(self, n: int, rec: dict[str, Any]) -> ReviewItem:
        return ReviewItem(image_id(n), rec["width"], rec["height"], rec, rec["bundle_id"],
                          image_uri=f"s3://bkt/edge/images/{image_id(n)}.jpg", score=0.4, reasons=("kpt_near_threshold",),
                          audit=n % 2 == 0)

    def _line(self, item: ReviewItem) -> tuple[str, dict[str, Any]]:
        for key in self.store.list(self.backend.manifests_prefix + "/"):
            for text in self.store.get(key).decode().splitlines():
                line = json.loads(text)
                if line["image-id"] == item.image_id:
                    return key.rsplit("/", 1)[1].removesuffix(".manifest"), line
        raise AssertionError(f"{item.image_id} is in no manifest")

    def _finish(self, batch: str, line: dict[str, Any], content: dict[str, Any]) -> None:
        payload = [{"datasetObjectId": "0", "dataObject": {"s3Uri": line["source-ref"]},
                    "annotations": [{"workerId": self.reviewer_id,
                                     "annotationData": {"content": json.dumps(content)}}]}]
        event = {"version": "2018-10-16", "labelingJobArn": "arn:aws:sagemaker:eu-west-1:1:labeling-job/x",
                 "labelCategories": ["head"], "labelAttributeName": ATTRIBUTE, "roleArn": "arn:aws:iam::1:role/r",
                 "payload": {"s3Uri": "s3://bkt/annotations/consolidation-request/iteration-1/x.json"}}
        (consolidated,) = post_annotation_handler(event, None, lambda uri: json.dumps(payload).encode())
        job = job_name_for("edge-review", batch)
        out = {**line, **consolidated["consolidatedAnnotation"]["content"],
               f"{ATTRIBUTE}-metadata": {"job_name": f"labeling-job/{job}", "type": "groundTruth/custom",
                                         "human-annotated": "yes",
                                         "creation_date": dt.datetime.utcnow().isoformat()}}
        key = f"groundtruth/output/{job}/{OUTPUT_MANIFEST}"
        old = self.store.get(key).decode() if self.store.head(key) else ""
        self.store.put(key, (old + json.dumps(out) + "\n").encode())

    def review(self, item: ReviewItem, heads: Sequence[Sequence[float]], persons: Sequence[ReviewedPerson]) -> None:
        batch, line = self._line(item)
        self._finish(batch, line, answer(heads, persons, CABIN19_NAMES))

    def accept(self, item: ReviewItem) -> None:
        batch, line = self._line(item)
        task = pre_annotation_handler({"version": "2018-10-16", "labelingJobArn": "arn", "dataObject": line})
        self._finish(batch, line, answer_from_page(Page(render(task["taskInput"]))))


class TestGroundTruthBackend(ReviewBackendContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> GroundTruthHarness:
        return GroundTruthHarness(tmp_path)


def test_manifest_line_carries_pre_annotations_and_provenance() -> None:
    rec = record(persons=1, names=COCO17_NAMES)
    line = json.loads(manifest_line("s3://bkt/a.jpg", "abc", rec, "bundle-7", 0.41, ["kpt_near_threshold"], True, "box-1"))
    assert line["source-ref"] == "s3://bkt/a.jpg" and line["image-id"] == "abc"
    assert (line["edge-bundle"], line["edge-score"], line["edge-reasons"], line["edge-audit"], line["edge-appliance"]) == (
        "bundle-7", 0.41, ["kpt_near_threshold"], True, "box-1")
    assert line["auto-head"]["annotations"] == [{"class_id": 0, "left": 40, "top": 12, "width": 50, "height": 48}]
    assert line["auto-head-metadata"]["human-annotated"] == "no"
    kps = line["auto-kpts"]["persons"][0]["keypoints"]
    assert [k["label"] for k in kps] == list(COCO17_NAMES)
    assert kps[2] == {"label": "right_eye", "x": 0.0, "y": 0.0, "visibility": "outside"}  # claims no location
    assert not any(k.startswith("$") for k in line)
    with pytest.raises(ManifestError, match="auto-kpts"):
        manifest_line("s3://bkt/a.jpg", "abc", record(persons=40), "b")


def test_template_renders_pre_annotations_labels_and_visibility_controls() -> None:
    rec = record(persons=2, heads=1)
    line = json.loads(manifest_line("s3://bkt/edge/a.jpg", "abc", rec, "bundle-7", 0.4, ["r"], False))
    task = pre_annotation_handler({"version": "2018-10-16", "labelingJobArn": "arn", "dataObject": line})
    assert task["isHumanAnnotationRequired"] is True
    page = Page(render(task["taskInput"]))
    (box,), (kp,) = page.elements["crowd-bounding-box"], page.elements["crowd-keypoint"]
    assert box["src"] == kp["src"] == "https://signed.example/bkt/edge/a.jpg"
    assert json.loads(box["labels"] or "") == ["head", "person 1", "person 2", "person 3"]  # one spare person
    boxes = json.loads(box["initial-value"] or "")
    assert [b["label"] for b in boxes] == ["head", "person 1", "person 2"]
    labels = json.loads(kp["labels"] or "")
    assert len(labels) == 3 * 19 and "1 nose" in labels and "3 neck" in labels
    placed = {p["label"]: (p["x"], p["y"]) for p in json.loads(kp["initial-value"] or "")}
    vis = {k["label"]: k for k in line["auto-kpts"]["persons"][0]["keypoints"]}
    assert placed["1 nose"] == (vis["nose"]["x"], vis["nose"]["y"])
    assert "1 right_eye" not in placed  # outside: not placed
    radios = page.elements["crowd-radio-button"]
    assert len(radios) == 3 * 19 * 3
    checked = {r["name"] for r in radios if "checked" in r}
    assert len(checked) == 3 * 19  # exactly one state per point
    assert {"vis-1-nose-visible", "vis-1-left_eye-occluded", "vis-1-right_eye-outside", "vis-3-nose-outside"} <= checked


def test_consolidation_keeps_first_worker_and_reports_problems() -> None:
    content = {"boxes": {"boundingBoxes": [{"label": "car", "left": 1, "top": 1, "width": 2, "height": 2}]},
               "points": {"keypoints": [{"label": "2 nose", "x": 10, "y": 12}, {"label": "2 nose", "x": 1, "y": 1}]},
               "vis-2-nose": "occluded", "vis-2-neck-visible": {"on": True}}
    payload = [{"datasetObjectId": "7", "annotations": [
        {"workerId": "w1", "annotationData": {"content": json.dumps(content)}},
        {"workerId": "w2", "annotationData": {"content": json.dumps({})}}]},
               {"datasetObjectId": "8", "annotations": []}]
    event = {"labelAttributeName": "rev", "payload": {"s3Uri": "s3://b/p.json"}}
    seen = []
    out = post_annotation_handler(event, None, lambda uri: seen.append(uri) or json.dumps(payload))
    assert seen == ["s3://b/p.json"]
    assert [o["datasetObjectId"] for o in out] == ["7"]
    got = out[0]["consolidatedAnnotation"]["content"]["rev"]
    assert got["workerId"] == "w1" and got["workerCount"] == 2
    (person,) = got["persons"]
    assert person["keypoints"] == [{"label": "nose", "x": 10.0, "y": 12.0, "visibility": "occluded"}]
    assert person["box"] == [10.0, 12.0, 10.0, 12.0]
    assert len(got["problems"]) == 4  # unknown box label, point twice, neck not placed, no person box


BUILTIN = {"source-ref": "s3://bucket/img.png", "head-box": {"image_size": [{"width": 500, "height": 400, "depth": 3}],
           "annotations": [{"class_id": 0, "left": 111, "top": 134, "width": 61, "height": 128}]},
           "head-box-metadata": {"objects": [{"confidence": 0.8}], "class-map": {"0": "head"},
                                 "type": "groundtruth/object-detection", "human-annotated": "yes",
                                 "creation-date": "2018-10-18T22:18:13.527256", "job-name": "identify-heads"}}


def test_builtin_bounding_box_output_and_adjustment_status() -> None:
    label = parse_output_line(BUILTIN)
    assert label is not None
    assert (label.image_id, label.width, label.height, label.job) == ("img", 500, 400, "identify-heads")
    assert label.heads == ((111, 134, 172, 262),) and label.persons == () and label.parts == ("heads",)
    assert label.adjusted is None and label.reviewer is None
    assert label.reviewed_at == dt.datetime(2018, 10, 18, 22, 18, 13, 527256, tzinfo=dt.timezone.utc).timestamp()
    adjusted = {**BUILTIN, "head-box-2": {**BUILTIN["head-box"], "annotations": []},
                "head-box-2-metadata": {**BUILTIN["head-box-metadata"], "creation-date": "2018-10-19T00:00:00",
                                        "job-name": "labeling-job/adjust-heads", "adjustment-status": "adjusted"}}
    label = parse_output_line(adjusted)
    assert label is not None and (label.job, label.heads, label.adjusted) == ("adjust-heads", (), True)
    assert parse_output_line({"source-ref": "s3://b/x.jpg"}) is None


def _custom_review_line(rec: dict, job: str, **meta: str) -> tuple[dict, tuple]:
    """An output line for ``rec`` with a key-point review (attribute ``rev``: the first head, the
    first person with its nose at 10, 20) and its heads as expected."""
    line = json.loads(manifest_line("s3://b/x.jpg", "x", rec, "b"))
    heads, persons = expected(rec)
    line.update({"rev": {"image_size": {"width": WIDTH, "height": HEIGHT}, "heads": [list(heads[0])],
                         "persons": [{"box": list(persons[0].box), "keypoints": [{"label": "nose", "x": 10, "y": 20,
                                                                                  "visibility": "visible"}]}]},
                 "rev-metadata": {"job-name": job, "type": "groundTruth/custom", "human-annotated": "yes",
                                  "creation-date": "2026-11-24T10:00:00Z", **meta}})
    return line, heads


def test_output_in_downscaled_pixels_comes_back_in_original_pixels(tmp_path: Path) -> None:
    rec = {**record(persons=1), "original_size": [WIDTH * 2, HEIGHT * 2]}
    line, heads = _custom_review_line(rec, "j")
    label = parse_output_line(line)
    assert label is not None and (label.width, label.height) == (WIDTH * 2, HEIGHT * 2)
    assert label.heads[0] == pytest.approx(tuple(2 * v for v in heads[0]))
    assert (label.persons[0].keypoints[0].x, label.persons[0].keypoints[0].y) == (20.0, 40.0)


def test_a_chained_head_box_job_keeps_the_key_point_review_of_the_same_line() -> None:
    """A bounding-box adjustment job chained on a key-point job writes its attribute beside the
    earlier one; the line's label is both: the newer heads and the reviewed key points."""
    line, _ = _custom_review_line(record(persons=1), "kpts", **{"adjustment-status": "adjusted"})
    line.update({"head-box": {"image_size": [{"width": WIDTH, "height": HEIGHT, "depth": 3}],
                              "annotations": [{"class_id": 0, "left": 1, "top": 2, "width": 3, "height": 4}]},
                 "head-box-metadata": {**BUILTIN["head-box-metadata"], "creation-date": "2026-11-25T10:00:00",
                                       "job-name": "labeling-job/adjust-heads", "adjustment-status": "unadjusted"}})
    label = parse_output_line(line)
    assert label is not None and label.parts == ("heads", "persons") and label.job == "adjust-heads"
    assert label.heads == ((1, 2, 4, 6),) and label.adjusted is True
    assert (label.persons[0].keypoints[0].x, label.persons[0].keypoints[0].y) == (10.0, 20.0)
    assert label.reviewed_at == dt.datetime(2026, 11, 25, 10, tzinfo=dt.timezone.utc).timestamp()


SPEC = LabelingJobSpec(role_arn="arn:aws:iam::123456789012:role/gt", workteam_arn=(
    "arn:aws:sagemaker:eu-west-1:123456789012:workteam/private-crowd/edge"),
    ui_template_s3_uri="s3://bkt/edge/groundtruth/keypoints.liquid.html", output_s3_path="s3://bkt/edge/groundtruth/output",
    pre_lambda_arn="arn:aws:lambda:eu-west-1:123456789012:function:edge-pre",
    consolidation_lambda_arn="arn:aws:lambda:eu-west-1:123456789012:function:edge-post",
    label_category_config_s3_uri="s3://bkt/edge/groundtruth/labels.json")


def sagemaker() -> Any:
    boto3 = pytest.importorskip("boto3")
    return boto3.client("sagemaker", region_name="eu-west-1", aws_access_key_id="test", aws_secret_access_key="test")


def test_create_labeling_job_request_matches_the_service_model(tmp_path: Path) -> None:
    from botocore.stub import Stubber

    client = sagemaker()
    arn = "arn:aws:sagemaker:eu-west-1:123456789012:labeling-job/edge-review-b7"
    store = LocalFolderStore(tmp_path, "edge")
    backend = GroundTruthBackend(store, job=SPEC, sagemaker_client=client)
    item = GroundTruthHarness(tmp_path).item(1, record())
    expected_request = {
        "LabelingJobName": "edge-review-b7", "LabelAttributeName": "reviewed",
        "InputConfig": {"DataSource": {"S3DataSource": {"ManifestS3Uri": store.uri("manifests/b7.manifest")}}},
        "OutputConfig": {"S3OutputPath": SPEC.output_s3_path}, "RoleArn": SPEC.role_arn,
        "LabelCategoryConfigS3Uri": SPEC.label_category_config_s3_uri,
        "HumanTaskConfig": {"WorkteamArn": SPEC.workteam_arn, "UiConfig": {"UiTemplateS3Uri": SPEC.ui_template_s3_uri},
                            "PreHumanTaskLambdaArn": SPEC.pre_lambda_arn, "TaskTitle": SPEC.task_title,
                            "TaskDescription": SPEC.task_description, "NumberOfHumanWorkersPerDataObject": 1,
                            "TaskTimeLimitInSeconds": 900, "AnnotationConsolidationConfig": {
                                "AnnotationConsolidationLambdaArn": SPEC.consolidation_lambda_arn}}}
    with Stubber(client) as stub:
        stub.add_response("create_labeling_job", {"LabelingJobArn": arn}, expected_request)
        stub.add_client_error("create_labeling_job", "ResourceInUse", "exists")
        stub.add_client_error("create_labeling_job", "ThrottlingException", "slow down")
        stub.add_client_error("create_labeling_job", "AccessDeniedException", "no")
        backend.submit("b7", [item])
        assert create_labeling_job(client, "edge-review-b7", "s3://b/m", SPEC) is None
        with pytest.raises(RetryableError, match="Throttling"):
            create_labeling_job(client, "edge-review-b7", "s3://b/m", SPEC)
        with pytest.raises(PermanentError, match="AccessDenied"):
            create_labeling_job(client, "edge-review-b7", "s3://b/m", SPEC)
        stub.assert_no_pending_responses()
    # the real service model refuses a bad request before anything is sent
    with pytest.raises(PermanentError, match="NumberOfHumanWorkersPerDataObject"):
        create_labeling_job(client, "j", "s3://b/m", LabelingJobSpec(**{**SPEC.__dict__, "workers_per_object": 0}))


def test_manifest_is_written_once_and_names_are_valid(tmp_path: Path) -> None:
    harness = GroundTruthHarness(tmp_path)
    item = harness.item(1, record())
    harness.backend.submit("b1", [item])
    with pytest.raises(ConflictError):
        harness.backend.submit("b1", [harness.item(2, record())])
    assert len(harness.store.get("manifests/box-1/b1.manifest").splitlines()) == 1
    # a manifest the uploader wrote first (its own bytes) is used as it is
    uploaded = manifest_line("s3://bkt/edge/images/x.jpg", item.image_id, record(persons=0), "b") + "\n"
    harness.store.put("manifests/box-1/b9.manifest", uploaded.encode())
    harness.backend.submit("b9", [item])
    assert harness.store.get("manifests/box-1/b9.manifest").decode() == uploaded
    with pytest.raises(ValueError, match="image URI"):
        harness.backend.submit("b2", [ReviewItem("x", 4, 4, record(), "b", local_path=Path("/x.jpg"))])
    assert job_name_for("edge review", "2026-11-24T10:00:00_x" * 4).startswith("edge-review-2026-11-24T10-00-00-x")
    assert len(job_name_for("p", "x" * 200)) == 63
    config = label_category_config()
    assert config["document-version"] == "2018-11-28"
    assert [c["label"] for c in config["labels"]][:3] == ["head", "person", "nose"]


def test_bad_output_lines_are_refused_not_fatal(tmp_path: Path) -> None:
    harness = GroundTruthHarness(tmp_path)
    good = dict(BUILTIN, **{"image-id": "good"})
    bad = {"source-ref": "s3://b/x.jpg", "r": {}, "r-metadata": {"type": "groundtruth/semantic-segmentation",
                                                                   "human-annotated": "yes"}}
    harness.store.put(f"groundtruth/output/j/{OUTPUT_MANIFEST}", f"{json.dumps(bad)}\n\n{json.dumps(good)}\n".encode())
    assert [label.image_id for label in harness.backend.collect()] == ["good"]
    assert list(harness.backend.rejected) == [f"groundtruth/output/j/{OUTPUT_MANIFEST}:1"]


def test_consolidation_lambda_runs_with_the_two_arguments_aws_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    """AWS Lambda calls ``handler(event, context)``: the deployed file reads the payload from S3
    itself (boto3, the Lambda's role); a reader is only for tests."""
    moto = pytest.importorskip("moto", reason="needs moto (the test extra)")
    boto3 = pytest.importorskip("boto3")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # the Lambda runtime sets it
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    content = answer([(10.0, 20.0, 50.0, 70.0)], [], CABIN19_NAMES)
    payload = [{"datasetObjectId": "0", "dataObject": {"s3Uri": "s3://gt-bkt/edge/images/a.jpg"},
                "annotations": [{"workerId": "w1", "annotationData": {"content": json.dumps(content)}}]}]
    key = "edge/groundtruth/output/j/annotations/consolidated-annotation/consolidation-request/iteration-1/x.json"
    event = {"version": "2018-10-16", "labelingJobArn": "arn:aws:sagemaker:eu-west-1:1:labeling-job/j",
             "labelCategories": ["head"], "labelAttributeName": ATTRIBUTE, "roleArn": "arn:aws:iam::1:role/r",
             "payload": {"s3Uri": f"s3://gt-bkt/{key}"}}
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="eu-west-1")
        s3.create_bucket(Bucket="gt-bkt", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        s3.put_object(Bucket="gt-bkt", Key=key, Body=json.dumps(payload).encode())
        (out,) = groundtruth_lambdas.post_annotation_handler(event, object())
        with pytest.raises(s3.exceptions.NoSuchKey):  # a missing payload fails the invocation loudly
            groundtruth_lambdas.post_annotation_handler({**event, "payload": {"s3Uri": "s3://gt-bkt/gone.json"}},
                                                        object())
    got = out["consolidatedAnnotation"]["content"][ATTRIBUTE]
    assert out["datasetObjectId"] == "0" and got["workerId"] == "w1"
    assert got["heads"] == [[10.0, 20.0, 50.0, 70.0]] and got["persons"] == [] and got["problems"] == []


def test_points_placed_where_the_page_preset_outside_are_kept(tmp_path: Path) -> None:
    """The template pre-checks "outside" for the points the model put outside and for every
    point of the spare person. A worker who places such a point and leaves its radio alone has
    put it in the picture: it comes back visible, and the spare person, placed without a box,
    gets the extent of its points; each is noted in ``problems``."""
    harness = GroundTruthHarness(tmp_path)
    rec = record(persons=1)
    item = harness.item(8, rec)
    harness.backend.submit("b8", [item])
    batch, line = harness._line(item)
    task = pre_annotation_handler({"version": "2018-10-16", "labelingJobArn": "arn", "dataObject": line})
    content = answer_from_page(Page(render(task["taskInput"])))
    assert content["vis-1-right_eye-outside"] == content["vis-2-nose-outside"] == {"on": True}  # preset
    content["points"]["keypoints"] += [{"label": "1 right_eye", "x": 55.0, "y": 66.0},
                                       {"label": "2 nose", "x": 200.0, "y": 50.0},
                                       {"label": "2 neck", "x": 210.0, "y": 90.0}]
    assert sorted(consolidate(content)["problems"]) == [
        "person 1 right_eye placed but marked outside; taken as visible",
        "person 2 has no box; the extent of its points is used",
        "person 2 neck placed but marked outside; taken as visible",
        "person 2 nose placed but marked outside; taken as visible"]
    harness._finish(batch, line, content)
    label = collect(harness.backend)[item.image_id]
    heads, (person,) = expected(rec)
    kps = list(person.keypoints)
    kps[CABIN19_NAMES.index("right_eye")] = ReviewedKeypoint(55.0, 66.0, "visible")
    placed = {"nose": ReviewedKeypoint(200.0, 50.0, "visible"), "neck": ReviewedKeypoint(210.0, 90.0, "visible")}
    spare = ReviewedPerson((200.0, 50.0, 210.0, 90.0),
                           tuple(placed.get(n, ReviewedKeypoint(0.0, 0.0, OUTSIDE)) for n in CABIN19_NAMES))
    assert_label(label, heads, [ReviewedPerson(person.box, tuple(kps)), spare], harness.tolerance)
    # a person with neither box nor placed point is left out, and says so
    nothing = consolidate({"vis-4-nose": "occluded"})
    assert nothing["persons"] == [] and nothing["problems"] == [
        "person 4 nose marked occluded but not placed; taken as outside",
        "person 4 has no box and no placed point; left out"]


class _SageMaker:
    """CreateLabelingJob as AWS answers it: a job name in use -> ResourceInUse."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create_labeling_job(self, **request: Any) -> dict[str, str]:
        from botocore.exceptions import ClientError

        name = request["LabelingJobName"]
        if name in self.names:
            raise ClientError({"Error": {"Code": "ResourceInUse", "Message": f"{name} exists"}}, "CreateLabelingJob")
        self.names.append(name)
        return {"LabelingJobArn": f"arn:aws:sagemaker:eu-west-1:1:labeling-job/{name}"}


def test_each_batch_of_a_long_job_prefix_gets_its_own_labeling_job(tmp_path: Path) -> None:
    """Job names are at most 63 characters; cutting ``<prefix>-<batch id>`` at the end removed
    the batches' sequence numbers, so later batches got the name of the first, CreateLabelingJob
    answered ResourceInUse ("exists already") and they were never labelled."""
    pytest.importorskip("botocore")
    prefix = "er-cabin-lab-frankfurt-main-hall-rack-0001"  # 42 characters
    batches = ["20261124T100000Z-000001", "20261124T100000Z-000002"]
    names = [job_name_for(prefix, b) for b in batches]
    assert names[0] != names[1]
    for name, batch in zip(names, batches):
        assert name.startswith("er-cabin-lab-frankfurt") and name.endswith("-" + batch) and len(name) <= 63
        assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name)
    assert job_name_for(prefix[:-1] + "2", batches[0]) != names[0]  # another appliance, same batch id
    # names that fit stay as they were
    assert job_name_for("er-box-1", batches[0]) == "er-box-1-20261124T100000Z-000001"
    assert job_name_for("er_box.1 ", batches[0]) == "er-box-1-20261124T100000Z-000001"
    assert job_name_for("p" * MAX_JOB_PREFIX, batches[0]) == "p" * MAX_JOB_PREFIX + "-" + batches[0]
    assert job_name_for("", batches[0]) == batches[0]
    with pytest.raises(ValueError, match="valid name"):
        job_name_for("edge", "__")
    # through the backend: every batch starts a job of its own
    client = _SageMaker()
    harness = GroundTruthHarness(tmp_path)
    backend = GroundTruthBackend(harness.store, job=dataclasses.replace(SPEC, job_prefix=prefix),
                                 sagemaker_client=client)
    for n, batch in enumerate(batches, start=1):
        backend.submit(batch, [harness.item(n, record())])
    assert client.names == names


def test_a_job_prefix_that_cannot_keep_the_batch_id_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "annotator.toml"
    base = ('[sync.target]\nkind = "s3"\nbucket = "bkt"\n[sync.review]\nkind = "groundtruth"\n'
            '[sync.review.groundtruth.job]\nrole_arn = "arn:aws:iam::1:role/gt"\n'
            'workteam_arn = "arn:aws:sagemaker:eu-west-1:1:workteam/private-crowd/x"\n'
            'ui_template_s3_uri = "s3://bkt/t.html"\n')
    for prefix in ("x" * (MAX_JOB_PREFIX + 1), "--"):
        config.write_text(base + f'job_prefix = "{prefix}"\n')
        with pytest.raises(SyncConfigError, match=rf"job\.job_prefix: expected 1 to {MAX_JOB_PREFIX} .*{prefix}"):
            review_settings_from(load_sync_config(config, env={}), env={})
    for text in (base + f'job_prefix = "{"x" * MAX_JOB_PREFIX}"\n', base):
        config.write_text(text)
        assert review_settings_from(load_sync_config(config, env={}), env={}).groundtruth is not None


def test_boxes_travel_with_each_edge_rounded_so_an_unchanged_answer_comes_back_unchanged() -> None:
    """Rounding left and width apart put the right edge 1 px off (10.4 + 20.2 -> 10 + 20 = 30,
    not round(30.6) = 31), so every unchanged Ground Truth answer came back moved."""
    rec = record(persons=1)
    rec["heads"][0]["box"] = [10.4, 20.6, 30.6, 40.4]
    rec["persons"][0]["box"] = [50.4, 60.6, 150.6, 200.4]
    line = json.loads(manifest_line("s3://b/x.jpg", "x", rec, "b"))
    (head,) = line["auto-head"]["annotations"]
    assert (head["left"], head["top"], head["left"] + head["width"], head["top"] + head["height"]) == (10, 21, 31, 40)
    task = pre_annotation_handler({"dataObject": line})["taskInput"]
    person = next(b for b in task["initialBoxes"] if b["label"] == "person 1")
    assert (person["left"], person["top"], person["left"] + person["width"],
            person["top"] + person["height"]) == (50, 61, 151, 200)
    content = answer_from_page(Page(render(task)))
    label = parse_output_line(output_line(line, content, "j"))
    assert label is not None and label.adjusted is False
    assert label.heads[0] == pytest.approx(rec["heads"][0]["box"], abs=0.5)
    assert label.persons[0].box == pytest.approx(rec["persons"][0]["box"], abs=0.5)


def test_an_answer_for_a_turned_upload_is_not_stretched_to_the_original() -> None:
    """A downscaled upload's answer is rescaled from the upload's size; an answer of another
    size (the worker saw the image turned) keeps its size, and the merge refuses it."""
    rec = {**record(persons=1), "original_size": [WIDTH * 2, HEIGHT * 2]}
    line, _ = _custom_review_line(rec, "j")
    line["rev"]["image_size"] = {"width": HEIGHT, "height": WIDTH}
    label = parse_output_line(line)
    assert label is not None and (label.width, label.height) == (HEIGHT, WIDTH)
    assert (label.persons[0].keypoints[0].x, label.persons[0].keypoints[0].y) == (10.0, 20.0)


def test_a_chained_head_box_answer_of_another_frame_is_not_taken_into_the_key_point_review() -> None:
    """The head boxes of a chained bounding-box job answered on the image seen turned (its size
    the upload's turned) were copied into the key-point review, whose size is the image's, so the
    merge's size check let boxes of another frame through. That answer now comes back alone, with
    its own size, and the merge refuses it."""
    line, _ = _custom_review_line(record(persons=1), "kpts")
    line.update({"head-box": {"image_size": [{"width": HEIGHT, "height": WIDTH, "depth": 3}],
                              "annotations": [{"class_id": 0, "left": 1, "top": 2, "width": 3, "height": 4}]},
                 "head-box-metadata": {**BUILTIN["head-box-metadata"], "creation-date": "2026-11-25T10:00:00",
                                       "job-name": "labeling-job/adjust-heads"}})
    label = parse_output_line(line)
    assert label is not None and (label.width, label.height) == (HEIGHT, WIDTH) and label.parts == ("heads",)
