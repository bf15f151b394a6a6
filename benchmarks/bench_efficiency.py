"""Benchmark: continuations needed for mean |alignment error| <= 0.05, adaptive vs uniform allocation.

Truth: (a) exact enumeration on random Qwen2s small enough to enumerate every continuation (V=4, T=6, 16 prompts,
4 seeds), once with near-uniform next-token distributions (output head as initialised) and once with peaked, LM-like
ones (head scaled by 100: mean node entropy ~0.3 nats); (b) on the toy lab, a reference run with 20x the largest
uniform budget on the same nodes (base rollouts pinned, 3 seeds); since that reference is itself noisy, also the
errors on the rows two references agree on, and the seed-to-seed disagreement (a precision measure without truth).
The error of a (node, configuration) row is |alignment_hat - alignment_true| (a degenerate estimate or truth counts
as 0); ``needed`` interpolates, in log budget, the continuations per node at which the mean error crosses 0.05. The
headline (uniform / adaptive continuations at the target, exact truth, LM-like models) is printed last.

Usage: ``python benchmarks/bench_efficiency.py [--quick] [--no-toy]`` (about 10 minutes on 2 CPU cores).
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
from opd_callback.core.alignment import score_node  # noqa: E402
from opd_callback.rollout import TransformersBackend, next_token_logits  # noqa: E402

TARGET = 0.05
SHARPEN = (1.0, 100.0)  # output-head scale: near-uniform next-token distributions, and peaked LM-like ones


# ---------------------------------------------------------------------------------------------------- tiny exact lab
def tiny_tokenizer():
    from opd_callback.toy import char_tokenizer

    return char_tokenizer(["a", "b", "c", "<eos>"], eos_token="<eos>", unk_token="<eos>")


def tiny_reward(prompts, completions, **kw):
    # success: the completion contains "ab" or ends with "c"
    return [1.0 if ("ab" in c or c.endswith("c")) else 0.0 for c in completions]


@torch.no_grad()
def exact_successes(model, prompt_ids, prefix, remaining, tok):
    """Exact ``S_j`` of every token ``j`` after ``prefix`` (student at temperature 1, at most ``remaining`` more tokens
    after ``j``): enumerate every continuation level by level (one batched forward per level), then back up the
    rewards through the tree."""
    eos = tok.eos_token_id
    V = len(tok)
    levels = [[list(prefix) + [j] for j in range(V)]]
    for _ in range(remaining):
        nxt = [s + [j] for s in levels[-1] if s[-1] != eos for j in range(V)]
        if not nxt:
            break
        levels.append(nxt)
    value = {}
    for depth in range(len(levels) - 1, -1, -1):
        seqs = levels[depth]
        open_ = [s for s in seqs if s[-1] != eos and depth < len(levels) - 1]
        for s in seqs:
            if s[-1] == eos or depth == len(levels) - 1:
                value[tuple(s)] = tiny_reward(None, [tok.decode(s, skip_special_tokens=True)])[0]
        if open_:
            ids = torch.tensor([list(prompt_ids) + s for s in open_])
            p = torch.softmax(model(input_ids=ids).logits[:, -1].double(), -1)
            for s, row in zip(open_, p.tolist()):
                value[tuple(s)] = sum(pj * value[tuple(s + [j])] for j, pj in enumerate(row))
    return [value[tuple(list(prefix) + [j])] for j in range(V)]


def true_alignment(report, model_s, configs, tok, T, cache):
    """Exact alignment of each (node, config) row of ``report`` (memoised per prompt, prefix and sampled token)."""
    out = {}
    rows = {(r.prompt_index, r.rollout_index): (r.prompt, list(r.completion_ids)) for r in report.rollouts.itertuples()}
    for (pi, ri, pos), _ in report.records.groupby(["prompt_index", "rollout_index", "position"]):
        prompt, y = rows[(pi, ri)]
        key = (prompt, tuple(y[: pos + 1]))  # everything the truth depends on
        if key not in cache:
            prompt_ids = tok(prompt, add_special_tokens=False).input_ids
            s = exact_successes(model_s, prompt_ids, y[:pos], T - pos - 1, tok)
            V = len(s)
            seq, at = [prompt_ids + y], [[len(prompt_ids) + pos]]
            z = next_token_logits(model_s, seq, at, pad_id=tok.eos_token_id)[0][0]
            zts = [next_token_logits(c.teacher.model, seq, at, pad_id=tok.eos_token_id)[0][0] for c in configs]
            ns = score_node(z, zts, [c.divergence for c in configs], torch.arange(V),
                            torch.tensor(s, dtype=torch.float64), y[pos])
            cache[key] = [sc.alignment if not sc.degenerate else 0.0 for sc in ns.configs]
        out.update({(pi, ri, pos, c.name): a for c, a in zip(configs, cache[key])})
    return out


def row_alignments(report):
    """``{(prompt, rollout, position, config): alignment}`` of a report's rows (a degenerate row counts as 0)."""
    return {(r.prompt_index, r.rollout_index, r.position, r.config): 0.0 if r.degenerate else r.alignment
            for r in report.records.itertuples()}


