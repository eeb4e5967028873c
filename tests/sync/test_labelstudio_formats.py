"""What a Label Studio reviewer is shown: an image the browser can decode, in the record's frame.

Against the real Label Studio server on loopback (``ls_server``, from ``.venv-ls``), with a
store under its document root, the uploader and the review-submit task, as a sync process runs
them. A task used to link the store's own file: a 16-bit TIFF, a PGM or a JPEG 2000 was an
empty page in the browser, so the reviewer had nothing to label.
"""
from __future__ import annotations

import itertools
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pytest

import lsserver
from review_contract import HEIGHT, WIDTH, record
from service.store import Store
from sync.dataset import Dataset
from sync.errors import RetryableError
from sync.labelstudio import LabelStudioBackend, prediction_result
from sync.labelstudio_client import LabelStudioClient
from sync.merge import Merger
from sync.objectstore import LocalFolderStore
from sync.review import ReviewItem
from sync.submit import ReviewSubmitTask
from sync.uploader import Uploader, UploadSettings
from test_labelstudio import LabelStudioHarness
from test_reencode import _image

HEAD = (40, 12, 90, 60)  # record()'s head box, whole pixels: a bright square there in every image
JPEG = b"\xff\xd8\xff"
COPIES = "label-studio-jpeg"  # under the document root, a folder per project
_salts = itertools.count(1)


def _pixels(ext: str, salt: int = 0) -> bytes:
    """A WIDTH x HEIGHT image in format ``ext``, dark with a bright square on the head box;
    ``salt`` in its first pixel (other bytes, another image id)."""
    x1, y1, x2, y2 = HEAD
    if ext == ".tiff":  # a 16-bit IR frame
        img = np.full((HEIGHT, WIDTH), 300, np.uint16)
        img[y1:y2, x1:x2] = 60_000
    else:
        img = np.full((HEIGHT, WIDTH, 3), 10, np.uint8)
        img[y1:y2, x1:x2] = 250
        if ext == ".pgm":
            img = img[..., 0]
    img[0, 0] = salt % 200
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _turned_jpeg() -> bytes:
    """A JPEG WIDTH x HEIGHT upright, stored HEIGHT x WIDTH with EXIF orientation 6."""
    data, _ = _image(WIDTH, HEIGHT, orientation=6)
    return data


IMAGES = {"ir.tiff": lambda salt: _pixels(".tiff", salt), "cam.pgm": lambda salt: _pixels(".pgm", salt),
          "cam.jp2": lambda salt: _pixels(".jp2", salt), "cam.png": lambda salt: _pixels(".png", salt),
          "turned.jpg": lambda salt: _turned_jpeg()}
NOT_FOR_BROWSERS = ("ir.tiff", "cam.pgm", "cam.jp2")


class Sync:
    """A store under Label Studio's document root holding ``IMAGES`` (review-pending, records of
    their size), with the upload and review-submit tasks of one sync process. The images differ
    from every other instance's (their browser-safe copies share one folder)."""

    def __init__(self, server: lsserver.LabelStudioServer, tmp_path: Path, client: LabelStudioClient | None = None
                 ) -> None:
        self.server = server
        self.client = LabelStudioClient(server.url, server.token)
        self.title = f"edge review {uuid.uuid4().hex[:8]}"
        self.store = Store(server.document_root / f"store-{uuid.uuid4().hex[:8]}")
        self.ids: dict[str, str] = {}
        salt = next(_salts)
        for name, make in IMAGES.items():
            image_id, _ = self.store.ingest(make(salt), f"drop/{name}")
            (row,) = self.store.claim("test-worker", 1)
            self.store.complete(row.image_id, "test-worker", record(persons=1), "bundle-7", "review", 0.4,
                                ["kpt_near_threshold"], audit=False)
            self.ids[name] = image_id
        self.uploader = Uploader(self.store, LocalFolderStore(tmp_path / "outbox"),
                                 UploadSettings("box-1", batch_size=10))
        while self.uploader.run_once():
            pass
        self.restart(client)

    def restart(self, client: LabelStudioClient | None = None) -> None:
        """A new process: a fresh backend and submit task."""
        self.backend = LabelStudioBackend(client or self.client, self.title, self.server.document_root)
        self.submit = ReviewSubmitTask(self.uploader.journal, self.store, self.uploader.target, self.backend)

    def run(self) -> None:
        while self.submit.run_once():
            pass

    def tasks(self) -> dict[str, dict[str, Any]]:
        """The project's tasks by image file name."""
        names = {v: k for k, v in self.ids.items()}
        tasks = self.client.pages("/api/tasks/", "tasks", project=self.backend.project_id)
        return {names[t["data"]["image_id"]]: t for t in tasks}

    def shown(self, task: dict[str, Any]) -> tuple[bytes, str]:
        """The bytes and the content type the reviewer's browser gets for a task's image."""
        req = urllib.request.Request(self.server.url + task["data"]["image"],
                                     headers={"Authorization": f"Token {self.server.token}"})
        with urllib.request.urlopen(req) as resp:
            return resp.read(), resp.headers.get("Content-Type", "")

    def close(self) -> None:
        self.uploader.close()
        self.store.close()


