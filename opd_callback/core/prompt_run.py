"""One prompt's run through the estimator: base rollouts, their rewards, nodes, candidate tokens, targeted rollouts
(uniform or adaptive), node scores and records.

A :class:`PromptRun` holds the state of that work; each step is a method, called in a fixed order by
:meth:`PromptRun.execute`. Randomness comes from two streams seeded from ``(settings.seed, prompt index)``
(:func:`random_streams`): a ``torch.Generator`` for sampling tokens and a numpy generator for node selection and the
adaptive allocation's Monte Carlo draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from opd_callback.core.alignment import NodeScore, ScoringOptions, entropy
from opd_callback.core.allocation import SATURATION_MIN_SAMPLES, NodeErrorModel, SaturatedNodeModel, greedy_allocation
from opd_callback.core.nodes import select_nodes, window_index
from opd_callback.report.records import make_record, make_rollout_record
from opd_callback.rollout import next_token_logits

if TYPE_CHECKING:
    from opd_callback.core.engine import AlignmentEngine

__all__ = ["PreparedPrompt", "PromptRun", "random_streams"]

Node = tuple[int, int]  # (base rollout index, completion position)
Slot = tuple[Node, int]  # (node, index of a candidate token at that node)
Request = tuple[Slot, int]  # (slot, continuations to sample)

# the per-configuration columns of a record, read from a ConfigScore of the same names
_CONFIG_COLUMNS = ("alignment", "inner", "teacher_advantage", "kl_reverse", "kl_forward", "js", "teacher_entropy",
                   "degenerate", "g_norm", "d_norm")


@dataclass
class PreparedPrompt:
    """A validated, tokenized example: its index, the row, its prompt (text or messages), the student's prompt ids, each
    configuration's teacher prompt ids, and the other columns (passed to the reward function)."""

    index: int
    example: dict
    prompt: Any
    prompt_ids: list[int]
    teacher_prompt_ids: list[list[int]]
    columns: dict = field(default_factory=dict)


def random_streams(seed: int, index: int, device: Any) -> tuple[torch.Generator, np.random.Generator]:
    """The two random streams of prompt ``index``: a ``torch.Generator`` on ``device`` (token sampling) and a numpy
    generator (node selection, adaptive allocation), both seeded from ``(seed, index)`` only."""
    mixed = (int(seed) * 1_000_003 + int(index) * 7919 + 17) % (2**63 - 1)
    gen = torch.Generator(device=device if isinstance(device, torch.device) else torch.device(device))
    gen.manual_seed(mixed)
    return gen, np.random.default_rng([int(seed), int(index)])


@dataclass
class _Outcomes:
    """Rewards seen so far: their sum and count per slot, and per node the lowest and highest (saturation)."""

    sums: dict[Slot, float] = field(default_factory=dict)
    counts: dict[Slot, int] = field(default_factory=dict)
    lowest: dict[Node, float] = field(default_factory=dict)
    highest: dict[Node, float] = field(default_factory=dict)

    def add(self, slot: Slot, reward: float) -> None:
        self.sums[slot] = self.sums.get(slot, 0.0) + reward
        self.counts[slot] = self.counts.get(slot, 0) + 1
        node = slot[0]
        self.lowest[node] = min(self.lowest.get(node, reward), reward)
        self.highest[node] = max(self.highest.get(node, reward), reward)

    def saturated(self, node: Node) -> bool:
        """Every outcome seen at ``node`` is the same."""
        return self.lowest.get(node) == self.highest.get(node)

    def success(self, node: Node, n_candidates: int) -> list[float]:
        """Mean reward per candidate so far (0 where none was sampled)."""
        return [self.sums.get((node, s), 0.0) / max(self.counts.get((node, s), 0), 1) for s in range(n_candidates)]

    def sample_counts(self, node: Node, n_candidates: int) -> list[int]:
        """Rewards seen per candidate."""
        return [self.counts.get((node, s), 0) for s in range(n_candidates)]


