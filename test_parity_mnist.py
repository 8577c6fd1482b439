"""Tests of parity_mnist.py, the lesson, on small subsets of the real MNIST/FashionMNIST in data/ (`make data`).

The wiring tests pin what each recorded number means and what each method trains toward, so that a one-line
mistake in the script (a swapped argument, a flipped sign, a wrong label set, an ignored flag) fails one.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import kl
import parity_mnist as pm

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (the same numbers on any machine); restored for other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return pm.load_data(str(DATA_DIR), train_size=2000, test_size=500)


@pytest.fixture(scope="module")
def base(data):
    return pm.pretrain(data, seed=0)


@pytest.fixture(scope="module")
def small(data):
    """640 training images: 20 steps of batch 32 per epoch."""
    return pm.Data(**{**vars(data), "mnist_train_x": data.mnist_train_x[:640], "mnist_train_y": data.mnist_train_y[:640]})


def lesson_args(method, lr=1e-3, **settings):
    """The lesson's settings as its command line gives them, with small batches for the tests."""
    settings = {"batch_size": 32, "group_size": 4, **settings}
    teacher = ["--teacher", "teacher.pt"] if method == "sft-distill" else []
    args = pm.parse_args(["--method", method, "--lr", str(lr), *teacher])
    return argparse.Namespace(**{**vars(args), **settings})


def test_input_is_785_wide_with_task_indicator(data, base):
    assert data.mnist_train_x.shape[1] == data.fashion_test_x.shape[1] == 785
    assert torch.all(data.mnist_test_x[:, -1] == 1) and torch.all(data.fashion_test_x[:, -1] == -1)
    assert base["w1"].shape == (785, 512)
    # The indicator is an input the model uses: flipping it changes the logits.
    flipped = data.mnist_test_x[:10].clone()
    flipped[:, -1] = -1
    assert not torch.allclose(pm.mlp(base, flipped), pm.mlp(base, data.mnist_test_x[:10]))
    # One model and the same model stacked R times (parity_sweep.py) compute the same logits.
    stacked = {k: v.expand(3, *v.shape) for k, v in base.items()}
    torch.testing.assert_close(pm.mlp(stacked, data.mnist_test_x[:10])[2], pm.mlp(base, data.mnist_test_x[:10]))


def test_pi0_spreads_its_mass_over_the_correct_parity(data, base):
    """Pretraining labels are drawn uniformly among the five digits of the right parity (App. B.3): pi0 is
    better than chance at parity, and no single label takes most of the mass."""
    probs = pm.mlp(base, data.mnist_test_x).softmax(-1)
    correct = pm.correct_labels(data.mnist_test_y)
    assert (probs * correct).sum(-1).mean() > 0.7
    assert probs.max(-1).values.mean() < 0.5


def test_oracle_targets_are_base_restricted_to_correct_parity(base, data):
    digits = data.mnist_train_y[:200]
    base_logits = pm.mlp(base, data.mnist_train_x[:200])
    base_logp = torch.log_softmax(base_logits, -1)
    oracle = kl.restrict_to_correct(base_logits, pm.correct_labels(digits)).exp()
    wrong = torch.arange(10) % 2 != (digits % 2).unsqueeze(-1)
    assert torch.all(oracle[wrong] == 0)
    torch.testing.assert_close(oracle.sum(-1), torch.ones(200))
    # proportional to pi0 on the correct labels: oracle / pi0 is the same constant 1 / pi0(S) per image
    ratio = (oracle / base_logp.exp()).masked_fill(wrong, float("nan"))
    mass_correct = base_logp.exp().masked_fill(wrong, 0).sum(-1)
    torch.testing.assert_close(ratio.nanmean(-1), 1 / mass_correct)
    assert torch.allclose(ratio.nan_to_num(0).amax(-1), ratio.nan_to_num(1e9).amin(-1), rtol=1e-5)


