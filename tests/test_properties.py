"""Property-based: any command line drawn from the grammar of valid and invalid values ends in exit 0 with
consistent results, or exit 2 with one error line, never a traceback (issue 20). Derandomized, so CI sees the
same examples every run; tiny lengths on a tiny model keep it to about a minute."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lminf_eval.harness.cli import app
from lminf_eval.methods import PRESETS
from lminf_eval.settings import NAMES

runner = CliRunner()
NUMBERS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([10**20, 2**70, 1e30, 0.5, -0.0]),
    st.sampled_from(["inf", "nan", "L_pre", "L_pre/2", "L_pre/0", "L_pre-40", "x", ""]),
)
METHOD = st.builds(
    lambda name, options: ":".join([name, *(f"{k}={v}" for k, v in options)]),
    st.one_of(st.sampled_from(list(PRESETS)), st.sampled_from(["lm-infinity", "", "vanilla "])),
    st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), st.just("bogus")), NUMBERS), max_size=2),
)
LENGTH = st.one_of(st.sampled_from(["1x", "2x", "0.5x", "16", "48", "0x", "-1x", "1e9x", "lots", "4k"]))
FLAGS = st.fixed_dictionaries(
    {},
    optional={
        "--n-global": NUMBERS,
        "--n-local": NUMBERS,
        "--num-docs": st.integers(-1, 5),
        "--seed": st.sampled_from([0, 1, -1, 2**70]),
        "--top-k": st.integers(-1, 3),
    },
)


def check(res, out: Path) -> None:
    """Exit 0 with complete, consistent results, or exit 2 with one error line; nothing else."""
    assert "Traceback" not in res.output, res.output
    if res.exit_code == 0:
        results = json.loads((out / "results.json").read_text())
        cells = results["cells"]
        assert results["status"] == "complete" and cells["total"] == cells["planned"], cells
        return
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, (res.exit_code, res.output[-2000:])
    assert lines and lines[-1].startswith("lminf-eval: error:") and len(lines[-1]) < 400, res.stderr[-2000:]


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(methods=st.lists(METHOD, min_size=1, max_size=2), lengths=st.lists(LENGTH, min_size=1, max_size=2), flags=FLAGS)
def test_any_ppl_command_line_is_a_result_or_one_line(tiny, tmp_path_factory, methods, lengths, flags):
    out = tmp_path_factory.mktemp("run")
    args = ["ppl", "--model", str(tiny.model), "--dataset", str(tiny.data), "--output-dir", str(out)]
    args += ["--method", ",".join(methods), "--lengths", ",".join(lengths), "--num-docs", "1"]
    for flag, value in flags.items():
        args += [flag, str(value)]
    check(runner.invoke(app, args), out)


YAML_VALUES = st.one_of(
    NUMBERS, st.lists(st.sampled_from(["vanilla", "lm-infinite", "window"]), max_size=2), st.booleans(), st.none()
)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    config=st.dictionaries(st.sampled_from(["lengths", "methods", "n-global", "num_docs", "seed", "nope"]), YAML_VALUES)
)
def test_any_yaml_config_is_a_result_or_one_line(tiny, tmp_path_factory, config):
    import yaml

    out = tmp_path_factory.mktemp("run")
    file = out.parent / f"{out.name}.yaml"
    file.write_text(yaml.safe_dump({"lengths": "1x", "num-docs": 1, **config}))
    args = ["ppl", "--model", str(tiny.model), "--dataset", str(tiny.data), "--output-dir", str(out)]
    check(runner.invoke(app, [*args, "--config", str(file)]), out)
