"""Step-level search: `step-beam` (beam search over reasoning steps, optionally diverse verifier
tree search) and `tree` (Tree-of-Thoughts, tree.py), scored by a process reward model, the
arithmetic verifier, the steps' log-probs or an outcome reward model.

A step is the text up to and including `SearchConfig.delimiter` (by default a PRM scorer's own
delimiter, else a newline; a PRM scores steps cut at another one wrongly, so that is refused,
E638), or up to the end of turn. A node is a partial solution: its parent, its step's tokens,
the scores of every step of its path and, while it may still be expanded, its KV cache. Its
value aggregates the step scores (min, last or product). A node is finished at end of turn, at
a final-answer line, at `max_tokens` path tokens or at `max_steps` steps.

KV reuse. A node that will be expanded holds its own cache of prompt + path and the logits of its
next token. Expanding a set of nodes copies their caches (copy.deepcopy: a parent's cache stays
valid for its other children) into one batch (batch.generate_from: `expand` rows per node, rows
left-padded where paths differ in length) and decodes every child step together, each row
stopping at the delimiter or end of turn: one batched generation per search step, through the
same sampler and decode loop as every other strategy. The batch cache is then dropped; a child
that is kept for expansion gets a copy of its parent's cache plus a prefill of its own step's
tokens only. So the prompt is prefilled once and each kept step once, and a child never
re-prefills its parent's tokens (`prefilled_tokens` counts it). Deliberate simplification: a kept
step runs through the model twice (decoded, then prefilled into its own cache); slicing per-row
caches out of the decode batch, whose rows are dropped as they finish, would save that prefill.

Ranking. Nodes are ranked by value, equal values by the mean log-prob of their path (the
verifier scores every step with right arithmetic 1.0, and sample order is no reason to prefer
one); a step sampled twice from one parent is one candidate, not two (`distinct`), so copies of
one partial solution never fill several beam slots.

Step scores lie in [0, 1] for the built-in scorers, so one --prune-threshold reads the same way:
- `prm:RUN` (or any object with `score_many(prompt, steps_lists)`): the PRM's score per step prefix;
- `prm+verifier:RUN`: the PRM's score per step prefix times the verifier's check of that step
  (scorers.step_checks), so a step with a slip scores 0 whatever the PRM says;
- `verifier`: the share of right `a op b = c` steps in the step (1 with none); a finished
  solution with no extractable answer scores 0 on its last step;
- `logprob` (default): exp(mean token log-prob of the step), the model's own confidence;
- `rm:RUN`: sigmoid of the reward model's score of the text so far; other scorer specs
  (scorers.py): their score of the text so far, as given.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mlxpt.decode.options import DecodeConfig
from mlxpt.decode.scorers import search_delimiter
from mlxpt.errors import ConfigError


@dataclass
class Node:
    parent: Node | None
    tokens: list[int]  # this step's ids, the delimiter included (the stop token is not)
    logprobs: list[float]
    depth: int  # steps in the path (the root, the bare prompt, has 0)
    length: int  # generated tokens in the path
    subtree: int = 0  # dvts: the independent subtree this node belongs to
    scores: list[float] = field(default_factory=list)  # one per step of the path
    value: float = 1.0  # aggregate of `scores`
    finished: str | None = None  # "stop" (end of turn) | "answer" | "length" | "max-steps"
    state: tuple | None = None  # (cache, next-token logits) while it may be expanded
    pending: int = 0  # tree dfs: children on the stack that still need this node's cache
    stop_token: int | None = None  # the end-of-turn token that finished it (`stop`), if any

    def path(self) -> list[Node]:
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def path_tokens(self) -> list[int]:
        return [t for n in self.path() for t in n.tokens]


def aggregate(scores: Sequence[float], how: str) -> float:
    """A partial solution's value from its step scores: min, last or product (1.0 with none)."""
    if not scores:
        return 1.0
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    return math.prod(scores)


def rank(node: Node) -> tuple[float, float]:
    """A node's sort key, best highest: its value, then on equal values (the verifier's 1.0 for
    every step with right arithmetic) the mean log-prob of its path, so a tie goes to the partial
    solution the model finds likelier rather than to the one sampled first."""
    lps = [x for n in node.path() for x in n.logprobs]
    return node.value, (sum(lps) / len(lps) if lps else 0.0)


