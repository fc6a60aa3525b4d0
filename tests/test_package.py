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
