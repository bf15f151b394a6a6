"""What a toy lab is made of, shared by building and loading one: its version, its models, its data split."""

from __future__ import annotations

import contextlib

from .task import make_examples

# Bump whenever the task format, tokenizer, model sizes or training recipe change.
LAB_VERSION = "toy-v5"
MODEL_NAMES = ("student", "strong_teacher", "wrong_teacher", "hard_wrong_teacher")

N_TRAIN = 30000
N_VAL = 256  # early-stopping checks (disjoint from train and probe)
N_PROBE = 512
DIGITS = 3


def split_examples(seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """The lab's training, validation and probe examples of ``seed`` (disjoint)."""
    ex = make_examples(N_TRAIN + N_VAL + N_PROBE, seed=seed, digits=DIGITS)
    return ex[:N_TRAIN], ex[N_TRAIN : N_TRAIN + N_VAL], ex[N_TRAIN + N_VAL :]


@contextlib.contextmanager
def quiet_hf():
    """Temporarily disable transformers' progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
