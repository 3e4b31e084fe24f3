"""`lm-eval-lminf` as an lm-eval user types it: the example in docs/cli.md runs as written on a CPU machine
(no --device, a registry name as `pretrained`, RULER sizing its haystack with a local tokenizer), its --help
names the lminf model args, and without the extra it is one line, exit 2. (~20 s: two lm-eval start-ups.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from lminf_eval.harness.lmeval_cli import with_local_defaults

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def documented_example() -> list[str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    (line,) = re.findall(r"^\s*(lm-eval-lminf run .*)$", text, flags=re.M)
    return shlex.split(line)


def test_the_documented_example_runs_as_written(tmp_path):
    import os

    args = documented_example()
    assert "--device" not in args and "pretrained=tiny-rope" in " ".join(args)
    command = [str(Path(sys.executable).parent / args[0]), *args[1:]]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "niah_single_1" in done.stdout and re.search(r"\|\s*512\|", done.stdout), done.stdout  # the asked length


def test_local_defaults_fill_device_and_tokenizer_only_when_left_out():
    base = ["run", "--model", "lminf", "--model_args", "pretrained=tiny-rope,method=vanilla", "--tasks", "x"]
    out = with_local_defaults(base)
    device = out[out.index("--device") + 1]
    assert device in ("cpu", "cuda") and out[-2] == "--metadata" and out[-1].startswith("tokenizer=")
    assert Path(out[-1].split("=", 1)[1], "tokenizer.json").is_file()  # a local directory, not a hub lookup
    mine = with_local_defaults([*base, "--device", "cpu", "--metadata", "tokenizer=gpt2"])
    assert mine == [*base, "--device", "cpu", "--metadata", "tokenizer=gpt2"]
    assert with_local_defaults(["run", "--help"]) == ["run", "--help"]


def test_help_names_the_model_args_and_a_missing_extra_is_one_line():
    help_text = subprocess.run(
        [str(Path(sys.executable).parent / "lm-eval-lminf"), "run", "--help"], capture_output=True, text=True
    )
    assert (
        help_text.returncode == 0 and "The lminf model type" in help_text.stdout and "method=SPEC" in help_text.stdout
    )
    code = (
        "import sys; sys.modules['lm_eval'] = None; sys.argv = ['lm-eval-lminf', '--help']\n"
        "from lminf_eval.harness.lmeval_cli import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "pip install 'lminf-eval[lm-eval]'" in lines[0], done.stderr
