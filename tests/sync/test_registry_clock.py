"""``annotator models clean-registry`` judges an object's age by the store's clock, not this box's.

A bucket stamps LastModified with the server's clock; a box clock ahead of it made an object
written a second ago look hours old, and ``--apply`` deleted a publication running now. The box
clock is shifted in a child process (``time.time`` and botocore's signing clock: what this
code reads of the clock) against real S3 servers on loopback; the servers keep the true time.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from s3servers import ACCESS_KEY, SECRET_KEY, S3Server
from sync.errors import BundleContentError
from sync.objectstore import LocalFolderStore
from sync.registry import BundleRegistry

ROOT = Path(__file__).resolve().parents[2]

# Runs argv[2:] with this box's clock argv[1] seconds ahead of the true time.
SKEWED = textwrap.dedent("""
    import datetime, runpy, sys, time
    import botocore.auth
    ahead = float(sys.argv[1])
    real, signing = time.time, botocore.auth.get_current_datetime
    time.time = lambda: real() + ahead
    botocore.auth.get_current_datetime = lambda *a, **k: signing(*a, **k) + datetime.timedelta(seconds=ahead)
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__") if sys.argv[0] != "-c" else exec(sys.argv[1])
""")


def skewed(ahead_s: float, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("AWS_PROFILE", None)
    env.pop("AWS_SESSION_TOKEN", None)
    return subprocess.run([sys.executable, "-c", SKEWED, str(ahead_s), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_clean_registry_with_the_box_clock_hours_ahead_leaves_a_publication_running_now(
        moto_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Box clock 2 h ahead of the bucket's, ``--min-age-hours 1 --apply``: a model file written a
    second ago was "newest 2 h old" and removed, under a publication about to write its
    bundle.json. Judged by the listing's Date it is 0 h old and left; a folder the server
    stamped two days ago is still removed, a published bundle never."""
    import moto.s3.models

    from sync.s3store import S3Store

    bucket = moto_server.new_bucket()
    store = S3Store(bucket, "registry", client=moto_server.client())
    store.put("bundles/good/bundle.json", b"{}")
    store.put("bundles/good/head.onnx", b"model")
    store.put("bundles/running/head.onnx", b"a publication writing its files now")
    two_days_ago = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(days=2)
    with monkeypatch.context() as m:  # the server's clock when it wrote the killed publication's file
        m.setattr(moto.s3.models, "utcnow", lambda: two_days_ago)
        store.put("bundles/killed/head.onnx", b"cut short")
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n[sync.models]\n[sync.models.registry]\n'
                      f'kind = "s3"\nbucket = "{bucket}"\nprefix = "registry"\n'
                      f'endpoint_url = "{moto_server.endpoint_url}"\n')

    done = skewed(7200, "service.cli", "models", "clean-registry", "--config", str(config),
                  "--min-age-hours", "1", "--apply")
    assert done.returncode == 0, done.stderr
    assert "left  bundles/running/  1 objects, no bundle.json yet, newest 0.0 h old" in done.stdout, done.stdout
    assert "removed  bundles/killed/  1 objects" in done.stdout and "newest 48 h old" in done.stdout
    assert list(store.list("bundles/")) == ["bundles/good/bundle.json", "bundles/good/head.onnx",
                                            "bundles/running/head.onnx"]


