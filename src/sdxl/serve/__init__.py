"""`sdxl serve`: an HTTP server over the same generation as the CLI (sdxl.session), with a persistent job queue.

config.py (settings and limits), models.py (the models folder and the loaded pipelines), jobs.py (the queue, its
SQLite store and the workers), preview.py (the live preview), app.py (the FastAPI app and its security
middleware), native.py (`/v1/jobs`), a1111.py (`/sdapi/v1`, OpenAI's images API), page.py (the web page),
ray_app.py (a Ray Serve deployment, optional).
"""
