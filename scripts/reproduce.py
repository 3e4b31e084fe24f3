"""`make reproduce`: the paper's tables and figures regenerated with `lminf-eval` commands, into results/paper/.

    python scripts/reproduce.py [--profile quick|default|paper]

quick (~15-20 min on a 2-core CPU) and default (~4.1 h, the sum of its steps' wall times measured
here, over several resumed runs) run offline on the shipped models and corpora;
paper runs the real grid (7B models, hub corpora; configs/paper-*.yaml) on a GPU machine with hub access.
Each step writes its own folder and is skipped once complete, resumed if interrupted; TABLES.md then
collects every table with the command, machine and versions that produced it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = "0.5x,1x,2x,4x,8x,16x,32x"
ABLATION = "vanilla,window,lambda-only,ceiling-only,lm-infinite"
SWEEP = ",".join(f"lm-infinite:n_global={g}" for g in (0, 1, 2, 10, 100))
TOPK = "lm-infinite:top_k=5:top_k_from_layer=4"


def steps(profile: str) -> list[tuple[str, list[str]]]:
    """(folder, lminf-eval arguments) in order. Table numbers follow the paper."""
    if profile == "paper":
        out = []
        for model in ("llama-2-7b", "llama-7b", "gpt-j-6b", "mpt-7b"):
            for data in ("arxiv", "openwebtext2"):
                out.append(
                    (
                        f"table1-{model}-{data}",
                        ["ppl", "--config", "configs/paper-table1.yaml", "--model", model, "--dataset", data],
                    )
                )
        out += [
            ("fig5-ablation", ["ppl", "--config", "configs/paper-fig5-ablation.yaml"]),
            ("table2-passkey", ["passkey", "--config", "configs/paper-table2-passkey.yaml"]),
            ("table3-generate", ["generate", "--config", "configs/paper-table3-generate.yaml"]),
            ("appg-timing", ["timing", "--config", "configs/paper-appg-timing.yaml"]),
            ("stream", ["ppl", "--config", "configs/paper-stream.yaml"]),
        ]
        return out
    quick = profile == "quick"
    docs = "2" if quick else "4"
    smol_lengths = "4k,8k,16k" if quick else "4k,8k,16k,24k,32k"
    out = []
    for model in ("tiny-rope", "tiny-alibi"):
        for data in ("arxiv-sample", "web-sample"):
            out.append(
                (
                    f"table1-{model}-{data}",
                    ["ppl", "--model", model, "--dataset", data, "--lengths", TINY, "--num-docs", "4"],
                )
            )
    for data in ("arxiv-sample",) if quick else ("arxiv-sample", "web-sample"):
        out.append(
            (
                f"table1-smollm2-{data}",
                ["ppl", "--model", "smollm2-135m", "--dataset", data, "--lengths", smol_lengths, "--num-docs", docs],
            )
        )
    out += [
        (
            "fig5-ablation-tiny-rope",
            ["ppl", "--model", "tiny-rope", "--method", ABLATION, "--lengths", TINY, "--num-docs", "4", "--log-x"],
        ),
        (
            "fig5-nglobal-tiny-rope",
            ["ppl", "--model", "tiny-rope", "--method", SWEEP, "--lengths", "1x,4x", "--num-docs", "4"],
        ),
        (
            "stream-tiny-rope",
            [
                "ppl",
                "--model",
                "tiny-rope",
                "--method",
                "lm-infinite",
                "--n-global",
                "10",
                "--stream-tokens",
                "100000" if quick else "1000000",
                "--chunk-size",
                "256",
            ],
        ),
        (
            "table2-passkey-smollm2",
            [
                "passkey",
                "--model",
                "smollm2-135m",
                "--method",
                f"vanilla,truncate,lm-infinite,{TOPK}",
                "--lengths",
                "12k" if quick else "8k,12k,16k",
                "--num-samples",
                "2" if quick else "4",
            ],
        ),
        (
            "appg-timing-smollm2",
            ["timing", "--model", "smollm2-135m", "--lengths", "8k,16k" if quick else "16k,32k", "--new-tokens", "8"],
        ),
        (
            "fig1-diagnose-tiny-rope",  # seconds; its position-0 attention share says whether it has a sink
            ["diagnose", "--model", "tiny-rope", "--method", "vanilla", "--lengths", "4x"],
        ),
        (
            "fig1-diagnose-smollm2",
            ["diagnose", "--model", "smollm2-135m", "--method", "vanilla", "--lengths", "12k" if quick else "16k"],
        ),
    ]
    if not quick:
        out += [
            (
                "fig5-ablation-smollm2",
                ["ppl", "--model", "smollm2-135m", "--method", ABLATION, "--lengths", "4k,8k,16k", "--num-docs", "2"],
            ),
            (
                "table2-passkey-depths-smollm2",
                [
                    "passkey",
                    "--model",
                    "smollm2-135m",
                    "--method",
                    f"vanilla,{TOPK}",
                    "--lengths",
                    "16k",
                    "--depths",
                    "0,0.25,0.5,0.75,1",
                    "--num-samples",
                    "2",
                ],
            ),
        ]
        for data in ("arxiv-sample", "web-sample"):
            out.append(
                (
                    f"table3-generate-smollm2-{data}",
                    [
                        "generate",
                        "--model",
                        "smollm2-135m",
                        "--dataset",
                        data,
                        "--lengths",
                        "4k,8k,16k",
                        "--num-docs",
                        "4",
                    ],
                )
            )
    return out


def run_step(folder: Path, args: list[str]) -> None:
    done = folder / "results.json"
    if done.exists() and json.loads(done.read_text()).get("status") == "complete":
        print(f"[skip] {folder.name}: complete")
        return
    cmd = [sys.executable, "-m", "lminf_eval", *args, "--output-dir", str(folder)]
    if any(folder.glob("samples*.jsonl")):
        cmd.append("--resume")
    print("[run] " + " ".join(["lminf-eval", *args]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    (folder / "COMMAND").write_text("lminf-eval " + " ".join(args) + "\n")


def collect(out: Path, profile: str) -> None:
    """TABLES.md: every table, each under the command that made it, plus machine and versions."""
    parts = [
        f"# Reproduction ({profile} profile)\n\nMachine: {platform.platform()}, {platform.processor() or 'cpu'}; "
        f"written by `python scripts/reproduce.py --profile {profile}`.\n"
    ]
    for folder in sorted(p for p in out.iterdir() if (p / "results.json").exists()):
        res = json.loads((folder / "results.json").read_text())
        report = subprocess.run(
            [sys.executable, "-m", "lminf_eval", "report", str(folder)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        v = res["versions"]
        command = (folder / "COMMAND").read_text().strip() if (folder / "COMMAND").exists() else res["command"]
        parts.append(
            f"## {folder.name}\n\n`{command}`"
            f" ({res['status']}; {res['wall_seconds']:.0f} s on {res['device']}; torch {v['torch']}, "
            f"transformers {v['transformers']}, git {res['git']})\n\n{report}"
        )
    (out / "TABLES.md").write_text("\n".join(parts))
    print(f"tables: {out / 'TABLES.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["quick", "default", "paper"], default="default")
    parser.add_argument("--only", help="run only steps whose folder name contains this")
    args = parser.parse_args()
    out = ROOT / "results" / "paper" / args.profile
    out.mkdir(parents=True, exist_ok=True)
    for name, cmd in steps(args.profile):
        if args.only and args.only not in name:
            continue
        run_step(out / name, cmd)
    collect(out, args.profile)
    for png in ("table1-tiny-rope-arxiv-sample/nll_vs_position.png", "fig5-ablation-tiny-rope/nll_vs_position.png"):
        if (out / png).exists():
            shutil.copy(out / png, out / png.replace("/", "_"))


if __name__ == "__main__":
    main()
