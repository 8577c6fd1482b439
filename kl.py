"""The math of "RL's Razor" (Shenfeld, Pari, Agrawal, 2025, arXiv 2509.04259) in one place.

Every training loop in this project (parity_mnist.py, llm_finetune.py, vla_finetune.py) takes its
divergences, losses and the forgetting-law fit from here. Nothing in this file knows about a dataset
or a model: inputs are tensors of logits or log-probabilities, outputs are tensors or numbers.

Conventions
- `base_*` always belongs to the base policy pi0, the un-suffixed argument to the fine-tuned policy pi.
- Logits: last dimension = classes (or vocabulary), any leading batch dimensions.
- Masks: 1 where a position counts (a response token, an action token), 0 elsewhere.
- Everything is computed from `log_softmax`, never `log(softmax)`: no clamp, and finite logits
  always give finite divergences.

Sections: 1. divergences between categorical distributions; 2. sequence KL and its Monte-Carlo
estimators; 3. the losses (GRPO, 1-0 REINFORCE, KL penalty, SFT, SimPO) and representation
similarity; 4. the forgetting law (polynomial fit, bootstrap R^2, Pareto frontier).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

def _full_precision(tensor):
    """Integers and bf16/fp16 become float32 (or the default float type); float32/64 stay as they are.
    Log-probabilities of a bf16 model are computed in float32: bf16 rounding is the artefact behind the
    apparent sparsity of RL updates, which the paper traces to bf16 storage of small updates."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor if tensor.dtype.is_floating_point else tensor.to(torch.get_default_dtype())


# --------------------------------------------------------------------------------------------------
# 1. Divergences between categorical distributions given as logits (paper §3, Table 1)
# --------------------------------------------------------------------------------------------------


def forward_kl(base_logits, logits):
    """Forward KL(pi0 || pi) = sum_y pi0(y) (log pi0(y) - log pi(y)), per input.

    The paper's forgetting predictor (§3, Eq. 1), with expectations under the *base* policy pi0.
    Evaluate it on new-task inputs and average over them.
    """
    base_logp = F.log_softmax(_full_precision(base_logits), -1)
    logp = F.log_softmax(_full_precision(logits), -1)
    return (base_logp.exp() * (base_logp - logp)).sum(-1)


def reverse_kl(base_logits, logits):
    """Reverse KL(pi || pi0), per input: Table 1's second row, and what the theory (§5.2) minimises."""
    return forward_kl(logits, base_logits)


def _probability_difference(base_logits, logits):
    return F.softmax(_full_precision(base_logits), -1) - F.softmax(_full_precision(logits), -1)


def total_variation(base_logits, logits):
    """Total variation 0.5 * sum_y |pi0(y) - pi(y)|, per input (Table 1)."""
    return 0.5 * _probability_difference(base_logits, logits).abs().sum(-1)


def l2_distance(base_logits, logits):
    """Euclidean distance between the probability vectors, ||pi0 - pi||_2, per input (Table 1)."""
    return torch.linalg.vector_norm(_probability_difference(base_logits, logits), dim=-1)


def js_divergence(base_logits, logits):
    """Jensen-Shannon divergence 0.5 KL(pi0||m) + 0.5 KL(pi||m), m = (pi0 + pi) / 2, in nats, per input.

    log m is formed with logaddexp so that near-degenerate inputs stay finite (Lin, 1991).
    """
    base_logp = F.log_softmax(_full_precision(base_logits), -1)
    logp = F.log_softmax(_full_precision(logits), -1)
    log_mix = torch.logaddexp(base_logp, logp) - math.log(2.0)
    half_kl = lambda lp: (lp.exp() * (lp - log_mix)).sum(-1)  # noqa: E731
    return 0.5 * half_kl(base_logp) + 0.5 * half_kl(logp)


def divergences(base_logits, logits):
    """All five distributional predictors of Table 1 at once, each a tensor with one value per input."""
    return {
        "forward_kl": forward_kl(base_logits, logits),
        "reverse_kl": reverse_kl(base_logits, logits),
        "tv": total_variation(base_logits, logits),
        "l2": l2_distance(base_logits, logits),
        "js": js_divergence(base_logits, logits),
    }


