"""Helpers for the sync tests: S3 endpoints on loopback (imported by conftest and the tests)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from procs import free_port  # noqa: F401  (the sync tests import it from here)

ACCESS_KEY, SECRET_KEY = "AKIAEDGETEST0001", "edge-test-secret-0001"


@dataclass
class S3Server:
    """A running S3 endpoint and the credentials it accepts."""

    name: str
    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def client(self, secret_key: str | None = None):  # -> botocore client
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10,
                          s3={"addressing_style": "path"}))

    def new_bucket(self) -> str:
        name = f"edge-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


class MotoControl(S3Server):
    """moto's threaded server, restartable on the same port (state lives in this process)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        super().__init__("moto", f"http://127.0.0.1:{self.port}")

    def stop(self) -> None:
        self._server.stop()
        if self._server._server is not None:  # free the listening socket: clients see "refused"
            self._server._server.server_close()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
