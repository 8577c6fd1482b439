"""Tests of parity_figures.py: the analysis on a synthetic results file, and the theory of §5.2."""
import json
import math
import os

import numpy as np
import pytest
import torch

import kl
import parity_figures as pf

FIGURES = ["parity_fig3_tradeoff_and_law.png", "parity_table1_predictors.png",
           "parity_2x2_onpolicy_vs_negatives.png", "parity_fig9_distill_from_rl.png",
           "parity_fig10_step_dynamics.png", "parity_fig7_cka.png", "parity_theory_em.png"]
BASE_FASHION, BASE_PARITY = 0.685, 0.877


def quadratic_law(forward_kl):
    """The exact forgetting law of the synthetic file: FashionMNIST accuracy, a quadratic in KL."""
    return BASE_FASHION - 0.09 * forward_kl + 0.004 * forward_kl**2


def synthetic_rows(methods, seeds=(0, 1), lrs=(1e-5, 1e-4, 1e-3), checkpoints=5, with_steps=True, with_cka=True):
    """Well-formed rows as parity_sweep.py writes them, with made-up numbers: each method moves KL at
    its own rate, FashionMNIST accuracy follows quadratic_law exactly, other predictors follow it loosely."""
    rng = np.random.default_rng(0)
    speed = {"sft1": 6.0, "sft2": 3.5, "sft-oracle": 0.3, "rl": 0.9, "rl-kl": 0.4, "reinforce": 1.0,
             "simpo": 4.0, "sft-distill": 0.9}
    rows = []
    for seed in seeds:
        for method in methods:
            for lr in lrs:
                run_id = f"{method}|lr={lr:g}|cosine|ep=1|bs=64|seed={seed}"
                common = {"run_id": run_id, "method": method, "lr": lr, "scheduler": "cosine", "epochs": 1,
                          "batch_size": 64, "group_size": 8, "seed": seed, "study": "paper-grid"}
                for k in range(checkpoints + 1):
                    progress = k / checkpoints
                    forward = speed[method] * progress * (1 + math.log10(lr / 1e-5)) / 3
                    parity = BASE_PARITY + (0.99 - BASE_PARITY) * (1 - math.exp(-4 * forward / speed[method]))
                    noise = rng.normal(0, 0.02)
                    fashion = quadratic_law(forward)
                    row = dict(common, kind="eval", step=k * 100, epoch=progress, wall_s=float(k),
                               parity_acc=parity, expected_reward=parity, fashion_acc=fashion,
                               forgetting=BASE_FASHION - fashion, forward_kl=forward, reverse_kl=0.8 * forward + noise * k,
                               tv=min(1.0, 0.2 * math.sqrt(forward)) + noise * k, l2=0.1 * forward + abs(noise),
                               js=0.1 * forward, weight_l1=lr * 1e4 * progress, fisher_l2=rng.random() * progress,
                               spectral_norm=lr * 1e3 * progress, act_l1=forward + rng.random(), act_l2=forward * rng.random())
                    if with_cka:
                        row["cka"] = 1.0 / (1.0 + 0.3 * forward)
                    rows.append(row)
                    if with_steps and k > 0:
                        delta = forward / (checkpoints * 10) * rng.random()
                        rows.append(dict(common, kind="step", step=k * 100, epoch=progress,
                                         cos_update_prior_grad=delta / (0.01 + delta) + rng.normal(0, 0.01),
                                         delta_forward_kl=delta))
    return rows


def write(path, rows, extra_lines=()):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.writelines(extra_lines)
    return str(path)


