"""The job queue: jobs persisted in SQLite (standard library), one worker thread per device running them in order.

A job's PNGs (infotext + recipe, written whole by sdxl.formats.files) are on disk before the job is recorded done.
A server killed and restarted keeps every finished job and re-queues what was queued or running. Progress is kept
in memory per sampler step, with a preview right for the loaded VAE (sdxl.serve.preview).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sqlite3
import threading
import time
import traceback
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

from sdxl.errors import SDXLError
from sdxl.serve.config import Limits
from sdxl.serve.models import ModelsFolder
from sdxl.serve.preview import renderer
from sdxl.adapters.apply import use_loras
from sdxl.adapters.tags import lora_free, request_loras
from sdxl.session import build_request, dtype_name, run_settings, write_images

INTERNAL = "internal error: "  # how the error of a job failed by a bug (or out of memory) begins; else its input
STATES = ("queued", "running", "done", "failed", "cancelled")
SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,
    init_image BLOB, mask BLOB, total INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT, created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0)"""
PREVIEW_PERIOD = 1.0  # seconds between live previews
MAX_ATTEMPTS = 3  # a job running when the server died this often (it may be what kills it) is not run again


@dataclass(frozen=True)
class JobSpec:
    """One generation job as every API hands it to the queue."""

    settings: dict  # Request fields as JSON values; checked by Request.fields_from_dict(settings, source)
    model: str | None = None  # checkpoint name in the models folder; None: the current one
    refiner: str | None = None  # None: the model's default; "none": no refiner
    vae: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # besides the prompt's <lora:NAME:W> tags (which stay in it)
    init_image: bytes | None = None  # PNG/JPEG bytes
    mask: bytes | None = None
    n_iter: int = 1  # runs of `batch` images, the seed advancing by batch each run
    source: str = "request"  # for error messages


@dataclass(frozen=True)
class JobState:
    """What `Jobs.get` reports."""

    id: str
    state: str  # queued | running | done | failed | cancelled
    step: int  # sampler steps done
    total: int  # sampler steps planned, all runs
    job_count: int  # jobs queued + running
    preview: bytes | None  # PNG of the current latent
    images: tuple[str, ...]  # paths of the PNGs written
    infotexts: tuple[str, ...]
    seeds: tuple[int, ...]
    prompts: tuple[str, ...]
    width: int
    height: int
    error: str | None


class Cancelled(Exception):
    """Raised from the step callback: the running job was cancelled or interrupted."""


class Skipped(Exception):
    """Raised from the step callback: the current run of the job is skipped (A1111's skip)."""


@dataclass
class _Live:
    """The running job's progress, written by the worker and read by HTTP threads."""

    id: str
    total: int = 0
    step: int = 0
    stop: str | None = None  # "cancel" (a user's cancel or interrupt) | "close" (the server stops)
    skip: bool = False
    preview: bytes | None = None  # PNG of the first image's denoised latent, rendered by the worker
    render: object = None  # latent -> PNG (sdxl.serve.preview.renderer of the job's pipeline)
    rendered_at: float = float("-inf")  # time.monotonic() of the last preview


