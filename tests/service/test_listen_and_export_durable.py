"""Listen addresses written as a user types loopback, and
an export's labels and copied images on disk before the file that says the export is whole."""
from __future__ import annotations

import os
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from service import outputs
from service.config import load_config
from service.errors import ConfigError
from service.keypoints import COCO17
from service.outputs import export_coco, export_yolo, read_yolo
from service.server import _start_metrics, _stop_metrics
from service.store import Store
from test_outputs import _jpeg, _prediction


@pytest.mark.parametrize("spelling", ["127.1:0", "LOCALHOST:0", "[::ffff:127.0.0.1]:0"])
def test_a_loopback_spelling_is_taken_as_loopback_and_both_servers_bind_it(spelling: str) -> None:
    # HEAD: '127.1' (the shorthand of 127.0.0.1: Prometheus binds it) was "expected host:port";
    # 'LOCALHOST' and the IPv4-mapped loopback (both bind 127.0.0.1) were "reachable from other
    # machines ... set metrics.allow_remote".
    cfg = load_config(None, env={}, overrides={"metrics.listen": spelling, "server.listen": spelling})
    recorder, port = _start_metrics(cfg)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200
    finally:
        _stop_metrics(recorder)
    server = grpc.server(futures.ThreadPoolExecutor(1))
    try:
        assert server.add_insecure_port(cfg.server.listen) > 0  # gRPC cannot bind '127.1' itself
    finally:
        server.stop(None)


@pytest.mark.parametrize("key", ["metrics.listen", "server.listen"])
def test_a_listen_address_with_no_host_names_both_readings(key: str) -> None:
    # HEAD: "expected host:port ... got ':9464'" (to Prometheus and Go it is every address).
    with pytest.raises(ConfigError, match=rf"^{key}: ':9464' names no host; write '127.0.0.1:9464' for this "
                                          r"machine only, or '0.0.0.0:9464' for every address"):
        load_config(None, env={}, overrides={key: ":9464"})


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "localhost.example:9464"])
def test_an_address_other_machines_reach_is_still_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics.listen: .* is reachable from other machines"):
        load_config(None, env={}, overrides={"metrics.listen": listen})


@pytest.fixture()
def annotated(tmp_path: Path) -> Iterator[tuple[Store, list[str]]]:
    store = Store(tmp_path / "store")
    ids = []
    for seed in range(3):
        iid, _ = store.ingest(_jpeg(seed), f"test:{seed}", {"camera": "cam"})
        store.claim("w", limit=1)
        record = {**_prediction(seed).to_json(), "image_id": iid, "keypoint_names": list(COCO17.names)}
        store.complete(iid, "w", record, "bundle-1", "auto_accepted", 0.7, [], audit=False)
        ids.append(iid)
    yield store, ids
    store.close()


def test_an_image_copy_a_power_cut_emptied_is_copied_again(annotated: tuple[Store, list[str]], tmp_path: Path) -> None:
    # An export to another disk copies the images, unsynced on HEAD: a power cut kept the name
    # and lost the bytes, and every later export kept the empty file ("leaves an existing dst").
    store, ids = annotated
    out = export_yolo(store, tmp_path / "yolo", link=False)
    coco = export_coco(store, tmp_path / "coco" / "annotations.json", link=False)
    emptied = [out / "pose" / "images" / f"{ids[0]}.jpg", coco.parent / "images" / f"{ids[1]}.jpg"]
    for path in emptied:
        path.write_bytes(b"")
    export_yolo(store, tmp_path / "yolo", link=False)
    export_coco(store, tmp_path / "coco" / "annotations.json", link=False)
    assert [p.read_bytes() for p in emptied] == [store.image_bytes(ids[0]), store.image_bytes(ids[1])]


def test_a_yolo_export_has_its_labels_on_disk_before_its_data_yaml(annotated: tuple[Store, list[str]], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # HEAD: no label file was synced (2,000 renames, 2 fsyncs for 1,000 images under strace): a
    # power cut kept their names, not their bytes, and an empty label reads as no one there.
    store, ids = annotated
    events: list[tuple[str, Any]] = []
    real_replace, real_sync = os.replace, getattr(outputs, "_sync_files", None)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(("replace", Path(dst).parent.name, Path(dst).name))

    def sync(folder: Path) -> None:
        real_sync(folder)
        events.append(("sync", Path(folder).name, ""))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(outputs, "_sync_files", sync, raising=False)
    out = export_yolo(store, tmp_path / "yolo")
    labels = [i for i, e in enumerate(events) if e[0] == "replace" and e[1] == "labels"]
    yamls = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == "data.yaml"]
    syncs = [i for i, e in enumerate(events) if e == ("sync", "yolo", "")]
    assert len(labels) == 2 * len(ids) and len(yamls) == 2
    assert syncs and max(labels) < syncs[0] < min(yamls), events
    assert len(read_yolo(out / "pose" / "labels" / f"{ids[0]}.txt", 64, 48)) == 1


def test_a_yolo_export_cut_short_over_an_earlier_one_leaves_no_data_yaml(annotated: tuple[Store, list[str]],
                                                                        tmp_path: Path) -> None:
    # HEAD: the earlier export's data.yaml stayed beside labels half rewritten (and, after a
    # power cut, emptied): a folder that looked whole to ultralytics.
    store, ids = annotated
    out = export_yolo(store, tmp_path / "yolo")
    (out / "head" / "labels" / f".{ids[1]}.txt.tmp").mkdir()  # the write of the second image's label fails
    with pytest.raises(IsADirectoryError):
        export_yolo(store, out)
    assert not (out / "pose" / "data.yaml").exists() and not (out / "head" / "data.yaml").exists()
    (out / "head" / "labels" / f".{ids[1]}.txt.tmp").rmdir()
    export_yolo(store, out)
    assert (out / "pose" / "data.yaml").is_file() and (out / "head" / "data.yaml").is_file()
