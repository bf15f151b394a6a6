"""The callback on each supported trainer (real TRL / transformers trainers, tiny models, CPU): GKD, SDFT (frozen copy
and PEFT base teacher), a plain transformers.Trainer with explicit configurations, a peft LoRA student, SDPO refused.
The derived ``current`` configuration is checked against the trainers' own loss functions through autograd."""

from __future__ import annotations

import pytest
import torch
from _dist_worker import (
    accuracy_reward,
    build_dataset,
    build_model,
    build_tokenizer,
    distillation_config,
    tiny_settings,
)

import opd_callback as oc
from opd_callback.training.trainers import RoutedModel, describe_trainer

pytestmark = pytest.mark.filterwarnings("ignore")

CPU = dict(bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none", save_strategy="no", seed=0,
           disable_tqdm=True, logging_steps=1, learning_rate=1e-2)


def _opd_rows(tr):
    return [r for r in tr.state.log_history if "opd/errors" in r]


def _loss_rows(tr):
    return [(r["step"], r["loss"]) for r in tr.state.log_history if "loss" in r]


def _direction(cfg, z, zt, sampled):
    return oc.divergence_direction(
        cfg.divergence, z, zt, sampled=sampled, beta=cfg.beta, temperature=cfg.temperature, top_k=cfg.top_k
    )


def _trl_direction(loss_fn, z):
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(zz).sum(), zz)
    return -g


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory, tok):
    """SDFT/SDPO with teacher_model_kind='base' reload the student from config._name_or_path: save it first."""
    path = tmp_path_factory.mktemp("student")
    build_model(tok, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _logits(seed=0, v=21):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, generator=g, dtype=torch.float64) * 2, torch.randn(v, generator=g, dtype=torch.float64) * 2)


# --------------------------------------------------------------------------------------------------------------------
# DistillationTrainer: beta / temperature mirrored exactly (checked through TRL's chunked loss itself)


@pytest.mark.parametrize("beta,temp", [(1.0, 1.0), (0.0, 0.7), (0.4, 1.3)])
def test_distillation_current_matches_trl_loss(tmp_path, tok, beta, temp):
    from trl import DistillationTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    tr = DistillationTrainer(
        model=build_model(tok, 0), teacher_model=build_model(tok, 1),
        args=distillation_config(str(tmp_path), beta=beta, temperature=temp), train_dataset=build_dataset(4),
        processing_class=tok,
    )
    spec = describe_trainer(tr)
    cfg = spec.current
    assert spec.kind == "distillation" and cfg.name == "current" and cfg.teacher.model is tr.teacher_model
    assert cfg.divergence == {1.0: "reverse_kl", 0.0: "forward_kl"}.get(beta, "jsd") and cfg.temperature == temp
    z, zt = _logits()
    V = z.shape[0]
    eye = torch.eye(V, dtype=torch.float64)

    def trl_loss(zz):  # lm_head = identity: hidden states are the logits
        loss, _, _ = _chunked_divergence_loss(
            zz.view(1, 1, V), zt.view(1, 1, V), eye, eye, torch.ones(1, 1), beta, temperature=temp
        )
        return loss

    ours = _direction(cfg, z, zt, torch.tensor(0))
    assert torch.allclose(ours, _trl_direction(trl_loss, z), atol=1e-10)


# --------------------------------------------------------------------------------------------------------------------
# GKD


def test_gkd_trainer(tmp_path, tok):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
         "answer": r["answer"]}
        for r in build_dataset(8)
    ]
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, max_new_tokens=4,
                     max_length=32, lmbda=1.0, beta=0.3, temperature=0.9, **CPU)
    tr = GKDTrainer(model=build_model(tok, 0), teacher_model=build_model(tok, 1), args=args,
                    train_dataset=Dataset.from_list(rows), processing_class=tok)
    cb = oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, every_n_steps=1, settings=tiny_settings())
    tr.add_callback(cb)
    cfg = cb.spec.current
    # GKD's compute_loss ignores args.temperature: the loss is a generalized JSD with beta at temperature 1
    assert cfg.divergence == "jsd" and cfg.beta == 0.3 and cfg.temperature == 1.0
    assert cb.spec.sampling_temperature == 0.9 and cb.settings.temperature == 1.0  # explicit settings win
    z, zt = _logits(1)
    trl = _trl_direction(
        lambda zz: GKDTrainer.generalized_jsd_loss(zz.view(1, 1, -1), zt.view(1, 1, -1), beta=0.3, reduction="sum"), z
    )
    assert torch.allclose(_direction(cfg, z, zt, torch.tensor(0)), trl, atol=1e-10)
    # probe rows derived from chat messages: the prompt is the conversation before the assistant turn
    assert cb.probe_rows[0]["prompt"][-1]["role"] == "user" and "messages" not in cb.probe_rows[0]
    tr.train()
    rows = _opd_rows(tr)
    assert [r["step"] for r in rows] == [1, 2] and all(r["opd/errors"] == 0 for r in rows)
    assert all("opd/current/degenerate_fraction" in r for r in rows)


