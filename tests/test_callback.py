"""GradientAlignmentCallback on a real trl.DistillationTrainer with tiny models (CPU): never hurting the run, logging,
records, failures, early stopping (forced and with a real wrong teacher, across a resume), wandb read-back, HTML."""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _dist_worker import (
    accuracy_reward,
    addition_rows,
    build_dataset,
    build_model,
    build_tokenizer,
    distillation_config,
    pretrain,
    tiny_settings,
)

import opd_callback as oc
from opd_callback.report.html import token_heatmap_html
from opd_callback.training.callback import DiagnosticError, estimate_continuations

pytestmark = pytest.mark.filterwarnings("ignore")

SCALAR_KEYS = ["opd/student/success_rate", "opd/rollouts", "opd/nodes", "opd/seconds", "opd/errors"]
PER_CONFIG = ["alignment", "alignment_correct", "alignment_incorrect", "positive_fraction", "teacher_advantage",
              "degenerate_fraction"]


def _trainer(out: Path, *, max_steps: int = 2, student=None, teacher=None, ds=None, **cfg):
    from trl import DistillationTrainer

    tok = build_tokenizer()
    student = student if student is not None else build_model(tok, 0)
    teacher = teacher if teacher is not None else build_model(tok, 1)
    args = distillation_config(str(out), max_steps=max_steps, **cfg)
    tr = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ds or build_dataset(8), processing_class=tok
    )
    return tr, tok


def _alt():
    return [oc.TeacherConfig("self+solution", oc.ContextTeacher("{solution}\n{prompt}"))]


def _loss_rows(tr):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in tr.state.log_history if "loss" in r]


def _opd_rows(tr):
    return [r for r in tr.state.log_history if "opd/errors" in r]


# --------------------------------------------------------------------------------------------------------------------


def test_training_is_bit_identical_and_records_are_saved(tmp_path):
    ref, _ = _trainer(tmp_path / "ref", max_steps=3)
    ref.train()

    run, _ = _trainer(tmp_path / "run", max_steps=3)
    cb = oc.GradientAlignmentCallback(
        run, reward_fn=accuracy_reward, every_n_steps=1, run_at_start=True, configs=_alt(), settings=tiny_settings()
    )
    run.add_callback(cb)
    run.train()

    # the same loss trajectory, bit for bit, and the same final weights
    assert len(_loss_rows(ref)) == 3
    assert _loss_rows(run) == _loss_rows(ref)
    for (name, p), (_, q) in zip(ref.model.named_parameters(), run.model.named_parameters()):
        assert torch.equal(p, q), name

    # one opd row per diagnostic (start + every step), each at its own step, with the required keys
    rows = _opd_rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        for k in SCALAR_KEYS:
            assert k in r, k
        assert r["opd/errors"] == 0.0
        assert r["opd/rollouts"] == 8 * 2  # probe: 8 train rows x num_rollouts
        for c in ("current", "self+solution"):
            assert f"opd/{c}/teacher_advantage" in r and f"opd/{c}/degenerate_fraction" in r
    assert any("opd/current/alignment" in r and "opd/current/positive_fraction" in r for r in rows)
    assert set(cb.history[-1]["metrics"]) <= {k for r in rows for k in r}

    # per-token records of every diagnostic, with a step column, readable with AlignmentReport.load
    rep = oc.AlignmentReport.load(tmp_path / "run" / "opd_alignment")
    assert sorted(rep.records["step"].unique().tolist()) == [0, 1, 2, 3]
    assert sorted(rep.rollouts["step"].unique().tolist()) == [0, 1, 2, 3]
    assert set(rep.records["config"]) == {"current", "self+solution"}
    # alternatives are scored on the same rollouts and nodes as current (a paired comparison)
    for step, part in rep.records.groupby("step"):
        nodes = {
            c: sorted(map(tuple, g[["prompt_index", "rollout_index", "position"]].to_numpy().tolist()))
            for c, g in part.groupby("config")
        }
        assert nodes["current"] == nodes["self+solution"] and nodes["current"]
    assert len(list((tmp_path / "run" / "opd_alignment").glob("step-*"))) == 4