def distinct(nodes: list[Node]) -> list[Node]:
    """`nodes` without repeats: a node whose step repeats a kept sibling's tokens (the same partial
    solution, sampled twice) is dropped, so identical copies never fill several beam slots."""
    seen: set = set()
    out = []
    for n in nodes:
        key = (id(n.parent), tuple(n.tokens))
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


def _final_methods(how: str) -> tuple[str, ...]:
    """Extractors that mark a final-answer step (never `last_number`: any step has a number)."""
    return ("tag", "boxed", "hash", "answer") if how in ("auto", "last_number") else (how,)


def make_step_scorer(spec, model, tokenizer, extract_how: str = "auto", delimiter: str | None = None) -> Callable:
    """`score(prompt, nodes, row) -> list[list[float]]`: every step score of each node's path (see
    the module doc for the specs; `spec` may also be a PRM-like object or a scorers.Scorer). Steps
    end at `delimiter` (None: a PRM's own, else a newline; one a PRM was not trained with is E638)."""
    from mlxpt.decode.scorers import Scorer, load_prm, make_scorer, prm_run, step_checks

    def steps_of(node: Node) -> list[str]:
        texts = [tokenizer.decode(n.tokens) for n in node.path()]
        return [t[: -len(delimiter)] if t.endswith(delimiter) else t for t in texts]

    def checks(node: Node, steps: list[str] | None = None) -> list[float]:  # the verifier's, per path step
        return step_checks(steps_of(node) if steps is None else steps, node.finished is not None, extract_how)

    verify = False
    if isinstance(spec, Scorer):  # a built scorer (e.g. `mlxpt eval`'s): its per-step form where there is one
        verify = getattr(spec, "verify_steps", False)
        spec = getattr(spec, "prm", None) or (spec.name if spec.name in ("logprob", "verifier") else spec)
    if prm_run(spec) is not None:
        verify = spec.startswith("prm+verifier:")
        spec = load_prm(prm_run(spec), tokenizer)
    delimiter = search_delimiter(spec, delimiter)
    if hasattr(spec, "score_many"):
        prm = spec

        def by_prm(prompt, nodes, row):
            texts = [steps_of(n) for n in nodes]
            got = _checked_prm(prm.score_many(prompt, texts), [n.depth for n in nodes])
            if not verify:
                return got
            return [
                [a * b for a, b in zip(s, checks(n, t), strict=True)] for s, t, n in zip(got, texts, nodes, strict=True)
            ]

        return by_prm
    if spec in (None, "logprob"):

        def by_logprob(prompt, nodes, row):
            return [
                n.parent.scores + [math.exp(sum(n.logprobs) / len(n.logprobs)) if n.logprobs else 0.0] for n in nodes
            ]

        return by_logprob
    if spec == "verifier":

        def by_verifier(prompt, nodes, row):
            return [n.parent.scores + [checks(n)[-1]] for n in nodes]

        return by_verifier
    scorer = spec if isinstance(spec, Scorer) else make_scorer(spec, model, tokenizer)
    squash = scorer.name.startswith("rm:")

    def by_text(prompt, nodes, row):
        values = scorer(prompt, [tokenizer.decode(n.path_tokens()) for n in nodes], row)
        values = [1 / (1 + math.exp(-max(-60.0, min(60.0, v)))) if squash else v for v in values]
        return [n.parent.scores + [v] for n, v in zip(nodes, values, strict=True)]

    return by_text


def _checked_prm(got, depths: list[int]) -> list[list[float]]:
    """PRM scores, one list per node with one score per step; E629 for a wrong shape."""
    if not isinstance(got, (list, tuple)) or len(got) != len(depths):
        raise ConfigError("E629", f"the PRM gave {len(got) if isinstance(got, (list, tuple)) else got!r} "
                          f"score lists for {len(depths)} partial solutions", "--scorer prm:",
                          "check the PRM run (score_many must return one list per solution)")  # fmt: skip
    out = []
    for scores, d in zip(got, depths, strict=True):
        scores = [float(s) for s in scores]
        if len(scores) != d:
            raise ConfigError("E629", f"the PRM gave {len(scores)} step scores for {d} steps", "--scorer prm:",
                              "check the PRM run (one score per step prefix)")  # fmt: skip
        out.append([s if math.isfinite(s) else 0.0 for s in scores])
    return out


