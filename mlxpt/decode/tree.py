"""Tree-of-Thoughts search over steps (Yao et al., 2023) on the machinery of step_search.py:
nodes, KV-cache reuse, one batched generation per expansion, the same scorers and limits.

- `bfs`: level by level; every node of the frontier is expanded with `expand` sampled steps in one
  batch, children valued below `prune_threshold` are dropped and the best `beam_width` are kept:
  the finished ones are solutions, the rest form the next level. Stops once `beam_width`
  solutions are found or the frontier is empty.
- `dfs`: best child first, depth first; children below the threshold are pruned, and a node with
  no child left sends the search back to the best unexplored sibling or ancestor's sibling
  (backtracking, counted). Stops at the first finished solution valued at or above the threshold.

Both stop at the hard limits (`max_nodes` steps sampled, `max_search_tokens` generated,
`max_seconds`), and the result says which one stopped it (`stopped_by`).
Simplification: values come from the scorers only (no separate "vote on states" prompt).
"""

from __future__ import annotations

from mlxpt.decode.options import DecodeConfig
from mlxpt.decode.step_search import Search, distinct, rank


def tree_search(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx) -> dict:
    """Tree-of-Thoughts search (see the module doc): the StrategyResult's fields."""
    S = Search(model, tokenizer, prompt_tokens, cfg, ctx)
    solutions = _dfs(S) if S.s.tree_search == "dfs" else _bfs(S)
    return S.result(cfg.strategy, solutions)


def _bfs(S: Search) -> list:
    frontier, solutions = [S.root], []
    while frontier and len(solutions) < S.width:
        S.stopped_by = S.limit()
        if S.stopped_by:
            break
        kept = distinct(sorted(S.keep(S.expand(frontier, S.s.expand)), key=rank, reverse=True))[: S.width]
        solutions += [n for n in kept if n.finished]
        parents, frontier = frontier, [n for n in kept if not n.finished]
        for n in frontier:
            S.prepare(n)
        for p in parents:
            p.state = None  # expanded once; the kept children hold their own caches
    return solutions


def _dfs(S: Search) -> list:
    stack, solutions = [S.root], []
    while stack:
        S.stopped_by = S.limit()
        if S.stopped_by:
            break
        node = stack.pop()
        if node.parent is not None:
            S.prepare(node)
            node.parent.pending -= 1
            if node.parent.pending == 0:
                node.parent.state = None  # every child of it has its own cache now
        children = sorted(S.keep(S.expand([node], S.s.expand)), key=rank)  # best last
        done = [n for n in children if n.finished]
        if done:
            solutions.append(done[-1])
            S.stopped_by = "solution"
            break
        if not children:
            S.backtracks += 1
            node.state = None
            continue
        node.pending = len(children)
        stack += children
    return solutions
