"""The README's quickstart sample output, from a real run: runs `backdoorlab run
studies/quickstart.yaml` in a throwaway BACKDOORLAB_HOME (no data directory), and compares the
sample block under "## Quickstart" in README.md with what the run printed (--check, the default:
exits 1 and prints a diff when they differ) or rewrites that block (--write). Keep the README in
step whenever the defaults change: `python benchmarks/readme_quickstart.py --write`.
tests/test_cli.py compares its own quickstart run with the README through `sample` and
`readme_sample` below. About a minute on 2 CPU cores.
The figures are compared within ``TOLERANCE``: another CPU's kernels (AVX-512 or AVX2, another
thread count) sum in another order, training takes another path, and CA moves in the third
decimal (seen between this machine and CI: 0.9972 and 0.9917 for the same clean cell), and the
clean model's RA on the patched digits by a tenth (0.6389 with two threads, 0.7469 with one thread
per xdist worker, same CPU); the text around them must match exactly.
Usage: python benchmarks/readme_quickstart.py [--check | --write]
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMAND = "$ backdoorlab run studies/quickstart.yaml"
_BLOCK = re.compile(r"(## Quickstart\n\n```console\n)(.*?)(\n```\n)", re.S)
_FIGURE = re.compile(r"\b\d\.\d{4}\b")  # CA, ASR and RA as printed
TOLERANCE = 0.15


def differences(readme: str, fresh: str, tol: float = TOLERANCE) -> list[str]:
    """Where the README's sample and a fresh run's differ: the text with every figure masked must
    be equal, and each figure within ``tol`` of the README's (one line per difference)."""
    a, b = readme.splitlines(), fresh.splitlines()
    if len(a) != len(b):
        return [f"the README's sample has {len(a)} lines, a fresh run {len(b)}"]
    out = []
    for i, (x, y) in enumerate(zip(a, b, strict=True), 1):
        if _FIGURE.sub("#", x) != _FIGURE.sub("#", y):
            out.append(f"line {i}: README {x!r}, fresh run {y!r}")
            continue
        for u, v in zip(_FIGURE.findall(x), _FIGURE.findall(y), strict=True):
            if abs(float(u) - float(v)) > tol:
                out.append(f"line {i}: {u} in the README, {v} in a fresh run (more than {tol} apart)")
    return out


def run_quickstart(home: str | os.PathLike) -> subprocess.CompletedProcess:
    """The quickstart run as a new user starts it (no data directory), with its own cache and store."""
    env = {**os.environ, "BACKDOORLAB_HOME": str(home), "BACKDOORLAB_DATA": str(Path(home) / "no-data")}
    return subprocess.run([sys.executable, "-m", "backdoorlab.cli", "run", "studies/quickstart.yaml",
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


def sample(stdout: str, stderr: str) -> str:
    """The README's sample from a first run's output: the command, the study line, the first
    cell's line (its wall time elided), then the result table as printed."""
    err = stderr.splitlines()
    study = next(ln for ln in err if ln.startswith("study quickstart:"))
    first = next(ln for ln in err if ln.startswith("[1/"))
    first = re.sub(r"\(\d+(\.\d+)? s\)$", "(… s)", first)
    lines = [COMMAND, study, first, "...", *stdout.rstrip("\n").splitlines()]
    return "\n".join(ln.rstrip() for ln in lines)  # the table pads its last column; the README does not


def readme_sample(text: str) -> str:
    """The sample block under "## Quickstart" in the README's ``text``."""
    m = _BLOCK.search(text)
    if m is None:
        raise SystemExit("README.md has no ```console block right under '## Quickstart'")
    return "\n".join(ln.rstrip() for ln in m.group(2).splitlines())


def replace_sample(text: str, block: str) -> str:
    m = _BLOCK.search(text)
    if m is None:
        raise SystemExit("README.md has no ```console block right under '## Quickstart'")
    return text[:m.start(2)] + block + text[m.end(2):]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare the README with a fresh run (default)")
    mode.add_argument("--write", action="store_true", help="rewrite the README's sample from a fresh run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        out = run_quickstart(home)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return out.returncode
    block = sample(out.stdout, out.stderr)
    text = README.read_text()
    if args.write:
        README.write_text(replace_sample(text, block))
        print(block)
        return 0
    old = readme_sample(text)
    diff = differences(old, block)
    if not diff:
        print(f"README.md's quickstart sample matches a fresh run (figures within {TOLERANCE})")
        return 0
    print("\n".join(diff))
    sys.stdout.writelines(difflib.unified_diff([ln + "\n" for ln in old.splitlines()],
                                               [ln + "\n" for ln in block.splitlines()], "README.md", "fresh run"))
    print("\nREADME.md's quickstart sample is stale: python benchmarks/readme_quickstart.py --write")
    return 1


if __name__ == "__main__":
    sys.exit(main())