@pytest.fixture(scope="module")
def full_analysis(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    rows = synthetic_rows(list(pf.METHODS))
    results = write(folder / "results.jsonl", rows + rows[:3], extra_lines=['{"kind": "eval", "run_id"'])
    plots = folder / "plots"
    return plots, pf.make_all(results, str(plots), n_boot=50)


def test_every_figure_and_the_report_are_written(full_analysis):
    plots, _ = full_analysis
    for name in FIGURES + ["parity_results.md"]:
        assert (plots / name).stat().st_size > 1000, name
    report = (plots / "parity_results.md").read_text()
    for heading in ["### Claims", "### Fig. 3", "### Table 1", "### The 2x2", "### Fig. 9", "### Fig. 10",
                    "### Fig. 7 analogue", "### Theory"]:
        assert heading in report
    for png in FIGURES:
        assert f"{os.path.relpath(plots / png)})" in report


def test_exact_quadratic_law_has_r2_one(full_analysis):
    _, out = full_analysis
    r2, low, high, n = out["fig3"]["r2"]
    assert r2 == pytest.approx(1.0, abs=1e-9) and low == pytest.approx(1.0, abs=1e-9)
    # 5 methods x 3 lrs x 5 checkpoints at the primary seed, plus the base model once
    assert n == 5 * 3 * 5 + 1
    assert out["table1"]["forward_kl"]["fit"][0] == pytest.approx(1.0, abs=1e-9)
    assert out["table1"]["weight_l1"]["fit"][0] < 0.99  # a loose predictor does not fit exactly
    assert set(out["fig3"]["seed_r2"]) == {0, 1}


def test_matched_accuracy_reads_the_best_checkpoint(full_analysis):
    _, out = full_analysis
    fig3 = out["fig3"]
    assert fig3["target"] == pf.TARGET_ACCURACY
    for v in fig3["methods"].values():
        # on the exact law, the lowest KL at the target gives the highest FashionMNIST accuracy
        assert v["fashion_at_target"] == pytest.approx(quadratic_law(v["kl_at_target"]))
    assert fig3["methods"]["sft-oracle"]["fashion_at_target"] > fig3["methods"]["sft1"]["fashion_at_target"]
    assert out["dynamics"]["rl"]["spearman"] > 0.5 and out["dynamics"]["all"]["pearson"] > 0.5  # cosine rises with ΔKL


def test_best_at_accuracy_and_matched_target():
    rows = [{"parity_acc": 0.95, "fashion_acc": 0.60}, {"parity_acc": 0.97, "fashion_acc": 0.50},
            {"parity_acc": 0.98, "fashion_acc": 0.55}]
    assert pf.best_at_accuracy(rows, "fashion_acc", 0.96) == 0.55
    assert math.isnan(pf.best_at_accuracy(rows, "fashion_acc", 0.99))
    assert pf.matched_target({"a": rows, "b": rows[:1]}) == 0.95


def test_missing_studies_are_skipped_not_crashed(tmp_path, capsys):
    rows = synthetic_rows(["sft1", "rl"], seeds=(0,), with_steps=False, with_cka=False)
    out = pf.make_all(write(tmp_path / "r.jsonl", rows), str(tmp_path / "plots"), n_boot=20)
    assert out["two_by_two"] is None and out["distill"] is None and out["dynamics"] is None and out["cka"] is None
    printed = capsys.readouterr().out
    assert "skipped the 2x2" in printed and "skipped Fig. 9" in printed and "skipped Fig. 10" in printed
    written = set(os.listdir(tmp_path / "plots"))
    assert {"parity_fig3_tradeoff_and_law.png", "parity_table1_predictors.png", "parity_theory_em.png",
            "parity_results.md"} <= written
    assert "parity_2x2_onpolicy_vs_negatives.png" not in written


def test_empty_results_file_draws_only_the_theory(tmp_path):
    out = pf.make_all(write(tmp_path / "empty.jsonl", []), str(tmp_path / "plots"), n_boot=20)
    assert out["fig3"] is None
    assert sorted(os.listdir(tmp_path / "plots")) == ["parity_results.md", "parity_theory_em.png"]


def test_missing_results_file_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["parity_figures.py", "--results", str(tmp_path / "nope.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        pf.main()
    assert exit_info.value.code != 0
    assert "parity_sweep.py --quick" in capsys.readouterr().err


# ---- the theory (§5.2, App. A) and its worked example --------------------------------------


def test_worked_example_i_projection_and_sft_targets():
    base, correct = pf.worked_example()
    projection = pf.em_step(base, correct)
    assert torch.softmax(projection, -1)[0].tolist() == pytest.approx([0.8333333, 0.1666667, 0.0], abs=1e-6)
    assert kl.reverse_kl(base, projection).item() == pytest.approx(-math.log(0.6), abs=1e-9)
    assert -math.log(0.6) == pytest.approx(0.511, abs=5e-4)
    for target, expected in [([1.0, 0.0, 0.0], 0.693), ([0.0, 1.0, 0.0], 2.303), ([0.5, 0.5, 0.0], 0.805)]:
        logits = pf.probs_to_logits(torch.tensor([target], dtype=torch.float64))
        assert kl.reverse_kl(base, logits).item() == pytest.approx(expected, abs=5e-4)


def test_em_lands_on_pi0_restricted_to_s_and_stays():
    base, correct = pf.parity_bandit()
    once = pf.em_step(base, correct)
    twice = pf.em_step(once, correct)
    expected = torch.softmax(base, -1) * correct
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(torch.softmax(once, -1), expected, atol=1e-12)
    assert torch.allclose(torch.softmax(twice, -1), expected, atol=1e-12)
    min_kl = -(torch.softmax(base, -1) * correct).sum(-1).log()
    assert torch.allclose(kl.reverse_kl(base, once), min_kl, atol=1e-9)


def test_exact_policy_gradient_loss_has_the_gradient_of_expected_reward():
    base, correct = pf.parity_bandit(n_inputs=4)
    logits = base.clone().requires_grad_(True)
    (4 * pf.exact_policy_gradient_loss(logits, correct)).backward()
    pi = torch.softmax(base, -1)
    reward = (pi * correct).sum(-1, keepdim=True)
    assert torch.allclose(logits.grad, -pi * (correct.double() - reward), atol=1e-12)  # d E[R] / d logits = pi (R - J)


def test_theory_runs_reproduce_paper_numbers():
    experiment = pf.theory_experiment()
    example = experiment["worked example"]
    runs, minimum = example["runs"], example["min_kl"]
    assert minimum == pytest.approx(-math.log(0.6))
    assert runs["exact EM (I-step + M-step)"]["curve"][-1] == pytest.approx(minimum, abs=1e-9)
    adam = runs["Adam on exact policy gradient"]
    assert adam["curve"][-1] == pytest.approx(0.510, abs=2e-3)
    assert adam["final"][0].tolist() == pytest.approx([0.8333, 0.1666, 0.0001], abs=5e-4)
    sgd = runs["plain SGD on logits, exact gradient"]
    assert sgd["curve"][-1] == pytest.approx(0.676, abs=2e-3)  # plain SGD ends away from the minimum
    assert sgd["final"][0].tolist() == pytest.approx([0.997, 0.003, 0.0001], abs=5e-4)
    assert runs["SFT on a fixed correct label, Adam"]["curve"][-1] == pytest.approx(-math.log(0.5), abs=2e-3)
    parity = experiment["ParityMNIST outputs"]
    assert parity["runs"]["Adam on exact policy gradient"]["curve"][-1] == pytest.approx(parity["min_kl"], abs=0.02)
    assert parity["runs"]["SFT on a fixed correct label, Adam"]["curve"][-1] > parity["min_kl"] + 0.3


def test_the_law_is_drawn_only_where_the_quadratic_describes_the_data():
    """Fig. 3 (middle): a convex fit is drawn up to its minimum when that comes before the largest KL."""
    coefficients = np.polyfit([0, 5, 10, 15], [0.68, 0.40, 0.22, 0.20], 2)
    vertex = -coefficients[1] / (2 * coefficients[0])
    assert 10 < vertex < 15
    assert pf.fit_range(coefficients, 15.0) == pytest.approx(vertex)
    assert pf.fit_range(coefficients, 8.0) == 8.0  # the data end before the minimum
    assert pf.fit_range(np.array([-0.001, -0.05, 0.68]), 15.0) == 15.0  # concave: no minimum to stop at