class Jobs:
    """The queue: submit/get/wait/cancel from any thread; one worker thread per pool of pipelines (a device) takes
    the oldest queued job, so jobs start in order, none runs twice (taken under the lock) and none is lost."""

    def __init__(self, database: Path, models: ModelsFolder, output_dir: Path, limits: Limits = Limits(),
                 pools: list[ModelsFolder] | None = None):
        self.models, self.output_dir, self.limits = models, Path(output_dir), limits
        self.pools = pools or [models]  # worker i loads its pipelines in pools[i] (on its own device)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.owner = claim(self.output_dir)  # this queue is ours alone until close() (SDXLError if taken)
        try:
            self.db = _open_database(database)
        except SDXLError:
            if self.owner is not None:
                os.close(self.owner)
            raise
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.running: dict[str, _Live] = {}  # job id -> progress, in the order the jobs started
        self.closing = False
        self.workers = [threading.Thread(target=self._work, args=(pool,), name=f"sdxl-worker-{i}", daemon=True)
                        for i, pool in enumerate(self.pools)]

    def start(self) -> "Jobs":
        for worker in self.workers:
            worker.start()
        return self

    def close(self) -> None:
        """Stop the workers after their running jobs' next step (those jobs are queued again for the next start)."""
        with self.changed:
            self.closing = True
            for live in self.running.values():
                live.stop = live.stop or "close"
            self.changed.notify_all()
        for worker in self.workers:
            if worker.is_alive():
                worker.join(timeout=60)
        if self.owner is not None:
            os.close(self.owner)  # the lock goes with it
            self.owner = None

    # --- the HTTP side ---------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        """Validate the job at once (SDXLError names the problem), store it with its seed fixed, return its id."""
        settings = self.check(spec)
        job_id = secrets.token_hex(8)
        stored = {"settings": settings, "model": spec.model or self.models.current, "refiner": spec.refiner,
                  "vae": spec.vae, "loras": [list(x) for x in spec.loras], "n_iter": spec.n_iter,
                  "source": spec.source}
        with self.changed:
            self.db.execute("INSERT INTO jobs (id, state, spec, init_image, mask, created) VALUES (?,?,?,?,?,?)",
                            (job_id, "queued", json.dumps(stored), spec.init_image, spec.mask, time.time()))
            self.changed.notify_all()
        return job_id

    def check(self, spec: JobSpec) -> dict:
        """The settings as they will run (a random seed fixed now, so a restart repeats it); every limit checked."""
        check_limits(spec, self.limits)
        _, requests = self.prepare(spec)
        return dict(spec.settings) | {"seed": requests[0].seed}

    def get(self, job_id: str) -> JobState:
        with self.lock:
            row = self.db.execute("SELECT state, total, result, error FROM jobs WHERE id=?", (job_id,)).fetchone()
            count = self.db.execute("SELECT count(*) FROM jobs WHERE state IN ('queued','running')").fetchone()[0]
            live = self.running.get(job_id)
        if row is None:
            raise KeyError(job_id)
        state, total, result, error = row
        r = json.loads(result) if result else {}
        step = live.step if live else (total if state == "done" else 0)
        return JobState(job_id, state, step, live.total if live else total, count, live and live.preview,
                        tuple(r.get("images", ())), tuple(r.get("infotexts", ())), tuple(r.get("seeds", ())),
                        tuple(r.get("prompts", ())), r.get("width", 0), r.get("height", 0), error)

    def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        """The job's state once it is done, failed or cancelled (or when `timeout` seconds have passed)."""
        end = None if timeout is None else time.monotonic() + timeout
        while (s := self.get(job_id)).state in ("queued", "running"):
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return s
            with self.changed:
                self.changed.wait(0.5 if left is None else min(0.5, left))
        return s

    def cancel(self, job_id: str) -> None:
        """A queued job is cancelled at once; a running one at its next step. KeyError if unknown."""
        with self.changed:
            row = self.db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row[0] == "queued":
                self.db.execute("UPDATE jobs SET state='cancelled' WHERE id=?", (job_id,))
            elif job_id in self.running:
                self.running[job_id].stop = "cancel"
            self.changed.notify_all()

    def interrupt(self) -> None:
        """Stop the running jobs at their next step (runs already finished keep their images)."""
        with self.lock:
            for live in self.running.values():
                live.stop = "cancel"

    def skip(self) -> None:
        """Abandon the running jobs' current run of `batch` images and go on with their next."""
        with self.lock:
            for live in self.running.values():
                live.skip = True

    def current(self) -> JobState | None:
        """The running job that started first (A1111's one current job)."""
        with self.lock:
            job_id = next(iter(self.running), None)
        return self.get(job_id) if job_id else None

    # --- the worker ------------------------------------------------------------------------------

    def prepare(self, spec: JobSpec):
        """(Models, [Request per run]): the same rules at submit and when the job runs."""
        models = self.models.models(spec.model, spec.refiner, spec.vae, tuple(spec.loras))
        init = _image(spec.init_image, "init_image", self.limits)
        mask = _image(spec.mask, "mask", self.limits)
        first = build_request(dict(spec.settings), models, spec.source, init, mask)
        check_request_limits(first, spec.n_iter, self.limits)
        self.models.check_plan(models, first)
        return models, [replace(first, seed=first.seed + j * first.batch) for j in range(spec.n_iter)]

    def _next(self):
        """The oldest queued job, marked running under the lock (so no other worker takes it)."""
        with self.changed:
            while not self.closing:
                row = self.db.execute("SELECT id, spec, init_image, mask FROM jobs WHERE state='queued' "
                                      "ORDER BY seq LIMIT 1").fetchone()
                if row is not None:
                    self.db.execute("UPDATE jobs SET state='running', attempts=attempts+1 WHERE id=?", (row[0],))
                    self.running[row[0]] = _Live(row[0])
                    return row
                self.changed.wait()
        return None

    def _work(self, pool: ModelsFolder) -> None:
        while (row := self._next()) is not None:
            job_id, stored, init, mask = row
            d = json.loads(stored)
            spec = JobSpec(d["settings"], d["model"], d["refiner"], d["vae"], tuple(map(tuple, d["loras"])),
                           init, mask, d["n_iter"], d["source"])
            state, result, error = "failed", None, None
            try:
                state, result = self._run(self.running[job_id], spec, pool)
            except SDXLError as e:
                error = str(e)
            except Exception as e:  # a bug or an out-of-memory: the job fails, the worker goes on
                traceback.print_exc()
                error = f"{INTERNAL}{type(e).__name__}: {e}"
            self._finish(job_id, state, result, error)

    def _finish(self, job_id: str, state: str, result: dict | None, error: str | None) -> None:
        with self.changed:
            live = self.running.pop(job_id)
            again = state == "cancelled" and live.stop == "close"  # not a user's cancel: run it at next start
            self.db.execute("UPDATE jobs SET state=?, total=?, result=?, error=?, attempts=attempts-? WHERE id=?",
                            ("queued" if again else state, live.total, json.dumps(result) if result else None,
                             error, int(again), job_id))
            self.changed.notify_all()

    def _run(self, live: _Live, spec: JobSpec, pool: ModelsFolder) -> tuple[str, dict]:
        """Run every run of a job and write its PNGs; ("done" | "cancelled", results)."""
        job_id = live.id
        models, requests = self.prepare(spec)
        log = functools.partial(print, f"job {job_id}:")
        pipe = pool.pipeline(models, log=log)
        use_loras(pipe, request_loras(requests[0], models), log)  # the same prompt, so the same LoRAs, every run
        live.render = renderer(pipe)
        live.total = sum(pipe.plan(r).total_steps for r in requests)
        for stale in self.output_dir.glob(f"{job_id}-*.png"):  # from an attempt a crash cut short
            stale.unlink()
        result = {"images": [], "infotexts": [], "seeds": [], "prompts": [], "width": 0, "height": 0}
        for j, req in enumerate(requests):
            try:
                out = pipe.generate(req, callback=lambda info: _step(live, info))
            except Skipped:
                live.skip = False
                continue
            except Cancelled:
                return "cancelled", result
            written = write_images(req, out.images, models, dtype_name(pool.dtype),
                                   self.output_dir / f"{job_id}-{j}.png", numbered=True,
                                   embeddings=pipe.tokenizer.embeddings, run=run_settings(pipe, pool.plan))
            result["images"] += [str(w.path) for w in written]
            result["infotexts"] += [w.infotext for w in written]
            result["seeds"] += [w.seed for w in written]
            result["prompts"] += [lora_free(req.prompt_of(i)) for i in range(len(written))]
            result["width"], result["height"] = out.images[0].size
        return "done", result



