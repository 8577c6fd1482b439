"""Tests of kl.py against torch.distributions, closed forms, enumeration and numpy/scipy references.

Every test here goes red if the function it checks is broken (a flipped sign, a swapped argument,
a dropped term): each compares with an independent computation, not with a copy of the formula.
"""
import itertools
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch.distributions import Categorical, kl_divergence

import kl



@pytest.fixture(autouse=True, scope="module")
def float64_by_default():
    """Reference values in float64; restored afterwards, since every test file shares one process."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_logit_pairs(seed=0, batch=(4, 3), classes=7):
    """Random logits plus near-degenerate ones (entries of +-50) for both arguments."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*batch, classes, generator=g) * 3
    other = torch.randn(*batch, classes, generator=g) * 3
    base[0] = 50 * torch.sign(torch.randn(batch[1], classes, generator=g))
    other[1] = 50 * torch.sign(torch.randn(batch[1], classes, generator=g))
    return base, other


# ------------------------------------------------------------------------------------------------
# 1. Divergences
# ------------------------------------------------------------------------------------------------


def test_forward_and_reverse_kl_match_torch_distributions():
    base, other = random_logit_pairs()
    p0, p = Categorical(logits=base), Categorical(logits=other)
    torch.testing.assert_close(kl.forward_kl(base, other), kl_divergence(p0, p))
    torch.testing.assert_close(kl.reverse_kl(base, other), kl_divergence(p, p0))


def test_tv_l2_js_match_closed_forms():
    base, other = random_logit_pairs(seed=1)
    p0, p = base.softmax(-1), other.softmax(-1)
    torch.testing.assert_close(kl.total_variation(base, other), 0.5 * (p0 - p).abs().sum(-1))
    torch.testing.assert_close(kl.l2_distance(base, other), ((p0 - p) ** 2).sum(-1).sqrt())
    mixture = Categorical(probs=(p0 + p) / 2)
    js = 0.5 * kl_divergence(Categorical(probs=p0), mixture) + 0.5 * kl_divergence(Categorical(probs=p), mixture)
    torch.testing.assert_close(kl.js_divergence(base, other), js)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_divergences_are_finite_nonnegative_zero_on_identity_and_bounded(dtype):
    base, other = (t.to(dtype) for t in random_logit_pairs(seed=2))
    for name, value in kl.divergences(base, other).items():
        assert value.shape == base.shape[:-1], name
        assert torch.isfinite(value).all() and (value >= -1e-6).all(), name
    for name, value in kl.divergences(base, base.clone()).items():
        assert value.abs().max() < 1e-6, name
    values = kl.divergences(base, other)
    assert (values["tv"] <= 1 + 1e-6).all() and (values["js"] <= math.log(2) + 1e-6).all()


def test_kl_is_asymmetric_and_tv_is_symmetric():
    base = torch.tensor([3.0, 0.0, 0.0])
    other = torch.tensor([0.0, 0.0, 0.0])
    assert abs(kl.forward_kl(base, other) - kl.reverse_kl(base, other)) > 0.05
    torch.testing.assert_close(kl.forward_kl(base, other), kl.reverse_kl(other, base))
    torch.testing.assert_close(kl.total_variation(base, other), kl.total_variation(other, base))


