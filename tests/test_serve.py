"""`nmt serve`: real HTTP on 127.0.0.1 against servers started here on free ports.

In-process servers run the real aiohttp app on a real socket in a background thread; the shutdown
test runs `python -m nmt serve` as a subprocess and signals it. The tiny checkpoint has random
weights, so answers are compared with the Translator's (and `nmt translate`'s) own outputs on the
same lines, never with recorded text.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import build_retokenized_checkpoint, build_tiny_checkpoint

from nmt import serve
from nmt.cli import main
from nmt.config import ServeConfig
from nmt.translator import Translator

TIMEOUT = 60  # seconds: a bound on every wait, so that a broken server fails instead of hanging
LONG_LINE = " ".join(["w1 w2 w3 cat"] * 30)  # over the tiny model's search.max_src_len (40)
LINES = [
    "the cat sat on the mat",
    "",
    "w1 w2 w3",
    "   ",
    "a dog w7 w8 w9 w10",
    "Ünïcödé שלום \x0b w4",
    LONG_LINE,
    "mat on sat cat the",
    "w11",
]


@pytest.fixture(scope="module")
def translator(tiny_checkpoint):
    return Translator.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(translator, tiny_checkpoint):
    return serve.Engine(translator, tiny_checkpoint.name)


@contextlib.contextmanager
def running(engine, **settings):
    """Serve `engine` on a free port of 127.0.0.1 in a background thread; yields "host:port"."""
    app = serve.make_app(engine, ServeConfig(port=0, **settings))
    ready: queue.Queue = queue.Queue()
    control = {}

    async def run():
        control["loop"], control["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await serve.run_app(app, "127.0.0.1", 0, control["stop"], 10.0, ready.put)

    def thread_main():
        try:
            asyncio.run(run())
        except BaseException as e:  # reported to the test thread
            ready.put(e)

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    url = ready.get(timeout=TIMEOUT)
    if isinstance(url, BaseException):
        raise url
    try:
        yield url.removeprefix("http://")
    finally:
        control["loop"].call_soon_threadsafe(control["stop"].set)
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def request(address, method="POST", path="/translate", body=None, headers=None, conn=None):
    """(status, JSON answer, headers) of one request; `body` a dict (sent as JSON) or bytes."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    own = conn is None
    conn = conn or http.client.HTTPConnection(address, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type", "").startswith("application/json"), data
        return resp.status, json.loads(data), resp
    finally:
        if own:
            conn.close()


def translate(address, lines, conn=None, **settings):
    status, answer, _ = request(address, body={"text": lines, **settings}, conn=conn)
    assert status == 200, answer
    assert len(answer["translations"]) == len(lines)
    return answer


@pytest.fixture(scope="module")
def server(engine):
    with running(engine, max_request_bytes=4096, max_request_sentences=50, max_beam_size=8) as a:
        yield a


# ---------------------------------------------------------------------- what it answers
def test_round_trip_equals_nmt_translate(server, tiny_checkpoint, tmp_path, capsys):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    for flags, settings in (([], {}), (["--beam-size", "1"], {"beam_size": 1})):
        args = ["translate", str(tiny_checkpoint), "-i", str(src), "-o", str(out), *flags]
        assert main([*args, "--dtype", "float32"]) == 0
        expected = out.read_text(encoding="utf-8").split("\n")[:-1]
        answer = translate(server, LINES, **settings)
        assert answer["translations"] == expected
        assert answer["model"] == "tiny.pt"
        assert answer["truncated"] == [LINES.index(LONG_LINE)]
        assert answer["translations"][1] == answer["translations"][3] == ""
    # the two settings give different outputs on some lines: beam_size is not ignored
    assert translate(server, LINES)["translations"] != expected


def test_nbest_lists_best_first(server, translator):
    answer = translate(server, LINES, beam_size=3, n_best=2)
    expected = translator.translate_nbest(LINES, 2, beam_size=3)
    for got, hyps in zip(answer["translations"], expected):
        assert [h["text"] for h in got] == [text for text, _ in hyps]
        assert [h["score"] for h in got] == pytest.approx([s for _, s in hyps], abs=1e-4)
        assert [h["score"] for h in got] == sorted((h["score"] for h in got), reverse=True)
    assert [len(got) for got in answer["translations"]] == [
        1 if not s.strip() else 2 for s in LINES
    ]


def test_empty_request_and_health_and_info(server, translator):
    assert translate(server, [])["translations"] == []
    status, health, _ = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny.pt"
    status, info, _ = request(server, "GET", "/info")
    assert status == 200
    assert info["precision"] == "float32" and info["device"] == "cpu"
    assert info["search_defaults"]["beam_size"] == translator.cfg.search.beam_size == 2
    assert info["config"]["hidden"] == 32 and info["tokenizer"]["src_pieces"] == 100
    assert info["limits"]["max_request_sentences"] == 50
    assert set(info["request_settings"]) >= {"beam_size", "n_best"}


# ---------------------------------------------------------------------- what it refuses
def _lines(n):
    return {"text": ["w1"] * n}


BAD_REQUESTS = [
    # (id, method, path, body, status, words the error must contain)
    ("cut-json", "POST", "/translate", b'{"text": ["a"', 400, "not valid JSON"),
    ("not-utf8", "POST", "/translate", b'{"text": ["\xff"]}', 400, "not valid JSON"),
    ("empty-body", "POST", "/translate", b"", 400, "not valid JSON"),
    ("nan", "POST", "/translate", b'{"text": ["a"], "alpha": NaN}', 400, "NaN"),
    ("array", "POST", "/translate", b'["a"]', 400, "JSON object"),
    ("no-text", "POST", "/translate", {"beam_size": 2}, 400, '"text" is missing'),
    ("text-string", "POST", "/translate", {"text": "a b"}, 400, "list of strings"),
    ("text-number", "POST", "/translate", {"text": ["a", 3]}, 400, '"text"[1]'),
    ("text-null", "POST", "/translate", {"text": [None]}, 400, "found a null"),
    ("surrogate", "POST", "/translate", b'{"text": ["\\ud800"]}', 400, "lone surrogate"),
    ("unknown-key", "POST", "/translate", {"text": ["a"], "beam": 3}, 400, "unknown key(s) beam"),
    ("beam-0", "POST", "/translate", {"text": ["a"], "beam_size": 0}, 400, "beam_size"),
    ("beam-str", "POST", "/translate", {"text": ["a"], "beam_size": "5"}, 400, "beam_size"),
    ("beam-float", "POST", "/translate", {"text": ["a"], "beam_size": 2.5}, 400, "beam_size"),
    ("beam-bool", "POST", "/translate", {"text": ["a"], "beam_size": True}, 400, "beam_size"),
    ("beam-over", "POST", "/translate", {"text": ["a"], "beam_size": 9}, 400, "<= 8"),
    ("nbest-over", "POST", "/translate", {"text": ["a"], "n_best": 3}, 400, "search.n_best"),
    ("alpha", "POST", "/translate", {"text": ["a"], "alpha": -1}, 400, "alpha"),
    ("max-len-b", "POST", "/translate", {"text": ["a"], "max_len_b": 0}, 400, "max_len_b"),
    ("sentences", "POST", "/translate", _lines(51), 413, "51 lines"),
    ("bytes", "POST", "/translate", {"text": ["w1 " * 2000]}, 413, "over the limit of 4096"),
    ("path", "GET", "/nope", None, 404, "Not Found"),
    ("subpath", "POST", "/translate/x", _lines(1), 404, "Not Found"),
    ("get-translate", "GET", "/translate", None, 405, "Method Not Allowed"),
    ("post-health", "POST", "/health", _lines(1), 405, "Method Not Allowed"),
    ("delete-info", "DELETE", "/info", None, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(
    "method, path, body, status, words",
    [c[1:] for c in BAD_REQUESTS],
    ids=[c[0] for c in BAD_REQUESTS],
)
def test_bad_requests_get_a_json_error_and_the_server_goes_on(
    server, translator, method, path, body, status, words
):
    got, answer, resp = request(server, method, path, body)
    assert got == status, answer
    assert set(answer) == {"error"} and words in answer["error"]
    if status == 405:
        assert resp.getheader("Allow")
    assert translate(server, LINES[:3])["translations"] == translator.translate(LINES[:3])


def test_chunked_body_over_the_limit_is_413(server, translator):
    conn = http.client.HTTPConnection(server, timeout=TIMEOUT)
    chunks = iter([b'{"text": ["', b"w1 " * 2000, b'"]}'])  # no Content-Length: chunked
    conn.request("POST", "/translate", body=chunks, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "over the limit of 4096" in json.loads(resp.read())["error"]
    conn.close()
    assert translate(server, ["w1"])["translations"] == translator.translate(["w1"])


class FailingEngine(serve.Engine):
    """The real engine, except that a search call holding the line "poison" fails."""

    def translate(self, lines, settings, line_ids=None):
        if "poison" in lines:
            raise RuntimeError("poisoned search call")
        return super().translate(lines, settings, line_ids)


def test_internal_failure_is_a_500_for_that_request_only(translator, capsys):
    failing = FailingEngine(translator, "tiny.pt")
    lines = ["w1 w2", "poison", "the cat", "w3"]
    # four one-line requests fill one batch (max 4 sentences): the poisoned call fails whole,
    # and its three healthy batch-mates must still get their own answers
    with running(failing, max_batch_sentences=4, max_wait_ms=TIMEOUT * 1000) as address:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda s: request(address, body={"text": [s]}), lines))
        for line, (status, answer, _) in zip(lines, answers):
            if line == "poison":
                assert status == 500
                assert answer == {"error": "internal error: RuntimeError: poisoned search call"}
            else:
                assert status == 200 and answer["translations"] == translator.translate([line])
        assert translate(address, LINES)["translations"] == translator.translate(LINES)
    assert "poisoned search call" in capsys.readouterr().err  # logged with its traceback


# ---------------------------------------------------------------------- batching
def test_requests_are_batched_only_with_equal_settings(translator, engine):
    greedy = translator.translate(LINES, beam_size=1)
    beam = translator.translate(LINES, beam_size=2)
    differ = [s for s, g, b in zip(LINES, greedy, beam) if g != b][:3]
    assert len(differ) == 3  # lines whose answer tells which settings translated them
    jobs = [(s, 1) for s in differ] + [(s, 2) for s in differ]
    random.Random(0).shuffle(jobs)
    # a batch runs when it holds 3 sentences (the wait is never reached): exactly two calls
    with running(engine, max_batch_sentences=3, max_wait_ms=TIMEOUT * 1000) as address:
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(lambda job: translate(address, [job[0]], beam_size=job[1]), jobs)
            )
        for (line, beam_size), answer in zip(jobs, answers):
            expected = greedy if beam_size == 1 else beam
            assert answer["translations"] == [expected[LINES.index(line)]]
        _, health, _ = request(address, "GET", "/health")
    assert (health["batches"], health["sentences"], health["requests"]) == (2, 6, 6)


def test_a_sampling_checkpoint_answers_each_request_as_if_alone(tmp_path):
    # each request's lines are numbered from 0 for their random streams, so the three requests
    # of one gathered batch each get the sample of their line alone, not of its batch position
    ckpt = build_tiny_checkpoint(tmp_path, sampling="topp", topp=1.0, beam_size=1, seed=3)
    translator = Translator.from_checkpoint(ckpt, device="cpu")
    line = "w1 w2 the cat sat"
    alone = translator.translate([line])
    assert len(set(translator.translate([line] * 3))) > 1  # positions 0, 1, 2 draw differently
    engine = serve.Engine(translator, ckpt.name)
    with running(engine, max_batch_sentences=3, max_wait_ms=TIMEOUT * 1000) as address:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: translate(address, [line]), range(3)))
        _, health, _ = request(address, "GET", "/health")
    assert health["batches"] == 1  # the three went together
    assert [a["translations"] for a in answers] == [alone] * 3


