"""`lm-eval-lminf` as an lm-eval user types it: the example in docs/cli.md runs as written on a CPU machine
(no --device, a registry name as `pretrained`, RULER sizing its haystack with a local tokenizer), its --help
names the lminf model args, and without the extra it is one line, exit 2. (~20 s: two lm-eval start-ups.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_tasks_list_answers_without_a_model():
    from typer.testing import CliRunner

    from lminf_eval.harness.cli import app

    res = CliRunner().invoke(app, ["lm-eval", "--tasks", "list", "--model", "not-loaded/at-all"])
    assert res.exit_code == 0, res.output
    assert "niah_single_1" in res.output


def test_batch_size_batches_and_changes_no_number(tmp_path, monkeypatch):
    """Contexts of different lengths in one forward (padded) give lm-eval's per-choice log-likelihoods of one
    at a time, through the patched model."""
    import json

    import torch
    from lm_eval.models.huggingface import HFLM
    from typer.testing import CliRunner

    from lminf_eval.harness.cli import app
    from lminf_eval.harness.models import load_model
    from lminf_eval.methods import applied, parse_method

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    words = "river stone cloud lamp orange violin paper garden window silver market candle forest".split()
    rows = [
        {"prompt": " ".join(words[(i * 7 + j * j) % len(words)] for j in range(100 + 20 * i)), "label": i % 3}
        for i in range(4)
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        f"task: padded_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_choice: [" river", " lamp", " market"]\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )
    batches: list[int] = []
    call = HFLM._model_call

    def counted(self, inps, *args, **kwargs):
        batches.append(len(inps))
        return call(self, inps, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_call", counted)
    args = ["lm-eval", "--model", "tiny-rope", "--method", "lm-infinite:n_global=4", "--tasks", "padded_mc"]
    args += ["--include-path", str(tmp_path), "--batch-size", "4", "--log-samples", "--output-dir", str(tmp_path / "b")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert max(batches) == 4  # (12 requests of 4 contexts, 3 choices each)
    samples = (tmp_path / "b" / "lm-eval-samples" / "lm-infinite_n_global_4__padded_mc.jsonl").read_text()
    samples = sorted(map(json.loads, samples.splitlines()), key=lambda s: s["doc_id"])
    pairs = [(a[0], a[1]) for s in samples for a in s["arguments"]]  # (context, continuation) per request
    model, tok = load_model("tiny-rope")
    ours = []
    with applied(model, parse_method("lm-infinite:n_global=4").settings(256, None), 256), torch.no_grad():
        for context, continuation in pairs:  # one at a time, unpadded
            ids, n = tok(context + continuation).input_ids, len(tok(context).input_ids)
            logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            ours.append(sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids))))
    lm = [r[0][0] for s in samples for r in s["resps"]]
    assert len(lm) == 12 and max(len(tok(c).input_ids) for c, _ in pairs) > 256  # (past L_pre: the method acts)
    assert lm == pytest.approx(ours, abs=2e-3)