def test_diagnostic_restores_rng_modes_grads_and_tokenizer(tmp_path):
    tr, tok = _trainer(tmp_path)
    cb = oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, every_n_steps=100, configs=_alt(),
                                      settings=tiny_settings())
    tr.add_callback(cb)
    model = tr.model
    model.train()
    model.model.layers[0].mlp.eval()  # a sub-module in another mode must stay so
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    tok.padding_side = "left"
    model.config.use_cache = False
    impl = model.config._attn_implementation  # switched to shared-prefix attention while continuations decode
    teacher_mode = tr.teacher_model.training
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    before = (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())

    report = cb.run_diagnostic()

    assert report is not None and report.n_nodes > 0
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    for p, (obj, val) in zip(model.parameters(), grads):
        assert p.grad is obj and torch.equal(p.grad, val)
    assert model.training and not model.model.layers[0].mlp.training and model.model.layers[0].self_attn.training
    assert tr.teacher_model.training == teacher_mode
    assert tok.padding_side == "left" and model.config.use_cache is False
    assert model.config._attn_implementation == impl != "opd_shared_prefix"
    assert torch.is_grad_enabled()


class _FlakyReward:
    """Passes the signature check at on_train_begin (one empty completion), raises inside every diagnostic."""

    __name__ = "flaky_reward"

    def __call__(self, prompts, completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("verifier crashed")
        return [0.0] * len(completions)


def test_on_error_warn_counts_and_training_continues(tmp_path, caplog):
    ref, _ = _trainer(tmp_path / "ref")
    ref.train()
    tr, _ = _trainer(tmp_path / "run")
    cb = oc.GradientAlignmentCallback(tr, reward_fn=_FlakyReward(), every_n_steps=1, configs=_alt(),
                                      settings=tiny_settings())
    tr.add_callback(cb)
    with caplog.at_level(logging.WARNING, logger="opd_callback"):
        tr.train()
    assert tr.state.global_step == 2 and cb.errors == 2
    assert [(r["step"], r["opd/errors"]) for r in _opd_rows(tr)] == [(1, 1.0), (2, 2.0)]
    assert _loss_rows(tr) == _loss_rows(ref)
    text = caplog.text
    assert "Traceback" in text and "verifier crashed" in text and "training continues" in text


def test_on_error_raise_reraises(tmp_path):
    tr, _ = _trainer(tmp_path)
    cb = oc.GradientAlignmentCallback(
        tr, reward_fn=_FlakyReward(), every_n_steps=1, configs=_alt(), settings=tiny_settings(), on_error="raise"
    )
    tr.add_callback(cb)
    with pytest.raises(DiagnosticError, match="verifier crashed"):
        tr.train()
    assert tr.state.global_step == 1


def test_bad_setup_fails_fast(tmp_path):
    tr, tok = _trainer(tmp_path)
    kw = dict(reward_fn=accuracy_reward, settings=tiny_settings())
    with pytest.raises(ValueError, match="probe set is empty"):
        oc.GradientAlignmentCallback(tr, probe_dataset=[], **kw)
    with pytest.raises(ValueError, match="no 'prompt' field"):
        oc.GradientAlignmentCallback(tr, probe_dataset=[{"question": "1+1="}], **kw)
    with pytest.raises(ValueError, match="reserved"):
        oc.GradientAlignmentCallback(tr, configs=[oc.TeacherConfig("current", oc.ContextTeacher("{prompt}"))], **kw)
    with pytest.raises(ValueError, match="not scored"):
        oc.GradientAlignmentCallback(tr, early_stopping=oc.AlignmentEarlyStopping(config="nope"), **kw)
    with pytest.raises(ValueError, match="metric must be"):
        oc.AlignmentEarlyStopping(metric="loss")
    with pytest.raises(ValueError, match="on_error"):
        oc.GradientAlignmentCallback(tr, on_error="ignore", **kw)

    def run_begin(cb):
        cb.on_train_begin(tr.args, tr.state, tr.control)

    # a template field the probe rows do not have: refused before any step
    cb = oc.GradientAlignmentCallback(
        tr, configs=[oc.TeacherConfig("hint", oc.ContextTeacher("{hint}\n{prompt}"))], **kw
    )
    with pytest.raises(ValueError, match="'hint'"):
        run_begin(cb)
    # a teacher with another vocabulary
    other = build_model(tok, 3)
    other.resize_token_embeddings(len(tok) + 5)
    cb = oc.GradientAlignmentCallback(tr, configs=[oc.TeacherConfig("big", oc.ExternalTeacher(other))], **kw)
    with pytest.raises(ValueError, match="vocabulary"):
        run_begin(cb)
    # a reward function with the wrong signature
    cb = oc.GradientAlignmentCallback(tr, reward_fn=lambda prompts, completions: [0.0], settings=tiny_settings())
    with pytest.raises(ValueError, match="reward function failed"):
        run_begin(cb)
    # sharded parameters: refused with a message, never a hang
    cb = oc.GradientAlignmentCallback(tr, **kw)
    tr.is_fsdp_enabled = True
    try:
        with pytest.raises(ValueError, match="FSDP"):
            run_begin(cb)
    finally:
        tr.is_fsdp_enabled = False
    # the whole run fails at on_train_begin, before the first step
    tr2, _ = _trainer(tmp_path / "t2")
    tr2.add_callback(
        oc.GradientAlignmentCallback(tr2, configs=[oc.TeacherConfig("hint", oc.ContextTeacher("{hint}{prompt}"))], **kw)
    )
    with pytest.raises(ValueError, match="'hint'"):
        tr2.train()
    assert tr2.state.global_step == 0


def test_run_at_end_when_another_callback_stops_training(tmp_path):
    from transformers import TrainerCallback

    class StopAtOne(TrainerCallback):  # runs after ours in on_step_end: we cannot see its decision there
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                control.should_training_stop = True

    tr, _ = _trainer(tmp_path, max_steps=5)
    cb = oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, every_n_steps=100, settings=tiny_settings())
    tr.add_callback(cb)
    tr.add_callback(StopAtOne())
    tr.train()
    assert tr.state.global_step == 1
    assert [r["step"] for r in _opd_rows(tr)] == [1]  # diagnosed at on_train_end, logged through on_log
    assert (tmp_path / "opd_alignment" / "step-0000001" / "records.parquet").exists()


