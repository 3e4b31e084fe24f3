"""Start-up time of the command line: `lminf-eval --help`, `ppl --help` and `--version` against the imports a
real run needs (torch, transformers, the runner), each the median of 5 fresh interpreters."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def cli(*args: str) -> str:
    return f"from lminf_eval.harness.cli import app\ntry: app({list(args)!r})\nexcept SystemExit: pass"


CASES = {
    "lminf-eval --help": cli("--help"),
    "lminf-eval ppl --help": cli("ppl", "--help"),
    "lminf-eval --version": cli("--version"),
    "a run's imports (runner, tasks)": "import lminf_eval.harness.runner, lminf_eval.tasks.ppl, transformers",
}


def seconds(code: str, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    results = {name: seconds(code) for name, code in CASES.items()}
    base = results["a run's imports (runner, tasks)"]
    for name, s in results.items():
        print(f"{name:<34} {s:6.2f} s  ({s / base:.2f}x a run's imports)")


if __name__ == "__main__":
    main()
