"""The uploader against a real S3 server (moto, on loopback) that misbehaves in ways it cannot
be made to on its own: faults are injected into botocore's ``before-send`` event, where a
handler may answer in the server's place or send the request and then lose its answer."""
from __future__ import annotations

import email.utils
import random
import time
from pathlib import Path
from typing import Callable

import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import ConnectionClosedError

from sync.backoff import RetryPolicy
from sync.errors import PermanentError, RetryableError
from sync.s3store import S3Store
from sync.uploader import Uploader, UploadSettings

from reviewdata import fill_store
from s3servers import S3Server
from test_uploader import Recording, assert_exactly_once, drain

FAST = RetryPolicy(base=0.01, cap=0.05, attempts=4, rng=random.Random(7))


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: object):
        yield self.data


def answer(status: int, code: str | None = None, date: float | None = None) -> AWSResponse:
    """What S3 sends when it refuses a request: an XML error (none for a HEAD), and its Date."""
    body = f"<Error><Code>{code}</Code><Message>refused</Message></Error>".encode() if code else b""
    headers = {"Content-Type": "application/xml",
               "Date": email.utils.formatdate(time.time() if date is None else date, usegmt=True)}
    return AWSResponse("http://127.0.0.1/", status, headers, _Body(body))


def inject(target: S3Store, fault: Callable[[AWSPreparedRequest], AWSResponse | None]) -> Callable[[], None]:
    """Run ``fault`` before each request the target sends; its answer replaces the server's.
    Returns the function that removes it."""
    def handler(request: AWSPreparedRequest, **_: object) -> AWSResponse | None:
        return fault(request)

    target.client.meta.events.register_first("before-send.s3", handler)
    return lambda: target.client.meta.events.unregister("before-send.s3", handler)


def _target(server: S3Server, **kwargs: object) -> S3Store:
    return S3Store(server.new_bucket(), "edge", endpoint_url=server.endpoint_url, region="us-east-1", **kwargs)


def test_a_lost_answer_to_completing_a_multipart_upload_is_retried(moto_server: S3Server, tmp_path: Path,
                                                                    s3_env: None) -> None:
    """The server completed the upload but its answer was lost; botocore asked again and S3
    answered NoSuchUpload (it forgets the upload id on completion). That stopped the agent as
    a permanent error; it is retried, and the retry finds the object there."""
    store, review, _ = fill_store(tmp_path / "store", review=2)
    target = _target(moto_server, multipart_threshold=1, multipart_chunksize=8 << 20)  # every object in parts
    completes: list[str] = []

    def lose_first_completion(request: AWSPreparedRequest) -> AWSResponse | None:
        if request.method != "POST" or "uploadId=" not in request.url:
            return None
        completes.append(request.url)
        if len(completes) == 1:
            target.client._endpoint.http_session.send(request)  # done on the server...
            raise ConnectionClosedError(endpoint_url=request.url)  # ...and the answer lost
        if len(completes) == 2:
            return answer(404, "NoSuchUpload")
        return None

    inject(target, lose_first_completion)
    rec = Recording(target)
    drain(Uploader(store, rec, UploadSettings("box-1", retry=FAST)))
    assert len(completes) >= 2
    assert_exactly_once(target, store, review)
    assert len(list(target.list("manifests/"))) == 1


def test_a_clock_off_by_more_than_s3_allows_is_retried_and_says_so(moto_server: S3Server, tmp_path: Path,
                                                                     s3_env: None) -> None:
    """RequestTimeTooSkewed read as "credentials rejected ... wrong keys" and stopped the agent
    for good; an edge box without a real-time clock starts before NTP sets its time. It says
    what to fix, is retried, and goes on once the clock is right."""
    store, review, _ = fill_store(tmp_path / "store", review=2)
    target = _target(moto_server)
    server_time = time.time() + 3600  # this box is an hour behind

    def skewed(request: AWSPreparedRequest) -> AWSResponse:
        if request.method == "HEAD":  # no body: the reason is only in the Date
            return answer(403, date=server_time)
        return answer(403, "RequestTimeTooSkewed", date=server_time)

    healed = inject(target, skewed)
    with pytest.raises(RetryableError, match="clock is (359[0-9]|360[0-9]) s behind the server's") as caught:
        Uploader(store, target, UploadSettings("box-1", retry=FAST)).run_once()
    assert "credentials" not in str(caught.value)
    uploader = Uploader(store, target, UploadSettings("box-1", retry=FAST))
    uploader._checked = True  # past the bucket check: the put answers with the code
    with pytest.raises(RetryableError, match="clock"):
        uploader.run_once()
    assert store.counts()["review_pending"] == 2
    healed()
    drain(uploader)
    assert_exactly_once(target, store, review)


def test_an_expired_session_token_is_named_though_a_head_gives_no_reason(moto_server: S3Server, tmp_path: Path,
                                                                          s3_env: None) -> None:
    """A HEAD's refusal has no body: the uploader, which heads each key before it puts it,
    stopped with "head images/...: 400: Bad Request" and nothing about what to fix."""
    store, review, _ = fill_store(tmp_path / "store", review=1)
    target = _target(moto_server)
    uploader = Uploader(store, target, UploadSettings("box-1", retry=FAST))
    uploader._checked = True  # the token expires after the bucket check, mid-run
    inject(target, lambda request: answer(400) if request.method == "HEAD" else answer(400, "ExpiredToken"))
    with pytest.raises(PermanentError, match="session token expired") as caught:
        uploader.run_once()
    assert "\n" not in str(caught.value) and "Bad Request" not in str(caught.value)
    assert store.counts()["review_pending"] == 1 and store.counts()["uploaded"] == 0