def test_a_box_clock_within_the_signing_limit_does_not_age_a_bucket_object(seaweed: S3Server) -> None:
    """SeaweedFS checks signatures: a box 2 h ahead is refused (said), 10 min ahead is served,
    and those 10 minutes made an object written now 600 s old, an orphan for a 5-minute limit
    (``orphans``) and deleted by ``remove_orphan``. By the server's clock it is neither."""
    from sync.s3store import S3Store

    bucket = seaweed.new_bucket()
    store = S3Store(bucket, "registry", client=seaweed.client())
    store.put("bundles/running/head.onnx", b"a publication writing its files now")
    code = textwrap.dedent(f"""
        import json
        from sync.registry import BundleRegistry, Orphan
        from sync.s3store import S3Store
        registry = BundleRegistry(S3Store({bucket!r}, "registry", endpoint_url={seaweed.endpoint_url!r},
                                          region="us-east-1"))
        found = [[o.bundle_id, round(o.newest_age_s)] for o in registry.orphans(300)]
        removed = registry.remove_orphan(Orphan("running", ("bundles/running/head.onnx",), 35, 900.0), 300)
        print(json.dumps({{"found": found, "removed": removed}}))
    """)
    done = skewed(600, "-c", code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"found": [], "removed": False}
    assert list(store.list("bundles/")) == ["bundles/running/head.onnx"]
    refused = skewed(7200, "-c", code)
    # 7200 s, or a second more on a busy box
    assert refused.returncode != 0 and re.search(r"this box's clock is 720\d s ahead of the server's", refused.stderr)


def test_the_stores_list_with_times_and_their_clock(moto_server: S3Server, tmp_path: Path) -> None:
    """``list_with_times`` beside ``list`` on each store: the same keys, each with its time and
    size, and the clock that stamped them (the folder's: this box's; the bucket's: its Date)."""
    from sync.s3store import S3Store

    folder = LocalFolderStore(tmp_path / "registry", "models")
    bucket = S3Store(moto_server.new_bucket(), "models", client=moto_server.client())
    for store in (folder, bucket):
        store.put("bundles/a/bundle.json", b"{}")
        store.put("bundles/a/head.onnx", b"12345")
        store.put("other/x", b"x")
        listing = store.list_with_times("bundles/")
        assert sorted(listing.objects) == list(store.list("bundles/")) == ["bundles/a/bundle.json",
                                                                         "bundles/a/head.onnx"]
        assert [size for _, size in listing.objects.values()] == [2, 5]
        assert all(abs(listing.now - stamp) < 60 for stamp, _ in listing.objects.values())
        assert sorted(store.list_with_times("").objects) == list(store.list(""))
        assert store.list_with_times("nothing/").objects == {}


def test_a_store_without_object_times_is_not_cleaned(tmp_path: Path) -> None:
    """A store that only lists keys (the ``ObjectStore`` protocol) has no ages to judge: refused."""
    inner = LocalFolderStore(tmp_path)
    inner.put("bundles/x/head.onnx", b"m")

    class KeysOnly:
        def list(self, prefix: str = ""):
            return inner.list(prefix)

        def __repr__(self) -> str:
            return "KeysOnly()"

    with pytest.raises(BundleContentError, match="cannot tell the age of its objects"):
        BundleRegistry(KeysOnly()).orphans()


def test_a_model_file_still_going_up_keeps_its_publication_young(seaweed: S3Server) -> None:
    """A publication over a slow link: head.onnx finished long ago, pose_main.onnx still going
    up (a multipart upload: no object yet). Judged by its objects alone the folder was an
    orphan, and removing head.onnx left the bundle about to be published without it. The
    upload in progress counts from when it began (ages here by a ``now`` in between)."""
    from sync.s3store import S3Store

    bucket = seaweed.new_bucket()
    client = seaweed.client()
    store = S3Store(bucket, "registry", client=client)
    store.put("bundles/slow/head.onnx", b"finished")
    time.sleep(2.1)  # LastModified and Initiated have one-second steps
    client.create_multipart_upload(Bucket=bucket, Key="registry/bundles/slow/pose_main.onnx")
    (upload,) = client.list_multipart_uploads(Bucket=bucket, Prefix="registry/bundles/")["Uploads"]
    (obj,) = client.list_objects_v2(Bucket=bucket, Prefix="registry/bundles/")["Contents"]
    finished, began = obj["LastModified"].timestamp(), upload["Initiated"].timestamp()
    assert began - finished >= 1
    now, min_age = began + 1, began - finished + 0.5  # head.onnx is older than min_age, the upload younger
    assert BundleRegistry(store).orphans(min_age, now=now) == []
    assert [o.bundle_id for o in BundleRegistry(store).orphans(min_age, now=began + min_age)] == ["slow"]