def restrict_to_correct(base_logits, correct):
    """Log-probs of pi0 restricted to the correct set S and renormalised: pi0(y | S) (Lemma A.1).

    This is the "optimal distribution" of the ParityMNIST oracle SFT (§3, Fig. 3): the information
    projection argmin_{q: q(S)=1} KL(q || pi0), with KL(q* || pi0) = -log pi0(S). The paper prints
    the forward objective KL(pi0 || q), which is +inf for every feasible q; the I-projection is the
    reading that matches the rejection-sampling argument of §5.2 and Lemma A.1.
    `correct` is a bool tensor broadcastable to the logits; entries outside S get log-prob -inf.
    """
    masked = base_logits.masked_fill(~correct, float("-inf"))
    return masked - torch.logsumexp(masked, -1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# 2. Sequence KL for language and action-token models (the paper does not say how it estimated the
#    LLM's KL; these are the exact per-token KL and Schulman's estimators, "Approximating KL divergence", 2020)
# --------------------------------------------------------------------------------------------------


def token_logprobs(logits, tokens):
    """log pi(token_t | prefix) for each position: logits [..., T, V], tokens [..., T] -> [..., T]."""
    return F.log_softmax(_full_precision(logits), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_forward_kl(base_logits, logits, mask):
    """Exact forward KL(pi0 || pi) over the vocabulary at every response position, aggregated.

    base_logits, logits: [B, T, V] from teacher-forcing both models on the same responses, which
    must have been sampled from pi0 (temperature 1, no top-p/top-k). By the chain rule the masked sum
    over positions is an unbiased estimate of the sequence-level KL(pi0(.|x) || pi(.|x)).
    Returns {"sum": per-sequence sum [B], "mean": per-token mean [B]}.
    """
    mask = mask.to(torch.float32)
    per_token = forward_kl(base_logits, logits) * mask
    total = per_token.sum(-1)
    return {"sum": total, "mean": total / mask.sum(-1).clamp(min=1)}


def kl_estimators(base_logprobs, logprobs, mask):
    """Monte-Carlo estimates of the forward KL(pi0 || pi) from sampled tokens, summed per sequence.

    Inputs are log pi0(y_t) and log pi(y_t) of the *same* tokens y_t, sampled from pi0; r = pi/pi0.
    In Schulman's notation (samples from the first argument of the KL):
      k1 = -log r            unbiased for KL(pi0 || pi) under y ~ pi0; single values can be < 0.
      k2 = (log r)^2 / 2     biased (exact only to second order), low variance, >= 0.
      k3 = (r - 1) - log r   unbiased for KL(pi0 || pi) under y ~ pi0, and >= 0 for every sample.
    Summing k1 or k3 over the positions of a pi0-sampled sequence is unbiased for the sequence KL
    (chain rule). Under samples from pi instead, the same formulas with the roles swapped estimate
    the reverse KL; that is not what this function is for.
    Returns {"k1": [B], "k2": [B], "k3": [B]}.
    """
    mask = mask.to(torch.float32)
    log_ratio = _full_precision(logprobs) - _full_precision(base_logprobs)
    per_token = {
        "k1": -log_ratio,
        "k2": 0.5 * log_ratio**2,
        "k3": torch.expm1(log_ratio) - log_ratio,
    }
    return {name: (value * mask).sum(-1) for name, value in per_token.items()}


# --------------------------------------------------------------------------------------------------
# 3. Losses shared by every training loop
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards, normalize_std=True, eps=1e-8):
    """Group-relative advantages of GRPO (Shao et al., 2024, Eq. 3) from rewards [num_prompts, G].

    A = (r - mean_G) / (std_G + eps), std over the group with no Bessel correction (so a group of
    one or a group of equal rewards gets advantage 0, never NaN; TRL's Bessel-corrected std differs
    by the constant factor sqrt((G-1)/G), which a learning rate absorbs).
    normalize_std=False drops the division: the Dr. GRPO advantage (Liu et al., 2025), the paper's
    LLM setting (Table 2, loss type Dr. GRPO).
    """
    rewards = _full_precision(rewards)
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(-1, correction=0, keepdim=True) + eps)


