"""Hostile inputs: every bad input gets a clear error that names the argument, before any model is touched,
or the correct result. Categories: settings, teacher configurations, templates, examples and models, reward outputs,
state, determinism, nodes, files, CLI configs and flags, callback and early-stopping arguments."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CHAT_TEMPLATE, base_args, build_cli_lab, count_forwards, make_model, make_tokenizer, reward_from
from transformers import GPT2Config, GPT2LMHeadModel

import opd_callback as oc
from opd_callback import cli
from opd_callback.report import AlignmentReport
from opd_callback.rollout import TransformersBackend, row_keys, row_uniforms

# --------------------------------------------------------------------------------------------------------------------
# a tiny lab


def lab():
    tok = make_tokenizer(("a", "b", "c", "|", ":"), unk=True, chat_template=CHAT_TEMPLATE)
    return tok, make_model(tok, seed=0, init=0.2), make_model(tok, seed=3, init=0.2)


def has_a(text: str) -> float:
    return float("a" in text)


EXAMPLES = [{"prompt": "ab", "answer": "c"}, {"prompt": "ba|", "answer": "a"}]


def small(**kw) -> oc.RolloutSettings:
    base = dict(num_rollouts=3, max_new_tokens=6, temperature=0.8, top_k=2, teacher_top_k=1, rollouts_per_branch=4,
                bootstrap_samples=50)
    base.update(kw)
    return oc.RolloutSettings(**base)


def run(examples=EXAMPLES, student=None, teacher=None, reward=None, cfgs=None, **kw) -> AlignmentReport:
    tok, s, t = lab()
    student = student or s
    teacher = teacher or t
    cfgs = cfgs or [oc.TeacherConfig("ext", oc.ExternalTeacher(teacher)),
                    oc.TeacherConfig("ctx", oc.ContextTeacher("{prompt}|{answer}"), divergence="forward_kl")]
    return oc.diagnose(student, tok, examples, reward_fn=reward or reward_from(has_a), configs=cfgs,
                       settings=small(**kw), progress=False)


def gpt2(tok, n_positions: int = 16) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=16, n_layer=1, n_head=2,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(cfg).eval()


def raises_before_forward(model, exc_type, match, fn):
    counter, remove = count_forwards(model)
    try:
        with pytest.raises(exc_type, match=match) as info:
            fn()
    finally:
        remove()
    assert counter[0] == 0, "the model ran before the error"
    return info.value


# --------------------------------------------------------------------------------------------------------------------
# RolloutSettings: types checked, never coerced


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(num_rollouts="2"), TypeError, r"num_rollouts must be an int, got '2' \(str\); pass the number itself"),
        (dict(batch_size=2.5), TypeError, r"batch_size must be an int, got 2.5 \(float\); pass a whole number"),
        (dict(seed=-1), ValueError, r"seed must be >= 0, got -1"),
        (dict(adaptive="no"), TypeError, r"adaptive must be a bool \(True or False\), got 'no'"),
        (dict(adaptive=1), TypeError, r"adaptive must be a bool \(True or False\), got 1 \(int\)"),
        (dict(prefix_cache=None), TypeError, r"prefix_cache must be a bool"),
        (dict(num_rollouts=True), TypeError, r"num_rollouts must be an int, got True \(bool\)"),
        (dict(temperature=float("nan")), ValueError, r"temperature must be a finite number, got nan"),
        (dict(temperature="1.0"), TypeError, r"temperature must be a number, got '1.0'"),
        (dict(node_selection="random"), ValueError, r"node_selection must be 'depth_windows' or 'entropy'"),
        (dict(node_selection="positions", positions=[-1, 2]), ValueError, r"positions must be >= 0"),
        (dict(node_selection="positions", positions=[6, 9]), ValueError,
         r"positions \[6, 9\] are all >= max_new_tokens = 6"),
        (dict(positions=[1, 2]), ValueError, r"positions=\[1, 2\] is only used with node_selection='positions'"),
        (dict(node_selection="positions", positions=["1"]), TypeError, r"positions must be a list of ints"),
        (dict(ci_level=1.0), ValueError, r"ci_level must be in \(0, 1\), got 1.0"),
        (dict(budget=0), ValueError, r"budget must be >= 1 or None, got 0"),
        (dict(rollouts_per_branch=0), ValueError, r"rollouts_per_branch must be >= 1, got 0"),
    ],
)
def test_settings_refuse_bad_values(kw, exc, match):
    with pytest.raises(exc, match=r"^RolloutSettings: " + match):
        small(**kw)


def test_settings_accept_numpy_scalars_as_plain_numbers():
    st = small(num_rollouts=np.int64(2), temperature=np.float32(0.5), adaptive=np.bool_(True))
    assert st.num_rollouts == 2 and type(st.num_rollouts) is int
    assert st.temperature == 0.5 and type(st.temperature) is float
    assert st.adaptive is True


# --------------------------------------------------------------------------------------------------------------------
# TeacherConfig and teachers


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(divergence="jsd", beta="0.5"), TypeError, r"TeacherConfig 't': beta must be a number or None, got '0.5'"),
        (dict(divergence="jsd", beta=True), TypeError, r"beta must be a number or None, got True \(bool\)"),
        (dict(temperature=0), ValueError, r"TeacherConfig 't': temperature must be > 0, got 0"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number, got inf"),
        (dict(divergence="topk", top_k=2.0), TypeError, r"top_k must be an int or None, got 2.0"),
        (dict(divergence=3), TypeError, r"divergence must be a name such as 'reverse_kl' or a callable"),
        (dict(divergence="reverse-kl"), ValueError, r"TeacherConfig 't': unknown divergence 'reverse-kl'"),
    ],
)
def test_teacher_config_refuses_bad_values(kw, exc, match):
    with pytest.raises(exc, match=match):
        oc.TeacherConfig("t", oc.ContextTeacher("{prompt}"), **kw)


def test_teacher_config_refuses_bad_names_and_teachers():
    with pytest.raises(ValueError, match=r"name must be a non-empty string, got ''"):
        oc.TeacherConfig("", oc.ContextTeacher("{prompt}"))
    with pytest.raises(TypeError, match=r"name must be a non-empty string, got 3 \(int\)"):
        oc.TeacherConfig(3, oc.ContextTeacher("{prompt}"))
    with pytest.raises(TypeError,
                       match=r"teacher must be ExternalTeacher\(model\) or ContextTeacher\(template\), got str"):
        oc.TeacherConfig("t", "models/teacher")
    with pytest.raises(TypeError, match=r"ExternalTeacher: model must be a causal LM .*got str.*from_pretrained"):
        oc.ExternalTeacher("models/teacher")


# --------------------------------------------------------------------------------------------------------------------
# templates


@pytest.mark.parametrize(
    "template, match",
    [
        ("{prompt", r"template '\{prompt' cannot be parsed .*'\{\{' or '\}\}'"),
        ("{prompt}}", r"cannot be parsed .*literal brace"),
        ("{prompt!x}", r"unknown conversion '!x'"),
        ("{} {prompt}", r"positional field"),
        ("", r"template is empty"),
    ],
)
def test_bad_templates_are_refused_at_construction(template, match):
    with pytest.raises(ValueError, match=r"^ContextTeacher: .*" + match):
        oc.ContextTeacher(template)


def test_nested_format_spec_field_is_named_before_any_forward():
    """``{prompt:{w}}`` needs a column 'w': named up front, not a bare KeyError: 'w' mid-run."""
    tok, student, _ = lab()
    assert oc.ContextTeacher("{prompt:{w}}").fields == ["prompt", "w"]
    cfg = [oc.TeacherConfig("padded", oc.ContextTeacher("{prompt:{w}}"))]
    raises_before_forward(student, ValueError, r"config 'padded' names field 'w', which example 0 does not have",
                          lambda: oc.diagnose(student, tok, EXAMPLES, reward_fn=reward_from(has_a), configs=cfg,
                                              settings=small(), progress=False))


@pytest.mark.parametrize(
    "template, match",
    [
        ("{answer[3]}{prompt}",
         r"config 'bad', example 0: template '\{answer\[3\]\}\{prompt\}' cannot be filled .*IndexError"),
        ("{prompt:d}", r"config 'bad', example 0: .*cannot be filled .*ValueError"),
        ("{prompt.nope}", r"config 'bad', example 0: .*cannot be filled .*AttributeError"),
    ],
)
def test_templates_that_cannot_be_filled_are_named_before_any_forward(template, match):
    tok, student, _ = lab()
    cfg = [oc.TeacherConfig("bad", oc.ContextTeacher(template))]
    raises_before_forward(student, ValueError, match,
                          lambda: oc.diagnose(student, tok, EXAMPLES, reward_fn=reward_from(has_a), configs=cfg,
                                              settings=small(), progress=False))


# --------------------------------------------------------------------------------------------------------------------
# examples and models


def test_empty_prompt_is_refused_before_any_forward():
    tok, student, _ = lab()
    raises_before_forward(student, ValueError, r"example 1: 'prompt' is an empty string",
                          lambda: run([EXAMPLES[0], {"prompt": "", "answer": "a"}], student=student))


def test_prompt_past_learned_positions_is_refused_with_the_limit():
    tok, _, _ = lab()
    g = gpt2(tok, n_positions=16)
    long = {"prompt": "ab" * 10, "answer": "a"}  # 20 tokens > 16 positions
    cfg = [oc.TeacherConfig("self", oc.ContextTeacher("{prompt}"))]
    err = raises_before_forward(g, ValueError, r"example 0: the student's prompt has 20 tokens",
                                lambda: oc.diagnose(g, tok, [long], reward_fn=reward_from(has_a), configs=cfg,
                                                    settings=small(), progress=False))
    assert "16 position embeddings" in str(err) and "the prompt alone is too long" in str(err)


def test_completions_that_would_run_past_learned_positions_are_refused():
    tok, _, _ = lab()
    g = gpt2(tok, n_positions=16)
    cfg = [oc.TeacherConfig("self", oc.ContextTeacher("{prompt}"))]
    raises_before_forward(g, ValueError, r"prompt has 2 tokens and completions up to max_new_tokens=20, 22 positions "
                          r"in all, past the model's 16 position embeddings; .*lower max_new_tokens to 14 or less",
                          lambda: oc.diagnose(g, tok, [EXAMPLES[0]], reward_fn=reward_from(has_a), configs=cfg,
                                              settings=small(max_new_tokens=20), progress=False))


def test_context_teacher_prompt_past_positions_names_the_teacher():
    tok, _, _ = lab()
    g = gpt2(tok, n_positions=16)
    cfg = [oc.TeacherConfig("long-ctx", oc.ContextTeacher("{prompt}|{answer}|{answer}|{answer}|{answer}"))]
    raises_before_forward(g, ValueError, r"the teacher of config 'long-ctx''s prompt has 10 tokens",
                          lambda: oc.diagnose(g, tok, [EXAMPLES[0]], reward_fn=reward_from(has_a), configs=cfg,
                                              settings=small(max_new_tokens=8), progress=False))


def test_rotary_model_past_its_configured_length_runs_with_one_warning():
    """Rotary positions have no hard limit: handled explicitly, with a warning (documented in docs/method.md)."""
    tok, _, teacher = lab()
    from helpers import tiny_qwen2

    short = tiny_qwen2(len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0, max_positions=4)
    with pytest.warns(UserWarning, match=r"max_position_embeddings=4; rotary positions beyond it were not trained"):
        rep = run(student=short, teacher=teacher)
    assert len(rep.rollouts) == 6


def test_chat_messages_rows_work_in_diagnose_like_prompt_rows():
    """TRL's conversational format: the final assistant turn is dropped, as the callback does."""
    msgs = [{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}], "answer": "c"},
            {"messages": [{"role": "user", "content": "ba|"}, {"role": "assistant", "content": "a"}], "answer": "a"}]
    prompts = [{"prompt": [{"role": "user", "content": "ab"}], "answer": "c"},
               {"prompt": [{"role": "user", "content": "ba|"}], "answer": "a"}]
    a, b = run(msgs), run(prompts)
    assert a.rollouts["prompt"].tolist() == b.rollouts["prompt"].tolist()
    assert "assistant" not in a.rollouts["prompt"].iloc[0]
    np.testing.assert_array_equal(a.records["alignment"].to_numpy(float), b.records["alignment"].to_numpy(float))