def mean_error(est, truth, keep=None):
    """Mean |alignment_hat - truth| over the rows of ``est`` (:func:`row_alignments`; only keys in ``keep``, if
    given)."""
    return float(np.mean([abs(a - truth[k]) for k, a in est.items() if keep is None or k in keep]))


def sweep(student, tok, examples, configs, base_settings, budgets, seeds, truth_fn, reward_fn, backend_fn=lambda: None,
          keep=None, pairwise=False):
    """Mean |error| and continuations per node for uniform and adaptive allocation at each budget (mean over seeds);
    with ``keep`` (a set of row keys) also the mean over those rows only (``mean_abs_error_kept``); with ``pairwise``
    (the seeds score the same nodes) the mean |difference| between the estimates of two seeds, a precision measure
    that needs no truth (``seed_disagreement``)."""
    rows = []
    for adaptive, n in itertools.product([False, True], budgets):
        errs, kept, conts, nodes, ests = [], [], [], [], []
        for seed in seeds:
            st = oc.RolloutSettings(**{**base_settings, "seed": seed, "rollouts_per_branch": n, "adaptive": adaptive})
            rep = oc.diagnose(student, tok, examples, reward_fn=reward_fn, configs=configs, settings=st,
                              backend=backend_fn(), progress=False)
            truth, est = truth_fn(rep), row_alignments(rep)
            errs.append(mean_error(est, truth))
            ests.append(est)
            if keep is not None:
                kept.append(mean_error(est, truth, keep))
            conts.append(rep.meta["continuations"])
            nodes.append(rep.meta["nodes"])
        row = {"adaptive": adaptive, "rollouts_per_branch": n, "mean_abs_error": float(np.mean(errs)),
               "continuations_per_node": float(np.sum(conts) / max(np.sum(nodes), 1))}
        if keep is not None:
            row["mean_abs_error_kept"] = float(np.mean(kept))
        if pairwise:
            pairs = itertools.combinations(ests, 2)
            row["seed_disagreement"] = float(np.mean([abs(a[k] - b[k]) for a, b in pairs for k in a]))
        rows.append(row)
        print(f"  {'adaptive' if adaptive else 'uniform ':<8} n={n:<4} "
              f"continuations/node={row['continuations_per_node']:7.1f} mean|err|={row['mean_abs_error']:.4f}"
              + (f"  on resolved nodes {row['mean_abs_error_kept']:.4f}" if keep is not None else "")
              + (f"  seed-to-seed |diff| {row['seed_disagreement']:.4f}" if pairwise else ""))
    return rows


def needed(rows, adaptive, metric="mean_abs_error"):
    """Smallest continuations/node whose error <= TARGET (linear interpolation in log budget)."""
    pts = sorted((r["continuations_per_node"], r[metric]) for r in rows if r["adaptive"] == adaptive)
    for (c0, e0), (c1, e1) in zip(pts, pts[1:]):
        if e0 <= TARGET:
            return c0
        if e1 <= TARGET:
            f = (e0 - TARGET) / (e0 - e1)
            return float(np.exp(np.log(c0) + f * (np.log(c1) - np.log(c0))))
    return pts[0][0] if pts and pts[0][1] <= TARGET else float("nan")