# --------------------------------------------------------------------------------------------------------------------
# early stopping


def test_early_stopping_unit_rules():
    es = oc.AlignmentEarlyStopping(metric="alignment_incorrect", threshold=0.0, patience=2, min_step=10)

    def summ(v, ci=(None, None)):
        return [{"config": "current", "alignment_mean": 0.1, "alignment_incorrect": v, "ci_incorrect": list(ci)}]

    assert es.update(5, summ(-0.5))["status"] == "before_min_step" and es.bad_count == 0
    assert es.update(10, summ(-0.5))["status"] == "bad" and es.bad_count == 1
    d = es.update(20, summ(None))  # no non-degenerate incorrect node: neither good nor bad
    assert d["status"] == "neutral" and es.bad_count == 1 and "neither" in d["message"]
    assert es.update(30, summ(0.2))["status"] == "good" and es.bad_count == 0
    es.update(40, summ(-0.1))
    d = es.update(50, summ(-0.2))
    assert d["stop"] and es.stopped_step == 50 and "stayed below" in es.reason
    # a diagnostic resting on fewer than min_questions questions with a usable node is neutral
    thin = [{**summ(-0.9)[0], "n_questions_valid": 2}]
    assert oc.AlignmentEarlyStopping(metric="alignment_incorrect").update(0, thin)["status"] == "neutral"
    # state round trip (what transformers writes into trainer_state.json)
    st = json.loads(json.dumps(es.state()))
    es2 = oc.AlignmentEarlyStopping(**st["args"])
    from types import SimpleNamespace

    assert es2.restore_from(SimpleNamespace(stateful_callbacks={"AlignmentEarlyStopping": st}))
    assert es2.bad_count == 2 and es2.stopped_step == 50
    # "beats" warnings rest on the paired comparison of a report (see tests/test_decision_metric.py): a summary
    # alone gives none
    assert es.beaten_by([{"config": "current"}, {"config": "ctx"}]) == []