@pytest.mark.parametrize(
    "row, exc, match",
    [
        ({"messages": [{"role": "assistant", "content": "c"}]}, ValueError,
         r"example 0: a 'messages' row has no non-assistant message"),
        ({"messages": "ab"}, TypeError, r"example 0: 'messages' must be a list of chat messages"),
        ({"prompt": [{"role": "user", "content": 3}]}, TypeError,
         r"example 0: every chat message's 'content' must be a string"),
    ],
)
def test_bad_chat_rows_are_named(row, exc, match):
    tok, student, _ = lab()
    raises_before_forward(student, exc, match, lambda: run([row], student=student))


# --------------------------------------------------------------------------------------------------------------------
# reward outputs


def _reward(out_of):
    def reward(prompts, completions, **kw):
        return out_of(len(completions))

    reward.__name__ = "hostile_reward"
    return reward


@pytest.mark.parametrize(
    "out_of, match",
    [
        (lambda n: {i: 1.0 for i in range(n)}, r"hostile_reward returned dict; it must return a list of 3 floats"),
        (lambda n: "1" * n, r"hostile_reward returned str"),
        (lambda n: ["1.0"] * n, r"hostile_reward returned list; it must return a list of 3 floats"),
        (lambda n: np.ones((n, 1)), r"returned a 2-dimensional ndarray; it must return a flat list of 3 floats"),
        (lambda n: (1.0 for _ in range(n)), r"hostile_reward returned generator"),
        (lambda n: {1.0, 0.0}, r"hostile_reward returned set"),
    ],
)
def test_reward_outputs_that_are_not_a_list_of_floats(out_of, match):
    with pytest.raises(oc.RewardFunctionError, match=match):
        run(reward=_reward(out_of))