def _load(address, translator, clients, requests, seed=0):
    """`clients` threads, each sending `requests` requests of 1-3 lines on its own connection,
    half of them greedy; every answer must be its own request's, as the Translator gives it.
    Returns the number of sentences sent."""
    pool = [s for s in LINES if s != LONG_LINE] + [f"w{i} the w{i + 1} cat" for i in range(20)]
    expected = {b: dict(zip(pool, translator.translate(pool, beam_size=b))) for b in (1, 2)}

    def client(k):
        rng = random.Random(seed * 1000 + k)
        conn = http.client.HTTPConnection(address, timeout=TIMEOUT)
        sent = 0
        for _ in range(requests):
            lines = rng.choices(pool, k=rng.randint(1, 3))
            beam_size = rng.choice((1, 2))
            answer = translate(address, lines, conn=conn, beam_size=beam_size)
            assert answer["translations"] == [expected[beam_size][s] for s in lines]
            sent += len(lines)
        conn.close()
        return sent

    with ThreadPoolExecutor(clients) as threads:
        return sum(threads.map(client, range(clients)))


def test_load_concurrent_clients_get_their_own_answers(engine, translator):
    with running(engine, max_batch_sentences=16, max_wait_ms=5) as address:
        sent = _load(address, translator, clients=8, requests=25)
        _, health, _ = request(address, "GET", "/health")
    # every request answered, every sentence searched exactly once
    assert (health["requests"], health["sentences"], health["in_flight"]) == (200, sent, 0)