@pytest.fixture
def sync(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[Sync]:
    s = Sync(ls_server, tmp_path)
    yield s
    s.close()


def _moved(rec: dict[str, Any], dx: float, dy: float) -> dict[str, Any]:
    """``rec`` with its head box and its person's first point (the nose) moved by dx, dy pixels."""
    out = {**rec, "heads": [{**h, "box": [h["box"][0] + dx, h["box"][1] + dy, h["box"][2] + dx, h["box"][3] + dy]}
                            for h in rec["heads"]]}
    person = dict(rec["persons"][0])
    person["keypoints"] = [{**person["keypoints"][0], "x": person["keypoints"][0]["x"] + dx,
                            "y": person["keypoints"][0]["y"] + dy}, *person["keypoints"][1:]]
    out["persons"] = [person]
    return out


def test_images_a_browser_cannot_show_go_as_jpegs_of_their_size_and_their_reviews_merge(sync: Sync,
                                                                                         tmp_path: Path) -> None:
    sync.run()
    tasks = sync.tasks()
    assert sorted(tasks) == sorted(IMAGES)
    x1, y1, x2, y2 = HEAD
    for name in NOT_FOR_BROWSERS:
        data, content_type = sync.shown(tasks[name])
        assert data.startswith(JPEG) and content_type == "image/jpeg", (name, data[:8], content_type)
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert pixels.shape == (HEIGHT, WIDTH), name  # the record's size, upright
        assert pixels[y1 + 4:y2 - 4, x1 + 4:x2 - 4].mean() > 150 > pixels[y2 + 10:, x2 + 10:].mean() + 100, name
        assert (tasks[name]["data"]["width"], tasks[name]["data"]["height"]) == (WIDTH, HEIGHT)
        assert tasks[name]["data"]["image"] == \
            f"/data/local-files/?d={COPIES}/{sync.backend.project_id}/{sync.ids[name]}.jpg"
    for name in ("cam.png", "turned.jpg"):  # a browser shows them as stored (and turns the JPEG itself)
        assert sync.shown(tasks[name])[0] == sync.store.image_bytes(sync.ids[name]), name
    # the reviewer moves the head and the nose of each; the answers merge in the record's pixels
    rec = record(persons=1)
    for name in NOT_FOR_BROWSERS:
        task = sync.client.get(f"/api/tasks/{tasks[name]['id']}/")
        sync.client.post(f"/api/tasks/{task['id']}/annotations/", {
            "result": prediction_result(_moved(rec, 6.0, 4.0)), "was_cancelled": False, "lead_time": 3.0,
            "parent_prediction": task["predictions"][0]["id"]})
    labels = list(sync.backend.collect())
    assert sync.backend.rejected == {}
    dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.0)
    report = Merger(sync.store, dataset).merge(labels)
    assert sorted(report.merged) == sorted(sync.ids[n] for n in NOT_FOR_BROWSERS), report.skipped
    for name in NOT_FOR_BROWSERS:
        label = dataset.get(sync.ids[name]).label  # type: ignore[union-attr]
        assert (label["width"], label["height"]) == (WIDTH, HEIGHT)
        assert label["heads"][0] == pytest.approx([v + d for v, d in zip(rec["heads"][0]["box"], (6, 4, 6, 4))],
                                                  abs=0.02)
        nose = rec["persons"][0]["keypoints"][0]
        assert label["persons"][0]["keypoints"][0] == pytest.approx([nose["x"] + 6, nose["y"] + 4, 2], abs=0.02)
    dataset.close()


