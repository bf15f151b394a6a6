"""Tests for opd_callback.toy (offline toy lab).

The lab tests use the lab shipped with the package (seed 0): identical weights on every machine, no training. The
training code is tested with a stub (cache mechanics) and a few real steps; `python -m opd_callback.toy --rebuild`
trains a full lab.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

import opd_callback.toy as toy
from opd_callback.toy import (
    ANSWER_TEMPLATE,
    MISLEADING_TEMPLATE,
    SOLUTION_TEMPLATE,
    build_lab,
    build_tokenizer,
    make_examples,
    reward_fn,
    sample_accuracy,
    solve,
    tiny_random_model,
)
from opd_callback.toy import lab as lab_mod
from opd_callback.toy.task import parse_answer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_and_specials(tok):
    printable = "".join(chr(i) for i in range(32, 127))
    for s in ["367+485=", "7+5+0=12,6+8+1=15,3+4+1=08>852", printable, "  two  spaces , and .\nnewline ",
              "a'b \"c\" ?!"]:
        ids = tok(s, add_special_tokens=False).input_ids
        assert len(ids) == len(s)  # one id per character
        assert tok.decode(ids) == s
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.unk_token == "<unk>"
    assert tok("\u00e9", add_special_tokens=False).input_ids == [tok.unk_token_id]
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]:
        ids = tok(special, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(special)
    assert 90 <= len(tok) <= 128
    # no BOS or other specials are added by default
    assert tok("12").input_ids == tok("12", add_special_tokens=False).input_ids


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "367+485="}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n367+485=<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert text.endswith("<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert not no_gen.endswith("assistant\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.decode(ids) == text


# --------------------------------------------------------------------------------------
# task


def test_solve_example_and_format():
    assert solve(367, 485) == "7+5+0=12,6+8+1=15,3+4+1=08>852"
    assert solve(367, 485, carries=False) == "7+5+0=12,6+8+0=14,3+4+0=07>742"
    assert solve(999, 999) == "9+9+0=18,9+9+1=19,9+9+1=19>1998"
    assert len(solve(999, 999)) <= 40
    assert solve(12, 3) == "2+3+0=05,1+0+0=01>15"


def test_solve_matches_integer_arithmetic():
    rng = random.Random(1)
    step_re = re.compile(r"^(\d)\+(\d)\+([01])=(\d\d)$")
    for _ in range(3000):
        digits = rng.randint(1, 5)
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        text = solve(a, b)
        assert parse_answer(text) == str(a + b)
        chain, answer = text.rsplit(">", 1)
        carry = 0
        for step in chain.split(","):
            x, y, c, s = step_re.match(step).groups()
            assert int(c) == carry and int(s) == int(x) + int(y) + int(c)
            carry = int(s) // 10
        # no-carry rule: digit-wise sum mod 10
        wrong = solve(a, b, carries=False)
        width = max(len(str(a)), len(str(b)))
        expected = "".join(str(((a // 10**i) % 10 + (b // 10**i) % 10) % 10) for i in reversed(range(width)))
        assert parse_answer(wrong) == expected
        has_carry = any((a // 10**i) % 10 + (b // 10**i) % 10 >= 10 for i in range(width))
        assert (int(expected) != a + b) == has_carry
        assert (wrong != text) == has_carry


def test_reward_fn():
    ans = ["852", "852", "852", "852", "1998", "42"]
    completions = [
        "7+5+0=12,6+8+1=15,3+4+1=08>852",  # right
        "7+5+0=12,6+8+0=14,3+4+0=07>742",  # wrong rule
        "7+5+0=12,6+8+1=15,3+4+1=08>85",  # truncated
        "garbage ))) no answer",
        "9+9+0=18,9+9+1=19,9+9+1=19>1998<|endoftext|><|endoftext|>",
        ">042",  # leading zero is the same number
    ]
    assert reward_fn(None, completions, ans) == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # chat format (TRL conversational datasets) and extra kwargs
    prompts = [[{"role": "user", "content": "367+485="}]] * 2
    chat = [[{"role": "assistant", "content": "7+5+0=12,6+8+1=15,3+4+1=08>852"}],
            [{"role": "assistant", "content": ">851"}]]
    assert reward_fn(prompts, chat, answer=["852", "852"], completion_ids=[[1], [2]], trainer_state=None) == [1.0, 0.0]
    assert reward_fn(["a"], [""], ["1"]) == [0.0]
    with pytest.raises(ValueError):
        reward_fn(None, ["1"], ["1", "2"])


def test_make_examples_deterministic_and_valid():
    a = make_examples(300, seed=3)
    assert a == make_examples(300, seed=3)
    assert a[:50] == make_examples(50, seed=3)  # prefix-stable
    assert a != make_examples(300, seed=4)
    assert len({e["prompt"] for e in a}) == 300
    for e in a:
        for k in ("prompt", "solution", "answer", "misleading_answer", "misleading_solution"):
            assert isinstance(e[k], str)
        x, y = e["prompt"][:-1].split("+")
        assert 100 <= int(x) <= 999 and 100 <= int(y) <= 999
        assert e["answer"] == str(int(x) + int(y))
        assert e["solution"] == solve(int(x), int(y))
        assert reward_fn(None, [e["solution"]], [e["answer"]]) == [1.0]
        assert int(e["misleading_answer"]) != int(e["answer"])
        assert parse_answer(e["misleading_solution"]) == e["misleading_answer"]
        assert reward_fn(None, [e["misleading_solution"]], [e["answer"]]) == [0.0]
        assert len(e["solution"]) <= 40
    assert any(not e["has_carry"] for e in a) and any(e["has_carry"] for e in a)
    assert all(len(e["prompt"]) == 6 for e in make_examples(20, digits=2))


def test_templates():
    e = make_examples(1, seed=0)[0]
    for tpl, key in [(ANSWER_TEMPLATE, "answer"), (SOLUTION_TEMPLATE, "solution"),
                     (MISLEADING_TEMPLATE, "misleading_answer")]:
        text = tpl.format(**e)
        assert text.endswith(e["prompt"]) and e[key] in text and text != e["prompt"]
    assert toy.TEMPLATES["answer"] == ANSWER_TEMPLATE


# --------------------------------------------------------------------------------------
# models and sampling


def test_tiny_random_model(tok):
    m = tiny_random_model(tok, seed=0)
    m2 = tiny_random_model(tok, seed=0)
    m3 = tiny_random_model(tok, seed=1, hidden_size=48, num_layers=2)
    assert type(m).__name__ == "Qwen2ForCausalLM" and not m.training
    assert m.config.vocab_size == len(tok)
    assert m.config.eos_token_id == m.config.pad_token_id == tok.eos_token_id
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    for (k, v), (_, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, v2), k
    assert m3.config.hidden_size == 48 and m3.config.num_hidden_layers == 2
    state = torch.random.get_rng_state()
    tiny_random_model(tok, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # does not touch the global RNG
    ids = tok(["367+485="], return_tensors="pt").input_ids
    assert m(ids).logits.shape == (1, 8, len(tok))


def test_sample_accuracy_and_training_smoke(tok):
    ex = make_examples(64, seed=0)
    m = tiny_random_model(tok, seed=0)
    state = torch.random.get_rng_state()
    acc = sample_accuracy(m, tok, ex, n=16, max_new_tokens=8)
    assert acc == 0.0
    assert torch.equal(state, torch.random.get_rng_state())
    assert tok.padding_side == "right"
    outs = toy.sample_completions(m, tok, [e["prompt"] for e in ex[:4]], seed=3, max_new_tokens=6)
    assert outs == toy.sample_completions(m, tok, [e["prompt"] for e in ex[:4]], seed=3, max_new_tokens=6)
    # a few steps of the training loop reduce the loss
    items = toy.encode_items(tok, [e["prompt"] for e in ex], [e["solution"] for e in ex])
    losses = []
    toy.train_lm(m, items, tok.pad_token_id, toy.TrainRecipe(steps=40, batch_size=16, lr=3e-3, warmup=5),
                 callback=lambda step, loss: losses.append(loss) and False, callback_every=10)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert not m.training


# --------------------------------------------------------------------------------------
# cache mechanics (fast: the trainer is replaced by a stub)


def _fake_train_all(calls):
    def fake(out_dir, seed, verbose, threads=1):
        calls.append(seed)
        time.sleep(0.5)
        tk = build_tokenizer()
        for i, name in enumerate(lab_mod.MODEL_NAMES):
            tiny_random_model(tk, seed=seed * 10 + i).save_pretrained(out_dir / name)
            tk.save_pretrained(out_dir / name)
        with open(out_dir / "lab.json", "w") as f:
            json.dump({"accuracy": {"student": 0.5}, "meta": {"version": lab_mod.LAB_VERSION, "seed": seed}}, f)

    return fake


def test_cache_lock_and_force(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lab_mod, "train_all", _fake_train_all(calls))
    labs = []
    threads = [threading.Thread(target=lambda: labs.append(build_lab(tmp_path, seed=7, verbose=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [7] and len(labs) == 3
    lab = labs[0]
    assert lab.path == (tmp_path / f"{lab_mod.LAB_VERSION}-seed7").resolve()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [lab.path.name]
    assert all((lab.path / n / "config.json").is_file() for n in lab_mod.MODEL_NAMES)
    assert not any(m.training for m in lab.models.values())
    build_lab(tmp_path, seed=7, verbose=False)
    assert calls == [7]
    build_lab(tmp_path, seed=7, force=True, verbose=False)
    assert calls == [7, 7]
    monkeypatch.setenv("OPD_TOY_CACHE", str(tmp_path / "env"))
    assert lab_mod.default_cache_dir() == tmp_path / "env"
    assert build_lab(seed=8, verbose=False).path.parent == (tmp_path / "env").resolve()
    # another thread count is another lab (float order), cached under its own key
    lab_t2 = build_lab(tmp_path, seed=7, threads=2, verbose=False)
    assert lab_t2.path.name == f"{lab_mod.LAB_VERSION}-seed7-threads2" and calls == [7, 7, 8, 7]
    # the shipped lab (seed 0) is loaded without training, whatever the cache says; force=True trains into the cache
    shipped = build_lab(tmp_path, seed=0, verbose=False)
    assert shipped.path == lab_mod.shipped_lab_dir(0) and calls == [7, 7, 8, 7]
    forced = build_lab(tmp_path, seed=0, force=True, verbose=False)
    assert calls[-1] == 0 and forced.path == (tmp_path / f"{lab_mod.LAB_VERSION}-seed0").resolve()
    with pytest.raises(ValueError, match="threads"):
        build_lab(tmp_path, seed=7, threads=0)
    with pytest.raises(FileNotFoundError, match="--rebuild"):
        lab_mod.load_lab(tmp_path / "nothing")


# --------------------------------------------------------------------------------------
# the real lab (slow: trains all models once, unless OPD_TOY_CACHE points at a built cache)


@pytest.fixture(scope="module")
def lab_and_time():
    t0 = time.perf_counter()
    lab = build_lab(seed=0, verbose=False)
    return lab, time.perf_counter() - t0


def test_lab_accuracy_bands(lab_and_time):
    lab, seconds = lab_and_time
    acc = lab.accuracy
    print(lab.accuracy_table(), f"\nbuild_lab took {seconds:.1f}s; build_seconds={lab.meta.get('build_seconds')}")
    assert 0.3 <= acc["student"] <= 0.7
    assert acc["strong_teacher"] >= 0.9
    assert acc["wrong_teacher"] <= acc["strong_teacher"] - 0.5
    assert acc["hard_wrong_teacher"] <= acc["strong_teacher"] - 0.5
    assert acc["student+solution"] >= 0.85
    assert acc["student+solution"] >= acc["student"] + 0.2
    assert acc["student+answer"] > acc["student"]
    assert acc["wrong_teacher@no_carry_rule"] >= 0.8
    assert acc["hard_wrong_teacher@no_carry_rule"] >= 0.8


def test_shipped_lab_reproduces_its_recorded_accuracies(lab_and_time):
    """The shipped weights load and reproduce the accuracies recorded when they were trained, within sampling error
    (same probe prompts, fresh sampling seed: a binomial 5-sigma band at n=512)."""
    lab, _ = lab_and_time
    assert lab.path == lab_mod.shipped_lab_dir(0) and lab.meta["version"] == lab_mod.LAB_VERSION
    assert lab.meta["seed"] == 0 and lab.meta.get("threads") == 1
    n = 512
    for name, context in [("student", None), ("strong_teacher", None), ("hard_wrong_teacher", None),
                          ("student", "solution")]:
        key = name if context is None else f"{name}+{context}"
        p = lab.accuracy[key]
        got = lab.sample_accuracy(name, n=n, seed=2024, context=context)
        band = 5 * math.sqrt(max(p * (1 - p), 1e-3) / n) + 1.0 / n
        assert abs(got - p) <= band, (key, got, p, band)



def test_lab_contents(lab_and_time, tok):
    lab, _ = lab_and_time
    assert lab.path.name == f"{lab_mod.LAB_VERSION}-seed0"
    assert (lab.path / "lab.json").is_file()
    info = json.loads((lab.path / "lab.json").read_text())
    assert info["accuracy"] == lab.accuracy and info["meta"]["seed"] == 0
    train_prompts = {e["prompt"] for e in lab.train_examples}
    assert len(lab.probe_examples) >= 256
    assert not train_prompts & {e["prompt"] for e in lab.probe_examples}
    assert lab.tokenizer.pad_token_id == lab.tokenizer.eos_token_id
    assert lab.tokenizer.get_vocab() == tok.get_vocab()
    assert lab.tokenizer.chat_template == tok.chat_template
    for name, model in lab.models.items():
        assert not model.training, name
        assert model.config.vocab_size == len(lab.tokenizer)
        assert model.config.eos_token_id == model.config.pad_token_id == lab.tokenizer.eos_token_id
        assert not model.config.tie_word_embeddings
        assert model.config._name_or_path == str(lab.model_path(name))
        assert (lab.model_path(name) / "tokenizer_config.json").is_file()
    # the recorded accuracy is reproducible from the saved weights (up to float/threads noise)
    measured = lab.sample_accuracy("student", n=256, seed=1)
    assert abs(measured - lab.accuracy["student"]) < 0.15
    assert lab.prompts(lab.probe_examples[:1], context="solution") == [
        SOLUTION_TEMPLATE.format(**lab.probe_examples[0])]



def test_lab_loads_again_identically(lab_and_time):
    lab, _ = lab_and_time
    again = build_lab(seed=0, verbose=False)
    assert again.path == lab.path and again.accuracy == lab.accuracy
    for name in lab_mod.MODEL_NAMES:
        a, b = lab.models[name].state_dict(), again.models[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [e["prompt"] for e in again.probe_examples] == [e["prompt"] for e in lab.probe_examples]
    fresh = lab.load_model("student")
    assert fresh is not lab.student and not fresh.training


def test_wrong_teachers_rank_below_strong_teacher(lab_and_time):
    """On the shipped lab, the decision metric ranks both wrong teachers -- the one trained on the no-carry rule and
    the strong teacher fine-tuned on it (wrong only at the decisive tokens) -- below the strong teacher, with the
    paired question-bootstrap CI of the difference below 0, and below 0 themselves."""
    import opd_callback as oc
    from opd_callback.report import stats
    from opd_callback.toy import reward_fn

    lab, _ = lab_and_time
    report = oc.diagnose(
        lab.student,
        lab.tokenizer,
        lab.probe_examples[:16],
        reward_fn=reward_fn,
        configs=[
            oc.TeacherConfig("strong", oc.ExternalTeacher(lab.strong_teacher)),
            oc.TeacherConfig("wrong", oc.ExternalTeacher(lab.wrong_teacher)),
            oc.TeacherConfig("hard-wrong", oc.ExternalTeacher(lab.hard_wrong_teacher)),
        ],
        settings=oc.RolloutSettings(num_rollouts=2, max_new_tokens=40, node_selection="entropy",
                                    max_nodes_per_rollout=6, top_k=3, teacher_top_k=1, rollouts_per_branch=6,
                                    batch_size=512, seed=0),
        progress=False,
    )
    s = {r["config"]: r for r in report.config_summary()}
    print(report.format_table())
    diff = stats.metric_differences(report, "teacher_gain", reference="strong").set_index("config")
    assert s["strong"]["teacher_gain"] > 0 and s["strong"]["teacher_gain_ci"][0] > 0
    for bad in ("wrong", "hard-wrong"):
        assert s[bad]["teacher_gain"] < 0 < s["strong"]["teacher_gain"], bad
        assert diff.loc[bad, "diff_ci_high"] < 0, bad
    assert s["wrong"]["teacher_advantage"] < min(0.0, s["strong"]["teacher_advantage"])
