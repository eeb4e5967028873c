"""One suite that every ObjectStore passes (local folder, moto, SeaweedFS), then S3 specifics."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from sync.errors import ObjectNotFound, PermanentError, RetryableError
from sync.objectstore import LocalFolderStore, ObjectStore, S3Store
from sync.s3store import wrap_boto_error

from s3servers import ACCESS_KEY, S3Server, free_port


def _s3(server: S3Server, bucket: str, prefix: str = "edge", **kw) -> S3Store:
    return S3Store(bucket, prefix, endpoint_url=server.endpoint_url, region="us-east-1", **kw)


@pytest.fixture(params=["local", "moto", "seaweed"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path, s3_env: None):
    """A factory ``prefix -> ObjectStore``; all stores of one test share one bucket / folder."""
    if request.param == "local":
        return lambda prefix="edge": LocalFolderStore(tmp_path / "bucket", prefix)
    server: S3Server = request.getfixturevalue("moto_server" if request.param == "moto" else "seaweed")
    bucket = server.new_bucket()
    return lambda prefix="edge": _s3(server, bucket, prefix)


def test_is_an_object_store(make_store) -> None:
    assert isinstance(make_store(), ObjectStore)


def test_put_head_get_round_trip(make_store) -> None:
    store = make_store()
    store.check()
    data = b"\xff\xd8 not really a jpeg \xff\xd9"
    assert store.head("images/a.jpg") is None
    store.put("images/a.jpg", data, "image/jpeg", metadata={"appliance": "box-1"})
    info = store.head("images/a.jpg")
    assert info is not None
    assert (info.key, info.size, info.sha256) == ("images/a.jpg", len(data), hashlib.sha256(data).hexdigest())
    assert store.get("images/a.jpg") == data


def test_get_reports_progress_as_the_bytes_arrive(make_store) -> None:
    """A model file over a weak link outlasted the agent's watchdog: ``get`` fed it only once the
    whole file had arrived. It is now called per MiB (``CHUNK``)."""
    from sync.objectstore import CHUNK

    store = make_store()
    data = bytes(range(256)) * (CHUNK * 5 // 2 // 256)
    store.put("bundles/b/pose.onnx", data)
    calls: list[int] = []
    assert store.get("bundles/b/pose.onnx", progress=lambda: calls.append(1)) == data
    assert len(calls) >= 3
    assert store.get("bundles/b/pose.onnx") == data


def test_put_from_file_and_overwrite(make_store, tmp_path: Path) -> None:
    store = make_store()
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * 4000)
    store.put("x/big.bin", src)
    assert store.head("x/big.bin").sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    store.put("x/big.bin", b"small")
    info = store.head("x/big.bin")
    assert (info.size, info.sha256) == (5, hashlib.sha256(b"small").hexdigest())


def test_missing_objects(make_store) -> None:
    store = make_store()
    assert store.head("nope/x.json") is None
    with pytest.raises(ObjectNotFound):
        store.get("nope/x.json")
    store.delete("nope/x.json")  # not an error


@pytest.mark.parametrize("keys, prefix, expected", [
    ([], "", []),
    (["b/2", "a/1", "b/1"], "", ["a/1", "b/1", "b/2"]),
    (["b/2", "a/1", "b/1"], "b/", ["b/1", "b/2"]),
    (["a/1"], "c/", []),
])
def test_list(make_store, keys: list[str], prefix: str, expected: list[str]) -> None:
    store = make_store()
    for k in keys:
        store.put(k, k.encode())
    assert list(store.list(prefix)) == expected


def test_prefixes_keep_stores_apart_and_delete(make_store) -> None:
    one, two = make_store("edge/one"), make_store("edge/two")
    one.put("k/a", b"1")
    two.put("k/b", b"2")
    assert list(one.list()) == ["k/a"] and list(two.list()) == ["k/b"]
    assert one.head("k/b") is None
    one.delete("k/a")
    assert list(one.list()) == [] and one.head("k/a") is None


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b"])
def test_bad_keys_are_refused(make_store, key: str) -> None:
    with pytest.raises(ValueError):
        make_store().put(key, b"x")


def test_uri(make_store) -> None:
    uri = make_store().uri("images/a.jpg")
    assert uri.endswith("/edge/images/a.jpg") and uri.split(":")[0] in ("s3", "file")


# -- S3 specifics ----------------------------------------------------------------------------
@pytest.mark.parametrize("server_name", ["moto", "seaweed"])
def test_multipart_upload_keeps_the_checksum(request: pytest.FixtureRequest, server_name: str,
                                             tmp_path: Path, s3_env: None) -> None:
    server: S3Server = request.getfixturevalue(f"{server_name}_server" if server_name == "moto" else server_name)
    bucket = server.new_bucket()
    store = _s3(server, bucket, multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=1)
    src = tmp_path / "large.bin"
    src.write_bytes(hashlib.sha256(b"seed").digest() * (6 << 15))  # 6 MiB -> two parts
    store.put("images/large.bin", src)
    etag = server.client().head_object(Bucket=bucket, Key="edge/images/large.bin")["ETag"]
    assert etag.strip('"').endswith("-2"), etag  # it really went up in parts
    assert store.head("images/large.bin").sha256 == hashlib.sha256(src.read_bytes()).hexdigest()


@pytest.mark.parametrize("sse, kms_key_id", [("AES256", None), ("aws:kms", "alias/edge-test")])
def test_server_side_encryption(moto_server: S3Server, s3_env: None, sse: str, kms_key_id: str | None) -> None:
    bucket = moto_server.new_bucket()
    _s3(moto_server, bucket, sse=sse, kms_key_id=kms_key_id).put("a", b"secret")
    assert moto_server.client().head_object(Bucket=bucket, Key="edge/a")["ServerSideEncryption"] == sse


def test_wrong_credentials_are_a_clear_permanent_error(seaweed: S3Server, s3_env: None,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    bucket = seaweed.new_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = _s3(seaweed, bucket)
    for call in (store.check, lambda: store.put("a", b"x"), lambda: store.head("a")):
        with pytest.raises(PermanentError, match="credentials rejected"):
            call()
    assert "not-the-secret" not in caplog.text


def test_missing_bucket_is_a_clear_permanent_error(moto_server: S3Server, s3_env: None) -> None:
    store = _s3(moto_server, "edge-no-such-bucket")
    with pytest.raises(PermanentError, match="bucket edge-no-such-bucket does not exist"):
        store.check()
    with pytest.raises(PermanentError, match="bucket edge-no-such-bucket does not exist"):
        store.put("a", b"x")
    from sync.config import TargetConfig, open_target  # the table it was given in is named

    registry = open_target(TargetConfig(kind="s3", bucket="edge-no-such-bucket", endpoint_url=moto_server.endpoint_url,
                                        region="us-east-1"), "sync.models.registry")
    with pytest.raises(PermanentError, match=r"fix \[sync.models.registry\] bucket"):
        registry.check()


def test_unreachable_endpoint_is_retryable(s3_env: None) -> None:
    store = S3Store("b", "", endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout=1)
    with pytest.raises(RetryableError):
        store.put("a", b"x")
    with pytest.raises(RetryableError):
        store.head("a")


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("code, status, kind, words", [
    ("InternalError", 500, RetryableError, "InternalError"),
    ("SlowDown", 503, RetryableError, "SlowDown"),
    ("", 502, RetryableError, "502"),
    ("InvalidAccessKeyId", 403, PermanentError, "credentials rejected"),
    ("SignatureDoesNotMatch", 403, PermanentError, "credentials rejected"),
    ("AccessDenied", 403, PermanentError, "credentials rejected"),
    ("NoSuchBucket", 404, PermanentError, "bucket bkt does not exist"),
    ("InvalidArgument", 400, PermanentError, "InvalidArgument"),
    # completed by a request whose answer was lost, then asked again: check the key again
    ("NoSuchUpload", 404, RetryableError, "NoSuchUpload"),
    ("IncompleteBody", 400, RetryableError, "IncompleteBody"),
    ("RequestTimeTooSkewed", 403, RetryableError, "clock"),
    ("ExpiredToken", 400, PermanentError, "session token expired"),
])
def test_error_mapping(code: str, status: int, kind: type, words: str) -> None:
    err = wrap_boto_error(_client_error(code, status), "bkt", "put a")
    assert type(err) is kind and words in str(err) and ACCESS_KEY not in str(err)


def test_local_folder_lists_from_the_prefixs_folder_and_lists_folders(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``list`` walked the whole bucket folder (a year of uploaded images) to list one manifest
    folder; it starts at the prefix's folder now. ``folders`` names the sub-folders (jobs)."""
    import os

    import sync.objectstore as objectstore

    store = LocalFolderStore(tmp_path / "bucket")
    for key in ("images/aa/1.jpg", "images/bb/2.jpg", "out/job-a/manifests/output/output.manifest",
                "out/job-b/x.json", "out/top.json", "outer.json"):
        store.put(key, b"x")
    walked: list[str] = []
    walk = os.walk
    monkeypatch.setattr(objectstore.os, "walk", lambda top, *a, **k: walked.append(str(top)) or walk(top, *a, **k))
    assert list(store.list("out/")) == ["out/job-a/manifests/output/output.manifest", "out/job-b/x.json",
                                        "out/top.json"]
    assert walked == [str(tmp_path / "bucket" / "out")]
    assert list(store.list("out")) == ["out/job-a/manifests/output/output.manifest", "out/job-b/x.json",
                                       "out/top.json", "outer.json"]  # a prefix, not a folder
    assert list(store.list("nothing/")) == [] and list(store.list("../")) == []
    assert store.folders("out/") == ["job-a", "job-b"] and store.folders("images") == ["aa", "bb"]
    assert store.folders("missing/") == [] and store.folders("out/top.json") == []


def test_check_removes_the_temporary_files_a_killed_write_left_once_they_are_old(tmp_path: Path) -> None:
    """A kill inside ``put`` (before the rename) left ``.<name>.<random>.tmp`` in the bucket
    folder for good (the chaos soak: 1 in 39 agent kills); the agent's start (``check``) removes
    those older than a day and leaves younger ones (another appliance's write in a shared folder)."""
    import os
    import time

    from sync.objectstore import STALE_TEMP_S, LocalFolderStore

    store = LocalFolderStore(tmp_path / "bucket")
    store.put("images/abc.jpg", b"jpeg")
    old = tmp_path / "bucket" / "images" / ".def.jpg.x1y2.tmp"
    young = tmp_path / "bucket" / "manifests" / "box-1" / ".b1.manifest.z9.tmp"
    for path in (old, young):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    stale = time.time() - STALE_TEMP_S - 60
    os.utime(old, (stale, stale))
    store.check()
    assert not old.exists() and young.exists()  # HEAD: both stayed
    assert list(store.list("")) == ["images/abc.jpg"]
