"""The repository's kernels/ folder is rmt_fast.kernels; run from the repository root (python -m ...), it
must not shadow Hugging Face's top-level `kernels` package, which transformers >= 5.25 imports."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *flags: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_top_level_name_goes_to_the_installed_kernels_package(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'the other kernels'\n")
    r = _run("import kernels, sys; print(kernels.WHO, kernels is sys.modules['kernels'])", pythonpath=str(tmp_path))
    assert r.returncode == 0 and r.stdout.split() == ["the", "other", "kernels", "True"], r.stderr
    r = _run("import kernels, rmt_fast.kernels.attention as a; print(kernels.WHO, a.__name__)",
             pythonpath=str(tmp_path))
    assert r.returncode == 0 and r.stdout.split()[-1] == "rmt_fast.kernels.attention", r.stderr


def test_without_another_kernels_package_the_folder_stays_an_empty_module():
    """transformers <= 5.24 imports the name to probe it: that must work and find no version."""
    r = _run("import kernels; print(kernels.__file__, getattr(kernels, '__version__', 'N/A'))", "-S")
    assert r.returncode == 0, r.stderr                 # -S: no site-packages, so no other 'kernels'
    path, version = r.stdout.split()
    assert Path(path) == ROOT / "kernels" / "__init__.py" and version == "N/A"