class CutAtImport(LabelStudioClient):
    """A client whose imports never reach the server, as when the connection is cut or the
    process killed between writing the copies and importing their tasks."""

    def post(self, path: str, body: Any) -> Any:
        if path.endswith("/import"):
            raise RetryableError(f"Label Studio POST {path}: connection reset (cut by the test)")
        return super().post(path, body)


def test_a_copy_written_before_a_failed_import_is_imported_once(ls_server: lsserver.LabelStudioServer,
                                                                tmp_path: Path) -> None:
    """The JPEG is written before the import; a process that ends between the two leaves it,
    and the next run imports each image once, linking it."""
    s = Sync(ls_server, tmp_path, client=CutAtImport(ls_server.url, ls_server.token))
    try:
        with pytest.raises(RetryableError):
            s.submit.run_once()
        folder = ls_server.document_root / COPIES / str(s.backend.project_id)
        copies = sorted(folder / f"{s.ids[n]}.jpg" for n in NOT_FOR_BROWSERS)
        assert all(p.is_file() and p.read_bytes().startswith(JPEG) for p in copies)
        assert s.tasks() == {}
        before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copies}
        s.restart()
        s.run()
        tasks = s.tasks()
        assert sorted(tasks) == sorted(IMAGES)  # each image once
        for name in NOT_FOR_BROWSERS:
            assert tasks[name]["data"]["image"] == \
                f"/data/local-files/?d={COPIES}/{s.backend.project_id}/{s.ids[name]}.jpg"
        # killed after the import, before the journal's record of it: submitted again, nothing new
        s.restart()
        batch = s.uploader.journal.unsubmitted_batches("nobody")[0]
        s.backend.submit(batch.batch_id, s.submit.items(batch))
        assert sorted(s.tasks()) == sorted(IMAGES)
        assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copies} == before  # reused, not rewritten
        assert not list(folder.glob(".*.tmp"))  # no temporary file left
        storages = {Path(x["path"]) for x in s.client.get("/api/storages/localfiles/", project=s.backend.project_id)}
        assert folder in storages
    finally:
        s.close()


def test_a_review_drawn_on_an_image_of_another_size_is_refused(ls_server: lsserver.LabelStudioServer) -> None:
    """A browser that showed an EXIF-turned JPEG as stored (not upright, as OpenCV and the
    record see it) puts the regions in that frame: refused, not merged as the image's."""
    h = LabelStudioHarness(ls_server)
    rec = record(persons=1)
    path = h.folder / "turned.jpg"
    path.write_bytes(_turned_jpeg())
    item = ReviewItem("turned-1", WIDTH, HEIGHT, rec, "bundle-7", local_path=path)
    h.backend.submit("b", [item])
    assert h.task(item)["data"]["image"].endswith("/turned.jpg")  # linked as stored: the browser turns it
    stored_frame = [{**r, "original_width": HEIGHT, "original_height": WIDTH} for r in prediction_result(rec)]
    h.post(item, stored_frame)
    assert list(h.backend.collect()) == []
    assert f"{HEIGHT}x{WIDTH} image" in h.backend.rejected[item.image_id]
    h.post(item, prediction_result(rec))  # drawn on the upright image: taken
    (label,) = h.backend.collect()
    assert (label.image_id, label.width, label.height) == (item.image_id, WIDTH, HEIGHT)
    assert item.image_id not in h.backend.rejected