def test_gumbel_sampling_matches_the_policy():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0, -3.0, 0.0, 0.2, 1.5, -0.5]])
    labels = pm.gumbel_sample(logits, 200_000, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(labels.flatten(), minlength=10).float() / labels.numel()
    torch.testing.assert_close(frequencies, logits.softmax(-1)[0], atol=4e-3, rtol=0)


def test_rl_raises_expected_reward_from_pi0_at_zero_kl(small, base):
    _, rows = pm.finetune(lesson_args("rl", epochs=2, eval_every=1.0), small, base)
    before, after = rows[0], rows[-1]
    assert [row["step"] for row in rows] == [0, 20, 40]
    assert before["forward_kl"] == 0 and before["reverse_kl"] == 0 and before["forgetting"] == 0
    assert after["expected_reward"] > before["expected_reward"] + 0.02
    assert after["forward_kl"] > 0


def test_zero_advantages_leave_the_model_where_it_started(small, base, monkeypatch):
    """The lab's first edit: kl.group_advantages returning zeros makes GRPO's gradient zero."""
    monkeypatch.setattr(kl, "group_advantages", lambda rewards, **kw: torch.zeros_like(rewards))
    params, rows = pm.finetune(lesson_args("rl", eval_every=1.0), small, base)
    assert rows[-1]["parity_acc"] == rows[0]["parity_acc"] and rows[-1]["forward_kl"] == 0
    for k in base:
        assert torch.equal(params[k], base[k])


def test_sft2_trains_toward_0_4_and_1_5_fixed_per_image(small, base):
    """SFT dist. 2's labels are drawn once per image: after two epochs the model predicts, on its training
    images, labels from {0, 4} for even digits and {1, 5} for odd ones, and pi0 does not."""
    params, _ = pm.finetune(lesson_args("sft2", lr=3e-3, epochs=3, eval_every=1.0), small, base)
    digits = small.mnist_train_y
    allowed = torch.stack([digits % 2, digits % 2 + 4], -1)
    in_set = lambda model: (pm.mlp(model, small.mnist_train_x).argmax(-1, keepdim=True) == allowed).any(-1)  # noqa: E731
    assert in_set(params).float().mean() > 0.9
    assert in_set(base).float().mean() < 0.7


# --------------------------------------------------------------------------------------------------
# Wiring: what each recorded number means and what each method trains toward. Each test is written so
# that a one-line mistake in the script (a swapped argument, a flipped sign, a wrong label set, an
# ignored flag) fails it. `method_loss_grad` and `evaluate` are the only places that know the scripts'
# function signatures.
# --------------------------------------------------------------------------------------------------


def method_loss_grad(method, logits, digits, gen, base_logits=None, teacher_logits=None, sft2_labels=None, **cfg):
    """(loss, d loss / d logits) of one method on a batch of logits [B, 10]."""
    logits = logits.clone().requires_grad_()
    cfg = lesson_args(method, **cfg)
    loss = pm.method_loss(cfg, logits, digits, sft2_labels, base_logits, teacher_logits, gen)
    return loss, torch.autograd.grad(loss, logits)[0]


def random_logits(batch, seed):
    return 2 * torch.randn(batch, 10, generator=torch.Generator().manual_seed(seed))


def implied_targets(logits, grad):
    """For a cross-entropy loss averaged over B rows, d loss / d logits = (softmax - target) / B."""
    return logits.softmax(-1) - len(logits) * grad


def moved_model(base):
    """pi0 with noise on every weight and more mass on label 0: KL(pi0 || pi) and KL(pi || pi0) differ."""
    gen = torch.Generator().manual_seed(1)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    moved["b3"] = moved["b3"] + 3 * (torch.arange(10) == 0)
    return moved


def check_scores(metrics, moved, base, data, base_fashion_acc):
    """The recorded numbers against independent computations: which divergence, which direction, which inputs."""
    base = Categorical(logits=pm.mlp(base, data.mnist_test_x).double())  # MNIST test, indicator +1
    tuned = Categorical(logits=pm.mlp(moved, data.mnist_test_x).double())
    forward, reverse = kl_divergence(base, tuned).mean().item(), kl_divergence(tuned, base).mean().item()
    assert abs(forward - reverse) > 0.1 * forward  # the two directions are told apart by this test
    assert metrics["forward_kl"] == pytest.approx(forward, rel=1e-4)
    assert metrics["reverse_kl"] == pytest.approx(reverse, rel=1e-4)
    fashion_acc = (pm.mlp(moved, data.fashion_test_x).argmax(-1) == data.fashion_test_y).float().mean().item()
    parity_acc = (pm.mlp(moved, data.mnist_test_x).argmax(-1) % 2 == data.mnist_test_y % 2).float().mean().item()
    assert metrics["fashion_acc"] == pytest.approx(fashion_acc)
    assert metrics["parity_acc"] == pytest.approx(parity_acc)
    assert metrics["forgetting"] == pytest.approx(base_fashion_acc - fashion_acc)  # base minus current
    assert metrics["forgetting"] > 0  # this move costs FashionMNIST accuracy


def test_scores_name_each_divergence_by_its_direction_and_measure_it_on_new_task_inputs(base, data):
    moved = moved_model(base)
    with torch.no_grad():
        base_fashion_acc = pm.accuracy(pm.mlp(base, data.fashion_test_x), data.fashion_test_y)
        metrics = pm.scores(pm.mlp(moved, data.mnist_test_x), pm.mlp(moved, data.fashion_test_x), data,
                            pm.mlp(base, data.mnist_test_x), base_fashion_acc)
    check_scores(metrics, moved, base, data, base_fashion_acc)


def test_sft1_targets_are_0_for_even_and_1_for_odd():
    logits, digits = random_logits(40, 0), torch.arange(40) % 10
    _, grad = method_loss_grad("sft1", logits, digits, torch.Generator().manual_seed(0))
    torch.testing.assert_close(implied_targets(logits, grad), torch.nn.functional.one_hot(digits % 2, 10).float())


def test_sft2_targets_are_the_given_labels_from_0_4_and_1_5():
    logits, digits = random_logits(40, 1), torch.arange(40) % 10
    labels = digits % 2 + 4 * (torch.arange(40) // 10 % 2)
    _, grad = method_loss_grad("sft2", logits, digits, torch.Generator().manual_seed(0), sft2_labels=labels)
    torch.testing.assert_close(implied_targets(logits, grad), torch.nn.functional.one_hot(labels, 10).float())


def test_soft_oracle_targets_are_the_base_restricted_to_the_correct_parity():
    logits, base_logits, digits = random_logits(40, 2), random_logits(40, 3), torch.arange(40) % 10
    _, grad = method_loss_grad("sft-oracle", logits, digits, torch.Generator().manual_seed(0),
                               base_logits=base_logits, oracle_targets="soft")
    base = base_logits.softmax(-1)
    correct = torch.arange(10) % 2 == (digits % 2).unsqueeze(-1)
    expected = base * correct / (base * correct).sum(-1, keepdim=True)
    torch.testing.assert_close(implied_targets(logits, grad), expected)


@pytest.mark.parametrize("method, source", [("sft-oracle", "base"), ("sft-distill", "teacher")])
def test_sampled_targets_follow_their_distribution(method, source):
    """Oracle: labels sampled from pi0(.|correct parity); distillation: labels sampled from the teacher."""
    batch, draws = 4, 4000
    logits, digits = random_logits(batch, 4), torch.tensor([0, 3, 6, 9])
    source_logits = random_logits(batch, 5)
    kwargs = {"base_logits": source_logits} if source == "base" else {"teacher_logits": source_logits}
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(batch, 10)
    for _ in range(draws):
        _, grad = method_loss_grad(method, logits, digits, gen, **kwargs)
        counts += implied_targets(logits, grad)
    expected = source_logits.softmax(-1)
    if method == "sft-oracle":
        correct = torch.arange(10) % 2 == (digits % 2).unsqueeze(-1)
        expected = expected * correct / (expected * correct).sum(-1, keepdim=True)
    torch.testing.assert_close(counts / draws, expected, atol=0.03, rtol=0)


def policy_gradient_expectation(logits, labels, advantages):
    """-(1 / (B G)) sum_{i,g} A_ig d log pi(y_ig | x_i) / d logits, by enumeration: onehot(y) - pi."""
    probs = logits.softmax(-1)
    batch, group = labels.shape
    grad = torch.zeros_like(logits)
    for i in range(batch):
        for g in range(group):
            grad[i] -= advantages[i, g] * (torch.nn.functional.one_hot(labels[i, g], 10) - probs[i])
    return grad / (batch * group)


@pytest.mark.parametrize("method, group_size", [("rl", 4), ("rl", 6), ("reinforce", 4)])
def test_policy_gradient_advantages_and_group_size(method, group_size):
    logits, digits = random_logits(12, 6), torch.arange(12) % 10
    _, grad = method_loss_grad(method, logits, digits, torch.Generator().manual_seed(7), group_size=group_size)
    labels = pm.gumbel_sample(logits, group_size, torch.Generator().manual_seed(7))  # the same draw, replayed
    assert labels.shape == (12, group_size)
    rewards = (labels % 2 == (digits % 2).unsqueeze(-1)).double()
    if method == "rl":  # GRPO: group-normalised, population std
        advantages = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, correction=0, keepdim=True) + 1e-8)
    else:  # 1-0 REINFORCE: the reward itself
        advantages = rewards
    torch.testing.assert_close(grad, policy_gradient_expectation(logits, labels, advantages.float()),
                               atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("direction, coef", [("reverse", 0.1), ("forward", 0.1), ("reverse", 0.7)])
def test_kl_penalty_direction_and_coefficient(direction, coef):
    logits, base_logits, digits = random_logits(12, 8), random_logits(12, 9), torch.arange(12) % 10
    _, grad = method_loss_grad("rl-kl", logits, digits, torch.Generator().manual_seed(3), base_logits=base_logits,
                               kl_coef=coef, kl_direction=direction)
    _, rl_grad = method_loss_grad("rl", logits, digits, torch.Generator().manual_seed(3))
    tuned_logits = logits.clone().requires_grad_()
    base, tuned = Categorical(logits=base_logits), Categorical(logits=tuned_logits)
    penalty = (kl_divergence(tuned, base) if direction == "reverse" else kl_divergence(base, tuned)).mean()
    expected = rl_grad + coef * torch.autograd.grad(penalty, tuned_logits)[0]
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)