def test_reward_as_numpy_array_or_tensor_is_the_same_result():
    a = run(reward=lambda prompts, completions, **kw: [float("a" in c) for c in completions])
    b = run(reward=lambda prompts, completions, **kw: np.array([float("a" in c) for c in completions]))
    c = run(reward=lambda prompts, completions, **kw: torch.tensor([float("a" in c) for c in completions]))
    for other in (b, c):
        np.testing.assert_array_equal(a.records["alignment"].to_numpy(float),
                                      other.records["alignment"].to_numpy(float))


# --------------------------------------------------------------------------------------------------------------------
# state


def test_diagnose_restores_every_modules_training_flag():
    tok, student, teacher = lab()
    student.train()
    student.model.layers[0].mlp.eval()  # deliberately in eval() inside a model in train()
    teacher.eval()
    teacher.lm_head.train()
    before = {n: m.training for n, m in student.named_modules()}
    before_t = {n: m.training for n, m in teacher.named_modules()}
    run(student=student, teacher=teacher)
    assert {n: m.training for n, m in student.named_modules()} == before
    assert {n: m.training for n, m in teacher.named_modules()} == before_t
    assert student.model.layers[0].mlp.training is False and student.training is True


# --------------------------------------------------------------------------------------------------------------------
# determinism: records independent of batch_size and prefix_cache (per-row random streams)


