"""The JPEG copies Label Studio shows instead of images a browser cannot show: how long they live.

Against the real Label Studio server on loopback (``ls_server``), with the store, uploader and
review-submit task of ``test_labelstudio_formats.Sync`` and the merge task the agent runs. A
copy used to stay for ever (one JPEG per image ever sent), and so did the temporary file of a
write that a kill cut short. The copies are found from the tasks' image links, whatever the
folder layout.

Also what a deleted project does to reviews: Label Studio deletes its annotations with it (every
request about it or its tasks answers 404 at once), so a review finished there but not yet
collected is reviewed again in the new project; a review already merged is not sent again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote

import lsserver
from review_contract import record
from service.store import REVIEWED, UPLOADED
from sync.dataset import Dataset
from sync.labelstudio import prediction_result
from sync.merge import Merger, MergeTask
from test_labelstudio_formats import IMAGES, JPEG, NOT_FOR_BROWSERS, Sync, _moved


def copy_of(s: Sync, task: dict[str, Any]) -> Path:
    """The file under the document root that a task's image link names."""
    return s.server.document_root / unquote(task["data"]["image"].split("?d=", 1)[1])


def review(s: Sync, name: str, cancelled: bool = False) -> None:
    """The reviewer submits (moves the head and the nose), or skips, the task of image ``name``."""
    task = s.client.get(f"/api/tasks/{s.tasks()[name]['id']}/")
    s.client.post(f"/api/tasks/{task['id']}/annotations/", {
        "result": [] if cancelled else prediction_result(_moved(record(persons=1), 6.0, 4.0)),
        "was_cancelled": cancelled, "lead_time": 3.0, "parent_prediction": task["predictions"][0]["id"]})


def merge_task(s: Sync, dataset: Dataset) -> MergeTask:
    """The agent's merge task for the current backend (collect, then merge)."""
    return MergeTask(Merger(s.store, dataset), s.backend.collect, on_report=s.backend.merged)


def killed_write(folder: Path, image_id: str) -> Path:
    """The temporary file a write of ``image_id``'s copy leaves when a kill cuts it short
    (``service.durable``'s name: ``.<name>.<random>.tmp``)."""
    tmp = folder / f".{image_id[:24]}.jpg.k7x_q2ab.tmp"
    tmp.write_bytes(JPEG)
    return tmp


def test_a_copy_goes_once_its_review_is_merged_or_its_task_is_gone(ls_server: lsserver.LabelStudioServer,
                                                                   tmp_path: Path) -> None:
    s = Sync(ls_server, tmp_path)
    dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.0)
    try:
        s.run()
        copies = {n: copy_of(s, t) for n, t in s.tasks().items() if n in NOT_FOR_BROWSERS}
        assert all(p.is_file() for p in copies.values())
        folder = copies["ir.tiff"].parent
        tmp = killed_write(folder, s.ids["cam.pgm"])
        other = folder / "notes.txt"  # not ours: left alone
        other.write_text("kept")
        s.restart()  # a new process: its first collection clears what the kill left
        merge = merge_task(s, dataset)
        assert not merge.run_once()
        assert not tmp.exists() and other.exists()
        assert all(p.is_file() for p in copies.values())  # every task still waits for its review
        review(s, "ir.tiff")
        review(s, "cam.pgm", cancelled=True)  # skipped: the task is still to be done
        for _ in range(2):  # collected but not merged (a merge that refused it, or failed): kept
            assert [label.image_id for label in s.backend.collect()] == [s.ids["ir.tiff"]]
        assert copies["ir.tiff"].is_file()
        assert merge.run_once()
        assert s.store.get(s.ids["ir.tiff"]).state == REVIEWED  # type: ignore[union-attr]
        assert copies["ir.tiff"].is_file()  # collected; the next collection knows it was merged
        merge.run_once()
        assert not copies["ir.tiff"].exists()
        assert copies["cam.pgm"].is_file() and copies["cam.jp2"].is_file()
        assert s.shown(s.tasks()["cam.pgm"])[0] == copies["cam.pgm"].read_bytes()
        # a deleted task: its copy goes; the image, still waiting, comes back with a new copy
        s.client.delete(f"/api/tasks/{s.tasks()['cam.jp2']['id']}/")
        merge.run_once()
        assert not copies["cam.jp2"].exists() and copies["cam.pgm"].is_file()
        assert s.store.get(s.ids["cam.jp2"]).state == UPLOADED  # type: ignore[union-attr]
        assert s.submit.reconcile() == 1
        task = s.tasks()["cam.jp2"]
        data, content_type = s.shown(task)
        assert copy_of(s, task).is_file() and data.startswith(JPEG) and content_type == "image/jpeg"
        assert sorted(s.tasks()) == sorted(IMAGES)
    finally:
        dataset.close()
        s.close()


def test_a_deleted_projects_copies_go_and_its_merged_reviews_are_not_sent_again(
        ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> None:
    s = Sync(ls_server, tmp_path)
    dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.0)
    try:
        s.run()
        first = s.backend.project_id
        copies = {n: copy_of(s, t) for n, t in s.tasks().items() if n in NOT_FOR_BROWSERS}
        tmp = killed_write(copies["cam.jp2"].parent, s.ids["cam.jp2"])
        merge = merge_task(s, dataset)
        review(s, "ir.tiff")
        assert merge.run_once()  # merged: the image is reviewed
        merged = dataset.get(s.ids["ir.tiff"]).label  # type: ignore[union-attr]
        review(s, "cam.pgm")  # finished, not collected yet ...
        s.client.delete(f"/api/projects/{first}/")  # ... when the project is deleted
        s.restart()
        s.run()  # the restarted process finds the project gone and submits the waiting images again
        assert s.backend.project_id != first
        tasks = s.tasks()
        assert sorted(tasks) == sorted(set(IMAGES) - {"ir.tiff"})  # the merged review is not sent again
        assert all(t["annotations"] == [] for t in s.client.get(f"/api/projects/{s.backend.project_id}/export",
                                                                 exportType="JSON"))
        merge = merge_task(s, dataset)
        assert not merge.run_once()
        assert dataset.get(s.ids["ir.tiff"]).label == merged  # type: ignore[union-attr]
        assert s.store.get(s.ids["cam.pgm"]).state == UPLOADED  # type: ignore[union-attr]  # lost with the project
        # the deleted project's copies went, and what a kill left among them; the new tasks show new ones
        assert not any(p.exists() for p in copies.values()) and not tmp.exists()
        for name in ("cam.pgm", "cam.jp2"):
            data, content_type = s.shown(tasks[name])
            assert copy_of(s, tasks[name]).is_file() and data.startswith(JPEG) and content_type == "image/jpeg"
    finally:
        dataset.close()
        s.close()
