"""The vLLM side of the rollout benchmarks (``bench_rollouts.py --backend vllm``, ``gpu_bench_vllm.py``).

``VLLMRunner(model)`` saves the model to a temporary directory, starts one engine on it (prefix caching on, sampling
exactly softmax(z/tau)), and times :meth:`VLLMBackend.sample_branches` on the benchmark's branches: the same work as
the transformers engine (``(base, prefix length, forced token, max new tokens)`` tuples, EOS disabled so every
continuation has exactly ``max_new`` tokens).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VLLMRunner:
    def __init__(self, model, *, dtype: str = "float32", max_model_len: int = 1024, **options) -> None:
        from opd_callback.rollout.vllm_backend import VLLMBackend, VLLMOptions, start_vllm_engine

        self.dir = tempfile.mkdtemp(prefix="bench-vllm-")
        model.save_pretrained(self.dir)
        t0 = time.perf_counter()
        self.llm = start_vllm_engine(self.dir, VLLMOptions(dtype=dtype, max_model_len=max_model_len, **options))
        self.startup_s = time.perf_counter() - t0
        self.backend = VLLMBackend(self.llm, model, eos_ids=[], pad_id=0)
        self.options = {"dtype": dtype, "max_model_len": max_model_len, **options}
        self.block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)
        self.options["block_size_in_engine"] = self.block_size
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        self.options.update(chunked_prefill_in_engine=bool(sched.enable_chunked_prefill),
                            max_num_seqs_in_engine=int(sched.max_num_seqs),
                            max_num_batched_tokens_in_engine=int(sched.max_num_batched_tokens))
        self._branches: list = []

    def prompt_tokens_computed(self) -> dict:
        """Prompt tokens of the last pass that prefix caching cannot serve, at best: per continuation (vLLM's ``n``
        fans out into one sequence each), the partial last block of its prompt (or the last token when the prompt
        ends on a block boundary); against the tokens sampled."""
        b = self.block_size
        tail = sum((L + 1) - ((L + 1 - 1) // b) * b for _, L, _, _ in self._branches)
        sampled = sum(m for *_, m in self._branches)
        return {"prompt_tail_tokens_per_pass": tail, "sampled_tokens_per_pass": sampled,
                "tail_over_sampled": tail / sampled if sampled else None}

    def run(self, bases, branches, seed: int = 0) -> tuple[int, float]:
        """(tokens sampled, seconds) of one pass over ``branches``; the prefix cache is cleared first, so every pass
        pays for its prefixes (as one diagnostic does)."""
        self.llm.reset_prefix_cache()
        self._branches = list(branches)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        out = self.backend.sample_branches(bases, branches, gen)
        dt = time.perf_counter() - t0
        return sum(len(o) for o in out), dt
