"""The demo's teacher configurations and rollout settings (shared by the training-free diagnostic, the training runs
and ``benchmarks/bench_robustness.py``)."""

from __future__ import annotations

from typing import Any

#: The teachers of the training runs: run name -> (teacher attribute of the lab, configuration name in the demo).
TEACHERS = {"strong": ("strong_teacher", "strong-teacher"), "wrong": ("wrong_teacher", "wrong-teacher"),
            "hard-wrong": ("hard_wrong_teacher", "hard-wrong-teacher")}


def demo_configs(lab: Any) -> list:
    """The six teacher configurations the demo scores side by side on ``lab`` (all reverse KL): the strong, wrong and
    hard wrong teachers, and the student given the answer, the worked solution or a misleading answer."""
    import opd_callback as oc
    from opd_callback import toy

    return [
        oc.TeacherConfig("strong-teacher", oc.ExternalTeacher(lab.strong_teacher), divergence="reverse_kl"),
        oc.TeacherConfig("wrong-teacher", oc.ExternalTeacher(lab.wrong_teacher), divergence="reverse_kl"),
        oc.TeacherConfig("hard-wrong-teacher", oc.ExternalTeacher(lab.hard_wrong_teacher), divergence="reverse_kl"),
        oc.TeacherConfig("self+answer", oc.ContextTeacher(toy.ANSWER_TEMPLATE), divergence="reverse_kl"),
        oc.TeacherConfig("self+solution", oc.ContextTeacher(toy.SOLUTION_TEMPLATE), divergence="reverse_kl"),
        oc.TeacherConfig("self+misleading", oc.ContextTeacher(toy.MISLEADING_TEMPLATE), divergence="reverse_kl"),
    ]


def demo_settings(seed: int = 0, quick: bool = False, node_selection: str = "entropy"):
    """The demo's settings. Nodes at the highest-entropy positions of each rollout (the student's forking tokens):
    on five toy labs they separate good from bad teachers with far fewer nodes than depth windows
    (benchmarks/bench_robustness.py)."""
    import opd_callback as oc

    return oc.RolloutSettings(
        num_rollouts=4 if not quick else 2,
        max_new_tokens=48,
        node_selection=node_selection,
        nodes_per_window=2,
        max_nodes_per_rollout=10,
        top_k=4,
        teacher_top_k=2,
        rollouts_per_branch=8 if not quick else 4,
        batch_size=256,
        seed=seed,
    )


def training_settings(seed: int = 0, quick: bool = False):
    """The callback's settings in the demo's training runs: a smaller diagnostic than the training-free one, nodes at
    the forking tokens, where the stakes are (benchmarks/bench_robustness.py)."""
    import opd_callback as oc

    return oc.RolloutSettings(
        num_rollouts=2,
        max_new_tokens=48,
        node_selection="entropy",
        nodes_per_window=1,
        max_nodes_per_rollout=6,
        top_k=3,
        teacher_top_k=1,
        rollouts_per_branch=4 if quick else 6,
        batch_size=256,
        seed=seed,
    )
