"""`sdxl serve`: an HTTP server over the same generation as the CLI (sdxl.session), with a persistent job queue.

config.py (settings and limits), models.py (the models folder and the loaded pipelines), jobs.py (the queue, its
SQLite store and the worker), app.py (the FastAPI app and its security middleware), native.py (`/v1/jobs`).
"""
