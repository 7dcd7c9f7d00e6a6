"""The built wheel as a user gets it: complete (licence, type marker, stubs of the extension,
each data file once), and working from a folder outside the repository after installing it
into a fresh venv with nothing but its declared dependencies, so an undeclared dependency
fails here. tools/test.sh builds the wheel and names it in PAGEDLM_WHEEL."""
import hashlib
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

WHEEL = os.environ.get("PAGEDLM_WHEEL")
pytestmark = pytest.mark.skipif(not WHEEL, reason="PAGEDLM_WHEEL names no built wheel (tools/test.sh sets it)")


def test_wheel_is_complete():
    with zipfile.ZipFile(WHEEL) as wheel:
        names = wheel.namelist()
        assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
        assert "pagedlm/py.typed" in names
        stub = wheel.read("pagedlm/_C.pyi").decode()
        for name in ("class BlockManager", "def paged_decode(", "def cuda_devices"):
            assert name in stub
        data = [n for n in names if n.startswith("pagedlm/data/") and not n.endswith("/")]
        digests = {}
        for name in data:
            digests.setdefault(hashlib.sha256(wheel.read(name)).hexdigest(), []).append(name)
        assert [same for same in digests.values() if len(same) > 1] == []


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A venv with the wheel and its declared dependencies only (torch pinned to the tested build)."""
    root = tmp_path_factory.mktemp("fresh")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    torch = os.environ.get("PAGEDLM_WHEEL_TORCH", "torch")
    subprocess.run([python, "-m", "pip", "install", "-q", torch, WHEEL], check=True, timeout=900)
    workdir = root / "work"  # outside the repository: nothing importable from the source tree
    workdir.mkdir()
    return python, workdir


def pagedlm(fresh_venv, *args):
    python, workdir = fresh_venv
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PAGEDLM_TRACEBACK")}
    return subprocess.run([python.parent / "pagedlm", *args], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)


def test_demo_runs_from_a_fresh_install(fresh_venv):
    result = pagedlm(fresh_venv, "demo", "--requests", "6", "--quiet", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "tokens/s on cpu" in result.stdout
    assert "prefix-cache hits" in result.stdout


def test_generate_runs_from_a_fresh_install(fresh_venv):
    result = pagedlm(fresh_venv, "generate", "--max-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fibonacci(n):")
    assert "[8 tokens, length;" in result.stderr


def test_missing_extra_is_one_line_naming_it(fresh_venv):
    result = pagedlm(fresh_venv, "scaling", "plot", "--out", "isoflops.png")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pagedlm scaling plot: error: pagedlm scaling plot needs matplotlib, which is not installed: "
        "pip install 'pagedlm[plot]'"]


def test_missing_model_folder_is_one_line(fresh_venv):
    result = pagedlm(fresh_venv, "generate", "--model", "no-such-folder")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["pagedlm generate: error: --model no-such-folder: no such folder"]


def test_source_tree_is_not_on_the_path(fresh_venv):
    python, workdir = fresh_venv
    where = subprocess.run([python, "-c", "import pagedlm; print(pagedlm.__file__)"], cwd=workdir, check=True,
                           capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(python.parent.parent), where
    assert sys.prefix not in where


def test_serve_without_its_extra_is_one_line_naming_it(fresh_venv):
    result = pagedlm(fresh_venv, "serve", "--port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'pagedlm[serve]'" in lines[0], lines
