import os
import subprocess
import sys


def test_import_has_no_side_effects(tmp_path):
    """house rule 1: importing backdoorlab touches no disk, CUDA or RNG and pulls in no torch."""
    home = tmp_path / "home"
    code = ("import sys, backdoorlab; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(backdoorlab.__version__)")
    env = {**os.environ, "BACKDOORLAB_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == backdoorlab_version()
    assert not home.exists()


def backdoorlab_version():
    import backdoorlab

    return backdoorlab.__version__


def test_lazy_exports_resolve():
    import backdoorlab

    for name in backdoorlab.__all__:
        assert getattr(backdoorlab, name) is not None


def test_atomic_writes_get_the_umask_permissions_not_private_ones(tmp_path):
    """A file written through ``atomic_path`` (artifacts, exports, reports) is readable as a
    plain ``open()`` would leave it, not ``mkstemp``'s owner-only 0o600; a crash inside the
    block leaves the old file untouched and no temporary beside it."""
    from backdoorlab.utils import atomic_path

    old = os.umask(0o022)
    try:
        out = tmp_path / "rows.csv"
        with atomic_path(out) as tmp:
            tmp.write_text("a,b\n")
        assert out.read_text() == "a,b\n"
        assert out.stat().st_mode & 0o777 == 0o644
        try:
            with atomic_path(out) as tmp:
                tmp.write_text("half")
                raise RuntimeError("killed mid-write")
        except RuntimeError:
            pass
        assert out.read_text() == "a,b\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]
    finally:
        os.umask(old)