def test_restrict_to_correct_is_the_i_projection():
    """Lemma A.1: pi0(.|S) has mass 1 on S, is proportional to pi0 there, has KL(q||pi0) = -log pi0(S),
    and equals what a general constrained solver finds for argmin_{q(S)=1} KL(q || pi0)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        base = torch.randn(10, generator=g) * 2
        correct = torch.rand(10, generator=g) < 0.5
        correct[0] = True
        q = kl.restrict_to_correct(base, correct).exp()
        p0 = base.softmax(-1)
        torch.testing.assert_close(q.sum(), torch.tensor(1.0))
        assert (q[~correct] == 0).all()
        torch.testing.assert_close(q[correct], p0[correct] / p0[correct].sum())
        kl_q_p0 = (torch.special.xlogy(q, q) - q * p0.log()).sum()
        torch.testing.assert_close(kl_q_p0, -p0[correct].sum().log())

        support = correct.nonzero().squeeze(-1).numpy()
        target = p0.numpy()[support]
        objective = lambda x: float(np.sum(x * (np.log(np.maximum(x, 1e-300)) - np.log(target))))  # noqa: E731
        solution = scipy.optimize.minimize(
            objective, np.full(len(support), 1 / len(support)), method="SLSQP",
            bounds=[(0, 1)] * len(support), constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
            options={"ftol": 1e-12, "maxiter": 500})
        np.testing.assert_allclose(solution.x, q[correct].numpy(), atol=1e-4)


def test_restrict_to_correct_broadcasts_a_mask_per_input():
    base = torch.zeros(2, 4)
    correct = torch.tensor([[True, False, True, False], [False, True, False, True]])
    q = kl.restrict_to_correct(base, correct).exp()
    torch.testing.assert_close(q, torch.tensor([[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]]))


# ------------------------------------------------------------------------------------------------
# 2. Sequence KL and its estimators, on a tiny autoregressive model enumerated exactly
# ------------------------------------------------------------------------------------------------

VOCAB, LENGTH = 3, 3


def tiny_sequence_model(seed, scale=1.0):
    """Next-token logits depend on the previous token: a table [VOCAB + 1 (start), LENGTH, VOCAB]."""
    return torch.randn(VOCAB + 1, LENGTH, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def logits_along(table, tokens):
    """Teacher-forced logits [N, LENGTH, VOCAB] of the table model on token sequences [N, LENGTH]."""
    previous = torch.cat([torch.full_like(tokens[:, :1], VOCAB), tokens[:, :-1]], 1)
    return table[previous, torch.arange(LENGTH)]


def exact_sequence_kl(base_table, table):
    """KL(pi0 || pi) over whole sequences by enumerating all VOCAB**LENGTH of them."""
    sequences = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))
    base_logp = kl.token_logprobs(logits_along(base_table, sequences), sequences).sum(-1)
    logp = kl.token_logprobs(logits_along(table, sequences), sequences).sum(-1)
    return float((base_logp.exp() * (base_logp - logp)).sum())


def sample_sequences(table, n, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, LENGTH, dtype=torch.long)
    previous = torch.full((n,), VOCAB)
    for t in range(LENGTH):
        tokens[:, t] = torch.multinomial(table[previous, t].softmax(-1), 1, generator=g).squeeze(-1)
        previous = tokens[:, t]
    return tokens


def test_token_logprobs_match_categorical_log_prob():
    logits = torch.randn(2, 5, 11)
    tokens = torch.randint(11, (2, 5))
    torch.testing.assert_close(kl.token_logprobs(logits, tokens), Categorical(logits=logits).log_prob(tokens))


def test_estimators_and_exact_token_kl_are_unbiased_for_sequence_kl():
    """Under y ~ pi0: mean of k1, of k3 and of the exact per-token KL, summed over the sequence,
    all match the enumerated sequence KL(pi0 || pi) within 4 standard errors."""
    base_table, table = tiny_sequence_model(0), tiny_sequence_model(1)
    exact = exact_sequence_kl(base_table, table)
    tokens = sample_sequences(base_table, 40_000, seed=2)
    base_logits, logits = logits_along(base_table, tokens), logits_along(table, tokens)
    mask = torch.ones_like(tokens)
    estimates = kl.kl_estimators(kl.token_logprobs(base_logits, tokens), kl.token_logprobs(logits, tokens), mask)
    estimates["exact_token"] = kl.sequence_forward_kl(base_logits, logits, mask)["sum"]
    for name in ("k1", "k3", "exact_token"):
        values = estimates[name]
        standard_error = float(values.std() / math.sqrt(len(values)))
        assert abs(float(values.mean()) - exact) < 4 * standard_error + 1e-9, name
    assert (estimates["k3"] >= 0).all() and (estimates["k2"] >= 0).all()
    assert (estimates["k1"] < 0).any()  # k1 is unbiased but individual samples can be negative
    # the exact per-token sum has lower variance than the single-sample estimators
    assert estimates["exact_token"].var() < estimates["k1"].var()
    assert estimates["exact_token"].var() < estimates["k3"].var()


def test_k2_is_close_to_kl_only_for_nearby_policies():
    base_table = tiny_sequence_model(0)
    near = base_table + 0.05 * tiny_sequence_model(1)
    tokens = sample_sequences(base_table, 40_000, seed=3)
    mask = torch.ones_like(tokens)

    def k2_mean(table):
        estimates = kl.kl_estimators(kl.token_logprobs(logits_along(base_table, tokens), tokens),
                                     kl.token_logprobs(logits_along(table, tokens), tokens), mask)
        return float(estimates["k2"].mean())

    assert k2_mean(near) == pytest.approx(exact_sequence_kl(base_table, near), rel=0.05)
    far = tiny_sequence_model(1, scale=3.0)
    assert abs(k2_mean(far) - exact_sequence_kl(base_table, far)) > 0.1


def test_sequence_kl_respects_the_mask():
    base_logits, logits = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    per_token = kl.forward_kl(base_logits, logits)
    result = kl.sequence_forward_kl(base_logits, logits, mask)
    torch.testing.assert_close(result["sum"], torch.stack([per_token[0, :2].sum(), per_token[1, 1:].sum()]))
    torch.testing.assert_close(result["mean"], result["sum"] / torch.tensor([2.0, 3.0]))
    tokens = torch.randint(6, (2, 4))
    estimates = kl.kl_estimators(kl.token_logprobs(base_logits, tokens), kl.token_logprobs(logits, tokens), mask)
    log_ratio = kl.token_logprobs(logits, tokens) - kl.token_logprobs(base_logits, tokens)
    torch.testing.assert_close(estimates["k1"], torch.stack([-log_ratio[0, :2].sum(), -log_ratio[1, 1:].sum()]))


# ------------------------------------------------------------------------------------------------
# 3. Losses
# ------------------------------------------------------------------------------------------------


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    advantages = kl.group_advantages(rewards)
    torch.testing.assert_close(advantages.mean(-1), torch.zeros(4))
    assert torch.isfinite(advantages).all()
    torch.testing.assert_close(advantages[1:3], torch.zeros(2, 4))
    torch.testing.assert_close(advantages[0], torch.tensor([1.0, -1, -1, 1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages[3].std(correction=0), torch.tensor(1.0), atol=1e-6, rtol=0)
    dr_grpo = kl.group_advantages(rewards, normalize_std=False)
    torch.testing.assert_close(dr_grpo[3], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(kl.group_advantages(torch.tensor([[1.0]])), torch.zeros(1, 1))
    torch.testing.assert_close(kl.reinforce_advantages(torch.tensor([1, 0, 1])), torch.tensor([1.0, 0, 1]))


def test_policy_gradient_matches_enumerated_exact_gradient():
    """E_{y~pi}[grad of the loss] = -sum_y pi(y) A(y) grad log pi(y), computed by enumeration."""
    theta = torch.tensor([0.5, -1.0, 0.3, 1.2, 0.0], requires_grad=True)
    advantage_of = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.0])
    probs = theta.softmax(-1)
    exact = -sum(probs[y].detach() * advantage_of[y] * torch.autograd.grad(probs[y].log(), theta, retain_graph=True)[0]
                 for y in range(5))

    actions = torch.multinomial(probs.detach(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logprobs = torch.log_softmax(theta, -1)[actions]
    loss = kl.policy_gradient_loss(logprobs, advantage_of[actions])
    (sampled,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(sampled, exact, atol=0.02, rtol=0)
    assert not torch.allclose(sampled, -exact, atol=0.02)


def test_policy_gradient_aggregations():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    (grad_mean,) = torch.autograd.grad(kl.policy_gradient_loss(logprobs, advantages, mask), logprobs)
    # GRPO: each sequence's token mean, then the mean over the 2 sequences
    torch.testing.assert_close(grad_mean, torch.tensor([[-2 / 6, -2 / 6, -2 / 6], [1 / 4, 1 / 4, 0]]))
    loss = kl.policy_gradient_loss(logprobs, advantages, mask, aggregation="constant", max_tokens=10)
    (grad_constant,) = torch.autograd.grad(loss, logprobs)
    # Dr. GRPO: the token sum divided by num_sequences * max_tokens = 20, whatever each length
    torch.testing.assert_close(grad_constant, torch.tensor([[-0.1, -0.1, -0.1], [0.05, 0.05, 0]]))
    with pytest.raises(ValueError):
        kl.policy_gradient_loss(logprobs, advantages, mask, aggregation="token_mean")


def test_policy_gradient_clipping():
    """PPO clipping (mu > 1): a token whose ratio left [1-eps, 1+eps] in the advantage's favoured
    direction gets no gradient; otherwise the gradient is -A * ratio * grad log pi."""
    logprobs = torch.zeros(4, 1, requires_grad=True)
    old = torch.log(torch.tensor([[1 / 1.5], [1 / 1.5], [1 / 0.5], [1.0]]))  # ratios 1.5, 1.5, 0.5, 1
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    (grad,) = torch.autograd.grad(kl.policy_gradient_loss(logprobs, advantages, old_logprobs=old), logprobs)
    torch.testing.assert_close(grad.squeeze(-1), torch.tensor([0.0, 1.5, 0.0, -1.0]) / 4)
    # with old = current (mu = 1) the clipped loss has exactly the unclipped gradient
    (same,) = torch.autograd.grad(kl.policy_gradient_loss(logprobs, advantages, old_logprobs=logprobs.detach()), logprobs)
    (plain,) = torch.autograd.grad(kl.policy_gradient_loss(logprobs, advantages), logprobs)
    torch.testing.assert_close(same, plain)


def test_kl_penalty_directions_and_mask():
    base, logits = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    mask = (torch.rand(3, 5) < 0.6).long()
    mask[0, 0] = 1
    for direction, reference in (("reverse", kl.reverse_kl), ("forward", kl.forward_kl)):
        per_position = reference(base, logits)
        torch.testing.assert_close(kl.kl_penalty(base, logits, direction=direction), per_position.mean())
        expected = (per_position * mask).sum() / mask.sum()
        torch.testing.assert_close(kl.kl_penalty(base, logits, mask, direction=direction), expected)
    assert not torch.allclose(kl.kl_penalty(base, logits), kl.kl_penalty(base, logits, direction="forward"))
    with pytest.raises(ValueError):
        kl.kl_penalty(base, logits, direction="sideways")


def test_sft_loss_hard_soft_and_mask():
    logits = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([0, 5, 2, 2])
    hard = kl.sft_loss(logits, labels)
    torch.testing.assert_close(hard, torch.nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(kl.sft_loss(logits, torch.nn.functional.one_hot(labels, 6).double()), hard)
    soft_targets = torch.softmax(torch.randn(4, 6), -1)
    (grad,) = torch.autograd.grad(kl.sft_loss(logits, soft_targets), logits)
    torch.testing.assert_close(grad, (logits.softmax(-1) - soft_targets).detach() / 4)  # d CE / d logits = p - q
    mask = torch.tensor([1, 0, 1, 0])
    masked = kl.sft_loss(logits, labels, mask)
    torch.testing.assert_close(masked, torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]]))


def test_simpo_loss_as_printed():
    chosen, rejected = torch.tensor([-2.0, -1.0]), torch.tensor([-3.0, -1.0])
    # margins chosen - rejected - 1 = 0 and -1  ->  log 2 and log(1 + e)
    expected = (math.log(2) + math.log(1 + math.e)) / 2
    assert float(kl.simpo_loss(chosen, rejected)) == pytest.approx(expected)
    assert float(kl.simpo_loss(chosen, rejected, margin=0.0)) == pytest.approx(
        (math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    chosen.requires_grad_(True)
    (grad,) = torch.autograd.grad(kl.simpo_loss(chosen, rejected), chosen)
    assert (grad < 0).all()  # descending the loss raises the chosen log-prob


def test_linear_cka():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    assert kl.linear_cka(3.0 * x @ rotation + 1.0, x) == pytest.approx(1.0)
    assert kl.linear_cka(torch.randn(200, 6, generator=g), x) < 0.2
    a, b = torch.randn(50, 1, generator=g), torch.randn(50, 1, generator=g)
    b = a + b  # one feature each: linear CKA is the squared Pearson correlation
    assert kl.linear_cka(a, b) == pytest.approx(np.corrcoef(a.squeeze(), b.squeeze())[0, 1] ** 2)


# ------------------------------------------------------------------------------------------------
# 4. The forgetting law and the frontier
# ------------------------------------------------------------------------------------------------


def test_fit_law_recovers_a_noiseless_quadratic():
    x = np.linspace(0, 10, 30)
    coefficients, r2 = kl.fit_law(x, 0.3 * x**2 - 2.0 * x + 68.0)
    np.testing.assert_allclose(coefficients, [0.3, -2.0, 68.0], atol=1e-9)
    assert r2 == pytest.approx(1.0)


def test_fit_law_matches_numpy_polyfit_on_noisy_data():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 5, 100)
    y = 0.7 - 0.2 * x + 0.01 * x**2 + rng.normal(0, 0.05, 100)
    for degree in (1, 2, 3):
        coefficients, r2 = kl.fit_law(x, y, degree)
        reference = np.polyfit(x, y, degree)
        np.testing.assert_allclose(coefficients, reference, rtol=1e-8, atol=1e-10)
        residual = y - np.polyval(reference, x)
        assert r2 == pytest.approx(1 - residual.var() / y.var())
    assert math.isnan(kl.fit_law(x, np.ones_like(x))[1])
    assert math.isnan(kl.fit_law(x, np.zeros_like(x))[1])
    # a score that is constant up to float rounding (299/300 summed in different orders) is constant
    rounded = np.array([sum([1 / 300] * 299), 299 / 300, 1 - 1 / 300] * 10)
    assert np.ptp(rounded) > 0 and math.isnan(kl.fit_law(np.arange(30.0), rounded)[1])


def test_bootstrap_r2_interval_and_groups():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 5, 10)
    y = 1 - 0.1 * x**2 + rng.normal(0, 0.3, 10)
    r2, low, high = kl.bootstrap_r2(x, y, n_boot=300)
    assert r2 == pytest.approx(kl.fit_law(x, y)[1]) and low <= r2 <= high and low < high
    assert kl.bootstrap_r2(x, y, n_boot=300) == (r2, low, high)  # seeded: reproducible
    # 10 runs of 100 identical checkpoints each: resampling points sees every run almost every
    # time (a narrow interval), resampling runs does not (the honest, wide interval)
    x_repeated, y_repeated = np.repeat(x, 100), np.repeat(y, 100)
    runs = np.repeat(np.arange(10), 100)
    _, point_low, point_high = kl.bootstrap_r2(x_repeated, y_repeated, n_boot=300)
    _, run_low, run_high = kl.bootstrap_r2(x_repeated, y_repeated, groups=runs, n_boot=300)
    assert run_high - run_low > 5 * (point_high - point_low)


def test_pareto_frontier_on_a_hand_made_set():
    new = [0.90, 0.95, 0.95, 0.95, 0.80, 0.99, 0.85, 0.99]
    prior = [0.60, 0.50, 0.55, 0.55, 0.70, 0.20, 0.65, 0.20]
    # 0.99 appears twice (kept once), 0.95 three times (only the best prior, once), then each lower
    # accuracy is kept because its prior score beats everything more accurate
    assert kl.pareto_frontier(new, prior) == [5, 2, 0, 6, 4]
    assert kl.pareto_frontier([0.5, 0.6], [0.9, 0.9]) == [1]


def test_frontier_at_reads_best_prior_and_lowest_kl_among_points_that_reach_the_level():
    new, prior, kls = [0.2, 0.3, 0.4, 0.5], [0.99, 0.7, 0.95, 0.6], [0.0, 0.5, 3.0, 1.0]
    assert kl.frontier_at(new, prior, kls, 0.3) == (0.95, 0.5)  # from different points
    assert kl.frontier_at(new, prior, kls, 0.45) == (0.6, 1.0)
    assert kl.frontier_at(new, prior, kls, 0.1 + 0.2) == (0.95, 0.5)  # a point at the level counts
    assert all(np.isnan(v) for v in kl.frontier_at(new, prior, kls, 0.6))


def test_bootstrap_r2_of_a_target_that_never_varies_is_undefined_not_an_error():
    r2, low, high = kl.bootstrap_r2([0.0, 1.0, 2.0, 3.0], [0.5, 0.5, 0.5, 0.5], groups=["a", "a", "b", "b"], n_boot=50)
    assert math.isnan(r2) and math.isnan(low) and math.isnan(high)
