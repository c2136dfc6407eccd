"""Training objectives as pure functions of per-token log-probs.

Every objective takes `logp` (B, L), the log-probability of each target token under the model
(SFT with a KL pull: the pair `(logp, kl)`), plus the batch's other arrays, and returns
`(loss_sum, weight, aux)`: the loss summed over its
units (tokens for SFT, pairs for preference losses), how many units, and a dict of metric sums.
Sums, not means, make gradient accumulation over micro-batches equal one big batch. The
functions use only operators and `.sum()`, so they run on mlx arrays (autodiff) and on NumPy
arrays alike; each comes with its closed-form dL/d(logp) for backends without autodiff.
"""

from __future__ import annotations

import math


def sft_objective(logp, mask):
    """Negative log-likelihood of the trained tokens: loss = -sum(mask * logp) over `mask.sum()` tokens."""
    return -(logp * mask).sum(), mask.sum(), {}


def sft_grad(logp, mask):
    """d(loss_sum)/d(logp) for `sft_objective`."""
    return -mask


def sft_kl_objective(outputs, mask, beta=0.1):
    """SFT pulled towards the base: `outputs` = (logp, kl), kl[b, t] = KL(p_tuned || p_base) over the
    vocabulary at each position; loss = -sum(mask * logp) + beta * sum(mask * kl) over `mask.sum()`
    tokens. Metric sum "kl": sum(mask * kl) (the report shows its mean per trained token)."""
    logp, kl = outputs
    kl_sum = (kl * mask).sum()
    return -(logp * mask).sum() + beta * kl_sum, mask.sum(), {"kl": kl_sum}


def sft_kl_grad(outputs, mask, beta=0.1):
    """(d(loss_sum)/d(logp), d(loss_sum)/d(kl)) for `sft_kl_objective`."""
    return -mask, beta * mask


# Preference losses. The batch holds B chosen rows then B rejected rows (one forward pass), a
# response mask, and the summed reference log-probs of each response, (B,) each. Every loss
# returns (loss summed over pairs, B, metric sums) and has a closed-form dL/d(logp).


def _xp(a):
    """The array module of `a`: numpy or mlx.core (only functions both have are used)."""
    if type(a).__module__.startswith("numpy"):
        import numpy

        return numpy
    import mlx.core

    return mlx.core


def _log_sigmoid(xp, x):
    return -xp.logaddexp(0.0, -x)


def _sigmoid(xp, x):
    return xp.exp(_log_sigmoid(xp, x))


def _split(logp, mask):
    """Per-response summed log-probs and lengths: (chosen, rejected, len chosen, len rejected)."""
    seq = (logp * mask).sum(axis=1)
    n = mask.sum(axis=1)
    B = seq.shape[0] // 2
    return seq[:B], seq[B:], n[:B], n[B:]


def _pref_metrics(xp, rc, rr, pc, pr):
    """Metric sums over pairs from the implicit rewards (rc, rr) and the policy log-probs."""
    return {
        "rewards_chosen": rc.sum(),
        "rewards_rejected": rr.sum(),
        "margin": (rc - rr).sum(),
        "accuracy": ((rc > rr).astype(xp.float32) + 0.5 * (rc == rr).astype(xp.float32)).sum(),  # ties: half
        "logp_chosen": pc.sum(),
        "logp_rejected": pr.sum(),
    }


