"""The wheel is the product: built from this tree, installed offline into a fresh virtual environment (its
dependencies reused from this one through a .pth file, the wheel itself with --no-deps --no-index), and run from a
folder outside the repository: `lminf-eval ppl` on the shipped model and corpus (the defaults, at two lengths and
two documents: the full defaults take ~100 s of CPU here) and `lminf-eval passkey --model smollm2-135m` (one short
prompt), results under the current directory. Marked `wheel`: ~60 s on an idle 2-core machine (a wheel build, a
venv, two runs); `pytest -m "not wheel"` leaves it out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "lminf_eval", "tasks", "models", "data", "configs"]

pytestmark = pytest.mark.wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv holding the wheel built from a copy of the tree (so no build/ is left)."""
    tmp = tmp_path_factory.mktemp("wheel")
    (tmp / "src").mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tmp / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, tmp / "src" / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist",
                    tmp / "src"], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("lminf_eval-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"], check=True)
    venv_python = tmp / "venv" / "bin" / "python"
    purelib = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., reused
    subprocess.run([*pip, "--python", venv_python, "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    return tmp / "venv" / "bin"


def run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([bin_dir / args[0], *args[1:]], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_installed_wheel_runs_its_defaults_outside_the_repository(installed, tmp_path):
    where = run(installed, tmp_path, "python", "-c", "import lminf_eval.harness.models as m; print(m.shipped())")
    assert where.returncode == 0 and not Path(where.stdout.strip()).is_relative_to(ROOT), where.stdout
    assert Path(where.stdout.strip(), "models", "tiny-rope", "model.safetensors").is_file()
    config = "from lminf_eval.harness.config import read_config_file as r; print(r('configs/demo.yaml', {'model', 'dataset', 'method', 'lengths', 'num_docs', 'bucket_size'}))"  # noqa: E501
    assert "tiny-rope" in run(installed, tmp_path, "python", "-c", config).stdout  # a shipped config by its name

    done = run(installed, tmp_path, "lminf-eval", "ppl", "--lengths", "0.5x,2x", "--num-docs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "results" / "ppl" / "tiny-rope").iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert results["config"]["dataset"] == "arxiv-sample" and results["status"] == "complete"
    assert results["git"] is None and results["versions"]["lminf_eval"]  # (no clone: the package version says it)
    assert "[" in (folder / "ppl.md").read_text()  # two documents: intervals

    done = run(installed, tmp_path, "lminf-eval", "passkey", "--model", "smollm2-135m", "--lengths", "512",
               "--num-samples", "1", "--method", "lm-infinite")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "results" / "passkey" / "smollm2-135m").glob("*/passkey_accuracy.md"))