def test_early_stopping_fires_and_survives_resume(tmp_path):
    # threshold 1.01: alignment is a cosine, so every diagnostic is "bad"
    def make(out, max_steps, **cfg):
        tr, _ = _trainer(out, max_steps=max_steps, learning_rate=1e-3, save_strategy="steps", save_steps=1, **cfg)
        es = oc.AlignmentEarlyStopping(metric="alignment", threshold=1.01, patience=3, min_questions=1)
        cb = oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, every_n_steps=1, settings=tiny_settings(),
                                          early_stopping=es)
        tr.add_callback(cb)
        return tr, cb

    out = tmp_path / "run"
    tr, cb = make(out, 2)
    tr.train()
    assert tr.state.global_step == 2 and cb.early_stopping.bad_count == 2 and cb.early_stopping.stopped_step is None
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["AlignmentEarlyStopping"]["attributes"]["bad_count"] == 2

    # resume: the third bad diagnostic (step 3) stops training; a fresh counter would only stop at step 5
    for restore in (False, True):
        dst = tmp_path / f"resume-{restore}"
        shutil.copytree(out, dst)
        tr2, cb2 = make(dst, 8, restore_callback_states_from_checkpoint=restore)
        tr2.train(resume_from_checkpoint=str(dst / "checkpoint-2"))
        es = cb2.early_stopping
        assert any(cb is es for cb in tr2.callback_handler.callbacks)
        assert tr2.state.global_step == 3, restore
        assert es.stopped_step == 3 and es.bad_count == 3
        assert (dst / "checkpoint-3").is_dir()  # should_save on stop
        rows = _opd_rows(tr2)
        assert rows[-1]["opd/early_stopping/stop"] == 1.0 and rows[-1]["step"] == 3


def test_early_stopping_with_a_wrong_teacher(tmp_path, caplog):
    """A teacher trained on wrong answers pushes against the student's success: alignment < 0, training stops;
    a correct teacher scored alongside beats it with non-overlapping CIs."""
    tok = build_tokenizer()
    right, wrong = addition_rows(), addition_rows(wrong=True)
    student = pretrain(build_model(tok, 0, hidden=32), tok, right, steps=12)
    good = pretrain(build_model(tok, 1, hidden=32), tok, right, steps=60)
    bad = pretrain(build_model(tok, 2, hidden=32), tok, wrong, steps=60)
    from datasets import Dataset

    tr, _ = _trainer(
        tmp_path, max_steps=6, student=student, teacher=bad, ds=Dataset.from_list(right), learning_rate=1e-4,
        max_completion_length=2,
    )
    cb = oc.GradientAlignmentCallback(
        tr,
        reward_fn=accuracy_reward,
        probe_dataset=right[::3],
        every_n_steps=1,
        configs=[oc.TeacherConfig("good", oc.ExternalTeacher(good))],
        settings=tiny_settings(max_new_tokens=2, num_rollouts=4, bootstrap_samples=200),
        early_stopping=oc.AlignmentEarlyStopping(metric="alignment", threshold=0.0, patience=2),
    )
    tr.add_callback(cb)
    with caplog.at_level(logging.INFO, logger="opd_callback"):
        tr.train()
    assert tr.state.global_step == 2
    rows = _opd_rows(tr)
    assert all(r["opd/current/alignment"] < 0 < r["opd/good/alignment"] for r in rows)
    assert all(r["opd/current/teacher_advantage"] < 0 for r in rows)
    assert "stayed below 0" in caplog.text and "'good' beats 'current'" in caplog.text
    # the "beats" warning is a WARNING once per configuration; at later diagnostics it repeats at INFO
    beats = [r.levelno for r in caplog.records if "'good' beats 'current'" in r.getMessage()]
    assert beats[0] == logging.WARNING and all(lv == logging.INFO for lv in beats[1:]) and len(beats) >= 2


# --------------------------------------------------------------------------------------------------------------------
# wandb and HTML