class PromptRun:
    """All work for one prepared prompt of an :class:`~opd_callback.core.engine.AlignmentEngine`.

    :meth:`execute` runs the steps in order and returns ``(records, rollouts, stats)``.
    """

    def __init__(self, engine: AlignmentEngine, prep: PreparedPrompt) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.prep = prep
        self.generator, self.rng = engine._generator(prep.index)
        self.prompt_len = len(prep.prompt_ids)
        self.scoring = ScoringOptions(
            divergences=[c.divergence for c in engine.configs],
            temperature=self.settings.temperature,
            teacher_temperatures=[c.temperature for c in engine.configs],
            betas=[c.beta for c in engine.configs],
            top_ks=[c.top_k for c in engine.configs],
            tail=self.settings.tail,
            eps=self.settings.degenerate_eps,
        )
        self.completions: list[list[int]] = []  # base rollouts (completion token ids)
        self.rewards: list[float] = []  # their rewards
        self.sequences: list[list[int]] = []  # prompt + completion ids
        self.nodes: list[Node] = []
        self.positions_of: dict[int, list[int]] = {}  # base rollout -> its node positions
        self.student_logits: dict[Node, torch.Tensor] = {}
        self.teacher_logits: list[dict[Node, torch.Tensor]] = []  # per configuration
        self.candidates: dict[Node, list[int]] = {}
        self.live: list[Slot] = []  # candidates that need continuations
        self.terminal: list[Slot] = []  # EOS forced or completion limit reached: exact reward
        self.outcomes = _Outcomes()
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------------- the run
    def execute(self) -> tuple[list[dict], list[dict], dict]:
        """Run every step; returns ``(records, rollouts, stats)``."""
        self.sample_base_rollouts()
        rollouts = self.rollout_records()
        self.choose_nodes()
        self.stats = {"rollouts": self.settings.num_rollouts, "nodes": len(self.nodes), "continuations": 0,
                      "tokens": sum(len(c) for c in self.completions)}
        if not self.nodes:
            return [], rollouts, self.stats
        self.compute_student_logits()
        self.compute_teacher_logits()
        self.choose_candidates()
        self.record_exact_rewards()
        if self.settings.adaptive:
            self.adaptive_rounds()
        else:
            self.sample_continuations([(slot, self.settings.rollouts_per_branch) for slot in self.live])
        return self.node_records(), rollouts, self.stats

    # ------------------------------------------------------------------------------------------------------- steps
    def sample_base_rollouts(self) -> None:
        """Sample ``num_rollouts`` completions of the prompt from the student and score them."""
        n, length = self.settings.num_rollouts, self.settings.max_new_tokens
        prompt_ids = self.prep.prompt_ids
        self.completions = self.engine.backend.sample([prompt_ids] * n, [length] * n, self.generator)
        self.rewards = self.engine.score(self.prep, self.completions)
        self.sequences = [prompt_ids + list(c) for c in self.completions]

    def rollout_records(self) -> list[dict]:
        """One row of the rollouts table per base rollout."""
        prep, threshold = self.prep, self.settings.correct_threshold
        return [
            make_rollout_record(
                prompt_index=prep.index,
                rollout_index=r,
                prompt=prep.prompt if isinstance(prep.prompt, str) else repr(prep.prompt),
                completion=self.engine.tokenizer.decode(completion, skip_special_tokens=True),
                completion_ids=list(completion),
                reward=self.rewards[r],
                correct=bool(self.rewards[r] >= threshold),
            )
            for r, completion in enumerate(self.completions)
        ]

    def choose_nodes(self) -> None:
        """Nodes on every base rollout (:func:`~opd_callback.core.nodes.select_nodes`)."""
        if self.settings.node_selection == "entropy":
            entropies: Sequence[list[float] | None] = self._student_entropies()
        else:
            entropies = [None] * len(self.completions)
        for r, (completion, ent) in enumerate(zip(self.completions, entropies)):
            self.nodes.extend((r, t) for t in select_nodes(len(completion), self.settings, self.rng, ent))
        for r, t in self.nodes:
            self.positions_of.setdefault(r, []).append(t)

    def _student_entropies(self) -> list[list[float]]:
        """The student's entropy (at the sampling temperature) at every position of every base rollout."""
        positions = [[self.prompt_len + t for t in range(len(c))] for c in self.completions]
        logits = self.engine.backend.logits(self.sequences, positions)
        out = []
        for rows in logits:
            out.append(entropy(torch.log_softmax(rows.double() / self.settings.temperature, -1)).tolist())
        return out

    def _by_node(self, per_rollout: Sequence[Sequence[torch.Tensor]]) -> dict[Node, torch.Tensor]:
        """Logit rows given per scored rollout (in rollout order, one per node position) keyed by node."""
        out = {}
        for r, rows in zip(sorted(self.positions_of), per_rollout):
            for t, row in zip(self.positions_of[r], rows):
                out[(r, t)] = row
        return out

    def compute_student_logits(self) -> None:
        """The student's logits at every node."""
        rollouts = sorted(self.positions_of)
        logits = self.engine.backend.logits(
            [self.sequences[r] for r in rollouts],
            [[self.prompt_len + t for t in self.positions_of[r]] for r in rollouts],
        )
        self.student_logits = self._by_node(logits)

    def compute_teacher_logits(self) -> None:
        """Each configuration's teacher logits at every node (shared between configurations with the same model and
        the same teacher prompt)."""
        engine = self.engine
        rollouts = sorted(self.positions_of)
        cache: dict[tuple[int, tuple[int, ...]], dict[Node, torch.Tensor]] = {}
        for c, teacher_prompt in zip(engine.configs, self.prep.teacher_prompt_ids):
            model = engine.teacher_model(c)
            key = (id(model), tuple(teacher_prompt))
            if key not in cache:
                logits = next_token_logits(
                    model,
                    [teacher_prompt + list(self.completions[r]) for r in rollouts],
                    [[len(teacher_prompt) + t for t in self.positions_of[r]] for r in rollouts],
                    pad_id=engine.pad_id,
                    batch_size=self.settings.batch_size,
                )
                cache[key] = self._by_node(logits)
            self.teacher_logits.append(cache[key])

    def _candidate_tokens(self, node: Node) -> list[int]:
        """The student's top-k at ``node``, then each teacher's top-k, then the sampled token (distinct, in order)."""
        st, vocab = self.settings, self.engine.vocab
        ids: list[int] = []
        tops = [torch.topk(self.student_logits[node], k=min(st.top_k, vocab)).indices.tolist()]
        if st.teacher_top_k > 0:
            tops += [torch.topk(zt[node], k=min(st.teacher_top_k, vocab)).indices.tolist()
                     for zt in self.teacher_logits]
        for j in [j for top in tops for j in top] + [self._sampled_token(node)]:
            if j not in ids:
                ids.append(int(j))
        return ids

    def _sampled_token(self, node: Node) -> int:
        r, t = node
        return int(self.completions[r][t])

    def choose_candidates(self) -> None:
        """Candidate tokens per node; each candidate is live (needs continuations) or terminal (EOS, or the
        completion limit reached: its reward is exact)."""
        eos = set(self.engine.eos_ids)
        last = self.settings.max_new_tokens
        for node in self.nodes:
            ids = self._candidate_tokens(node)
            self.candidates[node] = ids
            for slot, j in enumerate(ids):
                (self.terminal if (j in eos or node[1] + 1 >= last) else self.live).append((node, slot))

    def record_exact_rewards(self) -> None:
        """Rewards known without sampling: terminal candidates (scored once), and the base rollout as a free sample
        of its own token (``reuse_base_rollout``)."""
        if self.terminal:
            done = [list(self.completions[r][:t]) + [self.candidates[(r, t)][s]] for (r, t), s in self.terminal]
            for slot, reward in zip(self.terminal, self.engine.score(self.prep, done)):
                self.outcomes.add(slot, reward)
        if self.settings.reuse_base_rollout:
            for node in self.nodes:
                slot = (node, self.candidates[node].index(self._sampled_token(node)))
                if slot in self.outcomes.counts:
                    continue  # terminal: already exact
                self.outcomes.add(slot, self.rewards[node[0]])

    def sample_continuations(self, requests: list[Request]) -> None:
        """Sample ``n`` continuations for each ``(slot, n)`` request and score them in one batched pass."""
        owners = [slot for slot, n in requests for _ in range(n)]
        last = self.settings.max_new_tokens
        branches = [(r, self.prompt_len + t, self.candidates[(r, t)][s], last - (t + 1)) for (r, t), s in owners]
        continuations = self._sample_branches(branches)
        self.stats["continuations"] += len(continuations)
        self.stats["tokens"] += sum(len(c) for c in continuations)
        full = [list(self.completions[r][:t]) + [self.candidates[(r, t)][s]] + list(c)
                for ((r, t), s), c in zip(owners, continuations)]
        for slot, reward in zip(owners, self.engine.score(self.prep, full) if full else []):
            self.outcomes.add(slot, reward)

    def _sample_branches(self, branches: list[tuple[int, int, int, int]]) -> list[list[int]]:
        """Every branch's continuation (shared-prefix KV reuse unless ``settings.prefix_cache`` is off)."""
        if not branches:
            return []
        backend = self.engine.backend
        if self.settings.prefix_cache:
            return backend.sample_branches(self.sequences, branches, self.generator)
        prefixes = [list(self.sequences[b][:length]) + [int(j)] for b, length, j, _ in branches]
        return backend.sample(prefixes, [m for _, _, _, m in branches], self.generator)

    # ------------------------------------------------------------------------------------------------------- adaptive
    def adaptive_rounds(self) -> None:
        """Adaptive allocation of the prompt's continuation budget (``RolloutSettings(adaptive=True)``).

        Round 1 gives every live candidate ``max(adaptive_initial, rollouts_per_branch / 4)`` continuations. The rest
        of the prompt's budget (pooled over its nodes) is spent in two more rounds, half and then the rest, by
        :func:`~opd_callback.core.allocation.greedy_allocation`, which minimises the sum over nodes of the predicted
        alignment error (``allocation.py`` explains the error models). A node whose outcomes so far are all equal is
        *saturated*: it stops once each of its candidates has ``max(SATURATION_MIN_SAMPLES, rollouts_per_branch / 2)``
        continuations (8 at least, half the uniform share); before that it competes for continuations by its chance
        of breaking the tie, up to its nominal budget. Any other node gets at most 4x its nominal budget.
        """
        st = self.settings
        first = min(max(st.adaptive_initial, math.ceil(st.rollouts_per_branch / 4)), st.rollouts_per_branch)
        self.sample_continuations([(slot, first) for slot in self.live])
        live_slots: dict[Node, list[int]] = {}
        for node, s in self.live:
            live_slots.setdefault(node, []).append(s)
        nominal = {node: st.budget if st.budget is not None else st.rollouts_per_branch * len(slots)
                   for node, slots in live_slots.items()}
        remaining = sum(nominal.values()) - first * len(self.live)
        eps = self.rng.standard_normal((256, max(len(c) for c in self.candidates.values())))
        # a saturated node stops once each candidate has this many continuations (at least half the uniform share:
        # success rates around 0.1 are common, and 8 failures in a row are then not rare)
        stop_at = max(SATURATION_MIN_SAMPLES, math.ceil(st.rollouts_per_branch / 2))
        for round_index in range(2):
            spend = remaining // 2 if round_index == 0 else remaining
            competing = []
            for node, slots in live_slots.items():
                entry = self._allocation_model(node, slots, nominal[node], stop_at, eps)
                if entry is not None:
                    competing.append((node, *entry))
            if spend <= 0 or not competing:
                break
            extra = greedy_allocation(spend, [m for _, m, _ in competing], [room for _, _, room in competing])
            requests = [((node, s), int(x)) for (node, _, _), xs in zip(competing, extra) for s, x in enumerate(xs)
                        if x > 0]
            self.sample_continuations(requests)
            remaining -= sum(x for _, x in requests)

    def _allocation_model(
        self, node: Node, slots: list[int], nominal: int, stop_at: int, eps: np.ndarray
    ) -> tuple[NodeErrorModel | SaturatedNodeModel, int] | None:
        """``(error model, room)`` of a node competing for more continuations, or ``None`` when it stops."""
        n = np.array(self.outcomes.sample_counts(node, len(self.candidates[node])), dtype=np.float64)
        spent = int(sum(n[s] for s in slots))
        if self.outcomes.saturated(node):
            if min(n[s] for s in slots) >= stop_at or nominal - spent <= 0:
                return None  # enough evidence (or its nominal share is spent): stop
            sigma = np.zeros(len(n))
            sigma[slots] = 1.0
            return SaturatedNodeModel(sigma=sigma, n=n), nominal - spent
        room = 4 * nominal - spent
        if room <= 0:
            return None
        return self._error_model(node, slots, n, eps), room

    def _error_model(self, node: Node, slots: list[int], n: np.ndarray, eps: np.ndarray) -> NodeErrorModel:
        """The predicted alignment error of a non-saturated node as a function of its candidates' sample counts."""
        ids = self.candidates[node]
        ns = self.node_score(node)
        cand_t = torch.as_tensor(ids, dtype=torch.long)
        p = self._candidate_probs(node)
        renormalize = self.settings.tail == "renormalize"
        q = (p / p.sum()) if renormalize else p
        d = torch.stack([c.d.to(torch.float64).reshape(-1) for c in ns.configs])
        s_sum = np.array([self.outcomes.sums.get((node, s), 0.0) for s in range(len(ids))])
        m = (s_sum + 0.5) / (n + 1.0)
        sigma = np.zeros(len(ids))
        sigma[slots] = np.sqrt(m[slots] * (1.0 - m[slots]))
        return NodeErrorModel(
            q=q.numpy(),
            d=(d if renormalize else d[:, cand_t]).numpy(),
            d_norm=d.norm(dim=1).numpy(),
            s_hat=s_sum / np.maximum(n, 1.0),
            sigma=sigma,
            n=n,
            eps=eps,
        )

    # ------------------------------------------------------------------------------------------------------- scores
    def _candidate_probs(self, node: Node) -> torch.Tensor:
        """The student's sampling probabilities of ``node``'s candidates (float64)."""
        cand_t = torch.as_tensor(self.candidates[node], dtype=torch.long)
        return torch.softmax(self.student_logits[node].double() / self.settings.temperature, -1)[cand_t]

    def node_score(self, node: Node) -> NodeScore:
        """Every configuration's score at ``node`` from the rewards seen so far."""
        ids = self.candidates[node]
        return self.scoring.score(
            self.student_logits[node],
            [zt[node] for zt in self.teacher_logits],
            torch.as_tensor(ids, dtype=torch.long),
            torch.as_tensor(self.outcomes.success(node, len(ids)), dtype=torch.float64),
            self._sampled_token(node),
        )

    def node_records(self) -> list[dict]:
        """One record per (node, configuration), in node order (parameter-space scores with ``space="params"``)."""
        params = self.settings.space == "params"
        records: list[dict] = []
        for node in self.nodes:
            r, t = node
            ns = self.node_score(node)
            if params:
                ns = self.engine.param_scorer().rescore(ns, self.prep.prompt_ids + list(self.completions[r]),
                                                        self.prompt_len + t)
            node_fields = self._node_fields(node, ns)
            for c, cs in zip(self.engine.configs, ns.configs):
                config_fields = {k: getattr(cs, k) for k in _CONFIG_COLUMNS}
                if params:
                    config_fields["alignment_logits"] = cs.alignment_logits
                records.append(make_record(**node_fields, config=c.name, **config_fields))
        return records

    def _node_fields(self, node: Node, ns: NodeScore) -> dict:
        """The columns of a record that every configuration at ``node`` shares."""
        r, t = node
        ids = self.candidates[node]
        y_t = self._sampled_token(node)
        reward = self.rewards[r]
        return dict(
            prompt_index=self.prep.index,
            rollout_index=r,
            position=t,
            token_id=y_t,
            token=self.engine.tokenizer.decode([y_t]),
            rollout_reward=reward,
            rollout_correct=bool(reward >= self.settings.correct_threshold),
            window=window_index(t),
            student_entropy=ns.student_entropy,
            covered_mass=ns.covered_mass,
            value=ns.value,
            candidate_ids=list(ids),
            candidate_probs=self._candidate_probs(node).tolist(),
            candidate_success=self.outcomes.success(node, len(ids)),
            candidate_rollouts=self.outcomes.sample_counts(node, len(ids)),
        )