def exact_part(quick, sharpen, n_seeds=4):
    """Uniform vs adaptive against exact enumeration. ``sharpen`` scales the random models' output heads: 1 gives
    near-uniform next-token distributions, larger values peaked, LM-like ones (the mean node entropy is reported)."""
    tok = tiny_tokenizer()
    student = random_qwen2(4, 16, 1, 2, 1, eos=3, seed=1)
    teachers = [random_qwen2(4, 16, 1, 2, 1, eos=3, seed=s) for s in (2, 3)]
    with torch.no_grad():
        for m in [student, *teachers]:
            m.lm_head.weight.mul_(sharpen)
    configs = [oc.TeacherConfig(f"t{i}", oc.ExternalTeacher(m)) for i, m in enumerate(teachers)]
    T = 6
    rng = np.random.default_rng(0)
    examples = [{"prompt": "".join(rng.choice(list("abc"), 3))} for _ in range(4 if quick else 16)]
    base = dict(num_rollouts=2, max_new_tokens=T, node_selection="positions", positions=[0, 1, 2, 3], top_k=4,
                teacher_top_k=0, batch_size=1024, reuse_base_rollout=False, bootstrap_samples=0)
    cache = {}
    truth_fn = lambda rep: true_alignment(rep, student, configs, tok, T, cache)  # noqa: E731
    budgets = [4, 16, 64] if quick else [4, 16, 32, 64, 128, 256, 1024]
    seeds = [0] if quick else list(range(n_seeds))
    probe = oc.diagnose(student, tok, examples, reward_fn=tiny_reward, configs=configs[:1],
                        settings=oc.RolloutSettings(**{**base, "rollouts_per_branch": 1}), progress=False)
    nodes = probe.records
    shape = {"sharpen": sharpen, "prompts": len(examples), "nodes": len(nodes),
             "mean_node_entropy": float(nodes["student_entropy"].mean()),
             "mean_top1_prob": float(nodes["candidate_probs"].map(max).mean())}
    print(f"exact enumeration (V=4, T=6, sharpen {sharpen}: mean node entropy {shape['mean_node_entropy']:.2f} nats, "
          f"mean top-1 probability {shape['mean_top1_prob']:.2f}):")
    rows = sweep(student, tok, examples, configs, base, budgets, seeds, truth_fn, tiny_reward)
    return {"shape": shape, "rows": rows}


class FrozenBases(TransformersBackend):
    """The student's backend with the *base* rollouts pinned: the first call for a prompt records them, later calls
    replay them, so runs with different seeds score the same nodes and differ only in their continuations."""

    def __init__(self, model, store: dict, **kw):
        super().__init__(model, **kw)
        self.store = store

    def sample(self, prefixes, max_new_tokens, generator):
        key = tuple(tuple(p) for p in prefixes)
        if len(set(key)) != 1:  # not a base-rollout call (those repeat one prompt): sample as usual
            return super().sample(prefixes, max_new_tokens, generator)
        if key not in self.store:
            self.store[key] = super().sample(prefixes, max_new_tokens, generator)
        return [list(c) for c in self.store[key]]