def test_records_do_not_depend_on_batch_size_or_prefix_cache():
    ref = run(batch_size=256)
    key = ["prompt_index", "rollout_index", "position", "config"]
    for kw in (dict(batch_size=1), dict(batch_size=7), dict(batch_size=64), dict(prefix_cache=False),
               dict(prefix_cache=False, batch_size=3)):
        rep = run(**kw)
        assert rep.rollouts["completion_ids"].tolist() == ref.rollouts["completion_ids"].tolist(), kw
        a, b = ref.records.sort_values(key), rep.records.sort_values(key)
        assert a[key].values.tolist() == b[key].values.tolist(), kw
        assert a["candidate_success"].tolist() == b["candidate_success"].tolist(), kw
        np.testing.assert_allclose(a["alignment"].to_numpy(float), b["alignment"].to_numpy(float), atol=1e-9,
                                   equal_nan=True)


def test_row_streams_are_splitmix64_and_do_not_depend_on_other_rows():
    mask = (1 << 64) - 1

    def splitmix(state: int) -> int:
        z = state & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    keys = row_keys(12345, 5)
    u = row_uniforms(keys, 3)
    for i in range(5):
        key = splitmix(i * 0x9E3779B97F4A7C15 + 12345)
        assert int(keys[i]) & mask == key
        for s in range(3):
            assert u[i, s].item() == ((splitmix(key + (s + 1) * 0x9E3779B97F4A7C15) >> 11) + 1) * 2.0**-53
    # row 3's draws are the same whether the call has 5 rows or 50
    torch.testing.assert_close(row_uniforms(row_keys(12345, 50), 3)[3], u[3])