def _leet(run_dir: Path) -> list[dict]:
    exe = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(exe) if exe.exists() else "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard only
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_wandb_offline_run_has_scalars_and_panels_at_the_right_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "opd-callback-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ds = build_dataset(8)  # "prompt" plus extra columns "answer" and "solution"
    assert set(ds.column_names) == {"prompt", "answer", "solution"}
    tr, _ = _trainer(tmp_path / "out", max_steps=2, ds=ds, report_to=["wandb"], run_name="opd-test")
    cb = oc.GradientAlignmentCallback(
        tr, reward_fn=accuracy_reward, every_n_steps=2, run_at_start=True, configs=_alt(), settings=tiny_settings()
    )
    tr.add_callback(cb)
    try:
        tr.train()
        run_dir = Path(wandb.run.dir).parent
    finally:
        wandb.finish()

    history = [r["history"]["item"] for r in _leet(run_dir) if r.get("type") == "history"]
    scalar_rows = [h for h in history if "train/opd/errors" in h]
    assert [h["train/global_step"] for h in scalar_rows] == [0, 2]
    for h in scalar_rows:
        for k in SCALAR_KEYS:
            assert "train/" + k in h
        assert "train/opd/current/degenerate_fraction" in h and "train/opd/self+solution/teacher_advantage" in h
    panel_rows = [h for h in history if any(k.startswith("opd/heatmap") for k in h)]
    assert [h["train/global_step"] for h in panel_rows] == [0, 2]
    for h in panel_rows:
        assert any(k.startswith("opd/tokens") for k in h)
        assert any(k.startswith("opd/current/alignment_hist/") for k in h)
        assert any(k.startswith("opd/self+solution/alignment_hist/") for k in h)
    # every row of the run carries train/global_step (none relies on an implicit step)
    assert all("train/global_step" in h for h in history)
    pages = list(run_dir.glob("files/media/html/**/*.html"))
    assert len(pages) == 2 and all("<script" not in p.read_text().lower() for p in pages)
    assert list(run_dir.glob("files/media/table/**/*.json"))


def test_heatmap_escapes_model_text():
    evil = '<script>alert("x")</script>'
    records = pd.DataFrame(
        [
            {
                "prompt_index": 0,
                "rollout_index": 0,
                "position": 0,
                "token": "<",
                "value": 0.5,
                "covered_mass": 1.0,
                "student_entropy": 1.0,
                "candidate_ids": [0, 1],
                "candidate_probs": [0.5, 0.5],
                "candidate_success": [1.0, 0.0],
                "config": '<b onmouseover="x">cfg',
                "alignment": -0.7,
                "teacher_advantage": 0.1,
                "kl_reverse": 0.2,
                "degenerate": False,
            }
        ]
    )
    rollouts = pd.DataFrame(
        [{"prompt_index": 0, "rollout_index": 0, "prompt": evil + " & 'q'", "completion_ids": list(range(len(evil))),
          "reward": 0.0, "correct": False}]
    )
    page = token_heatmap_html(records, rollouts, lambda ids: evil[ids[0]] if ids[0] < len(evil) else "?")
    assert "<script" not in page.lower() and "onmouseover=\"" not in page
    assert "&lt;script&gt;" in page and "&amp; &#x27;q&#x27;" in page
    assert "&lt;b onmouseover=&quot;x&quot;&gt;cfg" in page
    # the scored token is coloured (negative alignment: red) and carries escaped hover details
    assert "rgba(220,40,40" in page and 'title="position 0, token &#x27;&lt;&#x27;' in page


def test_cost_estimate_matches_settings():
    s = tiny_settings()
    # 3 prompts x 2 rollouts x min(2 nodes, 3 windows for 4 tokens) x (2 + 2*1 + 1) candidates x 2 continuations
    assert estimate_continuations(s, 3, 2) == 3 * 2 * 2 * 5 * 2


