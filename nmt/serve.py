"""`nmt serve`: a translation server over HTTP, one process, the model loaded once.

Owns: the JSON API, request checks and limits, gathering concurrent requests into batched search
calls, and graceful shutdown. Does not own: loading, search settings or the search itself (all
reached through `Engine`, the one adapter to `nmt.translator`), or argument parsing (nmt.cli).

API (every answer is JSON, errors included: `{"error": "..."}` with the status):
- `POST /translate` `{"text": ["...", ...], "beam_size": 5, "n_best": 1, ...}` ->
  `{"translations": [...], "model": "...", "ms": 12.3, "truncated": [...]}`: one entry per input
  line, in order, an empty line giving "" (N lines in, N lines out). With `n_best` > 1 each
  entry is a list of `{"text", "score"}`, best first. `truncated` lists the 0-based lines cut to
  `search.max_src_len` pieces; a string holding a line break is still one line. Search settings
  a request may set: REQUEST_SETTINGS; the rest come from the checkpoint, and `n_best` defaults
  to 1 as in `nmt translate`.
- `GET /health`: 200 `{"status": "ok", ...}` with counters; the port opens only once the model
  is loaded. `GET /info`: the model and tokenizer config, precision, search defaults, limits.
- 400: invalid JSON, `text` missing or not a list of strings, an unknown key, invalid search
  settings (the translator's own checks); 413: a body over `max_request_bytes` or more than
  `max_request_sentences` lines; 404, 405; 500 for an internal failure, to that request alone.

Batching: handlers queue their lines; one task gathers queued requests that have the same
search settings, up to `max_batch_sentences` sentences, waiting at most `max_wait_ms` after the
oldest arrived (while the model is busy, requests queue up and go together at the next call), and
runs them as one call of the batched search on a single worker thread that owns the model (torch
releases the GIL in its kernels, so the event loop keeps answering). Results are split back per
request. They equal `nmt translate`'s on the same lines whatever the batching, because the search
never lets a sentence's output depend on its batch-mates (tested in test_search/test_translator).
When a batch fails, each of its requests is run again alone, so only the faulty one gets a 500.

Library: aiohttp (an optional extra, `pip install 'nmt[serve]'`), chosen over Starlette on
uvicorn for the two things that matter most here. Request-size limits: aiohttp enforces the body
limit itself (`client_max_size`, chunked bodies too) and, answering 413 early, lingers to drain
the unread body so the client reads the answer instead of a reset connection; with Starlette the
limit would be a middleware of our own. Shutdown: aiohttp's runner closes the listening socket,
then waits (up to `shutdown_timeout`) for the handlers in flight, and leaves the exit code to us
(0); uvicorn by default re-raises the signal after its graceful shutdown (exit 143 for SIGTERM).
The one package also brings the asyncio client that benchmarks/serve_load.py uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import signal
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nmt import __version__
from nmt.config import SearchConfig, ServeConfig
from nmt.errors import UsageError
from nmt.translator import Translator

REQUEST_SETTINGS = ("beam_size", "n_best", "alpha", "beta", "max_len_a", "max_len_b")
REQUEST_KEYS = ("text", *REQUEST_SETTINGS)
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
_JSON_TYPES.update({bool: "boolean", type(None): "null"})


def _log(msg: str) -> None:
    print(f"nmt serve: {msg}", file=sys.stderr, flush=True)


def _web():
    """aiohttp.web, or one UsageError naming the extra to install."""
    try:
        from aiohttp import web
    except ImportError as e:
        raise UsageError(
            f"nmt serve needs aiohttp, which is not installed ({e}): pip install 'nmt[serve]'"
        ) from None
    return web


# ---------------------------------------------------------------------- the model side
def load_translator(
    paths: list[str], device: str = "auto", dtype: str | None = None, threads: int | None = None
) -> Translator:
    """The server's model: one checkpoint, or several as an ensemble
    (`Translator.from_checkpoints`); `dtype` and `threads` are search.dtype and search.threads
    (None: the checkpoint's), checked by the Translator."""
    return Translator.from_checkpoints(paths, device=device, dtype=dtype, threads=threads)


class Engine:
    """The one adapter between the server and the Translator: every call into it is here.

    `settings(fields)` checks a request's search settings with the translator's own checks (a
    UsageError names the field); `translate(lines, settings, line_ids)` is one call of the
    batched search (per line the (text, score) pairs best first, and the truncated lines'
    (index, pieces)); `line_ids` number each line within its own request, so that a sampling
    checkpoint's answers do not depend on the batching either.
    """

    def __init__(self, translator: Translator, name: str):
        self.translator = translator
        self.name = name

    def settings(self, fields: dict) -> SearchConfig:
        fields = dict(fields)
        n_best = fields.pop("n_best", 1)
        return self.translator.search_settings(n_best, **fields)

    def translate(self, lines: list[str], settings: SearchConfig, line_ids=None):
        return self.translator.run(lines, settings, line_ids)

    def describe(self) -> dict:
        t = self.translator
        return {
            "model": self.name,
            "languages": {"src": t.cfg.data.src_lang, "tgt": t.cfg.data.tgt_lang},
            "config": dataclasses.asdict(t.cfg.model),
            "tokenizer": {
                **dataclasses.asdict(t.cfg.tokenizer),
                "src_pieces": t.tokenizer.src_vocab_size,
                "tgt_pieces": t.tokenizer.tgt_vocab_size,
            },
            "device": str(t.device),
            "precision": t.precision,
            "precision_note": t.precision_note,
            "threads": torch.get_num_threads(),
            "search_defaults": {**dataclasses.asdict(t.cfg.search), "n_best": 1},
        }


# ---------------------------------------------------------------------- batching
@dataclasses.dataclass(eq=False)
class _Job:
    lines: list[str]
    settings: SearchConfig
    arrived: float  # event-loop time
    future: asyncio.Future


class Batcher:
    """Gathers queued requests with equal settings into one search call on the model's thread."""

    def __init__(self, engine: Engine, max_sentences: int, max_wait_s: float):
        self._engine = engine
        self._max_sentences = max_sentences
        self._max_wait = max_wait_s
        self._jobs: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="nmt-search")
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.sentences = 0

    async def translate(self, lines: list[str], settings: SearchConfig):
        """(results, truncated) for `lines`, as `Engine.translate` gives them."""
        loop = asyncio.get_running_loop()
        job = _Job(lines, settings, loop.time(), loop.create_future())
        self._jobs.append(job)
        self._arrived.set()
        return await job.future

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run_forever())

    def flush(self) -> None:
        """No more requests will come (shutdown): stop waiting for batch-mates."""
        self._closing = True
        self._arrived.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._jobs:
            job.future.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self._worker.shutdown)

    async def _run_forever(self) -> None:
        while True:
            await self._run(await self._gather())

    async def _gather(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        while True:
            while self._jobs and self._jobs[0].future.done():  # cancelled while queued
                self._jobs.popleft()
            if self._jobs:
                break
            self._arrived.clear()
            await self._arrived.wait()
        first = self._jobs[0]
        deadline = first.arrived + self._max_wait
        while True:
            batch, full = self._select(first.settings)
            wait = deadline - loop.time()
            if full or wait <= 0 or self._closing:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except asyncio.TimeoutError:
                pass
        for job in batch:
            self._jobs.remove(job)
        return batch

    def _select(self, settings: SearchConfig) -> tuple[list[_Job], bool]:
        """Queued jobs with `settings`, oldest first, that fit; and whether the batch is full."""
        batch, n = [], 0
        for job in self._jobs:
            if job.settings != settings or job.future.done():
                continue
            if batch and n + len(job.lines) > self._max_sentences:
                return batch, True
            batch.append(job)
            n += len(job.lines)
        return batch, n >= self._max_sentences

    async def _run(self, batch: list[_Job]) -> None:
        lines = [line for job in batch for line in job.lines]
        line_ids = [i for job in batch for i in range(len(job.lines))]  # within each request
        loop = asyncio.get_running_loop()
        call = functools.partial(self._engine.translate, lines, batch[0].settings, line_ids)
        try:
            results, truncated = await loop.run_in_executor(self._worker, call)
        except Exception as e:
            if len(batch) > 1:  # find the faulty request: each alone gives the same results
                for job in batch:
                    await self._run([job])
                return
            _log(f"internal error in a search call of {len(lines)} lines:")
            traceback.print_exception(e, file=sys.stderr)
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        self.batches += 1
        self.sentences += len(lines)
        start = 0
        for job in batch:
            end = start + len(job.lines)
            cut = [(i - start, n) for i, n in truncated if start <= i < end]
            if not job.future.done():
                job.future.set_result((results[start:end], cut))
            start = end


# ---------------------------------------------------------------------- requests
class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_request(body: bytes, max_sentences: int) -> tuple[list[str], dict]:
    """(lines, search-setting fields) of a /translate body, or a RequestError (400/413)."""
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(
            400, f'expected a JSON object like {{"text": ["..."]}}, found a {_json_type(data)}'
        )
    unknown = sorted(set(data) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(
            400, f"unknown key(s) {', '.join(unknown)}; expected {', '.join(REQUEST_KEYS)}"
        )
    if "text" not in data:
        raise RequestError(400, '"text" is missing: expected a list of strings, one per line')
    text = data["text"]
    if not isinstance(text, list):
        raise RequestError(
            400, f'"text": expected a list of strings, found a {_json_type(text)} (use ["..."])'
        )
    if len(text) > max_sentences:
        raise RequestError(
            413, f'"text" has {len(text)} lines, over the limit of {max_sentences} per request'
        )
    for i, line in enumerate(text):
        if not isinstance(line, str):
            raise RequestError(400, f'"text"[{i}]: expected a string, found a {_json_type(line)}')
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, f'"text"[{i}]: not valid Unicode (a lone surrogate)') from None
    return text, {k: data[k] for k in REQUEST_SETTINGS if k in data}


def _answer(results: list, n_best: int) -> list:
    if n_best == 1:
        return [hyps[0][0] for hyps in results]
    return [[{"text": text, "score": round(score, 4)} for text, score in hyps] for hyps in results]


class _Service:
    """The request handlers, over one engine and its batcher."""

    def __init__(self, engine: Engine, batcher: Batcher, cfg: ServeConfig):
        self.engine, self.batcher, self.cfg = engine, batcher, cfg
        self.in_flight = 0
        self.requests = 0

    async def translate(self, request):
        start = time.perf_counter()
        body = await self._read_body(request)
        lines, fields = parse_request(body, self.cfg.max_request_sentences)
        settings = self._settings(fields)
        self.in_flight += 1
        try:
            results, truncated = (
                await self.batcher.translate(lines, settings) if lines else ([], [])
            )
        finally:
            self.in_flight -= 1
        self.requests += 1
        answer = {
            "translations": _answer(results, settings.n_best),
            "model": self.engine.name,
            "ms": round(1000 * (time.perf_counter() - start), 1),
            "truncated": [i for i, _ in truncated],
        }
        return _json(answer)

    async def _read_body(self, request) -> bytes:
        limit = self.cfg.max_request_bytes
        size = request.content_length
        if size is not None and size > limit:
            raise RequestError(413, f"the body has {size} bytes, over the limit of {limit}")
        try:
            return await request.read()
        except _web().HTTPRequestEntityTooLarge:  # a chunked body without a length
            raise RequestError(413, f"the body is over the limit of {limit} bytes") from None

    def _settings(self, fields: dict) -> SearchConfig:
        try:
            settings = self.engine.settings(fields)
        except UsageError as e:
            raise RequestError(400, f"invalid search settings: {e}") from None
        if settings.beam_size > self.cfg.max_beam_size:
            raise RequestError(
                400,
                f"beam_size must be <= {self.cfg.max_beam_size} on this server, found "
                f"{settings.beam_size}",
            )
        return settings

    async def health(self, request):
        return _json(
            {
                "status": "ok",
                "model": self.engine.name,
                "in_flight": self.in_flight,
                "requests": self.requests,
                "batches": self.batcher.batches,
                "sentences": self.batcher.sentences,
            }
        )

    async def info(self, request):
        limits = dataclasses.asdict(self.cfg)
        for key in ("host", "port", "shutdown_timeout"):
            limits.pop(key)
        return _json(
            {
                **self.engine.describe(),
                "nmt": __version__,
                "request_settings": list(REQUEST_SETTINGS),
                "limits": limits,
            }
        )


def _json(data: dict, status: int = 200, headers=None):
    web = _web()
    body = json.dumps(data, ensure_ascii=False)
    return web.json_response(text=body, status=status, headers=headers)


def _error_middleware(web):
    @web.middleware
    async def json_errors(request, handler):
        try:
            return await handler(request)
        except RequestError as e:
            return _json({"error": str(e)}, e.status)
        except web.HTTPException as e:  # the router's 404 and 405
            if e.status < 400:
                raise
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            return _json({"error": f"{e.reason}: {request.method} {request.path}"}, e.status, allow)
        except Exception as e:
            _log(f"internal error answering {request.method} {request.path}:")
            traceback.print_exception(e, file=sys.stderr)
            return _json({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

    return json_errors


def make_app(engine: Engine, cfg: ServeConfig):
    """The aiohttp application: routes, limits, and the batcher's life cycle."""
    web = _web()
    app = web.Application(
        client_max_size=cfg.max_request_bytes, middlewares=[_error_middleware(web)]
    )
    service = _Service(engine, None, cfg)

    async def start(app):
        service.batcher = Batcher(engine, cfg.max_batch_sentences, cfg.max_wait_ms / 1000)
        service.batcher.start()

    async def flush(app):  # the listening socket is closed: nothing more will queue
        _log(f"stopping: finishing {service.in_flight} request(s) in flight")
        service.batcher.flush()

    async def stop(app):
        await service.batcher.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(flush)
    app.on_cleanup.append(stop)
    app.router.add_post("/translate", service.translate)
    app.router.add_get("/health", service.health)
    app.router.add_get("/info", service.info)
    return app


# ---------------------------------------------------------------------- running it
async def run_app(app, host: str, port: int, stop: asyncio.Event, shutdown_timeout: float, ready):
    """Serve `app` on host:port until `stop` is set, then shut down gracefully.

    `ready(url)` is called once the socket listens. Shutdown: the listening socket closes, idle
    connections close, requests in flight get `shutdown_timeout` seconds to finish.
    """
    web = _web()
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=shutdown_timeout, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        bound_host, bound_port = runner.addresses[0][:2]
        ready(f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}")
        await stop.wait()
    finally:
        await runner.cleanup()


async def _main(app, cfg: ServeConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            _log(f"{sig.name}: closing the port")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await run_app(
        app,
        cfg.host,
        cfg.port,
        stop,
        cfg.shutdown_timeout,
        ready=lambda url: _log(f"listening on {url} (SIGTERM or Ctrl-C to stop)"),
    )
    _log("stopped")
    return 0


def serve(
    paths: list[str],
    cfg: ServeConfig,
    device: str = "auto",
    dtype: str | None = None,
    threads: int | None = None,
) -> int:
    """`nmt serve`: load the model, serve until SIGTERM/SIGINT, return the exit code (0)."""
    _web()  # a missing extra is reported before a model is loaded
    translator = load_translator(paths, device, dtype, threads)
    engine = Engine(translator, "+".join(Path(p).name for p in paths))
    info = engine.describe()
    _log(
        f"{engine.name} loaded ({info['languages']['src']}->{info['languages']['tgt']}, "
        f"{info['device']}, {info['threads']} threads)"
    )
    _log(f"precision: {info['precision_note']}")
    return asyncio.run(_main(make_app(engine, cfg), cfg))
