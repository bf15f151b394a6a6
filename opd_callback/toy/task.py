"""A verifiable arithmetic task with a digit-by-digit chain of thought.

Completion format for ``a+b=`` (columns from least significant, ``x+y+c=ss`` where
``c`` is the carry into the column and ``ss`` the two-digit column sum whose tens digit
is the carry out), then ``>`` and the final answer::

    solve(367, 485)                 -> "7+5+0=12,6+8+1=15,3+4+1=08>852"
    solve(367, 485, carries=False)  -> "7+5+0=12,6+8+0=14,3+4+0=07>742"

The "wrong rule" (``carries=False``) drops every carry: the carry-in is always written
as 0 and the answer is the digit-wise sum mod 10 (always ``digits`` digits, so it can
have a leading zero).
"""

from __future__ import annotations

import random
import re
from typing import Any, Iterable, Sequence

# Privileged-context templates for self-distillation teachers. Each formatted string ends
# with the example's ``prompt`` so that the completion continues naturally.
ANSWER_TEMPLATE = "ans {answer}|{prompt}"
SOLUTION_TEMPLATE = "sol {solution}|{prompt}"
MISLEADING_TEMPLATE = "ans {misleading_answer}|{prompt}"
MISLEADING_SOLUTION_TEMPLATE = "sol {misleading_solution}|{prompt}"

TEMPLATES = {
    "answer": ANSWER_TEMPLATE,
    "solution": SOLUTION_TEMPLATE,
    "misleading": MISLEADING_TEMPLATE,
    "misleading_solution": MISLEADING_SOLUTION_TEMPLATE,
}

ANSWER_MARK = ">"
_ANSWER_RE = re.compile(r">\s*(\d+)")


def _digits_of(x: int, width: int) -> list[int]:
    """Digits of ``x``, least significant first, zero-padded to ``width``."""
    return [(x // 10**i) % 10 for i in range(width)]


def solve(a: int, b: int, carries: bool = True) -> str:
    """Return the completion text (worked chain of thought + ``>answer``) for ``a+b``.

    With ``carries=False`` the wrong rule is applied: every carry is dropped.
    """
    if a < 0 or b < 0:
        raise ValueError("solve() only handles non-negative integers")
    width = max(len(str(a)), len(str(b)))
    da, db = _digits_of(a, width), _digits_of(b, width)
    steps, out_digits, carry = [], [], 0
    for x, y in zip(da, db):
        c_in = carry if carries else 0
        s = x + y + c_in
        steps.append(f"{x}+{y}+{c_in}={s:02d}")
        out_digits.append(s % 10)
        carry = s // 10
    if carries:
        answer = str(a + b)
    else:
        answer = "".join(str(d) for d in reversed(out_digits))
    return ",".join(steps) + ANSWER_MARK + answer


def _answer_of(solution: str) -> str:
    return solution.rsplit(ANSWER_MARK, 1)[1]


def make_examples(n: int, seed: int = 0, digits: int = 3) -> list[dict]:
    """``n`` distinct ``a+b`` problems with ``digits``-digit operands, deterministic from ``seed``.

    Each dict has string fields ``prompt``, ``solution``, ``answer``, ``misleading_answer``,
    ``misleading_solution`` (plus int fields ``a``, ``b`` and bool ``has_carry``).
    The misleading answer is the no-carry answer when a carry exists (and the misleading
    solution is the no-carry worked solution); otherwise one digit of the answer is changed
    and the misleading solution is the correct chain ending in that wrong answer.
    """
    if digits < 1:
        raise ValueError("digits must be >= 1")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    space = (hi - lo + 1) ** 2
    if n > space:
        raise ValueError(f"only {space} distinct {digits}-digit problems exist, asked for {n}")
    rng = random.Random(f"opd-toy-examples:{seed}:{digits}")
    seen: set[tuple[int, int]] = set()
    out: list[dict] = []
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        solution = solve(a, b)
        answer = str(a + b)
        wrong = solve(a, b, carries=False)
        wrong_answer = _answer_of(wrong)
        has_carry = int(wrong_answer) != a + b
        if has_carry:
            mis_answer, mis_solution = wrong_answer, wrong
        else:
            pos = rng.randrange(len(answer))
            choices = [d for d in "0123456789" if d != answer[pos] and not (pos == 0 and d == "0" and len(answer) > 1)]
            mis_answer = answer[:pos] + rng.choice(choices) + answer[pos + 1 :]
            mis_solution = solution.rsplit(ANSWER_MARK, 1)[0] + ANSWER_MARK + mis_answer
        out.append(
            {
                "prompt": f"{a}+{b}=",
                "solution": solution,
                "answer": answer,
                "misleading_answer": mis_answer,
                "misleading_solution": mis_solution,
                "a": a,
                "b": b,
                "has_carry": has_carry,
            }
        )
    return out


def format_prompt(example: dict, template: str | None = None) -> str:
    """The prompt text of ``example``, optionally inside a context template."""
    if template is None:
        return example["prompt"]
    return template.format(**example)


def _content(x: Any) -> str:
    """Text of a completion/prompt given as a string, a message list, or a message dict."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return _content(x.get("content", ""))
    if isinstance(x, (list, tuple)):
        if not x:
            return ""
        if all(isinstance(m, dict) for m in x):
            # Chat format: use the assistant content (the completion); fall back to all content.
            assistant = [m for m in x if m.get("role", "assistant") == "assistant"]
            return "".join(_content(m) for m in (assistant or x))
        # A list of content parts, e.g. [{"type": "text", "text": ...}] or plain strings.
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in x)
    return str(x)


def parse_answer(completion: Any) -> str | None:
    """Final answer parsed from a completion (the digits after the last ``>``), or None."""
    matches = _ANSWER_RE.findall(_content(completion))
    return matches[-1] if matches else None


def _same_number(x: str | None, y: Any) -> bool:
    if x is None or y is None:
        return False
    y = str(y).strip()
    if x.isdigit() and y.isdigit():
        return int(x) == int(y)
    return x == y


def reward_fn(
    prompts: Sequence[Any] | None, completions: Sequence[Any], answer: Iterable[Any], **kwargs
) -> list[float]:
    """TRL-style reward: 1.0 when the final answer of ``completions[i]`` equals ``answer[i]``."""
    answers = list(answer)
    if len(answers) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
    return [1.0 if _same_number(parse_answer(c), a) else 0.0 for c, a in zip(completions, answers)]