# --------------------------------------------------------------------------------------------------------------------
# nodes


class _OneTokenBackend(TransformersBackend):
    """Every completion is a single EOS token (a student that stops at once)."""

    def sample(self, prefixes, max_new_tokens, generator):
        return [[self.eos_ids[0]] for _ in prefixes]


def test_positions_beyond_every_completion_warn_instead_of_a_silent_nan_table():
    tok, student, teacher = lab()
    st = small(node_selection="positions", positions=[3, 4])
    backend = _OneTokenBackend(student, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    with pytest.warns(UserWarning, match=r"no node was scored: every position in positions=\[3, 4\] is beyond the "
                                         r"completions \(the longest has 1 tokens\)"):
        rep = oc.diagnose(student, tok, EXAMPLES, reward_fn=reward_from(has_a),
                          configs=[oc.TeacherConfig("ext", oc.ExternalTeacher(teacher))], settings=st,
                          backend=backend, progress=False)
    assert rep.records.empty and len(rep.rollouts) == 6


# --------------------------------------------------------------------------------------------------------------------
# files


def test_failed_save_leaves_the_previous_content_intact(tmp_path, monkeypatch):
    rep = run()
    out = tmp_path / "run"
    rep.save(out)
    (out / "report.html").write_text("keep me")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = pd.DataFrame.to_parquet

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # records written, then the rollouts fail: half-way
            raise OSError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing)
    smaller = rep.filter(prompt_index=0)
    with pytest.raises(OSError, match="disk full"):
        smaller.save(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary directory left behind
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    smaller.save(out)
    back = AlignmentReport.load(out)
    assert set(back.records["prompt_index"]) == {0} and (out / "report.html").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_load_refuses_a_directory_whose_parquet_has_other_columns(tmp_path):
    pd.DataFrame({"a": [1], "b": [2]}).to_parquet(tmp_path / "records.parquet")
    with pytest.raises(ValueError, match=r"not an opd-callback records file: it lacks the columns \['prompt_index'"):
        AlignmentReport.load(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# CLI: configs and flags (one line, exit 2, before any model is loaded)


def _one_line_error(capsys, call) -> str:
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("opd-diagnose ") and lines[0].endswith("--help)")
    return lines[0]


def _no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(cli.models, "load_model", refuse)


@pytest.fixture(scope="module")
def cli_lab(tmp_path_factory) -> Path:
    return build_cli_lab(tmp_path_factory.mktemp("cli_lab"))


def _config(tmp_path, cli_lab, extra: str) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"student: {cli_lab / 'student'}\ndata: {cli_lab / 'data.jsonl'}\nreward: {cli_lab / 'rw.py'}:reward\n"
        f"out: {tmp_path / 'out'}\nteachers:\n  big: {cli_lab / 'teacher'}\n" + extra
    )
    return cfg


@pytest.mark.parametrize(
    "extra, match",
    [
        ("settings: [1, 2]\n", r"--config: 'settings' must be a mapping of RolloutSettings fields .*got list"),
        ("contexts: 5\n", r"--config: 'contexts' must be a mapping .*got int 5"),
        ("limit: ten\n", r"--config: limit must be an integer, got 'ten'"),
        ("settings: {adaptive: maybe}\n", r"--config settings: adaptive must be true or false .*got 'maybe'"),
        ("settings: {num_rollouts: 2.5}\n", r"--config settings: num_rollouts must be an int, got 2.5"),
        ("settings: {tail: drop}\n", r"--config settings: tail must be 'impute' or 'renormalize', got 'drop'"),
        ("contexts:\n  sol: '{prompt'\n", r"configuration 'sol': template '\{prompt' cannot be parsed"),
        ("contexts:\n  sol: '{prompt} {nope}'\n", r"template '\{prompt\} \{nope\}' names field 'nope'"),
        ("divergence: 5\n", r"--config: 'divergence' must be a divergence spec"),
        ("teachers:\n  big: {model: x, beta: half}\n", r"--config: teachers.big.beta must be a number, got 'half'"),
        ("settings: {seed: -1}\n", r"RolloutSettings: seed must be >= 0, got -1"),
    ],
)
def test_bad_cli_configs_give_one_line_before_any_model(tmp_path, cli_lab, capsys, monkeypatch, extra, match):
    _no_model_loading(monkeypatch)
    text = extra
    if extra.startswith("teachers:"):  # replace the file's teachers block
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"student: {cli_lab / 'student'}\ndata: {cli_lab / 'data.jsonl'}\n"
                       f"reward: {cli_lab / 'rw.py'}:reward\nout: {tmp_path / 'out'}\n" + text)
    else:
        cfg = _config(tmp_path, cli_lab, text)
    line = _one_line_error(capsys, lambda: cli.main(["run", "--config", str(cfg), "--no-progress"]))
    assert re.search(match, line), line


