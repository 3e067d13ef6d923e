"""The real `adaroute serve` process on tiny random models, on a free loopback port.

``ServerProcess`` starts the CLI in a subprocess, waits for /health, and stops it with SIGTERM.
Models: a tiny dense Llama directory whose context is raised to 4096 positions (so a request can
decode long enough to be interrupted) and a tiny routed directory saved by ``save_routed``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures import make_tiny_tokenizer, write_hf_dir

LONG_CONTEXT = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, *args: str, audit: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.audit = audit
        cmd = [sys.executable, "-m", "adaroute", "serve", str(model), "--port", str(self.port), "--threads", "1",
               *(["--audit", str(audit)] if audit else []), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"adaroute serve exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("adaroute serve did not become healthy")

    def client(self, api_key: str = "unused", **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def terminate(self, timeout: float = 60.0) -> tuple[int, str]:
        """SIGTERM, then (exit code, everything the process printed)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()


def long_context(directory: Path) -> Path:
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return long_context(write_hf_dir(tmp_path_factory.mktemp("serve") / "tiny", seed=5))


@pytest.fixture(scope="session")
def tiny_routed_dir(tmp_path_factory) -> Path:
    from adaroute.config import RoutingConfig
    from adaroute.routing import save_routed
    from tests.routing.conftest import calibrated_copy

    model, _ = calibrated_copy(seed=5, density=0.5)
    out = tmp_path_factory.mktemp("serve") / "tiny-routed"
    save_routed(model, make_tiny_tokenizer(), out, "tiny", RoutingConfig(), {"data": ["random"]})
    return out


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """One server for the request tests: API key required, audit log on, small body limit."""
    audit = tmp_path_factory.mktemp("audit") / "audit.sqlite"
    s = ServerProcess(tiny_dir, "--api-key", "sesame", "--max-body-bytes", "65536", "--max-batch", "4",
                      audit=audit)
    yield s
    s.stop()


def wait_rows(audit: Path, where: str = "1", count: int = 1, timeout: float = 10.0) -> list[dict]:
    """Audit rows matching ``where`` once at least ``count`` exist (the writer commits every 0.25 s)."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        db = sqlite3.connect(f"file:{audit}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in db.execute(f"SELECT * FROM requests WHERE {where}")]
        except sqlite3.OperationalError:
            rows = []
        finally:
            db.close()
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)