@pytest.mark.slow
def test_load_large(engine, translator):
    with running(engine, max_batch_sentences=64, max_wait_ms=10) as address:
        _load(address, translator, clients=8, requests=200, seed=1)
        _load(address, translator, clients=32, requests=50, seed=2)


# ---------------------------------------------------------------------- the process
class ServerProcess:
    """`python -m nmt serve` on a free port, its stderr collected as it comes."""

    def __init__(self, checkpoint, *flags):
        cmd = [sys.executable, "-m", "nmt", "serve", str(checkpoint), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, "--threads", "1", "--dtype", "float32", *flags],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self._reader.start()
        while True:
            line = lines.get(timeout=TIMEOUT)
            assert line is not None, f"nmt serve did not start: {''.join(self.log)}"
            found = re.search(r"listening on http://([\d.]+:\d+)", line)
            if found:
                self.address = found.group(1)
                return

    def _read(self, lines: queue.Queue) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def stop(self) -> str:
        """Kill the server if it still runs; returns its whole stderr."""
        self.proc.kill()
        self.proc.wait()
        self._reader.join(TIMEOUT)
        self.proc.stderr.close()
        return "".join(self.log)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_requests_in_flight_then_exits_0(tiny_checkpoint, translator, sig):
    # requests wait for batch-mates up to a minute: all 8 are in flight when the signal comes,
    # and the shutdown must run them at once, answer every one, and exit 0
    server = ServerProcess(
        tiny_checkpoint, "--max-batch-sentences", "1000", "--max-wait-ms", str(TIMEOUT * 1000)
    )
    address = server.address
    try:
        jobs = [LINES[k % len(LINES) : k % len(LINES) + 1 + k % 3] for k in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(translate, address, job) for job in jobs]
            for _ in range(TIMEOUT * 50):  # poll until the server holds all 8
                if request(address, "GET", "/health")[1]["in_flight"] == 8:
                    break
                threading.Event().wait(0.02)
            assert request(address, "GET", "/health")[1]["in_flight"] == 8
            server.proc.send_signal(sig)
            for job, answer in zip(jobs, answers):
                expected = translator.translate(job)
                assert answer.result(TIMEOUT)["translations"] == expected
        assert server.proc.wait(TIMEOUT) == 0
    finally:
        log = server.stop()
    assert f"{sig.name}: closing the port" in log, log
    assert "finishing 8 request(s) in flight" in log, log


