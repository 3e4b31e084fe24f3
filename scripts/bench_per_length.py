"""What reading Dynamic NTK once per milestone costs in `ppl`: the one forward of a document that `ppl` ran before
(the base of the whole document at every position) against `per_length_nll`, in the same process, alternating.

    python scripts/bench_per_length.py --model tiny-rope --lengths 0.5x,1x,2x,4x --reps 5 --threads 1

Prints the median time of each and their ratio, with the arithmetic beside it: the forwards' tokens (the
per-token work) and their attention pairs (the quadratic part), relative to one forward of the document. CPU
time (of this process, one thread) is the figure to read on a machine other jobs share; wall time beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-rope")
    parser.add_argument("--dataset", default="arxiv-sample")
    parser.add_argument("--lengths", default="0.5x,1x,2x,4x", help="milestones, as `ppl --lengths`")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps a shared machine's load from skewing it")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lminf_eval.tasks.ppl import forward_lengths, per_length_nll, token_nll

    from lminf_eval.harness.config import parse_lengths
    from lminf_eval.harness.data import load_documents
    from lminf_eval.harness.models import load_model, pretraining_length_for
    from lminf_eval.methods import applied, parse_method
    from lminf_eval.patch import pretraining_length
    from lminf_eval.rope_scaling import reset_dynamic_rope

    model, tokenizer = load_model(args.model)
    l_pre = pretraining_length_for(args.model) or pretraining_length(model.config)
    lengths = parse_lengths(args.lengths, l_pre)
    n = max(lengths)
    (doc,) = load_documents(args.dataset, tokenizer, 1, n, n)
    ids = torch.tensor([doc.ids])
    forwards = forward_lengths(lengths, n, l_pre)

    def timed(fn) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    one, per = [], []
    with applied(model, parse_method("dynamic-ntk").settings(l_pre, n), l_pre):
        token_nll(model, ids[:, : min(n, l_pre)])  # warm-up, untimed
        for _ in range(args.reps):
            reset_dynamic_rope(model)
            one.append(timed(lambda: token_nll(model, ids)))
            per.append(timed(lambda: per_length_nll(model, ids, lengths, l_pre, max(1, l_pre // 8))))
    tokens, pairs = sum(forwards) / n, sum(f * f for f in forwards) / n**2
    print(f"{args.model} (L_pre {l_pre}) on {args.dataset}, lengths {lengths}: forwards {forwards}")
    print(f"{args.threads} thread(s), median of {args.reps}, load {os.getloadavg()[0]:.2f} at the end")
    for k, kind in enumerate(("cpu", "wall")):
        t_one, t_per = statistics.median(t[1 - k] for t in one), statistics.median(t[1 - k] for t in per)
        print(f"{kind}: one forward {t_one:.3f} s, per length {t_per:.3f} s: {t_per / t_one:.2f}x")
    print(f"arithmetic: forward tokens {tokens:.2f}x, attention pairs {pairs:.2f}x")


if __name__ == "__main__":
    main()