def test_simpo_prefers_the_sft1_label_over_a_wrong_parity_label():
    """Wrong-parity labels share one logit here, so the loss does not depend on which one was drawn."""
    digits = torch.arange(20) % 10
    logits = random_logits(20, 10)
    wrong = torch.arange(10) % 2 != (digits % 2).unsqueeze(-1)
    logits = logits.masked_fill(wrong, -0.5)
    loss, _ = method_loss_grad("simpo", logits, digits, torch.Generator().manual_seed(0))
    logp = logits.log_softmax(-1)
    chosen = logp.gather(-1, (digits % 2).unsqueeze(-1)).squeeze(-1)
    rejected = logp.gather(-1, (1 - digits % 2).unsqueeze(-1)).squeeze(-1)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - 1.0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_parity_reward_and_correct_set():
    digits = torch.tensor([0, 1, 2, 7])
    labels = torch.tensor([4, 4, 3, 9])
    assert pm.parity_reward(labels, digits).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert pm.correct_labels(torch.tensor([3]))[0].nonzero().flatten().tolist() == [1, 3, 5, 7, 9]


def run_script(*args, cwd=ROOT, env_extra=None):
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "parity_mnist.py"), "--threads", "1", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--method", "ppo"], "invalid choice: 'ppo'"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr=-1e-3"], "--lr must be > 0"),
    (["--method", "sft-distill"], "--method sft-distill needs --teacher"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--warmup", "1"], "--warmup is a fraction"),
])
def test_bad_arguments_give_one_clear_line(args, message):
    result = run_script(*args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_data_without_network_gives_one_clear_line(tmp_path):
    result = run_script("--data-dir", str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: MNIST not found" in result.stderr and "make data" in result.stderr


@pytest.mark.parametrize("content", [b"not a checkpoint", "mismatched", "missing"])
def test_corrupt_or_mismatched_teacher_gives_one_clear_line(content, tmp_path):
    path = tmp_path / "teacher.pt"
    if content == "mismatched":
        torch.save({"w1": torch.zeros(784, 512)}, path)
    elif content != "missing":
        path.write_bytes(content)
    result = run_script("--method", "sft-distill", "--teacher", str(path), "--data-dir", str(DATA_DIR), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: checkpoint {path}" in result.stderr


def test_every_run_trains_saves_and_repeats_its_numbers(tmp_path):
    """Two identical commands train twice and print the same numbers; --save gives sft-distill its teacher."""
    fast = ["--batch-size", "3000", "--eval-every", "0.5", "--data-dir", str(DATA_DIR)]
    first = run_script("--method", "rl", "--save", str(tmp_path / "rl.pt"), *fast, cwd=tmp_path)
    second = run_script("--method", "rl", *fast, cwd=tmp_path)
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        assert "trained 20 steps" in result.stdout
    table = lambda out: [line for line in out.splitlines() if line.strip()[:1].isdigit()]  # noqa: E731
    assert len(table(first.stdout)) == 3 and table(first.stdout) == table(second.stdout)
    distill = run_script("--method", "sft-distill", "--teacher", str(tmp_path / "rl.pt"), *fast, cwd=tmp_path)
    assert distill.returncode == 0 and "trained 20 steps" in distill.stdout


