"""Tests of parity_mnist.py on small subsets of the real MNIST/FashionMNIST in data/ (`make data`)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kl
import parity_mnist as pm

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
EVAL_KEYS = ["kind", "run_id", "method", "lr", "scheduler", "epochs", "batch_size", "group_size", "seed", "step",
             "epoch", "wall_s", "parity_acc", "expected_reward", "fashion_acc", "forgetting", "forward_kl",
             "reverse_kl", "tv", "l2", "js", "weight_l1", "fisher_l2", "spectral_norm", "act_l1", "act_l2", "cka"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the script's default on this shared machine; restored for other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return pm.load_data(str(DATA_DIR), train_size=2000, test_size=500)


@pytest.fixture(scope="module")
def ref(data):
    return pm.build_reference(pm.pretrain(data, seed=0, progress=False), data)


@pytest.fixture(scope="module")
def small(data):
    """640 training images: 20 steps of batch 32 per epoch."""
    return dataclasses.replace(data, mnist_train_x=data.mnist_train_x[:640], mnist_train_y=data.mnist_train_y[:640])


def config(method, lr=1e-3, **kw):
    kw.setdefault("batch_size", 32)
    kw.setdefault("group_size", 4)
    return pm.RunConfig(method, lr, **kw)


def test_input_is_785_wide_with_task_indicator(data, ref):
    assert data.mnist_train_x.shape[1] == data.fashion_test_x.shape[1] == 785
    assert torch.all(data.mnist_test_x[:, -1] == 1) and torch.all(data.fashion_test_x[:, -1] == -1)
    assert ref.base["w1"].shape == (785, 512)
    # The indicator is an input the model uses: flipping it changes the logits.
    flipped = data.mnist_test_x[:10].clone()
    flipped[:, -1] = -1
    assert not torch.allclose(pm.mlp(ref.base, flipped), pm.mlp(ref.base, data.mnist_test_x[:10]))
    # One model and the same model stacked R times compute the same logits.
    stacked = {k: v.expand(3, *v.shape) for k, v in ref.base.items()}
    torch.testing.assert_close(pm.mlp(stacked, data.mnist_test_x[:10])[2], pm.mlp(ref.base, data.mnist_test_x[:10]))


@pytest.mark.parametrize("method", pm.METHODS)
def test_every_method_writes_well_formed_rows(method, small, ref, tmp_path):
    teacher = tmp_path / "teacher.pt"
    pm.save_params(ref.base, teacher)
    cfg = config(method, teacher=str(teacher) if method == "sft-distill" else "")
    rows, _ = pm.train_runs([cfg], small, ref, pm.load_params(teacher) if cfg.teacher else None, eval_every=0.5)
    out = tmp_path / "results.jsonl"
    pm.append_rows(out, rows[0])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["step"] for row in written] == [0, 10, 20]
    for row in written:
        assert row["kind"] == "eval" and row["method"] == method and set(EVAL_KEYS) <= set(row)
        assert all(math.isfinite(row[k]) for k in EVAL_KEYS[11:])
        assert 0 <= row["parity_acc"] <= 1 and 0 <= row["fashion_acc"] <= 1
    assert written[0]["forward_kl"] == 0 and written[0]["weight_l1"] == 0 and written[0]["forgetting"] == 0
    assert written[-1]["weight_l1"] > 0 and written[-1]["last"] is True


def test_oracle_targets_are_base_restricted_to_correct_parity(ref, data):
    digits = data.mnist_train_y[:200]
    base_logits = pm.mlp(ref.base, data.mnist_train_x[:200])
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


def test_rl_raises_expected_reward_and_starts_at_zero_kl(small, ref):
    rows, _ = pm.train_runs([config("rl", 1e-3, epochs=2)], small, ref, eval_every=1.0)
    before, after = rows[0][0], rows[0][-1]
    assert before["forward_kl"] == 0 and before["reverse_kl"] == 0 and before["tv"] == 0
    assert after["expected_reward"] > before["expected_reward"] + 0.02
    assert after["forward_kl"] > 0


def test_batched_runs_match_runs_trained_alone(small, ref):
    """Stacking sweep configurations into one batched model must not change any run's numbers."""
    configs = [config("rl", lr, scheduler=sch) for lr, sch in ((3e-4, "constant"), (1e-3, "cosine"), (1e-4, "cosine"))]
    batched, batched_params = pm.train_runs(configs, small, ref, eval_every=0.5)
    alone, alone_params = pm.train_runs([configs[1]], small, ref, eval_every=0.5)
    for key in pm.PARAM_SHAPES:
        torch.testing.assert_close(batched_params[1][key], alone_params[0][key], atol=1e-5, rtol=1e-5)
    for row_b, row_a in zip(batched[1], alone[0]):
        for key in EVAL_KEYS[12:]:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-5), key


