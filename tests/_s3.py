"""A local S3-compatible server for tests: moto's server mode in a subprocess on a
free loopback port, stopped by its pid.

Run as a script (``python tests/_s3.py PORT``) it is that server: moto's own
WSGI application and request handler, served by werkzeug as ``moto_server``
does, less the ``Server`` header werkzeug adds beside moto's. aiohttp (under
s3fs) refuses a reply with two (moto issue 9930, aiohttp >= 3.13.4).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _redis_server import free_port

REGION = "us-east-1"
ACCESS_KEY = "agentq-test"
SECRET_KEY = "agentq-test-secret"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    pid: int

    def env(self) -> dict[str, str]:
        """The AWS environment variables that point s3fs (botocore) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            # Never ask an instance metadata service for credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                              aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()


@contextlib.contextmanager
def s3_server(timeout: float = 30) -> Iterator[S3Server]:
    """Start the server, wait until it answers HTTP, yield it; stop it by pid."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    folder = Path(tempfile.mkdtemp(prefix="aqs3", dir="/tmp"))
    log = folder / "moto.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, __file__, str(port)], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(endpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start on {endpoint} "
                                   f"(exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield S3Server(endpoint, process.pid)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


def _serve(port: int) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    class OneServerHeader(MotoRequestHandler):
        def send_response(self, code: int, message: str | None = None) -> None:
            self.send_response_only(code, message)
            self.send_header("Date", self.date_time_string())

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass  # a line per request is noise in the log kept for failures

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_simple("127.0.0.1", port, DomainDispatcherApplication(create_backend_app),
               threaded=True, request_handler=OneServerHeader)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