def test_documented_divergence_form_and_string_settings_are_parsed(tmp_path, cli_lab):
    """``divergence: reverse_kl`` as docs/cli.md shows it; ``adaptive: "no"`` is False, ``"2"`` is 2."""
    cfg = _config(tmp_path, cli_lab, "divergence: forward_kl\nlimit: '2'\n"
                  "settings: {adaptive: 'no', num_rollouts: '2', max_new_tokens: 4, rollouts_per_branch: 1, "
                  "bootstrap_samples: 20}\n")
    args = cli.build_parser().parse_args(["run", "--config", str(cfg)])
    resolved = cli._resolve(args)
    assert resolved["settings"]["adaptive"] is False and resolved["settings"]["num_rollouts"] == 2
    assert resolved["limit"] == 2 and resolved["specs"][0].options == {"divergence": "forward_kl"}
    assert cli.main(["run", "--config", str(cfg), "--no-progress", "--no-html"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["configs"][0]["divergence"] == "forward_kl" and meta["settings"]["adaptive"] is False


def test_cli_flags_refused_in_one_line(tmp_path, cli_lab, capsys, monkeypatch):
    _no_model_loading(monkeypatch)
    args = base_args(cli_lab, tmp_path / "x")
    line = _one_line_error(capsys, lambda: cli.main(args + ["--limit", "0"]))
    assert "--limit must be >= 1, got 0" in line
    line = _one_line_error(capsys, lambda: cli.main(args + ["--context", "bad={prompt"]))
    assert "configuration 'bad': template '{prompt' cannot be parsed" in line
    line = _one_line_error(capsys, lambda: cli.main(args + ["--seed", "-3"]))
    assert "seed must be >= 0, got -3" in line


def test_cli_data_with_empty_prompt_or_chat_rows(tmp_path, cli_lab, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "", "answer": "3"}) + "\n")
    args = base_args(cli_lab, tmp_path / "x")
    args[args.index("--data") + 1] = str(data)
    _no_model_loading(monkeypatch)
    line = _one_line_error(capsys, lambda: cli.main(args))
    assert "example 0: 'prompt' is an empty string" in line
    # messages rows are read as the callback reads them: the final assistant turn dropped
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+2="},
                                             {"role": "assistant", "content": "3"}], "answer": "3"}) + "\n")
    rows = cli.load_examples(data)
    assert rows == [{"answer": "3", "prompt": [{"role": "user", "content": "1+2="}]}]