class Search:
    """The shared machinery of step-beam and tree: nodes, their caches, one batched expansion per
    call, scoring, limits and counters."""

    def __init__(self, model, tokenizer, prompt_tokens: Sequence[int], cfg: DecodeConfig, ctx):
        from mlxpt import _blas

        _blas.activate()
        from mlxpt.decode.batch import GroupStats, _check, _prefill
        from mlxpt.decode.generate import add_stop_tokens
        from mlxpt.decode.sampling import processors_from, sampler_from

        _check(1, cfg.max_tokens, prompt_tokens)
        self.t0 = time.perf_counter()
        self.model, self.tok, self.cfg, self.ctx, self.s = model, add_stop_tokens(tokenizer), cfg, ctx, cfg.search
        self.prompt = list(prompt_tokens)
        s = cfg.sampling_settings()
        self.sampler, self.processors = sampler_from(s), processors_from(s)
        self.delimiter = search_delimiter(cfg.scorer, self.s.delimiter)  # a PRM scorer's own by default
        self.score = make_step_scorer(cfg.scorer, model, self.tok, cfg.extract, self.delimiter)
        self.width = self.s.beam_width or cfg.n
        self.stats = GroupStats()
        self.prefilled, self.nodes, self.pruned, self.backtracks = len(self.prompt), 0, 0, 0
        self.stopped_by: str | None = None
        self.seen: list[Node] = []  # every scored node, in creation order
        self.root = Node(None, [], [], 0, 0, state=_prefill(model, self.prompt))

    @property
    def generated(self) -> int:
        return self.stats.generated_tokens

    def limit(self) -> str | None:
        """The hard limit (or cancellation) that stops the search now, if any."""
        s = self.s
        if self.ctx is not None and self.ctx.cancelled is not None and self.ctx.cancelled():
            return "cancelled"
        if self.nodes >= s.max_nodes:
            return "max-nodes"
        if s.max_search_tokens is not None and self.generated >= s.max_search_tokens:
            return "max-search-tokens"
        if s.max_seconds is not None and time.perf_counter() - self.t0 >= s.max_seconds:
            return "max-seconds"
        return None

    def prepare(self, node: Node) -> None:
        """Give `node` its cache: a copy of its parent's plus a prefill of its own step's tokens."""
        import mlx.core as mx

        cache = copy.deepcopy(node.parent.state[0])
        logits = self.model(mx.array(node.tokens)[None], cache=cache)[:, -1, :]
        mx.eval(logits, [c.state for c in cache])
        node.state = (cache, logits)
        self.prefilled += len(node.tokens)

    def expand(self, parents: list[Node], k: int, subtrees: Sequence[int] | None = None) -> list[Node]:
        """`k` sampled next steps of every parent in one batched generation, scored; the node,
        token and time limits cap the batch (rows beyond them are not drawn)."""
        from mlxpt.decode.batch import generate_from

        room = self.s.max_nodes - self.nodes
        if self.s.max_search_tokens is not None:  # every row draws at least one token
            room = min(room, self.s.max_search_tokens - self.generated)
        if room < len(parents) * k:
            parents = parents[: max(1, room // k)]
            k = min(k, room)
        for p in parents:
            if p.state is None:
                self.prepare(p)
        rows = len(parents) * k
        limits = [max(0, self.cfg.max_tokens - p.length) for p in parents]
        if self.s.max_search_tokens is not None:  # the last expansion shares what the budget has left
            share = max(1, (self.s.max_search_tokens - self.generated) // rows)
            limits = [min(m, share) for m in limits]
        states = [(copy.deepcopy(p.state[0]), p.state[1], self.prompt + p.path_tokens()) for p in parents]
        groups = generate_from(
            self.model, self.tok, states, k, limits, self.sampler, (self.delimiter,), self.processors, self.stats
        )
        children = []
        finals = _final_methods(self.cfg.extract)
        for i, (p, group) in enumerate(zip(parents, groups, strict=True)):
            if self.ctx is not None and self.ctx.on_samples is not None:
                self.ctx.on_samples(group)
            for j, c in enumerate(group):
                node = Node(p, list(c.tokens), list(c.logprobs), p.depth + 1, p.length + len(c.tokens))
                node.stop_token = c.stop_token
                node.subtree = subtrees[i * k + j] if subtrees is not None else p.subtree
                node.finished = self._finish(node, c, finals)
                children.append(node)
        self.nodes += len(children)
        for node, scores in zip(children, self.score(self.ctx.prompt, children, self.ctx.row), strict=True):
            node.scores = scores
            node.value = aggregate(scores, self.s.aggregate)
        self.seen += children
        return children

    def _finish(self, node: Node, c, finals: tuple[str, ...]) -> str | None:
        from mlxpt.rewards.extract import extract

        if c.stop_token is not None:
            return "stop"
        if node.length >= self.cfg.max_tokens:
            return "length"
        text = self.tok.decode(node.tokens)
        if any(extract(text, how) is not None for how in finals):
            return "answer"
        if c.finish_reason == "length":  # cut by the search's token budget: an incomplete step
            return None
        if node.depth >= self.s.max_steps:
            return "max-steps"
        return None

    def keep(self, nodes: list[Node]) -> list[Node]:
        """`nodes` at or above the prune threshold (the rest are counted as pruned)."""
        t = self.s.prune_threshold
        if t is None:
            return nodes
        kept = [n for n in nodes if n.value >= t]
        self.pruned += len(nodes) - len(kept)
        return kept

    def result(self, strategy: str, solutions: list[Node]) -> dict:
        """The StrategyResult's fields (strategies.py builds it): the best finished solution (or,
        with none, the best of the deepest nodes seen)."""
        from mlxpt.rewards.extract import extract

        pool = solutions or [n for n in self.seen if n.depth == max((m.depth for m in self.seen), default=0)]
        if not pool:
            pool = [self.root]
        best = max(range(len(pool)), key=lambda i: (*rank(pool[i]), -i))
        texts = [self.tok.decode(n.path_tokens()) for n in pool]
        answers = [extract(t, self.cfg.extract) for t in texts]
        if self.stopped_by is None:
            if any(n.finished == "max-steps" for n in pool):
                self.stopped_by = "max-steps"
            else:
                self.stopped_by = "solution" if solutions else "exhausted"
        search = {
            "nodes": self.nodes, "pruned": self.pruned, "backtracks": self.backtracks, "solutions": len(solutions),
            "depth": max((n.depth for n in self.seen), default=0), "stopped_by": self.stopped_by,
            "steps": [self.tok.decode(n.tokens) for n in pool[best].path()],
            "step_scores": pool[best].scores,
        }  # fmt: skip
        return dict(
            text=texts[best], samples=texts, scores=[n.value for n in pool], votes=None, answer=answers[best],
            n_used=len(pool), generated_tokens=self.generated, seconds=time.perf_counter() - self.t0,
            strategy=strategy, answers=answers, finish_reasons=[n.finished or "incomplete" for n in pool],
            prefilled_tokens=self.prefilled, stopped_by=self.stopped_by, search=search,
            sample_tokens=[n.path_tokens() + ([n.stop_token] if n.stop_token is not None else []) for n in pool],
        )  # fmt: skip


def step_beam(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx) -> dict:
    """StrategyResult fields of beam search over steps: `width` partial solutions, each expanded with `expand` sampled
    steps; the best `width` (dvts: the best one of each of `width` subtrees) go on. The root
    draws width x expand first steps. A finished child takes one of its group's slots for good."""
    S = Search(model, tokenizer, prompt_tokens, cfg, ctx)
    W, M = S.width, S.s.expand
    slots = {i: 1 for i in range(W)} if S.s.dvts else {0: W}
    first = [i // M for i in range(W * M)] if S.s.dvts else None
    beams, solutions = [S.root], []
    while beams:
        S.stopped_by = S.limit()
        if S.stopped_by:
            break
        children = S.expand(beams, W * M if beams[0] is S.root else M, first if beams[0] is S.root else None)
        parents, beams = beams, []
        for g, room in slots.items():
            group = distinct(sorted(S.keep([c for c in children if c.subtree == g]), key=rank, reverse=True))[:room]
            solutions += [n for n in group if n.finished]
            slots[g] = room - sum(1 for n in group if n.finished)
            beams += [n for n in group if not n.finished]
        for b in beams:
            S.prepare(b)
        for p in parents:
            p.state = None  # a beam is expanded once; its kept children now hold their own caches
    return S.result(cfg.strategy, solutions)