def _pairs(xp, mask):
    return xp.array(mask.shape[0] // 2, dtype=xp.float32)


def _spread(xp, mask, g_chosen, g_rejected):
    """dL/d(logp) from dL/d(summed response log-prob): each masked token gets its row's value."""
    return mask * xp.concatenate([g_chosen, g_rejected])[:, None]


def dpo_objective(logp, mask, ref_chosen, ref_rejected, loss_type="sigmoid", beta=0.1, label_smoothing=0.0):
    """DPO family on h = (logp_c - ref_c) - (logp_r - ref_r):
    sigmoid: -(1-ε) log σ(βh) - ε log σ(-βh); ipo: (h - 1/(2β))²; hinge: max(0, 1 - βh)."""
    xp = _xp(logp)
    pc, pr, _, _ = _split(logp, mask)
    h = (pc - ref_chosen) - (pr - ref_rejected)
    if loss_type == "sigmoid":
        z = beta * h
        loss = -(1 - label_smoothing) * _log_sigmoid(xp, z) - label_smoothing * _log_sigmoid(xp, -z)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = xp.maximum(1 - beta * h, 0.0)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    rc, rr = beta * (pc - ref_chosen), beta * (pr - ref_rejected)
    return loss.sum(), _pairs(xp, mask), _pref_metrics(xp, rc, rr, pc, pr)


def dpo_grad(logp, mask, ref_chosen, ref_rejected, loss_type="sigmoid", beta=0.1, label_smoothing=0.0):
    """d(loss_sum)/d(logp) for `dpo_objective`."""
    xp = _xp(logp)
    pc, pr, _, _ = _split(logp, mask)
    h = (pc - ref_chosen) - (pr - ref_rejected)
    if loss_type == "sigmoid":
        z = beta * h
        dh = beta * (-(1 - label_smoothing) * _sigmoid(xp, -z) + label_smoothing * _sigmoid(xp, z))
    elif loss_type == "ipo":
        dh = 2 * (h - 1 / (2 * beta))
    elif loss_type == "hinge":
        dh = -beta * (1 - beta * h > 0)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return _spread(xp, mask, dh, -dh)


def simpo_objective(logp, mask, ref_chosen, ref_rejected, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO (reference-free; the ref arrays are ignored): z = β(logp_c/|c| - logp_r/|r|) - γ,
    loss = -(1-ε) log σ(z) - ε log σ(-z)."""
    xp = _xp(logp)
    pc, pr, nc, nr = _split(logp, mask)
    ac, ar = pc / xp.maximum(nc, 1.0), pr / xp.maximum(nr, 1.0)
    z = beta * (ac - ar) - gamma
    loss = -(1 - label_smoothing) * _log_sigmoid(xp, z) - label_smoothing * _log_sigmoid(xp, -z)
    return loss.sum(), _pairs(xp, mask), _pref_metrics(xp, beta * ac, beta * ar, pc, pr)


def simpo_grad(logp, mask, ref_chosen, ref_rejected, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """d(loss_sum)/d(logp) for `simpo_objective`."""
    xp = _xp(logp)
    pc, pr, nc, nr = _split(logp, mask)
    nc, nr = xp.maximum(nc, 1.0), xp.maximum(nr, 1.0)
    z = beta * (pc / nc - pr / nr) - gamma
    dz = -(1 - label_smoothing) * _sigmoid(xp, -z) + label_smoothing * _sigmoid(xp, z)
    return _spread(xp, mask, beta * dz / nc, -beta * dz / nr)


_ORPO_MAX = -1e-6  # mean log-probs are clamped below 0 so log(1 - p) stays finite


def orpo_objective(logp, mask, ref_chosen, ref_rejected, orpo_lambda=0.1):
    """ORPO (reference-free): with a = mean logp_c, b = mean logp_r,
    loss = -a - λ log σ(log odds(a) - log odds(b)), log odds(x) = x - log(1 - eˣ)."""
    xp = _xp(logp)
    pc, pr, nc, nr = _split(logp, mask)
    a = xp.minimum(pc / xp.maximum(nc, 1.0), _ORPO_MAX)
    b = xp.minimum(pr / xp.maximum(nr, 1.0), _ORPO_MAX)
    u = (a - b) - (xp.log1p(-xp.exp(a)) - xp.log1p(-xp.exp(b)))
    loss = -a - orpo_lambda * _log_sigmoid(xp, u)
    metrics = _pref_metrics(xp, orpo_lambda * a, orpo_lambda * b, pc, pr)
    return loss.sum(), _pairs(xp, mask), metrics


def orpo_grad(logp, mask, ref_chosen, ref_rejected, orpo_lambda=0.1):
    """d(loss_sum)/d(logp) for `orpo_objective` (away from the clamp at mean logp ≈ 0)."""
    xp = _xp(logp)
    pc, pr, nc, nr = _split(logp, mask)
    nc, nr = xp.maximum(nc, 1.0), xp.maximum(nr, 1.0)
    a, b = xp.minimum(pc / nc, _ORPO_MAX), xp.minimum(pr / nr, _ORPO_MAX)
    u = (a - b) - (xp.log1p(-xp.exp(a)) - xp.log1p(-xp.exp(b)))
    du = -orpo_lambda * _sigmoid(xp, -u)
    da = -1 + du / (1 - xp.exp(a))
    db = -du / (1 - xp.exp(b))
    return _spread(xp, mask, da / nc, db / nr)


# Reward model (Bradley-Terry). Here the backend hands the objective one scalar reward per row
# (B chosen rows then B rejected, as for the preference losses), not per-token log-probs.


def bt_objective(rewards, center_coef=0.0):
    """Bradley-Terry: loss = -log σ(r_c - r_r) + λ (r_c + r_r)² per pair; λ = `center_coef` keeps
    rewards centred on 0 (TRL's center_rewards_coefficient; the BT term ignores any shift)."""
    xp = _xp(rewards)
    B = rewards.shape[0] // 2
    rc, rr = rewards[:B], rewards[B:]
    loss = -_log_sigmoid(xp, rc - rr) + center_coef * (rc + rr) ** 2
    metrics = {
        "rewards_chosen": rc.sum(),
        "rewards_rejected": rr.sum(),
        "margin": (rc - rr).sum(),
        "accuracy": ((rc > rr).astype(xp.float32) + 0.5 * (rc == rr).astype(xp.float32)).sum(),
    }
    return loss.sum(), xp.array(B, dtype=xp.float32), metrics


def bt_grad(rewards, center_coef=0.0):
    """d(loss_sum)/d(rewards) for `bt_objective`."""
    xp = _xp(rewards)
    B = rewards.shape[0] // 2
    rc, rr = rewards[:B], rewards[B:]
    d = -_sigmoid(xp, rr - rc)
    c = 2 * center_coef * (rc + rr)
    return xp.concatenate([d + c, -d + c])


# GRPO. The batch holds N completions (prompt + completion rows), a completion mask, one
# advantage per row, and per-token log-probs under the sampling policy (`old_logp`) and the
# reference (`ref_logp`); an empty array means "not needed": old = the current log-probs with
# no gradient (one update per generated batch, ratio 1), ref = no KL term (beta = 0).
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


def _detach(xp, a):
    return xp.stop_gradient(a) if hasattr(xp, "stop_gradient") else a


def _grpo_norm(xp, mask, loss_type, max_completion_length):
    """(per-token scale, weight): loss_sum = sum(scale * per_token_loss), averaged over `weight`.
    grpo: mean per sequence, then over sequences; dr_grpo: sum / (N * max length); dapo: sum over
    the tokens of the whole accumulated batch / their count; bnpo: token mean of each micro-batch."""
    n = mask.sum(axis=1, keepdims=True)
    rows = xp.array(mask.shape[0], dtype=xp.float32)
    if loss_type == "grpo":
        return mask / xp.maximum(n, 1.0), rows
    if loss_type == "dr_grpo":
        return mask / float(max_completion_length), rows
    if loss_type == "dapo":
        return mask, mask.sum()
    if loss_type == "bnpo":
        return mask / xp.maximum(mask.sum(), 1.0), xp.array(1.0, dtype=xp.float32)
    raise ValueError(f"unknown GRPO loss type {loss_type!r}")


def grpo_objective(
    logp, mask, advantages, old_logp, ref_logp,
    loss_type="grpo", epsilon=0.2, epsilon_high=0.2, beta=0.0, max_completion_length=256,
):  # fmt: skip
    """Clipped surrogate: per token -min(ρA, clip(ρ, 1-ε, 1+ε_high)A) + β·k3, ρ = exp(logp - old),
    k3 = exp(ref - logp) - (ref - logp) - 1; normalised per `loss_type` (see _grpo_norm).
    Metric sums (same normalisation): kl, clip_fraction (ρ outside the band on the side that
    clips), entropy (mean -logp of the sampled tokens: an estimate of the policy's entropy)."""
    xp = _xp(logp)
    old = old_logp if old_logp.size else _detach(xp, logp)
    ratio = xp.exp(logp - old)
    adv = advantages[:, None]
    per = -xp.minimum(ratio * adv, xp.clip(ratio, 1 - epsilon, 1 + epsilon_high) * adv)
    scale, weight = _grpo_norm(xp, mask, loss_type, max_completion_length)
    aux = {}
    if beta > 0 and ref_logp.size:
        d = ref_logp - logp
        kl = xp.exp(d) - d - 1
        per = per + beta * kl
        aux["kl"] = (scale * kl).sum()
    clipped = ((ratio < 1 - epsilon) * (adv < 0) + (ratio > 1 + epsilon_high) * (adv > 0)).astype(xp.float32)
    aux["clip_fraction"] = (scale * clipped).sum()
    aux["entropy"] = (scale * -logp).sum()
    return (scale * per).sum(), weight, aux


def grpo_grad(
    logp, mask, advantages, old_logp, ref_logp,
    loss_type="grpo", epsilon=0.2, epsilon_high=0.2, beta=0.0, max_completion_length=256,
):  # fmt: skip
    """d(loss_sum)/d(logp) for `grpo_objective`: -Aρ where the unclipped branch is the minimum
    (ties included), 0 where the clipped one is, plus β(1 - exp(ref - logp)), times the scale."""
    xp = _xp(logp)
    old = old_logp if old_logp.size else logp
    ratio = xp.exp(logp - old)
    adv = advantages[:, None]
    unclipped = ratio * adv <= xp.clip(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    g = -adv * ratio * unclipped
    if beta > 0 and ref_logp.size:
        g = g + beta * (1 - xp.exp(ref_logp - logp))
    scale, _ = _grpo_norm(xp, mask, loss_type, max_completion_length)
    return scale * g


# Distillation (GKD, train/distill.py). Here the backend hands the objective the student's
# log-probs over the vocabulary at each trained position, (N, K): K = V, or the teacher's top-k
# ids gathered (then both distributions are renormalised over those K). `weight` (N,) is the SFT
# mask there, `teacher` (N, K) the teacher's log-probs. The closed forms are d/d(student logits):
# a shift of a row leaves the loss unchanged, so log-probs and logits share the gradient.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _log_softmax(xp, x):
    m = _detach(xp, x.max(axis=-1, keepdims=True))
    return x - m - xp.log(xp.exp(x - m).sum(axis=-1, keepdims=True))


def _distill_parts(xp, student, teacher, divergence, beta, temperature):
    """(log q student, log p teacher, log m mixture or None) at `temperature`, each renormalised."""
    ls, lt = _log_softmax(xp, student / temperature), _log_softmax(xp, teacher / temperature)
    lm = None
    if divergence == "jsd":
        lm = xp.logaddexp(ls + float(math.log1p(-beta)), lt + float(math.log(beta)))
    elif divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}")
    return ls, lt, lm


def distill_objective(student, weight, teacher, divergence="forward_kl", beta=0.5, temperature=1.0):
    """Per trained position, TRL's generalised JSD on temperature-scaled distributions q (student)
    and p (teacher): forward_kl KL(p||q), reverse_kl KL(q||p), jsd β KL(p||m) + (1-β) KL(q||m)
    with m = (1-β) q + β p; summed with `weight` over `weight.sum()` trained tokens."""
    xp = _xp(student)
    ls, lt, lm = _distill_parts(xp, student, teacher, divergence, beta, temperature)
    p, q = xp.exp(lt), xp.exp(ls)
    if divergence == "forward_kl":
        per = (p * (lt - ls)).sum(axis=-1)
    elif divergence == "reverse_kl":
        per = (q * (ls - lt)).sum(axis=-1)
    else:
        per = beta * (p * (lt - lm)).sum(axis=-1) + (1 - beta) * (q * (ls - lm)).sum(axis=-1)
    return (weight * per).sum(), weight.sum(), {}


def distill_grad(student, weight, teacher, divergence="forward_kl", beta=0.5, temperature=1.0):
    """d(loss_sum)/d(student logits) (N, K) for `distill_objective`: forward (q - p)/T; reverse
    q (r - E_q r)/T with r = log q - log p; jsd (1-β) q (r - E_q r)/T with r = log q - log m."""
    xp = _xp(student)
    ls, lt, lm = _distill_parts(xp, student, teacher, divergence, beta, temperature)
    q = xp.exp(ls)
    if divergence == "forward_kl":
        g = q - xp.exp(lt)
    else:
        r = ls - (lt if divergence == "reverse_kl" else lm)
        g = q * (r - (q * r).sum(axis=-1, keepdims=True))
        g = g * (1 - beta) if divergence == "jsd" else g
    return g * (weight / temperature)[:, None]


# Objective -> closed-form dL/d(logp) for backends without autodiff (the NumPy backend): every
# `<name>_objective` above with a `<name>_grad` beside it (sft_kl: a pair, one per output).
GRADS = {
    obj: globals()[name.removesuffix("_objective") + "_grad"]
    for name, obj in list(globals().items())
    if name.endswith("_objective") and callable(obj) and name.removesuffix("_objective") + "_grad" in globals()
}
