"""The GPU benchmark's dry run: the whole script at toy sizes on the CPU (reference kernels, aot_eager compiles),
so a session with a GPU never spends its device time on a typo. Checks what the table is made of, not speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cuda_dry_run_writes_every_section(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/bench_cuda.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "cuda.json").read_text())
    meta, rows = data["meta"], data["results"]
    assert {"torch", "versions", "git", "sdpa_kernel", "device"} <= set(meta)
    assert "scaled_dot_product" in meta["sdpa_kernel"]
    by = {(r["section"], r["method"]): r for r in rows}
    assert not [r for r in rows if "skipped" in r]
    for path, ran in (("flash-window", "flash-window (reference window)"), ("flex", "flex"), ("blocks", "blocks")):
        assert set(by["error", path]["ran"]) == {ran}
        assert by["error", path]["max_abs_error"] < 0.05  # bf16 rounding of outputs of size ~1
        assert set(by["attention", path]["ran"]) == {ran}
    assert {r["n"] for r in rows if r["section"] == "prefill"} == {128, 256}
    assert set(by["prefill", "lm-infinite"]["ran"]) == {"blocks"}  # auto on the CPU
    for method in ("vanilla", "lm-infinite"):
        compiled = by["decode", f"{method} compiled"]
        assert compiled["graph_breaks"] == 0 and compiled["graphs"] == 1
    assert by["decode", "lm-infinite eager"]["cache"] == "LMInfiniteCache"
    table = (tmp_path / "cuda.md").read_text()
    for name in ("prefill s", "decode ms/token", "attention ms (1 layer)", "attention Tpairs/s", "KV GiB"):
        assert f"| {name}" in table
