"""The CLI: the quickstart end to end, and one-line errors with exit code 2 that leave the store
untouched."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backdoorlab.cli import main

REPO = Path(__file__).resolve().parents[1]


def readme_quickstart():
    """benchmarks/readme_quickstart.py, which writes the README's quickstart sample from a real run."""
    spec = importlib.util.spec_from_file_location("readme_quickstart", REPO / "benchmarks" / "readme_quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "backdoorlab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """One fresh quickstart run (about a minute on 2 cores), as the README's sample script runs it:
    ``(completed process, env of its BACKDOORLAB_HOME and data dir)``."""
    home = tmp_path_factory.mktemp("quickstart") / "home"
    out = readme_quickstart().run_quickstart(home)
    return out, {"BACKDOORLAB_HOME": str(home), "BACKDOORLAB_DATA": str(home / "no-data")}


def test_quickstart_runs_without_data_dir(quickstart_run, tmp_path):
    """`backdoorlab run studies/quickstart.yaml` needs no data directory and prints CA and ASR."""
    out, env = quickstart_run
    assert out.returncode == 0, out.stderr
    lines = {tuple(ln.split()[2:4]): ln.split() for ln in out.stdout.splitlines()[2:]}
    header = out.stdout.splitlines()[0].split()
    ca, asr = header.index("CA"), header.index("ASR")
    assert set(lines) == {(a, c) for a in ("none", "badnets", "blended") for c in ("fp32", "int8-torch")}
    for (attack, _), cols in lines.items():
        assert float(cols[ca]) >= 0.9
        assert (float(cols[asr]) >= 0.9) if attack != "none" else (float(cols[asr]) <= 0.1)
        assert cols[-2:] == (["conv:6/6,", "linear:1/1"] if _ == "int8-torch" else ["conv:0/6,", "linear:0/1"])
    again = run_cli("run", "studies/quickstart.yaml", "--no-progress", env=env)
    assert "6 already done, 0 to run" in again.stderr
    some = run_cli("run", "studies/quickstart.yaml", "--only", "attack=none,blended", "--only", "compression=fp32",
                   env=env)
    assert some.returncode == 0 and "2 cells, 2 already done, 0 to run" in some.stderr
    assert len(some.stdout.splitlines()) == 4  # header, rule, two rows
    bad = run_cli("run", "studies/quickstart.yaml", "--only", "attack=wanet", env=env)
    assert bad.returncode == 2 and "matches no cell" in bad.stderr and "Traceback" not in bad.stderr
    res = run_cli("results", env=env)
    assert res.returncode == 0 and res.stdout.count("quickstart") == 0 and "badnets" in res.stdout
    exp = run_cli("export", "--out", str(tmp_path / "res"), env=env)
    assert exp.returncode == 0 and (tmp_path / "res.csv").exists() and (tmp_path / "res.parquet").exists()
    # the report of `defenses: [none]`: no detection rate on any row (no detector ran), RA shown
    rep = run_cli("report", "--out", str(tmp_path / "report"), env=env)
    assert rep.returncode == 0, rep.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count('<table class="detection"') == 2 and "<th>RA</th>" in page
    assert not re.search(r"\(\d+/\d+\)|\[0\.\d+, [01]\.\d+\]", page) and "no detector ran" in page


def test_readme_quickstart_sample_is_a_real_run(quickstart_run):
    """The README's quickstart sample output is what the quickstart prints (its first cell's line
    and the table), its figures within the script's tolerance (another CPU trains another path):
    `python benchmarks/readme_quickstart.py --write` keeps it in step."""
    out, _ = quickstart_run
    assert out.returncode == 0, out.stderr
    mod = readme_quickstart()
    fresh = mod.sample(out.stdout, out.stderr)
    readme = mod.readme_sample((REPO / "README.md").read_text())
    diff = mod.differences(readme, fresh)
    assert not diff, ("README.md's quickstart sample differs from a fresh run; update it with "
                      "`python benchmarks/readme_quickstart.py --write`\n" + "\n".join(diff) + f"\nfresh run:\n{fresh}")


def test_readme_sample_comparison_tolerates_figures_only():
    mod = readme_quickstart()
    a = "[1/6] digits none: CA 0.9972  ASR 0.0000\nx  0.9944  1.0000"
    assert mod.differences(a, a.replace("0.9972", "0.9917")) == []
    assert mod.differences(a, a.replace("0.9944", "0.7000")) == [
        f"line 2: 0.9944 in the README, 0.7000 in a fresh run (more than {mod.TOLERANCE} apart)"]
    assert len(mod.differences(a, a.replace("none", "badnets"))) == 1
    assert mod.differences(a, a + "\nmore") == ["the README's sample has 2 lines, a fresh run 3"]


def _store_bytes(path):
    return path.read_bytes() if path.exists() else None


@pytest.mark.parametrize("study,match", [
    ("datasets: [digits]\nmodels: [small-cnn]\nattacks: [badnet]\n", "did you mean 'badnets'"),
    ("datasets: [digits]\nmodels: [small-cnn]\nattacks: [{name: badnets, rate: 2}]\n", "rate must be in"),
    ("datasets: [digits]\nmodels: [small-cnn]\nattacks: [{name: badnets, target: 12}]\n", "target label"),
    ("datasets: [digits\nmodels: [small-cnn]\n", "malformed study file"),
    ("datasets: [gtsrb]\nmodels: [small-cnn]\nattacks: [badnets]\ntrain: {epochs: 1}\n", "not found: looked"),
])
def test_user_errors_exit_2_with_one_line_and_leave_store_untouched(tmp_path, monkeypatch, capsys, study, match):
    monkeypatch.setenv("BACKDOORLAB_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path / "home"))
    store = tmp_path / "store.sqlite"
    from _helpers import sample_row

    from backdoorlab.bench.store import ResultStore

    ResultStore(store).put(sample_row())
    before = _store_bytes(store)
    p = tmp_path / "s.yaml"
    p.write_text(study)
    code = main(["run", str(p), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("backdoorlab: error: ") and match in err.replace('"', "'"), err
    assert "Traceback" not in err
    assert _store_bytes(store) == before


def test_unknown_names_in_other_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path))
    assert main(["data", "fetch", "gtsrbb", "--dest", str(tmp_path)]) == 2
    assert "did you mean 'gtsrb'" in capsys.readouterr().err
    assert main(["results", "--store", str(tmp_path / "missing.sqlite")]) == 2
    assert "no result store" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert main(["list", "attacks"]) == 0
    assert "badnets" in capsys.readouterr().out


def test_unwritable_export_is_one_line(tmp_path, monkeypatch, capsys):
    from _helpers import sample_row

    from backdoorlab.bench.store import ResultStore

    store = tmp_path / "s.sqlite"
    ResultStore(store).put(sample_row())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--store", str(store), "--out", str(blocker / "sub" / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("backdoorlab: error: ") and "Traceback" not in err
    assert main(["results", "--store", str(tmp_path)]) == 2  # a directory, not a store
    assert capsys.readouterr().err.count("\n") == 1
