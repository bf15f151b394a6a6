"""Parameter-space alignment cos(Jᵀg, Jᵀd) (RolloutSettings(space="params"), opd_callback/core/param_space.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import eos_char_tokenizer, tiny_qwen2
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

import opd_callback as oc
from opd_callback.core import param_space
from opd_callback.core.param_space import (
    CountSketch,
    ParamSpaceScorer,
    param_space_cosines,
    select_parameters,
    vjp_gram,
)

CHARS = list("0123456789+=> ab")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return eos_char_tokenizer(CHARS)


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 16) -> Qwen2ForCausalLM:
    return tiny_qwen2(len(CHARS) + 1, eos_id=0, pad_id=0, seed=seed, hidden=hidden, layers=layers, max_positions=64)


def reward(prompts, completions, answer, **kw):
    return [float(a in c) for c, a in zip(completions, answer)]


EXAMPLES = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]


def run(student, teacher, **settings):
    tok = tiny_tokenizer()
    configs = [
        oc.TeacherConfig("ext", oc.ExternalTeacher(teacher)),
        oc.TeacherConfig("ctx", oc.ContextTeacher("a {answer} {prompt}"), divergence="jsd", beta=0.5),
    ]
    st = oc.RolloutSettings(num_rollouts=2, max_new_tokens=5, rollouts_per_branch=2, seed=3, **settings)
    return oc.diagnose(student, tok, EXAMPLES, reward_fn=reward, configs=configs, settings=st, progress=False)


def assert_clean(model, flags):
    assert all(p.grad is None for p in model.parameters()), "a .grad was left on a parameter"
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad flags were not restored"


def manual_cosines(model, ids, vecs, names):
    """Reference: one plain autograd.grad per vector, concatenated, cosines by hand."""
    params = [p for n, p in model.named_parameters() if n in names]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        z = model(torch.tensor([ids])).logits[0, -1]
        flat = []
        for v in vecs:
            gr = torch.autograd.grad(z, params, grad_outputs=v.to(z.dtype), retain_graph=True)
            flat.append(torch.cat([x.reshape(-1) for x in gr]).double())
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    g = flat[0]
    return [float(g @ d / (g.norm() * d.norm())) for d in flat[1:]]


def random_vectors(n: int, V: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(V, generator=gen, dtype=torch.float64) for _ in range(n)]


def test_untied_lm_head_equals_logit_space():
    model = tiny_model()
    flags = [p.requires_grad for p in model.parameters()]
    g, *ds = random_vectors(4, model.config.vocab_size)
    out = param_space_cosines(model, [1, 2, 3, 4], g, ds, param_filter="lm_head")
    for o, d in zip(out, ds):
        assert o["alignment"] == pytest.approx(float(g @ d / (g.norm() * d.norm())), abs=1e-6)
    assert_clean(model, flags)


@pytest.mark.parametrize("tail", ["impute", "renormalize"])
def test_engine_params_space_lm_head_matches_logits(tail):
    student = tiny_model(0)
    flags = [p.requires_grad for p in student.parameters()]
    rep = run(student, tiny_model(1), space="params", param_filter="lm_head", tail=tail)
    rec = rep.records
    assert {"alignment_logits", "g_norm", "d_norm"} <= set(rec.columns)
    ok = ~rec["degenerate"].astype(bool)
    assert ok.sum() >= 5
    np.testing.assert_allclose(rec.loc[ok, "alignment"], rec.loc[ok, "alignment_logits"], atol=1e-5)
    assert rep.meta["settings"]["space"] == "params"
    assert_clean(student, flags)


def test_batched_vjp_matches_per_vector_autograd_and_the_loop_fallback(monkeypatch):
    model = tiny_model(2)
    names = [n for n, _ in select_parameters(model, "last:1")]
    assert names and all(n.startswith("model.layers.1.") for n in names)
    g, *ds = random_vectors(3, model.config.vocab_size, seed=1)
    ids = [3, 1, 4, 1, 5]
    ref = manual_cosines(model, ids, [g, *ds], set(names))
    out = param_space_cosines(model, ids, g, ds, param_filter="last:1")
    assert [o["alignment"] for o in out] == pytest.approx(ref, abs=1e-5)
    # the loop used when vmap has no batching rule for some op gives the same numbers
    monkeypatch.setattr(param_space, "_VMAP_OK", {}, raising=True)
    monkeypatch.setattr(param_space, "_batched_vjp", _loop_only(param_space._batched_vjp))
    out2 = param_space_cosines(model, ids, g, ds, param_filter="last:1")
    assert [o["alignment"] for o in out2] == pytest.approx(ref, abs=1e-5)


def _loop_only(fn):
    def wrapped(z, params, cot):
        param_space._VMAP_OK[type(z.grad_fn)] = False
        return fn(z, params, cot)

    return wrapped


def test_projection_converges_to_the_exact_value():
    model = tiny_model(4, layers=1, hidden=16)
    g, *ds = random_vectors(4, model.config.vocab_size, seed=5)
    ids = [2, 7, 1, 8]
    exact = np.array([o["alignment"] for o in param_space_cosines(model, ids, g, ds, param_filter="all")])
    errors = []
    for k in (16, 256, 4096, 65536):
        errs = []
        for seed in range(3):
            est = param_space_cosines(model, ids, g, ds, param_filter="all", projection_dim=k, seed=seed)
            errs.append(np.abs(np.array([o["alignment"] for o in est]) - exact).mean())
        errors.append(float(np.mean(errs)))
    assert errors[-1] < 0.01, errors
    assert errors[-1] < errors[1] < errors[0], errors
    # the projection is seeded: same seed, same numbers
    a = param_space_cosines(model, ids, g, ds, param_filter="all", projection_dim=64, seed=9)
    b = param_space_cosines(model, ids, g, ds, param_filter="all", projection_dim=64, seed=9)
    assert [x["alignment"] for x in a] == [x["alignment"] for x in b]


def test_count_sketch_preserves_inner_products_in_expectation():
    x = torch.randn(2, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = float(x[0] @ x[1])
    est = []
    for s in range(200):
        y = CountSketch(32, seed=s).project(x, 0)
        est.append(float(y[0] @ y[1]))
    assert np.mean(est) == pytest.approx(exact, abs=4 * np.std(est) / math.sqrt(len(est)))


def test_peft_lora_student():
    peft = pytest.importorskip("peft")
    base = tiny_model(0)
    student = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=True))
    student.eval()
    flags = [p.requires_grad for p in student.parameters()]
    names = [n for n, _ in select_parameters(student, "lora")]
    assert names and all("lora_" in n for n in names)
    assert [n for n, _ in select_parameters(student, None)] == names  # peft: the trainable ones are the adapters
    rep = run(student, tiny_model(1), space="params", param_filter="lora")
    rec = rep.records
    ok = ~rec["degenerate"].astype(bool)
    assert ok.sum() >= 5
    assert ((rec.loc[ok, "alignment"] >= -1 - 1e-9) & (rec.loc[ok, "alignment"] <= 1 + 1e-9)).all()
    assert np.isfinite(rec.loc[ok, "alignment_logits"]).all()
    # the lora space is not the logit space: the two cosines differ somewhere
    assert (rec.loc[ok, "alignment"] - rec.loc[ok, "alignment_logits"]).abs().max() > 1e-3
    assert_clean(student, flags)
    # and it agrees with a per-vector autograd reference at one node
    g, *ds = random_vectors(2, base.config.vocab_size, seed=2)
    ref = manual_cosines(student, [1, 2, 3], [g, *ds], set(names))
    out = param_space_cosines(student, [1, 2, 3], g, ds, param_filter="lora")
    assert [o["alignment"] for o in out] == pytest.approx(ref, abs=1e-5)


def test_frozen_flags_are_restored_and_no_grad_left():
    model = tiny_model(0)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.grad = None
    flags = [p.requires_grad for p in model.parameters()]
    g, *ds = random_vectors(2, model.config.vocab_size)
    param_space_cosines(model, [1, 2], g, ds, param_filter="all")
    assert_clean(model, flags)
    # an exception inside the backward still restores the flags
    with pytest.raises(RuntimeError):
        vjp_gram(model, [1, 2], torch.zeros(2, 3, dtype=torch.float64), select_parameters(model, "all"))
    assert_clean(model, flags)
    assert all(param_space._VMAP_OK.values()), "a bad cotangent must not switch the batched backward off"


def test_select_parameters_filters_and_errors():
    model = tiny_model(0)
    all_names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in select_parameters(model, "all")] == all_names
    assert [n for n, _ in select_parameters(model, "lm_head")] == ["lm_head.weight"]
    last2 = [n for n, _ in select_parameters(model, "last:2")]
    assert any(n.startswith("model.layers.0.") for n in last2) and "lm_head.weight" not in last2
    assert [n for n, _ in select_parameters(model, "re:norm")] == [n for n in all_names if "norm" in n]
    assert [n for n, _ in select_parameters(model, lambda n: n.endswith("q_proj.weight"))] == [
        n for n in all_names if n.endswith("q_proj.weight")
    ]
    assert [n for n, _ in select_parameters(model, ["lm_head.weight"])] == ["lm_head.weight"]
    with pytest.raises(ValueError, match="close"):
        select_parameters(model, ["lm_head.weigth"])
    with pytest.raises(ValueError, match="not a peft LoRA model"):
        select_parameters(model, "lora")
    with pytest.raises(ValueError, match="only 2 blocks"):
        select_parameters(model, "last:3")
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(model, "re:nothing-like-this")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="none has requires_grad"):
        select_parameters(model, None)


def test_settings_validation():
    oc.RolloutSettings(space="params", param_filter="last:2", projection_dim=128)
    oc.RolloutSettings(space="params", param_filter=["lm_head.weight"])
    oc.RolloutSettings(space="params", param_filter=lambda n: True)
    for kw, msg in [
        ({"space": "weights"}, "space must be"),
        ({"space": "params", "param_filter": "last:x"}, "not understood"),
        ({"space": "params", "param_filter": []}, "non-empty list"),
        ({"space": "params", "projection_dim": 0}, "projection_dim"),
        ({"param_filter": "lora"}, "apply to space='params'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            oc.RolloutSettings(**kw)


def test_scorer_reuses_the_selection():
    model = tiny_model(0)
    st = oc.RolloutSettings(space="params", param_filter="lm_head")
    sc = ParamSpaceScorer(model, st)
    assert sc.n_params == model.lm_head.weight.numel()