def test_report_on_a_foreign_directory_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    pd.DataFrame({"a": [1], "b": [2]}).to_parquet(tmp_path / "records.parquet")
    line = _one_line_error(capsys, lambda: cli.main(["report", str(tmp_path)]))
    assert "not an opd-callback records file" in line and "lacks the columns" in line
    with pytest.raises(ValueError, match="not an opd-callback records file"):
        cli.main(["report", str(tmp_path), "--debug"])


def test_all_degenerate_run_says_there_were_no_usable_nodes(tmp_path, cli_lab, capsys):
    zero = tmp_path / "zero.py"
    zero.write_text("def reward(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    args = base_args(cli_lab, tmp_path / "deg")
    args[args.index("--reward") + 1] = f"{zero}:reward"
    assert cli.main(args + ["--limit", "2", "--no-html"]) == 0
    captured = capsys.readouterr()
    assert "no usable nodes: all" in captured.err and "degenerate" in captured.err
    assert "+nan" not in captured.out


# --------------------------------------------------------------------------------------------------------------------
# callback and early-stopping arguments


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(patience=True), TypeError, r"AlignmentEarlyStopping: patience must be an int, got True"),
        (dict(threshold="0.5"), TypeError, r"AlignmentEarlyStopping: threshold must be a number or None, got '0.5'"),
        (dict(min_step=2.5), TypeError, r"AlignmentEarlyStopping: min_step must be an int, got 2.5"),
        (dict(warn_if_beaten="no"), TypeError, r"AlignmentEarlyStopping: warn_if_beaten must be a bool"),
        (dict(threshold=float("nan")), ValueError, r"AlignmentEarlyStopping: threshold must be a finite number"),
    ],
)
def test_early_stopping_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        oc.AlignmentEarlyStopping(**kw)


class _FakeTrainer:
    callback_handler = type("H", (), {"callbacks": []})()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(include_current="no"), r"GradientAlignmentCallback: include_current must be a bool"),
        (dict(every_n_steps=True), r"GradientAlignmentCallback: every_n_steps must be an int or None, got True"),
        (dict(every_n_steps=2.0), r"every_n_steps must be an int or None, got 2.0"),
        (dict(max_overhead="10%"), r"max_overhead must be a number, got '10%'"),
        (dict(probe_size="8"), r"probe_size must be an int, got '8'"),
        (dict(save_records=1), r"save_records must be a bool"),
    ],
)
def test_callback_arguments_are_checked_before_the_trainer_is_read(kw, match):
    with pytest.raises(TypeError, match=match):
        oc.GradientAlignmentCallback(_FakeTrainer(), reward_fn=reward_from(has_a), **kw)


def test_hostile_case_count():
    """The issue asks for at least 40 cases; parametrized cases count one each."""
    import sys

    items = [getattr(sys.modules[__name__], n) for n in dir(sys.modules[__name__]) if n.startswith("test_")]
    n = 0
    for fn in items:
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        n += len(marks[0].args[1]) if marks else 1
    assert n >= 40, n