def test_a_file_being_written_into_a_folder_registry_keeps_its_publication_young(tmp_path: Path) -> None:
    """The same in a folder registry: a model file being written (its hidden ``.tmp``, not an
    object yet) beside a two-day-old one; ``orphans`` and ``remove_orphan`` leave the folder."""
    from service.durable import atomic_file
    from sync.registry import Orphan

    store = LocalFolderStore(tmp_path / "registry")
    store.put("bundles/slow/head.onnx", b"finished")
    old = time.time() - 2 * 86400
    os.utime(tmp_path / "registry" / "bundles" / "slow" / "head.onnx", (old, old))
    registry = BundleRegistry(store)
    with atomic_file(tmp_path / "registry" / "bundles" / "slow" / "pose_main.onnx") as out:
        out.write(b"half of it")
        assert registry.orphans(3600) == []
        assert not registry.remove_orphan(Orphan("slow", ("bundles/slow/head.onnx",), 8, 2 * 86400.0), 3600)
    assert list(store.list("bundles/")) == ["bundles/slow/head.onnx", "bundles/slow/pose_main.onnx"]
    assert [o.bundle_id for o in registry.orphans(0.0)] == ["slow"]  # nothing running now: found


def test_an_upload_going_up_for_hours_is_as_young_as_its_last_part(moto_server: S3Server,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A publication over a slow link: head.onnx done and pose_main.onnx's multipart upload begun
    2 h ago, a part landing now. Judged by the upload's start it was 2 h old, an orphan for a
    1-hour limit, and its finished file deleted before its bundle.json came (review)."""
    import moto.s3.models

    from sync.s3store import S3Store

    bucket = moto_server.new_bucket()
    client = moto_server.client()
    store = S3Store(bucket, "registry", client=client)
    two_hours_ago = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(hours=2)
    with monkeypatch.context() as m:
        m.setattr(moto.s3.models, "utcnow", lambda: two_hours_ago)
        store.put("bundles/slow/head.onnx", b"finished")
        up = client.create_multipart_upload(Bucket=bucket, Key="registry/bundles/slow/pose_main.onnx")
    client.upload_part(Bucket=bucket, Key="registry/bundles/slow/pose_main.onnx", UploadId=up["UploadId"],
                       PartNumber=1, Body=b"x" * (5 << 20))
    registry = BundleRegistry(store)
    assert registry.orphans(3600) == []


def test_a_folder_no_bundle_id_can_name_is_left_by_clean_registry(tmp_path: Path) -> None:
    """An object bundles/../x made orphans() list '..', and deleting under it raised out of
    clean-registry (no other orphan was cleaned); now it is said and left."""
    registry_root = tmp_path / "registry"
    (registry_root / "bundles" / "killed").mkdir(parents=True)
    (registry_root / "bundles" / "killed" / "head.onnx").write_bytes(b"cut short")
    old = time.time() - 2 * 86400
    os.utime(registry_root / "bundles" / "killed" / "head.onnx", (old, old))

    class Listing(LocalFolderStore):
        def list_with_times(self, prefix: str = ""):  # a bucket can hold a key a folder cannot
            got = super().list_with_times(prefix)
            if "bundles/../x".startswith(prefix):
                return type(got)({**got.objects, "bundles/../x": (old, 3)}, got.now, got.writing)
            return got

    registry = BundleRegistry(Listing(registry_root))
    found = registry.orphans(3600)
    assert [o.bundle_id for o in found] == ["killed"]
    assert registry.remove_orphan(found[0], 3600) and not (registry_root / "bundles" / "killed").exists()
