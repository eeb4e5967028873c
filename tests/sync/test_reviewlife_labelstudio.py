"""A Label Studio annotation deleted after its review was merged (against the real server)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import pytest

import lsserver
from test_labelstudio_reviewers import Box, messages, pred_head_x


@pytest.fixture
def box(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[Box]:
    b = Box(ls_server, tmp_path)
    yield b
    b.close()


def test_an_annotation_deleted_after_the_merge_is_said_once_and_its_review_kept_until_a_new_one(
        box: Box, caplog: pytest.LogCaptureFixture) -> None:
    """The reviewer deletes their annotation in Label Studio the day after it was merged: the
    dataset kept the label and nothing was said. Now it is said once (the dataset keeps that
    review: a deletion is no review, and nothing is lost), and a review submitted in the task
    again replaces it."""
    caplog.set_level(logging.INFO)
    image = box.ids[0]
    box.send()
    first = box.annotate(image, head_dx=5.0)
    assert box.merge.run_once()
    merged_x = box.head_x(image)
    assert merged_x == pytest.approx(pred_head_x(box) + 0.05 * 64, abs=0.01)
    caplog.clear()
    box.client.delete(f"/api/annotations/{first['id']}/")
    box.merge.run_once()
    box.merge.run_once()
    said = [m for m in messages(caplog, logging.WARNING) if image[:12] in m and "deleted in Label Studio" in m]
    assert len(said) == 1 and "keeps" in said[0], messages(caplog)
    assert box.head_x(image) == merged_x  # kept
    time.sleep(0.01)
    box.annotate(image, head_dx=20.0)  # the task is to do again: a new review replaces the kept one
    assert box.merge.run_once()
    assert box.head_x(image) == pytest.approx(pred_head_x(box) + 0.20 * 64, abs=0.01)