def test_resume_after_interruption_gives_the_same_rows_once(small, ref, tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "reference_for", lambda data, seed, progress=True: ref)
    configs = [config("sft1", 1e-3), config("sft1", 3e-4, scheduler="cosine"), config("simpo", 1e-3)]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    clean = tmp_path / "clean.jsonl"
    pm.run_sweep(configs, clean, small, eval_every=0.5)
    # Interrupted: the first batch finished, the simpo run died while its rows were being written.
    interrupted = tmp_path / "interrupted.jsonl"
    lines = clean.read_text().splitlines()
    simpo_lines = [line for line in lines if '"simpo"' in line]
    kept = [line for line in lines if '"simpo"' not in line] + simpo_lines[:1]
    interrupted.write_text("\n".join(kept) + "\n" + simpo_lines[1][:40])
    assert pm.completed_runs(interrupted) == {c.run_id for c in configs[:2]}
    pm.run_sweep(configs, interrupted, small, eval_every=0.5)
    resumed = [json.loads(line) for line in interrupted.read_text().splitlines()]
    original = [json.loads(line) for line in lines]
    assert sorted(map(json.dumps, strip(resumed))) == sorted(map(json.dumps, strip(original)))
    assert len({(r["run_id"], r["step"]) for r in resumed}) == len(resumed) == 9
    pm.run_sweep(configs, interrupted, small, eval_every=0.5)  # complete: nothing more is written
    assert len(interrupted.read_text().splitlines()) == 9


def test_step_rows_for_fig10(small, ref):
    configs = [config("sft1", 1e-3, log_steps=5), config("sft1", 3e-4, log_steps=5)]
    rows, _ = pm.train_runs(configs[:1], small, ref, eval_every=0.5)
    assert [(row["kind"], row["step"]) for row in rows[0]] == [
        ("eval", 0), ("step", 1), ("step", 6), ("eval", 10), ("step", 11), ("step", 16), ("eval", 20)]
    steps = [row for row in rows[0] if row["kind"] == "step"]
    # The first step of the warmup has lr 0 (transformers' schedule): no update, no KL change.
    assert steps[0]["cos_update_prior_grad"] == 0 and steps[0]["delta_forward_kl"] == 0
    for row in steps[1:]:
        assert 0 < abs(row["cos_update_prior_grad"]) <= 1 and row["delta_forward_kl"] != 0
    # Alone (weights are views of the trained tensors) and batched (copies) agree.
    batched, _ = pm.train_runs(configs[::-1], small, ref, eval_every=0.5)
    for alone_row, batched_row in zip(steps, [row for row in batched[1] if row["kind"] == "step"]):
        for key in ("cos_update_prior_grad", "delta_forward_kl"):
            assert alone_row[key] == pytest.approx(batched_row[key], rel=1e-3, abs=1e-6)



def test_diagonal_fisher_matches_per_example_autograd(ref, data):
    x = data.fashion_train_x[:3]
    fisher = pm.diagonal_fisher(ref.base, x)
    params = {k: v.clone().requires_grad_() for k, v in ref.base.items()}
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        logp = torch.log_softmax(pm.mlp(params, x[i:i + 1])[0], -1)
        for y in range(10):
            grads = torch.autograd.grad(logp[y], list(params.values()), retain_graph=True)
            for k, g in zip(params, grads):
                expected[k] += logp[y].exp().detach() * g**2 / len(x)
    for k in params:
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-4, atol=1e-9)


def test_grids_have_the_sizes_the_paper_states():
    grid = pm.paper_grid()
    assert len(grid) == 300 and len({c.run_id for c in grid}) == 300
    paper = [3.0e-6, 4.54e-6, 6.88e-6, 1.04e-5, 1.58e-5, 2.39e-5, 3.62e-5, 5.48e-5, 8.29e-5, 1.26e-4, 1.90e-4,
             2.88e-4, 4.36e-4, 6.60e-4, 1.0e-3]
    np.testing.assert_allclose(pm.PAPER_LRS, paper, rtol=5e-3)
    for method in pm.FIG3_METHODS:
        assert sum(c.method == method for c in grid) == 60
    quick = pm.quick_grid("teacher.pt")
    assert {c.method for c in quick} == set(pm.METHODS) and len(quick) < len(grid) / 5
    assert {c.run_id for c in pm.seeds_grid() if c.seed == 0} <= {c.run_id for c in grid}


