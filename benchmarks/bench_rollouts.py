"""Benchmark: targeted-rollout throughput of the engine vs a naive baseline and vs the practical ceiling.

* engine   — ``TransformersBackend.sample_branches``: one forward over each base rollout gives the KV cache of every
             node prefix; every branch attends to its base row's cache in place (shared-prefix attention, no
             per-row prefix copy); continuations of all nodes are batched together; finished rows are compacted.
* naive    — ``model.generate`` once per (node, candidate), full prefix re-encoded, ``num_return_sequences=n``.
* ceiling  — plain batched ``model.generate`` of the same number of continuations from a 1-token prompt (no prefix).

* vllm     — ``--backend vllm``: :class:`~opd_callback.rollout.vllm_backend.VLLMBackend` on a vLLM engine started
             once per model (prefix caching, one request with ``n`` per (node, candidate); prefix cache cleared before
             each pass). Models whose head size vLLM's CPU attention refuses (the toy lab's) are skipped. Each repeat
             times one vLLM pass and one engine pass back to back (order alternating), in wall and process CPU time.

All of them sample the same number of continuation tokens (EOS disabled so lengths are equal), measured side by side
in one run. Usage: ``python benchmarks/bench_rollouts.py [--quick] [--device cuda --dtype bfloat16 --big]
[--backend vllm]`` (vLLM: in an environment that has it, e.g. ``.venv-vllm/bin/python``).
The headline ratio (engine / naive on the 20M model) is printed last.

``--row-streams`` measures only the engine, with its per-row random streams (records independent of ``batch_size``
and ``prefix_cache``) against one shared ``torch.multinomial`` stream per call (the previous sampler), in pairs run
in alternating order; on CPU it also compares the process's CPU time per pair (the median ratio is the headline:
wall time on a shared machine moves by more than the effect).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_qwen2, write_result  # noqa: E402

from opd_callback.rollout import TransformersBackend  # noqa: E402


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def make_work(vocab, eos, prompt_len, completion_len, n_rollouts, nodes_per_rollout, cands, n_per, max_new, min_prefix,
              seed=0):
    g = torch.Generator().manual_seed(seed)
    usable = [i for i in range(vocab) if i != eos]
    def rand_tokens(n):
        idx = torch.randint(len(usable), (n,), generator=g).tolist()
        return [usable[i] for i in idx]
    bases = [rand_tokens(prompt_len + completion_len) for _ in range(n_rollouts)]
    branches = []
    lo = max(min_prefix - prompt_len, 0)
    for b in range(n_rollouts):
        ts = torch.linspace(lo, completion_len - 1, nodes_per_rollout).long().tolist()
        for t in ts:
            for j in rand_tokens(cands):
                for _ in range(n_per):
                    branches.append((b, prompt_len + t, j, max_new))
    return bases, branches


def run_engine(model, bases, branches, batch_size, device, row_streams=True, cpu_time=False):
    """(tokens, seconds): wall seconds, or with ``cpu_time`` this process's CPU seconds (robust to other processes
    on a shared CPU machine; meaningful with OMP_NUM_THREADS=1 and no GPU)."""
    be = TransformersBackend(model, eos_ids=[], pad_id=0, batch_size=batch_size)
    be.row_streams = row_streams  # False: one shared torch.multinomial stream (records depend on batch_size)
    gen = torch.Generator(device=device).manual_seed(0)
    clock = time.process_time if cpu_time else time.perf_counter
    _sync(device)
    t0 = clock()
    out = be.sample_branches(bases, branches, gen)
    _sync(device)
    dt = clock() - t0
    return sum(len(o) for o in out), dt


def _generate(model, ids, n, max_new, eos):
    """Plain ``generate``: ``n`` samples per row at temperature 1, no truncation, exactly ``max_new`` new tokens."""
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        num_return_sequences=n,
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        pad_token_id=eos,
    )


def run_naive(model, bases, branches, eos, device):
    groups = {}
    for b, L, j, m in branches:
        groups[(b, L, j, m)] = groups.get((b, L, j, m), 0) + 1
    tokens = 0
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for (b, L, j, m), n in groups.items():
            ids = torch.tensor([list(bases[b][:L]) + [j]], device=device)
            out = _generate(model, ids, n, m, eos)
            tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    _sync(device)
    return tokens, time.perf_counter() - t0


def run_ceiling(model, n_seq, max_new, batch_size, eos, device):
    tokens = 0
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n_seq, batch_size):
            b = min(batch_size, n_seq - s)
            ids = torch.ones((b, 1), dtype=torch.long, device=device)
            out = _generate(model, ids, 1, max_new, eos)
            tokens += (out.shape[1] - 1) * b
    _sync(device)
    return tokens, time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _vllm_pair(runner, model, bases, branches, batch_size, device, vllm_first: bool) -> dict:
    """One vLLM pass and one transformers-engine pass on the same branches, back to back (``vllm_first``: order)."""
    load_before = os.getloadavg()[0]
    res = {}
    for which in (("vllm", "engine") if vllm_first else ("engine", "vllm")):
        cpu0 = time.process_time()
        if which == "vllm":
            tok, dt = runner.run(bases, branches)
        else:
            tok, dt = run_engine(model, bases, branches, batch_size, device)
        res[f"{which}_tokens_per_s"] = tok / dt
        res[f"{which}_tokens_per_cpu_s"] = tok / (time.process_time() - cpu0)  # this process's CPU time, all threads
    res["vllm_over_engine"] = res["vllm_tokens_per_s"] / res["engine_tokens_per_s"]
    res["vllm_over_engine_cpu_time"] = res["vllm_tokens_per_cpu_s"] / res["engine_tokens_per_cpu_s"]
    res.update(vllm_first=vllm_first, loadavg_1min_before=load_before, loadavg_1min_after=os.getloadavg()[0])
    return res


def bench(name, model, vocab, eos, *, device, batch_size, prompt_len, completion_len, n_rollouts, nodes, cands, n_per,
          max_new, repeats,
          streams_only=False, vllm=None, skip_naive=False, skip_ceiling=False):
    bases, branches = make_work(vocab, eos, prompt_len, completion_len, n_rollouts, nodes, cands, n_per, max_new, 64)
    prefix_lens = [L for _, L, _, _ in branches]
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "continuations": len(branches),
           "max_new_tokens": max_new, "prefix_len_min": min(prefix_lens),
           "prefix_len_mean": sum(prefix_lens) / len(prefix_lens),
           "batch_size": batch_size}
    # warm-up
    run_engine(model, bases, branches[: batch_size], batch_size, device)
    best = {"engine": 0.0, "multinomial": 0.0, "naive": 0.0, "ceiling": 0.0}
    ratios = []  # per repeat: CPU time with per-row streams / with the shared multinomial (CPU only)
    cpu = str(device) == "cpu"
    runner = None
    if vllm is not None:  # the vLLM backend side by side (benchmarks/vllm_rollouts.py)
        runner = vllm(model)
        runner.run(bases, branches[:batch_size])  # warm-up
        best["vllm"] = 0.0
        row.update(vllm_startup_s=runner.startup_s, vllm_options=runner.options)
    vllm_pairs = []  # per repeat: vLLM and engine tokens/s measured back to back (order alternating), load average
    for rep in range(repeats):  # interleaved, best of N (shared machines are noisy)
        if runner is not None:
            vllm_pairs.append(_vllm_pair(runner, model, bases, branches, batch_size, device, vllm_first=rep % 2 == 0))
            best["vllm"] = max(best["vllm"], vllm_pairs[-1]["vllm_tokens_per_s"])
            best["engine"] = max(best["engine"], vllm_pairs[-1]["engine_tokens_per_s"])
            last = vllm_pairs[-1]
            print(f"  pair {rep + 1}/{repeats}: vllm {last['vllm_tokens_per_s']:.0f} tok/s, engine "
                  f"{last['engine_tokens_per_s']:.0f} tok/s, vllm/engine {last['vllm_over_engine']:.2f}x "
                  f"(CPU time {last['vllm_over_engine_cpu_time']:.2f}x), load {os.getloadavg()[0]:.1f}", flush=True)
        pair = {}
        for streams in ((True, False) if rep % 2 == 0 else (False, True)):  # alternate the order: no position bias
            if not streams_only and runner is not None:
                continue  # the vLLM comparison times the default engine only, in the pairs above
            tok, dt = run_engine(model, bases, branches, batch_size, device, row_streams=streams)
            key = "engine" if streams else "multinomial"
            best[key] = max(best[key], tok / dt)
            if streams_only and cpu:
                pair[key] = run_engine(model, bases, branches, batch_size, device, row_streams=streams,
                                       cpu_time=True)[1]
        if pair:
            ratios.append(pair["engine"] / pair["multinomial"])
        if streams_only:
            continue
        if not skip_naive:
            tok, dt = run_naive(model, bases, branches, eos, device)
            best["naive"] = max(best["naive"], tok / dt)
        if not skip_ceiling:
            tok, dt = run_ceiling(model, len(branches), max_new, batch_size, eos, device)
            best["ceiling"] = max(best["ceiling"], tok / dt)
    row.update({f"{k}_tokens_per_s": v for k, v in best.items()})
    # per-row random streams (batch-independent records) vs one shared torch.multinomial stream
    row["row_streams_cost"] = best["multinomial"] / best["engine"] - 1 if best["multinomial"] else None
    if ratios:
        ratios.sort()
        row["row_streams_cpu_cost_median"] = ratios[len(ratios) // 2] - 1
        row["row_streams_cpu_cost_all"] = [r - 1 for r in ratios]
    if streams_only:
        cpu_txt = (f" | CPU time, median of {len(ratios)} pairs {row['row_streams_cpu_cost_median']:+.1%}"
                   if ratios else "")
        print(f"{name:<28} per-row streams {best['engine']:9.0f} tok/s | shared multinomial {best['multinomial']:9.0f} "
              f"| wall, best of {repeats}: cost {row['row_streams_cost']:+.1%}{cpu_txt}")
        return row
    row["engine_over_naive"] = best["engine"] / best["naive"] if best["naive"] else None
    row["engine_over_ceiling"] = best["engine"] / best["ceiling"] if best["ceiling"] else None
    for k in list(best):
        row[f"{k}_continuations_per_s"] = best[k] / max_new
    if runner is not None:
        row["vllm_over_engine"] = best["vllm"] / best["engine"]
        row["vllm_over_naive"] = best["vllm"] / best["naive"] if best["naive"] else None
        ratios = sorted(p["vllm_over_engine"] for p in vllm_pairs)
        row.update(vllm_pairs=vllm_pairs, vllm_over_engine_pairs_median=_median(ratios),
                   vllm_over_engine_pairs_min=ratios[0], vllm_over_engine_pairs_max=ratios[-1],
                   vllm_over_engine_cpu_time_median=_median([p["vllm_over_engine_cpu_time"] for p in vllm_pairs]),
                   vllm_prompt_tokens_computed=runner.prompt_tokens_computed())
        print(f"{name:<28} vllm   {best['vllm']:9.0f} tok/s | vllm/engine best-of {row['vllm_over_engine']:5.2f}x, "
              f"paired median {_median(ratios):5.2f}x (min {ratios[0]:.2f}, max {ratios[-1]:.2f}) "
              f"(engine start {runner.startup_s:.0f} s)")
        del runner
    print(
        f"{name:<28} engine {best['engine']:9.0f} tok/s | naive {best['naive']:9.0f} | "
        f"ceiling {best['ceiling']:9.0f} | "
        f"engine/naive {row['engine_over_naive'] or float('nan'):5.2f}x | "
        f"engine/ceiling {row['engine_over_ceiling'] or float('nan'):5.1%} | "
        f"per-row streams cost {row['row_streams_cost'] if row['row_streams_cost'] is not None else float('nan'):+.1%}"
    )
    return row


def _vllm_options(args) -> dict:
    """``VLLMRunner`` keyword arguments from the command line (only what was given, besides dtype and memory)."""
    opts = {"dtype": args.vllm_dtype or args.dtype, "gpu_memory_utilization": args.vllm_gpu_memory_utilization}
    if args.vllm_compile:
        opts["enforce_eager"] = False
    for name in ("block_size", "max_num_seqs", "kv_cache_gib"):
        if getattr(args, f"vllm_{name}") is not None:
            opts[name] = getattr(args, f"vllm_{name}")
    extra = {}
    if args.vllm_max_num_batched_tokens is not None:
        extra["max_num_batched_tokens"] = args.vllm_max_num_batched_tokens
    if args.vllm_chunked_prefill is not None:
        extra["enable_chunked_prefill"] = args.vllm_chunked_prefill == "on"
    if extra:
        opts["extra"] = extra
    return opts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--big", action="store_true", help="add a 0.5B-shaped random Qwen2 (GPU)")
    p.add_argument("--no-toy", action="store_true", help="skip the toy-lab models")
    p.add_argument("--row-streams", action="store_true",
                   help="only the engine, with per-row random streams vs one shared multinomial stream (best of 5)")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: also time the vLLM backend (the transformers engine and naive baseline still run)")
    p.add_argument("--vllm-dtype", default=None, help="vLLM engine dtype (default: --dtype)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.4,
                   help="vLLM engine's share of GPU memory (the transformers model shares the GPU)")
    p.add_argument("--vllm-block-size", type=int, default=None, help="vLLM KV block size (default: the backend's)")
    p.add_argument("--vllm-max-num-seqs", type=int, default=None, help="vLLM max_num_seqs (default: vLLM's)")
    p.add_argument("--vllm-max-num-batched-tokens", type=int, default=None,
                   help="vLLM max_num_batched_tokens (default: vLLM's)")
    p.add_argument("--vllm-chunked-prefill", choices=["on", "off"], default=None,
                   help="vLLM enable_chunked_prefill (default: vLLM's)")
    p.add_argument("--vllm-kv-cache-gib", type=float, default=None, help="vLLM CPU KV cache size (default: 1 GiB)")
    p.add_argument("--vllm-compile", action="store_true",
                   help="vLLM with torch.compile / graphs (enforce_eager=False; on CPU compiling costs minutes)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (both engines; set before vLLM starts, which then pins it)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the plain-generate ceiling")
    p.add_argument("--batch-size", type=int, default=192,
                   help="transformers engine batch size on the ~20M model (default 192)")
    p.add_argument("--max-new", type=int, default=16, help="tokens per continuation (default 16)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved passes, best kept (default 3, --quick 1)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline (long continuations)")
    p.add_argument("--out", default="rollouts", help="result name: benchmarks/results/<out>.json")
    args = p.parse_args(argv)
    vllm = None
    if args.backend == "vllm":
        from vllm_rollouts import VLLMRunner

        vllm = functools.partial(VLLMRunner, **_vllm_options(args))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    repeats = args.repeats or (1 if args.quick else (7 if args.row_streams else 3))
    work = dict(prompt_len=40, completion_len=64, n_rollouts=2, nodes=4, cands=6, n_per=8, max_new=args.max_new)
    rows = []
    if not args.no_toy:
        from opd_callback import toy

        lab = toy.build_lab(verbose=False)
        eos = lab.tokenizer.eos_token_id
        for nm in ("student", "strong_teacher"):
            m = getattr(lab, nm).to(dev)
            rows.append(bench(f"toy-lab {nm}", m, m.config.vocab_size, eos, device=dev, batch_size=192, repeats=repeats,
                              streams_only=args.row_streams, **work))
    m20 = random_qwen2(vocab_size=128, hidden=512, layers=6, heads=8, kv_heads=4, eos=0, dtype=dtype, device=dev)
    rows.append(bench("random Qwen2 ~20M", m20, 128, 0, device=dev, batch_size=args.batch_size, repeats=repeats,
                      streams_only=args.row_streams, vllm=vllm, skip_naive=args.no_naive,
                      skip_ceiling=args.no_ceiling, **work))
    if args.big:
        big = random_qwen2(vocab_size=151936, hidden=896, layers=24, heads=14, kv_heads=2, eos=0, dtype=dtype,
                           device=dev)
        w = dict(work, n_rollouts=4, nodes=8, completion_len=256, max_new=64)
        rows.append(bench("random Qwen2 0.5B-shaped", big, 151936, 0, device=dev, batch_size=256, repeats=repeats,
                          vllm=vllm, **w))
    if args.row_streams:
        path = write_result("rollouts_row_streams", {"device": dev, "dtype": args.dtype, "rows": rows})
        key = "row_streams_cpu_cost_median" if "row_streams_cpu_cost_median" in rows[0] else "row_streams_cost"
        worst = max(r[key] for r in rows)
        what = "process CPU time, median of paired runs" if key != "row_streams_cost" else f"wall, best of {repeats}"
        print(f"wrote {path}\nHEADLINE cost of per-row random streams: at most {worst:+.1%} ({what})")
        return
    cmd = "benchmarks/bench_rollouts.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = write_result(args.out, {"device": dev, "dtype": args.dtype, "backend": args.backend, "command": cmd,
                                   "torch_threads_during_run": torch.get_num_threads(),
                                   "loadavg_at_end": list(os.getloadavg()), "rows": rows})
    print(f"wrote {path}")
    head = rows[-1] if not args.big else rows[-2]
    print(f"HEADLINE engine/naive = {head['engine_over_naive'] or float('nan'):.2f}x, "
          f"engine/ceiling = {head['engine_over_ceiling'] or float('nan'):.0%} ({head['model']})")


if __name__ == "__main__":
    main()