def _step(live: _Live, info: dict) -> None:
    """k-diffusion's per-step callback: count, render the preview (at the first step, then at most once per
    PREVIEW_PERIOD seconds, as A1111's live_preview_refresh_period; in the worker, so that polls never wait on
    it), honour cancel and skip. The step is counted after the preview is set, so a poll that sees step 1 sees
    its preview."""
    if live.render is not None and time.monotonic() - live.rendered_at >= PREVIEW_PERIOD:
        try:
            live.preview = live.render(info["denoised"][0])
        except SDXLError:  # a non-finite latent: no preview now; the job itself reports it at its end
            pass
        live.rendered_at = time.monotonic()
    live.step += 1
    if live.stop:
        raise Cancelled
    if live.skip:
        raise Skipped


def _open_database(path: Path) -> sqlite3.Connection:
    """The job database, with the jobs a dead server left running queued again (or failed after MAX_ATTEMPTS)."""
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(SCHEMA)
        db.execute("UPDATE jobs SET state='failed', error=? WHERE state='running' AND attempts>=?",
                   (f"the server stopped during this job {MAX_ATTEMPTS} times; not run again", MAX_ATTEMPTS))
        db.execute("UPDATE jobs SET state='queued' WHERE state='running'")
    except sqlite3.DatabaseError as e:
        raise _unusable(path, e) from None
    return db