def run_script(*args, cwd=ROOT, env_extra=None):
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "parity_mnist.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--method", "ppo"], "invalid choice: 'ppo'"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr=-1e-3"], "--lr must be > 0"),
    (["--method", "sft-distill"], "--method sft-distill needs --teacher"),
])
def test_bad_arguments_give_one_clear_line(args, message):
    result = run_script(*args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_data_without_network_gives_one_clear_line(tmp_path):
    result = run_script("--data-dir", str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: MNIST not found" in result.stderr and "make data" in result.stderr


@pytest.mark.parametrize("content", [b"not a checkpoint", "mismatched"])
def test_corrupt_or_mismatched_checkpoint_gives_one_clear_line(content, tmp_path):
    path = tmp_path / "runs" / "parity" / "base_seed0.pt"
    path.parent.mkdir(parents=True)
    if content == "mismatched":
        torch.save({"w1": torch.zeros(784, 512)}, path)
    else:
        path.write_bytes(content)
    for args in (["--method", "rl"], ["--method", "sft-distill", "--teacher", str(path)]):
        result = run_script(*args, "--data-dir", str(DATA_DIR), cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert f"error: checkpoint {path.relative_to(tmp_path) if args[1] == 'rl' else path}" in result.stderr


# --------------------------------------------------------------------------------------------------
# Wiring: what each recorded number means and what each method trains toward. Each test is written so
# that a one-line mistake in the script (a swapped argument, a flipped sign, a wrong label set, an
# ignored flag) fails it. `method_loss_grad` and `evaluate` are the only places that know the scripts'
# function signatures.
# --------------------------------------------------------------------------------------------------

from torch.distributions import Categorical, kl_divergence  # noqa: E402


def method_loss_grad(method, logits, digits, gen, base_logits=None, teacher_logits=None, sft2_labels=None, **cfg):
    """(loss, d loss / d logits) of one method on a batch of logits [B, 10]."""
    logits = logits.clone().requires_grad_()
    cfg = config(method, **cfg)
    batch = len(digits)
    fixed = {"sft2_coin": torch.zeros(batch, dtype=torch.long) if sft2_labels is None else (sft2_labels - digits % 2) // 4}
    if base_logits is not None:
        fixed["base_logits"] = base_logits
    if teacher_logits is not None:
        fixed["teacher_logits"] = teacher_logits
    loss = pm.method_loss(cfg, logits.unsqueeze(0), digits, torch.arange(batch), None, fixed, gen)
    return loss, torch.autograd.grad(loss, logits)[0]


def evaluate(params, data, ref):
    return pm.evaluate(params, data, ref)


def random_logits(batch, seed):
    return 2 * torch.randn(batch, 10, generator=torch.Generator().manual_seed(seed))


def implied_targets(logits, grad):
    """For a cross-entropy loss averaged over B rows, d loss / d logits = (softmax - target) / B."""
    return logits.softmax(-1) - len(logits) * grad


def test_a_model_that_did_not_move_scores_exactly_as_the_base(ref, data):
    metrics = evaluate(ref.base, data, ref)
    for key in ("forward_kl", "reverse_kl", "tv", "l2", "js", "forgetting", "weight_l1", "fisher_l2",
                "spectral_norm", "act_l1", "act_l2"):
        assert metrics[key] == 0, key
    assert metrics["cka"] == pytest.approx(1, abs=1e-12)
    assert metrics["fashion_acc"] == ref.fashion_acc


def test_recorded_divergences_are_named_by_direction_and_measured_on_new_task_inputs(ref, data):
    gen = torch.Generator().manual_seed(1)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in ref.base.items()}
    moved["b3"] = moved["b3"] + 3 * (torch.arange(10) == 0)  # mass toward label 0: KL(pi0||pi) != KL(pi||pi0)
    metrics = evaluate(moved, data, ref)
    base = Categorical(logits=pm.mlp(ref.base, data.mnist_test_x).double())  # MNIST test, indicator +1
    tuned = Categorical(logits=pm.mlp(moved, data.mnist_test_x).double())
    forward, reverse = kl_divergence(base, tuned).mean().item(), kl_divergence(tuned, base).mean().item()
    assert abs(forward - reverse) > 0.1 * forward  # the two directions are told apart by this test
    assert metrics["forward_kl"] == pytest.approx(forward, rel=1e-4)
    assert metrics["reverse_kl"] == pytest.approx(reverse, rel=1e-4)
    fashion_acc = (pm.mlp(moved, data.fashion_test_x).argmax(-1) == data.fashion_test_y).float().mean().item()
    parity_acc = (pm.mlp(moved, data.mnist_test_x).argmax(-1) % 2 == data.mnist_test_y % 2).float().mean().item()
    assert metrics["fashion_acc"] == pytest.approx(fashion_acc)
    assert metrics["parity_acc"] == pytest.approx(parity_acc)
    assert metrics["forgetting"] == pytest.approx(ref.fashion_acc - fashion_acc)  # base minus current
    assert metrics["forgetting"] > 0  # this random move costs FashionMNIST accuracy


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