def reinforce_advantages(rewards):
    """1-0 REINFORCE (§5.1, Fig. 4): advantage = reward, so only correct on-policy samples are pushed
    up and wrong ones are ignored; equivalent to SFT on the model's own correct samples."""
    return _full_precision(rewards)


def policy_gradient_loss(logprobs, advantages, mask=None, old_logprobs=None, clip_eps=0.2,
                         aggregation="sequence_mean", max_tokens=None):
    """Policy-gradient loss on sampled actions/tokens, whose gradient is -E[A * grad log pi(y)].

    logprobs: log pi(y_t) of the sampled tokens, [B, T] (or [B] for one action per sample).
    advantages: one value per sequence, [B] (from group_advantages or reinforce_advantages).
    old_logprobs: log-probs under the policy that sampled the batch. None means a single update per
      batch (mu = 1): the ratio is 1 with the gradient of log pi, no clipping. Given (mu > 1), the
      PPO clipped surrogate min(r A, clip(r, 1-eps, 1+eps) A) with r = pi/pi_old (Schulman et al.,
      2017, Eq. 7), as GRPO and the paper's mu = 2 runs use.
    aggregation: "sequence_mean" averages each sequence's token terms, then the sequences (GRPO,
      Shao et al., 2024); "constant" sums all token terms and divides by B * max_tokens (Dr. GRPO,
      Liu et al., 2025), max_tokens defaulting to T.
    """
    if logprobs.dim() == 1:
        logprobs = logprobs.unsqueeze(-1)
        old_logprobs = None if old_logprobs is None else old_logprobs.unsqueeze(-1)
        mask = None if mask is None else mask.unsqueeze(-1)
    mask = torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)
    reference = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    ratio = torch.exp(logprobs - reference)
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(-1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if aggregation == "sequence_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if aggregation == "constant":
        max_tokens = logprobs.shape[-1] if max_tokens is None else max_tokens
        return (per_token * mask).sum() / (logprobs.shape[0] * max_tokens)
    raise ValueError(f"aggregation must be 'sequence_mean' or 'constant', got {aggregation!r}")


def kl_penalty(base_logits, logits, mask=None, direction="reverse"):
    """Exact KL penalty to the base policy, averaged over (masked) positions.

    The paper's "RL + KL reg." (Fig. 3) adds coefficient * penalty to the RL loss without naming the
    direction; "reverse" KL(pi || pi0) is the standard RLHF/GRPO regulariser, "forward" KL(pi0 || pi)
    is the quantity the forgetting law measures. Both are exact over the classes/vocabulary.
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    divergence = reverse_kl if direction == "reverse" else forward_kl
    per_position = divergence(base_logits, logits)
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def sft_loss(logits, targets, mask=None):
    """Supervised cross-entropy -sum_y q(y) log pi(y), averaged over the (masked) positions.

    targets: hard labels (integer tensor with the logits' shape minus the last dim) or soft target
    distributions (float tensor with the logits' shape, rows summing to 1), e.g. the oracle
    distribution pi0(.|S) of the oracle SFT (Fig. 3). The mask is how prompts are left out of an LLM's SFT loss.
    """
    logp = F.log_softmax(_full_precision(logits), -1)
    if targets.dtype.is_floating_point:
        per_position = -(targets * logp).sum(-1)
    else:
        per_position = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def simpo_loss(chosen_logprobs, rejected_logprobs, margin=1.0):
    """SimPO as printed in the paper (§5.1): -E[log sigmoid(log pi(y_w|x) - log pi(y_l|x) - margin)].

    Sequence log-probs (summed over tokens, no length normalisation, no beta), margin 1: the
    "offline, with negatives" corner of the 2x2 study. (Meng et al., 2024 normalise by length and
    scale by beta; the paper drops both.)
    """
    return -F.logsigmoid(chosen_logprobs - rejected_logprobs - margin).mean()


def linear_cka(features, base_features):
    """Linear centred kernel alignment between two representations of the same n inputs, in [0, 1].

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X [n, d1], Y [n, d2]
    (Kornblith et al., 2019, Eq. 5). 1 means the same representation up to rotation and isotropic
    scaling. The paper's App. C.1 uses CKNNA, a nearest-neighbour variant; this is its simple cousin.
    """
    x = features.double() - features.double().mean(0)
    y = base_features.double() - base_features.double().mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


# --------------------------------------------------------------------------------------------------
# 4. The forgetting law (§3, Fig. 3 middle, Table 1) and the trade-off frontier (Fig. 3 left)
# --------------------------------------------------------------------------------------------------


def fit_law(predictor, forgetting, degree=2):
    """Least-squares polynomial fit of forgetting (or prior-task score) against a predictor.

    The paper pools every method's points into one degree-2 fit and reports its R^2 (Table 1).
    Returns (coefficients, highest power first as numpy.polyfit; r2). A constant target (up to
    float rounding) has no variance to explain: R^2 is then nan.
    """
    x, y = np.asarray(predictor, np.float64), np.asarray(forgetting, np.float64)
    design = np.vander(x, degree + 1)
    coefficients = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = y - design @ coefficients
    total = ((y - y.mean()) ** 2).sum()
    has_variance = total > 1e-12 * (y**2).sum()
    r2 = 1.0 - (residual**2).sum() / total if has_variance else float("nan")
    return coefficients, float(r2)


def bootstrap_r2(predictor, forgetting, groups=None, degree=2, n_boot=1000, ci=0.95, seed=0):
    """R^2 of fit_law with a percentile bootstrap confidence interval.

    groups: optional run id per point. Given, whole runs are resampled with replacement (their
    mid-training checkpoints are correlated, so resampling points would overstate certainty);
    otherwise points are. Returns (r2, low, high); all three are nan when the target never varies.
    """
    x, y = np.asarray(predictor, np.float64), np.asarray(forgetting, np.float64)
    groups = np.arange(len(x)) if groups is None else np.asarray(groups)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        picked = np.concatenate([members[g] for g in rng.integers(len(unique), size=len(unique))])
        r2 = fit_law(x[picked], y[picked], degree)[1]
        if not math.isnan(r2):
            samples.append(r2)
    if not samples:  # every resample has a constant target (e.g. a prior-task score that never moved)
        return fit_law(x, y, degree)[1], float("nan"), float("nan")
    low, high = np.quantile(samples, [(1 - ci) / 2, (1 + ci) / 2])
    return fit_law(x, y, degree)[1], float(low), float(high)


def pareto_frontier(new_task_score, prior_task_score):
    """Indices of the non-dominated points (higher is better on both axes), by new-task score descending.

    Rule: sort by new-task score descending, ties by prior score descending, and keep a
    point only if its prior score is strictly higher than every point kept so far, so ties and
    duplicate checkpoints appear once.
    """
    new, prior = np.asarray(new_task_score, np.float64), np.asarray(prior_task_score, np.float64)
    order = np.lexsort((-prior, -new))
    kept, best_prior = [], -np.inf
    for i in order:
        if prior[i] > best_prior:
            kept.append(int(i))
            best_prior = prior[i]
    return kept


def frontier_at(new_task_score, prior_task_score, kls, level):
    """The Pareto frontier read at matched new-task score (Fig. 2 and 4 compare methods there): the best
    prior-task score and the lowest forward KL among points whose new-task score is at least `level`
    (nan, nan if none reaches it). The two need not come from the same point."""
    reached = np.asarray(new_task_score, np.float64) >= level - 1e-9
    if not reached.any():
        return float("nan"), float("nan")
    return float(np.asarray(prior_task_score)[reached].max()), float(np.asarray(kls)[reached].min())