# ---------------------------------------------------------------------- the command line
def test_cli_usage_errors_exit_2(tiny_checkpoint, tmp_path, capsys):
    other = build_retokenized_checkpoint(tiny_checkpoint, tmp_path)
    taken = socket.socket()  # a port in use: were the ensemble accepted, serving would fail too
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = str(taken.getsockname()[1])
    cases = [
        ([str(tiny_checkpoint), str(other), "--port", busy], "different sentencepiece models"),
        ([str(tiny_checkpoint), "--port", "70000"], "--port: must be <= 65535"),
        ([str(tiny_checkpoint), "--max-wait-ms", "-1"], "--max-wait-ms: must be >= 0"),
        ([str(tiny_checkpoint), "--max-batch-sentences", "0"], "--max-batch-sentences"),
        ([str(tiny_checkpoint), "--device", "cpu", "--dtype", "float16"], "float16 needs a CUDA"),
        ([str(tiny_checkpoint), "--threads", "-1"], "search.threads: must be >= 0"),
        ([str(tmp_path / "missing.pt")], "missing.pt"),
    ]
    with taken:
        for args, words in cases:
            assert main(["serve", *args]) == 2, args
            err = capsys.readouterr().err
            assert err.startswith("error: ") and words in err and "Traceback" not in err


def test_port_in_use_is_a_usage_error(tiny_checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_checkpoint), "--port", str(port), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_missing_server_library_names_the_extra(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # `import aiohttp` now fails
    assert main(["serve", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'nmt[serve]'" in err and "Traceback" not in err


def test_benchmark_script_runs_and_checks_its_answers(tiny_checkpoint, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "serve_load", Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    )
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    src = tmp_path / "src.txt"
    src.write_text("".join(s + "\n" for s in LINES), encoding="utf-8")
    out = tmp_path / "load.json"
    args = [str(tiny_checkpoint), "--src", str(src), "--clients", "1", "3", "--requests", "12"]
    serve_load.main([*args, "--threads", "1", "--beam-size", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [level["clients"] for level in result["levels"]] == [1, 3]
    sentences = result["translate"]["sentences"]
    for level in result["levels"]:
        assert (level["requests"], level["failed"], level["sentences"]) == (12, 0, sentences)
    assert result["translate"]["equal_lines"] == sentences and result["server_exit"] == 0
    assert "requests_per_s" in capsys.readouterr().out
