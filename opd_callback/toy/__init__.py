"""``opd_callback.toy``: a fully offline, seed-deterministic toy lab for on-policy distillation.

A verifiable 3-digit addition task with a digit-by-digit chain of thought, a character
tokenizer with a ChatML-like chat template, and tiny Qwen2 models (weak student, strong
teacher, wrong-rule teacher, and a hard wrong teacher: the strong teacher fine-tuned on the
wrong rule). The lab of seed 0 is shipped with the package (identical on every machine);
other seeds train in a few minutes on CPU and are cached on disk.

Modules: ``task`` (the task, prompts, reward), ``tokenizer`` (``char_tokenizer``, ``build_tokenizer``), ``models``
(``qwen2_config``, ``random_model``, ``tiny_random_model``: with ``char_tokenizer`` the one tokenizer and model builder
of the lab, the tests and the benchmarks), ``train`` (``TrainRecipe``, ``train_lm``, sampled accuracy), ``spec``
(version, model names, data split), ``build`` (training a lab), ``lab`` (``ToyLab``, loading and the cache).

>>> from opd_callback.toy import build_lab, solve
>>> solve(367, 485)
'7+5+0=12,6+8+1=15,3+4+1=08>852'
>>> lab = build_lab()              # doctest: +SKIP
>>> print(lab.accuracy_table())    # doctest: +SKIP
"""

from .lab import LAB_VERSION, MODEL_NAMES, ToyLab, build_lab, default_cache_dir, load_lab, shipped_lab_dir
from .models import make_config, qwen2_config, random_model, set_generation_config, tiny_random_model
from .task import (
    ANSWER_TEMPLATE,
    MISLEADING_SOLUTION_TEMPLATE,
    MISLEADING_TEMPLATE,
    SOLUTION_TEMPLATE,
    TEMPLATES,
    format_prompt,
    make_examples,
    parse_answer,
    reward_fn,
    solve,
)
from .tokenizer import build_tokenizer, char_tokenizer
from .train import CPU_TRAINER_ARGS, TrainRecipe, encode_items, sample_accuracy, sample_completions, train_lm

__all__ = [
    "CPU_TRAINER_ARGS",
    "ANSWER_TEMPLATE",
    "SOLUTION_TEMPLATE",
    "MISLEADING_TEMPLATE",
    "MISLEADING_SOLUTION_TEMPLATE",
    "TEMPLATES",
    "LAB_VERSION",
    "MODEL_NAMES",
    "ToyLab",
    "build_lab",
    "load_lab",
    "shipped_lab_dir",
    "build_tokenizer",
    "char_tokenizer",
    "default_cache_dir",
    "encode_items",
    "format_prompt",
    "make_config",
    "make_examples",
    "parse_answer",
    "qwen2_config",
    "random_model",
    "reward_fn",
    "sample_accuracy",
    "sample_completions",
    "set_generation_config",
    "solve",
    "tiny_random_model",
    "TrainRecipe",
    "train_lm",
]