def toy_part(quick):
    """Uniform vs adaptive on the toy lab (a trained 145K-parameter student), against a reference with 20x the largest
    uniform budget on the same nodes (base rollouts pinned by :class:`FrozenBases`; nodes = highest-entropy
    positions)."""
    from opd_callback import toy

    lab = toy.build_lab(verbose=False)
    configs = [
        oc.TeacherConfig("strong", oc.ExternalTeacher(lab.strong_teacher)),
        oc.TeacherConfig("wrong", oc.ExternalTeacher(lab.wrong_teacher)),
        oc.TeacherConfig("self+solution", oc.ContextTeacher(toy.SOLUTION_TEMPLATE)),
    ]
    examples = lab.probe_examples[: (4 if quick else 16)]
    base = dict(num_rollouts=1, max_new_tokens=48, node_selection="entropy", max_nodes_per_rollout=4, top_k=4,
                teacher_top_k=1, batch_size=512, reuse_base_rollout=False, bootstrap_samples=0)
    budgets = [2, 4, 8, 16] if quick else [2, 4, 8, 16, 32]
    ref_n = 20 * budgets[-1]
    store: dict = {}
    eos = lab.tokenizer.eos_token_id

    def backend():
        return FrozenBases(lab.student, store, eos_ids=[eos], pad_id=eos, batch_size=512)

    def reference(seed):
        settings = oc.RolloutSettings(**{**base, "seed": seed, "rollouts_per_branch": ref_n})
        return oc.diagnose(lab.student, lab.tokenizer, examples, reward_fn=toy.reward_fn, configs=configs,
                           backend=backend(), settings=settings, progress=False)

    print(f"toy lab: reference with rollouts_per_branch={ref_n} (20x the largest budget) ...")
    ref = reference(10_000)
    truth = row_alignments(ref)
    # the reference is itself an estimate: a second one with other continuations on the same nodes measures its noise
    second = row_alignments(reference(10_001))
    disagreement = mean_error(second, truth)
    # rows whose truth the reference resolves: the two references agree to 0.05 (chosen from the references only)
    resolved = {k for k, a in truth.items() if abs(a - second[k]) <= TARGET}
    shape = {"reference_disagreement": disagreement, "resolved_rows": len(resolved), "rows": len(truth),
             "prompts": len(examples), "nodes": int(ref.meta["nodes"]), "reference_rollouts_per_branch": ref_n,
             "reference_continuations": int(ref.meta["continuations"]),
             "reference_degenerate_fraction": float(ref.records["degenerate"].mean()),
             "mean_node_entropy": float(ref.records["student_entropy"].mean()),
             "mean_top1_prob": float(ref.records["candidate_probs"].map(max).mean())}
    print(f"  {shape['nodes']} nodes, mean node entropy {shape['mean_node_entropy']:.2f} nats, "
          f"reference degenerate fraction {shape['reference_degenerate_fraction']:.2f}; two references disagree by "
          f"mean|diff| = {disagreement:.4f} (the floor this truth can resolve); they agree to {TARGET} on "
          f"{len(resolved)} of {len(truth)} rows (resolved)")
    rows = sweep(lab.student, lab.tokenizer, examples, configs, base, budgets, [0, 1, 2] if not quick else [0, 1],
                 lambda rep: truth, toy.reward_fn, backend, keep=resolved, pairwise=True)
    return {"shape": shape, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer prompts, budgets and seeds (a smoke run)")
    p.add_argument("--no-toy", action="store_true", help="skip the toy-lab part")
    args = p.parse_args(argv)
    res = {"target": TARGET, "parts": {}, "needed": {}}
    parts = [(f"exact_sharpen_{sh:g}", lambda sh=sh: exact_part(args.quick, sh)) for sh in SHARPEN]
    if not args.no_toy:
        parts.append(("toy_lab", lambda: toy_part(args.quick)))
    for name, fn in parts:
        out = fn()
        res["parts"][name] = out
        metrics = ["mean_abs_error"] + (["mean_abs_error_kept"] if "mean_abs_error_kept" in out["rows"][0] else [])
        for metric in metrics:
            label = name if metric == "mean_abs_error" else f"{name}_resolved_rows"
            nu, na = needed(out["rows"], False, metric), needed(out["rows"], True, metric)
            res["needed"][label] = {"uniform": nu, "adaptive": na,
                                    "ratio_uniform_over_adaptive": nu / na if na == na and na else None}
            print(f"  {label}: continuations/node for mean|err| <= {TARGET}: uniform {nu:.0f}, adaptive {na:.0f} "
                  f"(nan = not reached within the grid)")
    path = write_result("efficiency", res)
    print(f"wrote {path}")
    head = res["needed"][f"exact_sharpen_{SHARPEN[-1]:g}"]
    print(f"HEADLINE continuations/node for mean|err|<={TARGET} against exact enumeration (LM-like, sharpen "
          f"{SHARPEN[-1]:g}): uniform {head['uniform']:.0f}, adaptive {head['adaptive']:.0f} -> "
          f"uniform/adaptive = {head['ratio_uniform_over_adaptive'] or float('nan'):.2f}x")


if __name__ == "__main__":
    main()