def test_time_budget_schedule(tmp_path):
    """every_n_steps=None: first diagnostic at first_step; later ones only while diagnostics fit max_overhead."""
    # a budget so large that every step is due after the first diagnostic
    run, _ = _trainer(tmp_path / "big", max_steps=5)
    cb = oc.GradientAlignmentCallback(
        run, reward_fn=accuracy_reward, first_step=2, max_overhead=1e9, configs=_alt(), settings=tiny_settings()
    )
    run.add_callback(cb)
    run.train()
    assert [h["step"] for h in cb.history] == [2, 3, 4, 5]
    assert cb.schedule.diag_seconds > 0 and cb.schedule.train_seconds > 0
    # a budget so small that, after the first diagnostic, none fits (not even the end-of-run one)
    run, _ = _trainer(tmp_path / "small", max_steps=6)
    cb = oc.GradientAlignmentCallback(
        run, reward_fn=accuracy_reward, first_step=2, max_overhead=1e-6, configs=_alt(), settings=tiny_settings()
    )
    run.add_callback(cb)
    run.train()
    assert [h["step"] for h in cb.history] == [2]
    assert cb.schedule.next_step > 6
    # the schedule obeys the budget: (diagnostic time + one more) <= max_overhead * training time at the next step
    sched = cb.schedule
    per_step = sched.train_seconds / sched.train_steps
    assert sched.diag_seconds * 2 <= 1e-6 * (sched.train_seconds + per_step * (sched.next_step - 2)) * 1.0001
    with pytest.raises(ValueError, match="max_overhead"):
        oc.GradientAlignmentCallback(run, reward_fn=accuracy_reward, max_overhead=0)


def test_short_run_gets_one_diagnostic_and_a_warning(tmp_path, caplog):
    """A run shorter than first_step: the schedule puts nothing inside it; on_train_begin says so at warning level
    and the end-of-run diagnostic still runs (every run gets one). With run_at_end=False nothing runs, and the warning
    says so."""
    run, _ = _trainer(tmp_path / "short", max_steps=3)
    cb = oc.GradientAlignmentCallback(run, reward_fn=accuracy_reward, configs=_alt(), settings=tiny_settings())
    run.add_callback(cb)
    with caplog.at_level(logging.WARNING, logger="opd_callback"):
        run.train()
    assert [h["step"] for h in cb.history] == [3]
    warn = [r for r in caplog.records if r.levelno == logging.WARNING and "no scheduled diagnostic" in r.getMessage()]
    assert len(warn) == 1 and "end-of-run one at step 3" in warn[0].getMessage()
    caplog.clear()
    run, _ = _trainer(tmp_path / "none", max_steps=3)
    cb = oc.GradientAlignmentCallback(run, reward_fn=accuracy_reward, configs=_alt(), settings=tiny_settings(),
                                      run_at_end=False)
    run.add_callback(cb)
    with caplog.at_level(logging.WARNING, logger="opd_callback"):
        run.train()
    assert cb.history == []
    assert any("NO diagnostic will run" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # a fixed cadence longer than the run: the same warning
    caplog.clear()
    run, _ = _trainer(tmp_path / "every", max_steps=3)
    cb = oc.GradientAlignmentCallback(run, reward_fn=accuracy_reward, every_n_steps=10, settings=tiny_settings())
    run.add_callback(cb)
    with caplog.at_level(logging.WARNING, logger="opd_callback"):
        run.train()
    assert [h["step"] for h in cb.history] == [3]
    assert any("every_n_steps=10" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def _documented_keys() -> list[str]:
    """The scalar keys listed in docs/callback.md, "Logged metrics" (before the wandb-only panels)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "callback.md").read_text()
    section = text.split("## Logged metrics", 1)[1].split("On wandb only", 1)[0]
    keys = re.findall(r"`(opd/[^`]+)`", section)
    assert len(keys) > 15, keys  # the parser found the tables
    return keys


def test_every_logged_key_is_documented(tmp_path):
    import re

    tr, _ = _trainer(tmp_path / "run", max_steps=2)
    es = oc.AlignmentEarlyStopping(metric="alignment", threshold=1.01, patience=5, min_questions=1)
    cb = oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, every_n_steps=1, configs=_alt(),
                                      settings=tiny_settings(), early_stopping=es)
    tr.add_callback(cb)
    tr.train()
    logged = {k for r in _opd_rows(tr) for k in r if k.startswith("opd/")}
    patterns = [re.compile(re.escape(k).replace(re.escape("<config>"), r"(current|self\+solution)") + "$")
                for k in _documented_keys()]
    assert {"opd/current/teacher_gain", "opd/self+solution/teacher_gain", "opd/early_stopping/bad_count"} <= logged
    assert sorted(k for k in logged if not any(p.match(k) for p in patterns)) == []
