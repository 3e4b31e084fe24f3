"""What a run says about itself and leaves behind: its own folder is ignored by git (the tree stays clean, so the
next run's `git` is not `+dirty`) while the committed results stay tracked; a model given as a path names its
folder by its last component."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lminf_eval.harness.results import default_output_dir, model_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git clone")
def test_a_runs_folder_is_ignored_and_committed_results_are_not():
    folder = default_output_dir("ppl", "tiny-rope")
    assert folder.parts[0] == "results" and not folder.is_absolute()  # under the current directory
    ignored = subprocess.run(["git", "check-ignore", "-q", str(folder / "results.json")], cwd=ROOT)
    assert ignored.returncode == 0
    tracked_but_ignored = subprocess.run(
        ["git", "ls-files", "-ci", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert tracked_but_ignored.stdout == ""  # (results/paper/..., results/bench/... stay in the repository)
    named = subprocess.run(["git", "check-ignore", "-q", "results/paper/default/new-step/results.json"], cwd=ROOT)
    assert named.returncode == 1


def test_a_path_model_names_its_folder_by_its_last_component(tmp_path):
    (tmp_path / "models" / "tiny-rope").mkdir(parents=True)
    assert model_folder(str(tmp_path / "models" / "tiny-rope")) == "tiny-rope"
    assert model_folder(str(tmp_path / "models" / "tiny-rope") + "/") == "tiny-rope"
    assert model_folder("/somewhere/SmolLM2.Q4.gguf") == "SmolLM2.Q4"
    assert (
        model_folder("tiny-rope") == "tiny-rope"
        and model_folder("meta-llama/Llama-2-7b-hf") == "meta-llama_Llama-2-7b-hf"
    )
    assert default_output_dir("ppl", str(tmp_path / "models" / "tiny-rope")).parent == Path("results/ppl/tiny-rope")
