"""`sdxl serve` as a Ray Serve deployment (sdxl.serve.ray_app) on a local Ray instance with one CPU: a job through
Ray's HTTP proxy gives the image the CLI makes. Skipped when Ray Serve is not installed (`pip install 'sdxl[ray]'`;
not in the test extra: Ray is ~80 MB and its install plus start take about a minute on a 2-core machine)."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_fixtures import FAST, free_port, tiny_models  # noqa: F401  (fixtures)

from sdxl.cli import main
from sdxl.serve.config import ServeConfig

ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'sdxl[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'sdxl[ray]'")


@pytest.fixture
def ray_served(tiny_models, tmp_path):
    from sdxl.serve.ray_app import deployment

    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(port=port, models_dir=tiny_models, output_dir=tmp_path / "out", device="cpu",
                             dtype="fp32")
        serve.run(deployment(config), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_job_through_ray_serve_equals_the_cli(ray_served, tiny_models, tmp_path, capsys):
    http = httpx.Client(base_url=ray_served, timeout=120)
    r = http.post("/v1/jobs", json={"prompt": "a red circle", "seed": 4, **FAST})
    assert r.status_code == 201, r.text
    end = time.monotonic() + 300
    while (d := http.get(r.json()["url"]).json())["state"] in ("queued", "running"):
        assert time.monotonic() < end
        time.sleep(0.2)
    assert d["state"] == "done" and d["seeds"] == [4], d
    served = Image.open(io.BytesIO(http.get(d["images"][0]).content))
    a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 4, "steps": 2, "width": 64,
                                                  "height": 64})
    assert a1111.status_code == 200 and len(a1111.json()["images"]) == 1
    out = tmp_path / "cli.png"
    assert main(["generate", "a red circle", "--model", str(tiny_models / "checkpoints" / "tiny.safetensors"),
                 "--seed", "4", "--steps", "2", "--width", "64", "--height", "64", "--dtype", "fp32", "--device",
                 "cpu", "-q", "-o", str(out)]) == 0, capsys.readouterr().err
    cli = Image.open(out)
    assert np.array_equal(np.asarray(served), np.asarray(cli)) and served.info["parameters"] == cli.info["parameters"]
