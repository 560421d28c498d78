"""A live `sdxl serve` for tests: uvicorn on a free 127.0.0.1 port (a thread, or a subprocess to kill), a tiny model.

Use in a test file:
    from serve_fixtures import live_server, served, tiny_models  # noqa: F401  (pytest fixtures)
    def test_x(served): httpx.get(served.url + "/v1/models")
`served` is one server per test module (fp32 on CPU, models folder with checkpoints/tiny.safetensors and
tiny_refiner.safetensors, loras/style.safetensors); `live_server(...)` starts others with their own settings.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import randomize, tiny_checkpoints

from sdxl.serve.config import ServeConfig

FAST = {"steps": 2, "width": 64, "height": 64}  # settings that keep a tiny job fast
SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models_folder(root: Path) -> Path:
    """root/checkpoints/{tiny,tiny_refiner}.safetensors and root/loras/style.safetensors (a random kohya LoRA)."""
    from sdxl.adapters.lora import add_lora, save_lora
    from sdxl.models.model import TINY_BASE, SDXLModel

    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "loras").mkdir(exist_ok=True)
    tiny_checkpoints(root / "checkpoints")
    model = SDXLModel(TINY_BASE)
    add_lora(model, rank=4)
    randomize(model, 2, 0.2)
    save_lora(model, root / "loras" / "style.safetensors")
    return root


@dataclass
class Live:
    url: str
    config: ServeConfig
    app: object = None
    process: subprocess.Popen | None = None

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def __post_init__(self):  # one connection pool for the helpers below (a new httpx client per call costs ~20 ms)
        self.http = httpx.Client(base_url=self.url, timeout=120, auth=self.auth())

    def submit(self, **body) -> str:
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            d = self.http.get(f"/v1/jobs/{job_id}").json()
            if d["state"] not in ("queued", "running"):
                return d
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {d['state']} after {timeout} s")

    def auth(self):
        return tuple(self.config.api_auth.split(":", 1)) if self.config.api_auth else None


def _wait_listening(port: int, alive=lambda: True, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and alive():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server did not start listening on port {port}")


@contextmanager
def live_server(output_dir: Path, models_dir: Path | None = None, **settings):
    """`sdxl serve`'s app under uvicorn in a thread, fp32 on CPU unless `settings` say otherwise."""
    import uvicorn

    from sdxl.serve.app import create_app

    sock = socket.socket()  # bound here and handed to uvicorn: no other test process can take the port meanwhile
    sock.bind(("127.0.0.1", settings.pop("port", 0)))
    config = ServeConfig(**({"port": sock.getsockname()[1], "models_dir": models_dir, "output_dir": Path(output_dir),
                             "device": "cpu", "dtype": "fp32"} | settings))
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_listening(config.port, thread.is_alive)
        yield Live(f"http://127.0.0.1:{config.port}", config, app)
    finally:
        server.should_exit = True
        thread.join(timeout=120)
        sock.close()


@contextmanager
def served_process(output_dir: Path, models_dir: Path | None, port: int | None = None, *extra: str):
    """`python -m sdxl.cli serve` as a subprocess (to be killed); stops it at the end if it still runs."""
    port = port or free_port()
    env = os.environ | {"PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "sdxl.cli", "serve", "--port", str(port), "--output-dir", str(output_dir),
            "--device", "cpu", "--dtype", "fp32", *(["--models-dir", str(models_dir)] if models_dir else []), *extra]
    process = subprocess.Popen(argv, env=env)
    try:
        _wait_listening(port, lambda: process.poll() is None)
        yield Live(f"http://127.0.0.1:{port}", ServeConfig(port=port, output_dir=Path(output_dir)), None, process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return make_models_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("out"), tiny_models) as live:
        yield live
