"""Benchmark: continuations needed for mean |alignment error| <= 0.05, adaptive vs uniform allocation.

Truth (a) exact enumeration on a model small enough to enumerate every continuation, and (b) on the toy lab, a
reference run with 20x the largest uniform budget. For each allocation and budget the diagnostic is repeated over
seeds on the same nodes; the error of a node is |alignment_hat - alignment_true| (a degenerate estimate counts as 0).
The headline ratio (uniform / adaptive continuations at the 0.05 target, exact truth) is printed last.

Usage: ``python benchmarks/bench_efficiency.py [--quick] [--no-toy]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_qwen2, write_result  # noqa: E402

import opd_callback as oc  # noqa: E402
from opd_callback.alignment import score_node  # noqa: E402
from opd_callback.rollout import next_token_logits  # noqa: E402

TARGET = 0.05
SHARPEN = 6.0


# ---------------------------------------------------------------------------------------------------- tiny exact lab
def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "c": 2, "<eos>": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def tiny_reward(prompts, completions, **kw):
    # success: the completion contains "ab" or ends with "c"
    return [1.0 if ("ab" in c or c.endswith("c")) else 0.0 for c in completions]


def exact_success(model, prompt_ids, prefix, remaining, tok, memo):
    """Exact P(success) of completion ``prefix + continuation`` by enumeration (student at temperature 1)."""
    key = tuple(prefix)
    if key in memo:
        return memo[key]
    eos = tok.eos_token_id
    if (prefix and prefix[-1] == eos) or remaining == 0:
        val = tiny_reward(None, [tok.decode(prefix, skip_special_tokens=True)])[0]
    else:
        z = next_token_logits(model, [prompt_ids + prefix], [[len(prompt_ids) + len(prefix)]], pad_id=eos)[0][0]
        p = torch.softmax(z.double(), -1)
        val = sum(float(p[j]) * exact_success(model, prompt_ids, prefix + [j], remaining - 1, tok, memo) for j in range(len(p)))
    memo[key] = val
    return val


def true_alignment(report, student, configs, tok, T, settings, cache):
    """Exact alignment of each (node, config) row of ``report``."""
    out = {}
    comp = {(r.prompt_index, r.rollout_index): list(r.completion_ids) for r in report.rollouts.itertuples()}
    for (pi, ri, pos), grp in report.records.groupby(["prompt_index", "rollout_index", "position"]):
        key = (pi, ri, pos)
        if key in cache:
            out.update(cache[key])
            continue
        prompt_ids = tok("ab", add_special_tokens=False).input_ids
        y = comp[(pi, ri)]
        prefix = y[:pos]
        memo = {}
        V = 4
        s = [exact_success(student, prompt_ids, prefix + [j], T - pos - 1, tok, memo) for j in range(V)]
        z = next_token_logits(student, [prompt_ids + y], [[len(prompt_ids) + pos]], pad_id=3)[0][0]
        zts = [next_token_logits(c.teacher.model, [prompt_ids + y], [[len(prompt_ids) + pos]], pad_id=3)[0][0] for c in configs]
        ns = score_node(z, zts, [c.divergence for c in configs], torch.arange(V), torch.tensor(s), y[pos])
        vals = {(pi, ri, pos, c.name): sc.alignment if not sc.degenerate else 0.0 for c, sc in zip(configs, ns.configs)}
        cache[key] = vals
        out.update(vals)
    return out


def mean_error(report, truth):
    errs = []
    for r in report.records.itertuples():
        est = 0.0 if r.degenerate else r.alignment
        errs.append(abs(est - truth[(r.prompt_index, r.rollout_index, r.position, r.config)]))
    return float(np.mean(errs))


def sweep(student, tok, examples, configs, base_settings, budgets, seeds, truth_fn):
    rows = []
    for adaptive, n in itertools.product([False, True], budgets):
        errs, conts, nodes = [], [], []
        for seed in seeds:
            st = oc.RolloutSettings(**{**base_settings, "seed": seed, "rollouts_per_branch": n, "adaptive": adaptive})
            rep = oc.diagnose(student, tok, examples, reward_fn=base_settings_reward[0], configs=configs, settings=st, progress=False)
            errs.append(mean_error(rep, truth_fn(rep)))
            conts.append(rep.meta["continuations"])
            nodes.append(rep.meta["nodes"])
        row = {"adaptive": adaptive, "rollouts_per_branch": n, "mean_abs_error": float(np.mean(errs)),
               "continuations_per_node": float(np.sum(conts) / max(np.sum(nodes), 1))}
        rows.append(row)
        print(f"  {'adaptive' if adaptive else 'uniform ':<8} n={n:<4} continuations/node={row['continuations_per_node']:7.1f} "
              f"mean|err|={row['mean_abs_error']:.4f}")
    return rows


base_settings_reward = [tiny_reward]


def needed(rows, adaptive):
    """Smallest continuations/node whose error <= TARGET (linear interpolation in log budget)."""
    pts = sorted((r["continuations_per_node"], r["mean_abs_error"]) for r in rows if r["adaptive"] == adaptive)
    for (c0, e0), (c1, e1) in zip(pts, pts[1:]):
        if e0 <= TARGET:
            return c0
        if e1 <= TARGET:
            f = (e0 - TARGET) / (e0 - e1)
            return float(np.exp(np.log(c0) + f * (np.log(c1) - np.log(c0))))
    return pts[0][0] if pts and pts[0][1] <= TARGET else float("nan")


def exact_part(quick):
    tok = tiny_tokenizer()
    student = random_qwen2(4, 16, 1, 2, 1, eos=3, seed=1)
    teachers = [random_qwen2(4, 16, 1, 2, 1, eos=3, seed=s) for s in (2, 3)]
    with torch.no_grad():  # language models are peaked: sharpen the random heads (LM-like entropies)
        for m in [student, *teachers]:
            m.lm_head.weight.mul_(SHARPEN)
    configs = [oc.TeacherConfig(f"t{i}", oc.ExternalTeacher(m)) for i, m in enumerate(teachers)]
    T = 6
    examples = [{"prompt": "ab"}] * (2 if quick else 4)
    base = dict(num_rollouts=2, max_new_tokens=T, node_selection="positions", positions=[0, 1, 2, 3], top_k=4,
                teacher_top_k=0, batch_size=512, reuse_base_rollout=False, bootstrap_samples=0)
    cache = {}
    truth_fn = lambda rep: true_alignment(rep, student, configs, tok, T, base, cache)  # noqa: E731
    budgets = [2, 8, 32] if quick else [4, 16, 64, 256]
    seeds = [0] if quick else [0, 1]
    print("exact enumeration (V=4, T=6):")
    rows = sweep(student, tok, examples, configs, base, budgets, seeds, truth_fn)
    return rows


def toy_part(quick):
    from opd_callback import toy

    lab = toy.build_lab(verbose=False)
    configs = [
        oc.TeacherConfig("strong", oc.ExternalTeacher(lab.strong_teacher)),
        oc.TeacherConfig("self+solution", oc.ContextTeacher(toy.SOLUTION_TEMPLATE)),
    ]
    examples = lab.probe_examples[: (2 if quick else 4)]
    base_settings_reward[0] = toy.reward_fn
    base = dict(num_rollouts=1, max_new_tokens=48, node_selection="depth_windows", max_nodes_per_rollout=6, top_k=4,
                teacher_top_k=1, batch_size=512, reuse_base_rollout=False, bootstrap_samples=0)
    ref_n = 20 * (16 if quick else 32)
    print(f"toy lab: reference with rollouts_per_branch={ref_n} ...")
    ref = oc.diagnose(lab.student, lab.tokenizer, examples, reward_fn=toy.reward_fn, configs=configs,
                      settings=oc.RolloutSettings(**{**base, "seed": 0, "rollouts_per_branch": ref_n}), progress=False)
    truth = {(r.prompt_index, r.rollout_index, r.position, r.config): (0.0 if r.degenerate else r.alignment)
             for r in ref.records.itertuples()}
    budgets = [2, 4, 8, 16] if quick else [2, 4, 8, 16, 32]
    rows = sweep(lab.student, lab.tokenizer, examples, configs, base, budgets, [0], lambda rep: truth)  # same nodes as the reference
    base_settings_reward[0] = tiny_reward
    return rows, ref_n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-toy", action="store_true")
    p.add_argument("--toy-only", action="store_true", help="add the toy part to an existing results/efficiency.json")
    args = p.parse_args(argv)
    if args.toy_only:
        import json

        from common import RESULTS

        prev = json.loads((RESULTS / "efficiency.json").read_text())
        res = {k: v for k, v in prev.items() if k in ("target", "exact", "exact_needed")}
        nu, na = res["exact_needed"]["uniform"], res["exact_needed"]["adaptive"]
    else:
        exact = exact_part(args.quick)
        res = {"target": TARGET, "exact": exact}
        nu, na = needed(exact, False), needed(exact, True)
        res["exact_needed"] = {"uniform": nu, "adaptive": na, "ratio_uniform_over_adaptive": nu / na if na else None}
    if not args.no_toy:
        rows, ref_n = toy_part(args.quick)
        tu, ta = needed(rows, False), needed(rows, True)
        res["toy"] = rows
        res["toy_reference_rollouts_per_branch"] = ref_n
        res["toy_needed"] = {"uniform": tu, "adaptive": ta, "ratio_uniform_over_adaptive": tu / ta if ta else None}
        print(f"toy lab: continuations/node for mean|err|<={TARGET}: uniform {tu}, adaptive {ta} (nan = not reached)")
    path = write_result("efficiency", res)
    print(f"wrote {path}")
    err = {r["adaptive"]: r["mean_abs_error"] for r in res["exact"] if r["rollouts_per_branch"] == max(x["rollouts_per_branch"] for x in res["exact"])}
    print(f"HEADLINE continuations/node for mean|err|<={TARGET} (exact truth): uniform {nu}, adaptive {na} "
          f"(nan = not reached); error at the largest budget: uniform {err.get(False):.4f}, adaptive {err.get(True):.4f}")


if __name__ == "__main__":
    main()