# --------------------------------------------------------------------------------------------------------------------
# SDFT


def _sdft(tmp_path, tok, model, **kw):
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, max_completion_length=4,
                distillation_topk=5, num_generations=2, **CPU)
    base.update(kw)
    return SDFTTrainer(model=model, args=SDFTConfig(**base), train_dataset=build_dataset(8, privileged=True),
                       processing_class=tok, **({"peft_config": kw.pop("_peft")} if "_peft" in kw else {}))


def test_sdft_current_mirrors_each_distillation_mode(tmp_path, tok, saved_student):
    from transformers import AutoModelForCausalLM
    from trl.experimental.sdft.loss_utils import (
        compute_full_logit_self_distillation_loss,
        compute_sampled_token_self_distillation_loss,
        compute_topk_self_distillation_loss,
    )

    z, zt = _logits(2)
    y = torch.tensor(3)
    T = 0.8
    cases = {
        "full_logits": dict(distillation_mode="full_logits", distillation_alpha=0.3),
        "sampled_token": dict(distillation_mode="sampled_token", distillation_alpha=1.0),
        "topk_renorm": dict(distillation_mode="topk_logits", distillation_alpha=0.5, distillation_topk=4),
        "topk_tail": dict(distillation_mode="topk_logits", distillation_alpha=0.5, distillation_topk=4,
                          distillation_add_tail=True),
    }
    trl_losses = {
        "full_logits": lambda zz: compute_full_logit_self_distillation_loss(zz / T, zt / T, distillation_alpha=0.3),
        "sampled_token": lambda zz: compute_sampled_token_self_distillation_loss(
            (zz / T).view(1, 1, -1), (zt / T).view(1, 1, -1), y.view(1, 1), distillation_alpha=1.0),
        "topk_renorm": lambda zz: compute_topk_self_distillation_loss(
            zz / T, zt / T, distillation_topk=4, distillation_alpha=0.5, distillation_add_tail=False),
        "topk_tail": lambda zz: compute_topk_self_distillation_loss(
            zz / T, zt / T, distillation_topk=4, distillation_alpha=0.5, distillation_add_tail=True),
    }
    for name, kw in cases.items():
        tr = _sdft(tmp_path / name, tok, AutoModelForCausalLM.from_pretrained(saved_student), temperature=T,
                   teacher_prompt_template="{privileged_context}|{prompt}", **kw)
        spec = describe_trainer(tr)
        cfg = spec.current
        assert spec.kind == "sdft" and cfg.teacher.template == "{privileged_context}|{prompt}"
        assert cfg.teacher.model is tr.teacher_model  # teacher_model_kind='base': the frozen initial copy
        ours = _direction(cfg, z, zt, y)
        assert torch.allclose(ours, _trl_direction(trl_losses[name], z), atol=1e-10), name


def test_sdft_trainer_runs_with_the_callback(tmp_path, tok, saved_student):
    from transformers import AutoModelForCausalLM

    tr = _sdft(tmp_path, tok, AutoModelForCausalLM.from_pretrained(saved_student))
    cb = oc.GradientAlignmentCallback(
        tr, reward_fn=accuracy_reward, every_n_steps=1, settings=tiny_settings(),
        configs=[oc.TeacherConfig("solution", oc.ContextTeacher("{solution}|{prompt}"))],
    )
    tr.add_callback(cb)
    tr.train()
    rows = _opd_rows(tr)
    assert [r["step"] for r in rows] == [1, 2] and all(r["opd/errors"] == 0 for r in rows)
    rep = oc.AlignmentReport.load(tmp_path / "opd_alignment")
    assert set(rep.records["config"]) == {"current", "solution"}