def check_database(path: Path) -> None:
    """An existing job database must read as one (SDXLError otherwise); read-only, so a server can check first."""
    if path.exists():
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            raise _unusable(path, e) from None


def _unusable(path: Path, e: Exception) -> SDXLError:
    return SDXLError(f"{path}: not a usable job database ({e}); move it away or give another --output-dir")


def claim(output_dir: Path) -> int | None:
    """An exclusive lock on output_dir/jobs.lock (released by the OS if the process dies), so that two servers
    never run the same queue; returns its file descriptor (None where the platform has no flock)."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(Path(output_dir) / "jobs.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SDXLError(f"another sdxl serve is using {output_dir} (its job queue); stop it or give another "
                        "--output-dir") from None
    return fd


def check_limits(spec: JobSpec, limits: Limits) -> None:
    """The limits readable from the settings alone (before anything is decoded)."""
    s = spec.settings
    for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
        if isinstance(s.get(name), str) and len(s[name]) > limits.max_prompt_chars:
            raise LimitError(name, f"{name} of {len(s[name])} characters is over the limit of "
                                   f"{limits.max_prompt_chars} (max_prompt_chars)")
    if not isinstance(spec.n_iter, int) or isinstance(spec.n_iter, bool) or spec.n_iter < 1:
        raise SDXLError(f"{spec.source}: n_iter must be a positive integer, got {spec.n_iter!r:.40}")


def check_request_limits(req, n_iter: int, limits: Limits) -> None:
    """The server's limits on a built request: size, steps, images per job."""
    if max(req.width, req.height) > limits.max_side:
        raise LimitError("width", f"{req.width}x{req.height} is over the limit of {limits.max_side} pixels a side "
                                  "(max_side)")
    for name in ("steps", "refiner_steps", "hires_steps"):
        n = getattr(req, name)
        if n is not None and n > limits.max_steps:
            raise LimitError(name, f"{name} {n} is over the limit of {limits.max_steps} (max_steps)")
    if req.batch * n_iter > limits.max_images:
        raise LimitError("batch", f"batch {req.batch} x n_iter {n_iter} = {req.batch * n_iter} images is over the "
                                  f"limit of {limits.max_images} (max_images)")


class LimitError(SDXLError):
    """A request over one of the server's limits; names the field and the limit."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _image(data: bytes | None, what: str, limits: Limits):
    """Image bytes decoded by sdxl.images' rules, refused over the server's pixel limit."""
    if data is None:
        return None
    from sdxl.images import load_image

    try:
        return load_image(data, what, max_pixels=limits.max_image_pixels)
    except SDXLError as e:
        if "pixels" in str(e) and "refused" in str(e):
            raise LimitError(what, f"{e} (max_image_pixels {limits.max_image_pixels})") from None
        raise
