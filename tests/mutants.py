#!/usr/bin/env python3
"""Mutation check: the suite must fail when the product is broken on purpose.

Each entry of MUTANTS is one deliberate break: a text patch (`old` -> `new`, in `file`) and
the tests that must catch it. For each, the checkout (its tracked and untracked files, as
`git ls-files` lists them) is copied into a temporary folder, the patch is applied there, and
the tests run on that copy (first on PYTHONPATH, its own folder as the working directory, `-x`,
slow tests included). A mutant is caught when pytest reports failing tests (exit code 1).

Every patch must find its `old` text exactly once: a refactor that moves the code makes the
script stop with an error (exit 2) naming the patch, never pass vacuously. To re-target one,
edit its entry: the file, the text to break, the broken text, the tests, fastest catcher first.

    python tests/mutants.py                     # every mutant, then a table; exit 1 if one lives
    python tests/mutants.py --list              # names, files and tests
    python tests/mutants.py loss-gradient-zeroed length-penalty-ignored   # some of them
    python tests/mutants.py translate-drops-empty-lines --tests tests/test_journeys.py
    python tests/mutants.py --baseline          # first: the tests pass on the unpatched copy

It assumes the unpatched suite passes (CI runs it first; --baseline checks it here).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str  # a slug: the command line selects mutants by it
    what: str  # the break, in words
    file: str  # relative to the repository root
    old: str  # the text broken; must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest arguments (files or node ids), fastest catcher first


MUTANTS = (
    Mutant(
        "optimizer-step-skipped",
        "the optimizer step skipped (gradients computed, weights never updated)",
        "nmt/optimization.py",
        "self.scaler.step(self.optimizer)",
        "pass  # MUTANT",
        ("tests/test_learning.py", "tests/test_training.py"),
    ),
    Mutant(
        "loss-gradient-zeroed",
        "the loss's gradient zeroed (the loss value unchanged)",
        "nmt/optimization.py",
        "        return grad, None, None, None",
        "        return torch.zeros_like(grad), None, None, None  # MUTANT",
        ("tests/test_learning.py", "tests/test_loss.py"),
    ),
    Mutant(
        "lr-schedule-not-stepped",
        "the learning-rate schedule never stepped (the first step's warm-up lr kept throughout)",
        "nmt/optimization.py",
        "        self.scheduler.step()",
        "        pass  # MUTANT",
        ("tests/test_learning.py", "tests/test_loss.py"),
    ),
    Mutant(
        "length-penalty-ignored",
        "the GNMT length penalty ignored (alpha read as 0)",
        "nmt/search.py",
        "    return ((5.0 + length) / 6.0) ** alpha",
        "    return ((5.0 + length) / 6.0) ** 0.0  # MUTANT",
        ("tests/test_search.py",),
    ),
    Mutant(
        "encoder-padding-mask-dropped",
        "the GNMT encoder's padding mask dropped (attention reads padded positions)",
        "nmt/models/gnmt.py",
        "return EncoderOut(memory=x, src_mask=src_mask, src_lens=src_lens)",
        "return EncoderOut(memory=x, src_mask=torch.ones_like(src_mask), src_lens=src_lens)",
        ("tests/test_models.py", "tests/test_gnmt.py"),
    ),
    Mutant(
        "tcn-tap-trimmed-too-soon",
        "the TCN leaves out a conv tap that still reads position 0 (one position too soon)",
        "nmt/models/tcn.py",
        "        while first < k - 1 and left - first * d >= length:  # before position 0",
        "        while first < k - 1 and left - first * d >= length - 1:  # MUTANT",
        ("tests/test_tcn.py",),
    ),
    Mutant(
        "beam-rows-read-the-wrong-sentence",
        "after a reorder, a run of beam rows reads the per-sentence keys of another sentence",
        "nmt/models/base.py",
        "            sentences = index[::runs] // self.sentence_rows  # (B' / runs,)",
        "            sentences = index[::runs] // runs  # MUTANT",
        ("tests/test_tcn.py", "tests/test_search.py"),
    ),
    Mutant(
        "atomic-write-not-renamed",
        "the atomic writer of checkpoints (and every file) never renames: left at the temp name",
        "nmt/textio.py",
        "        os.replace(tmp, path)",
        "        pass  # MUTANT",
        ("tests/test_checkpoint.py",),
    ),
    Mutant(
        "translate-drops-empty-lines",
        "`nmt translate` drops empty input lines",
        "nmt/textio.py",
        "        chunk.append(text)",
        "        if text.strip():  # MUTANT\n            chunk.append(text)",
        ("tests/test_translator.py", "tests/test_journeys.py"),
    ),
)

COPY_SKIP = re.compile(r"(^|/)(\.git|\.venv|__pycache__|\.pytest_cache|\.ruff_cache|runs)(/|$)")


def _die(message: str):
    """Stop with exit code 2: the check itself cannot run as written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # caught, SURVIVED, ERROR
    caught_by: list[str]
    seconds: float
    output: str = ""