def test_sdft_peft_base_teacher_is_the_adapter_free_student(tmp_path, tok, saved_student):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    args = SDFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, max_completion_length=4,
                      distillation_topk=5, num_generations=2, **{**CPU, "learning_rate": 0.1})
    tr = SDFTTrainer(model=AutoModelForCausalLM.from_pretrained(saved_student), args=args,
                     train_dataset=build_dataset(8, privileged=True), processing_class=tok,
                     peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    cb = oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, every_n_steps=1, settings=tiny_settings())
    tr.add_callback(cb)
    tr.train()
    teacher = describe_trainer(tr).current.teacher.model
    assert isinstance(teacher, RoutedModel)
    base = AutoModelForCausalLM.from_pretrained(saved_student)
    ids = torch.tensor([tok("1+2=")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(teacher(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
        assert not torch.allclose(tr.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)
    assert [r["step"] for r in _opd_rows(tr)] == [1] and cb.errors == 0


def test_sdpo_is_refused_with_a_message(tmp_path, tok, saved_student):
    from transformers import AutoModelForCausalLM
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    args = SDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=1,
                      max_completion_length=4, teacher_model_kind="live", **CPU)
    tr = SDPOTrainer(model=AutoModelForCausalLM.from_pretrained(saved_student), reward_funcs=accuracy_reward,
                     args=args, train_dataset=build_dataset(4), processing_class=tok)
    with pytest.raises(ValueError, match="successful sibling rollout.*include_current=False"):
        oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward)
    cb = oc.GradientAlignmentCallback(  # explicit configurations still work
        tr, reward_fn=accuracy_reward, include_current=False, settings=tiny_settings(),
        configs=[oc.TeacherConfig("solution", oc.ContextTeacher("{solution}|{prompt}"))],
    )
    assert cb.config_names == ["solution"]


# --------------------------------------------------------------------------------------------------------------------
# plain transformers.Trainer, peft student


def test_plain_trainer_with_explicit_configs(tmp_path, tok):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    texts = [r["solution"] for r in build_dataset(8)]
    train = Dataset.from_list([{"input_ids": tok(t)["input_ids"] + [tok.eos_token_id]} for t in texts])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, **CPU)
    tr = Trainer(model=build_model(tok, 0), args=args, train_dataset=train, processing_class=tok,
                 data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    with pytest.raises(ValueError, match="configs="):
        oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, probe_dataset=build_dataset(4))
    cb = oc.GradientAlignmentCallback(
        tr, reward_fn=accuracy_reward, probe_dataset=build_dataset(4), every_n_steps=1, settings=tiny_settings(),
        configs=[oc.TeacherConfig("teacher", oc.ExternalTeacher(build_model(tok, 1)), divergence="forward_kl"),
                 oc.TeacherConfig("solution", oc.ContextTeacher("{solution}|{prompt}"))],
        early_stopping=oc.AlignmentEarlyStopping(metric="alignment", threshold=1.01, patience=1, config="teacher",
                                                 min_questions=1),
    )
    assert cb.config_names == ["teacher", "solution"]
    tr.add_callback(cb)
    tr.train()
    rows = _opd_rows(tr)
    assert [r["step"] for r in rows] == [1] and rows[0]["opd/early_stopping/stop"] == 1.0
    assert tr.state.global_step == 1
    assert "opd/teacher/teacher_advantage" in rows[0] and not any(k.startswith("opd/current/") for k in rows[0])
    assert _loss_rows(tr)[0][0] == 1


def test_peft_lora_student(tmp_path, tok):
    from peft import LoraConfig, PeftModel
    from trl import DistillationTrainer

    def make(out):
        return DistillationTrainer(
            model=build_model(tok, 0), teacher_model=build_model(tok, 1),
            args=distillation_config(str(out), max_steps=2, learning_rate=5e-2), train_dataset=build_dataset(8),
            processing_class=tok, peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        )

    ref = make(tmp_path / "ref")
    ref.train()
    tr = make(tmp_path / "run")
    assert isinstance(tr.model, PeftModel)
    cb = oc.GradientAlignmentCallback(tr, reward_fn=accuracy_reward, every_n_steps=1, run_at_start=True,
                                      settings=tiny_settings())
    tr.add_callback(cb)
    tr.train()
    assert _loss_rows(tr) == _loss_rows(ref)
    assert [r["step"] for r in _opd_rows(tr)] == [0, 1, 2] and cb.errors == 0
    assert cb.last_report is not None and cb.last_report.n_nodes > 0
