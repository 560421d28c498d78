"""`sdxl serve` as a Ray Serve deployment (optional: `pip install 'sdxl[ray]'`): the same FastAPI app, its queue and
workers, in a Ray replica behind Ray's HTTP proxy (https://docs.ray.io/en/latest/serve/http-guide.html).

    import ray
    from ray import serve
    from sdxl.serve.config import ServeConfig
    from sdxl.serve.ray_app import deployment

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 7860})
    serve.run(deployment(ServeConfig(port=7860, models_dir=Path("models")), ray_actor_options={"num_gpus": 1}))

A replica owns its output folder's job queue (one server per folder), so run one replica per output folder; a
replica uses several GPUs with `workers` in its config and `num_gpus` in its actor options. The config's port is
Ray's HTTP port (the Host check compares them).
"""

from __future__ import annotations

from sdxl.errors import SDXLError
from sdxl.serve.config import ServeConfig


def deployment(config: ServeConfig, **options):
    """A bound Ray Serve deployment of `create_app(config)`; `options` go to `serve.deployment` (num_replicas,
    ray_actor_options, ...)."""
    try:
        from ray import serve
    except ModuleNotFoundError:
        raise SDXLError("Ray Serve is not installed; pip install 'sdxl[ray]'") from None
    from sdxl.serve.app import create_app

    app = create_app(config)

    @serve.deployment(name="sdxl", **options)
    @serve.ingress(app)
    class SDXLServe:
        """One replica: the app's lifespan opens the job queue and starts its workers (sdxl.serve.app)."""

    return SDXLServe.bind()
