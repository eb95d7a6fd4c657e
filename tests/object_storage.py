"""A real S3 API server for the object-storage tests and benchmarks: moto's server mode on a free local port, with
authentication on, and a TCP proxy in front of it that can be cut (the network gone) or slowed (a remote store's
round trip).

Test modules and ``tests/benchmarks/remote_feed.py`` import it as ``object_storage`` (``tests/`` is on ``sys.path``
for tests; the benchmark puts it there).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REQUEST_STARTS = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ")
"""How an HTTP/1.1 request's first bytes look: the proxy delays each request once, at its start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(root: Path, bucket: str, *, env: dict[str, str] | None = None) -> Iterator[tuple[dict[str, str], Any]]:
    """Start moto's S3 server with ``bucket`` made and an IAM user whose keys work (others are refused), its AWS
    config files under ``root``; yield the environment that reaches it (``AWS_*``) and a boto3 client. ``env`` is
    the server process's environment (default: this one's). Ends the server."""
    import boto3

    port = free_port()
    # The first 3 requests are unauthenticated (they make the IAM user); every later one needs its keys.
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**(os.environ if env is None else env), "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
               # nothing from this machine's own AWS config
               "AWS_CONFIG_FILE": str(root / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(root / "credentials")}
        iam = boto3.client("iam", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="kava")
        key = iam.create_access_key(UserName="kava")["AccessKey"]
        iam.put_user_policy(UserName="kava", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        aws |= {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=bucket)
        yield aws, client
    finally:
        server.terminate()
        server.wait(timeout=10)


class Proxy:
    """A TCP proxy to ``127.0.0.1:target``. :meth:`cut` drops every connection and closes the port (what a client
    sees when the network goes; :meth:`cut_on` at the first request naming a key), :meth:`open` listens again on
    the same port. ``delay_s`` holds each request that long before sending it on (a remote store's round trip)."""

    def __init__(self, target: int, *, delay_s: float = 0.0) -> None:
        self.target, self.port, self.delay_s = target, 0, delay_s
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._pattern: bytes | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> Proxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut_on(self, pattern: bytes) -> None:
        """Cut at the first request that carries ``pattern`` (a key in its request line), before it is sent on."""
        self._pattern = pattern

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                _close(s)
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            try:
                far = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _close(near)
                continue
            for s in (near, far):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [near, far]
            for a, b, out in ((near, far, True), (far, near, False)):
                threading.Thread(target=self._pipe, args=(a, b, out), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, out: bool) -> None:
        try:
            while data := a.recv(1 << 16):
                if out and self._pattern is not None and self._pattern in data:
                    self._pattern = None
                    self.cut()
                    return
                if out and self.delay_s and data.startswith(REQUEST_STARTS):
                    time.sleep(self.delay_s)
                b.sendall(data)
        except OSError:
            pass
        finally:
            _close(a)
            _close(b)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def serve_proxy(target: int, delay_s: float) -> tuple[subprocess.Popen, int]:
    """A :class:`Proxy` to ``127.0.0.1:target`` in a process of its own (its threads then take no time from the
    caller's), and its port. Terminate the process when done."""
    proc = subprocess.Popen([sys.executable, __file__, str(target), str(delay_s)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


if __name__ == "__main__":  # serve_proxy's process: print the port, then forward until terminated
    proxy = Proxy(int(sys.argv[1]), delay_s=float(sys.argv[2])).open()
    print(proxy.port, flush=True)
    threading.Event().wait()