def _files() -> list[str]:
    """The checkout's files: tracked, and untracked but not ignored (every file outside a git
    checkout, but for caches and virtual environments)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = out.split("\0")
    except (OSError, subprocess.CalledProcessError):  # no git, or not a git checkout
        names = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()]
    return sorted(f for f in set(names) if f and not COPY_SKIP.search(f))


def copy_checkout(dest: Path, files: list[str]) -> Path:
    for name in files:
        src = ROOT / name
        if src.is_file():  # a deleted but still tracked file is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def apply(mutant: Mutant, repo: Path) -> None:
    """Patch the copy; the target text must be there exactly once."""
    path = repo / mutant.file
    text = path.read_text(encoding="utf-8")
    found = text.count(mutant.old)
    if found != 1:
        _die(
            f"mutant {mutant.name}: {mutant.file}: the text to break is found {found} "
            f"times, expected once (the code moved? re-target the patch):\n{mutant.old}"
        )
    path.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")


def _env(repo: Path) -> dict:
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def check_import_path(repo: Path) -> None:
    """The copy's nmt, not an installed one, is what the tests will import."""
    code = "import nmt, sys; sys.stdout.write(nmt.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=_env(repo), capture_output=True, text=True
    ).stdout
    if not Path(where).resolve().is_relative_to(repo.resolve()):
        _die(f"the copy's tests would import nmt from {where}, not {repo}")


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "--tb=line", "-m", "not gpu"]
    cmd += ["-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(
            cmd, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout + proc.stderr


def _failed_tests(output: str) -> list[str]:
    """The failing tests (-rfE's summary), each with where it failed (--tb=line's
    `file:line: message`, the path made relative to the copy)."""
    tests = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    wheres = re.findall(
        r"^\S*?((?:nmt|tests|recipes)/\S+\.py:\d+: .*)$", output, flags=re.MULTILINE
    )
    return [f"{test}\n    at {where[:110]}" for test, where in zip(tests, wheres)] or tests


def run_mutant(mutant: Mutant, files: list[str], tests: tuple[str, ...], timeout: float):
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"nmt-mutant-{mutant.name}-") as tmp:
        repo = copy_checkout(Path(tmp), files)
        apply(mutant, repo)
        check_import_path(repo)
        code, output = run_tests(repo, tests, timeout)
    seconds = time.perf_counter() - start
    if code == 1:
        return Outcome(mutant, "caught", _failed_tests(output), seconds, output)
    status = "SURVIVED" if code == 0 else "ERROR"
    return Outcome(mutant, status, [], seconds, output)


def baseline(files: list[str], tests: tuple[str, ...], timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="nmt-mutant-baseline-") as tmp:
        repo = copy_checkout(Path(tmp), files)
        check_import_path(repo)
        code, output = run_tests(repo, tests, timeout)
    if code != 0:
        _die(f"the unpatched tests fail (exit {code}):\n{output[-3000:]}")
    print(f"baseline: {' '.join(tests)} pass unpatched", flush=True)


def print_table(outcomes: list[Outcome], total: float) -> None:
    width = max(len(o.mutant.name) for o in outcomes)
    print(f"\n{'mutant':<{width}}  {'result':<8}  {'seconds':>7}  caught by (first failing test)")
    for o in outcomes:
        print(f"{o.mutant.name:<{width}}  {o.status:<8}  {o.seconds:7.1f}  ", end="")
        print("\n".join(o.caught_by) or "-")
    print(f"total {total:.0f} s")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--tests", nargs="+", help="run these tests instead of each mutant's own")
    p.add_argument("--baseline", action="store_true", help="first check the tests pass unpatched")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default 900)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        _die(f"unknown mutant {', '.join(unknown)}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.names] or list(MUTANTS)
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.what}\n    {m.file}; tests: {' '.join(m.tests)}")
        return 0
    files = _files()
    with tempfile.TemporaryDirectory() as tmp:  # every patch applies before anything runs
        for m in chosen:
            apply(m, copy_checkout(Path(tmp) / m.name, [m.file]))
    start = time.perf_counter()
    if args.baseline:
        union = tuple(dict.fromkeys(t for m in chosen for t in (args.tests or m.tests)))
        baseline(files, union, args.timeout)
    outcomes = []
    for m in chosen:
        outcome = run_mutant(m, files, tuple(args.tests or m.tests), args.timeout)
        print(f"{m.name}: {outcome.status} ({outcome.seconds:.0f} s)", flush=True)
        if outcome.status == "ERROR":
            print(outcome.output[-3000:])
        outcomes.append(outcome)
    print_table(outcomes, time.perf_counter() - start)
    return 0 if all(o.status == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
