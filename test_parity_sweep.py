"""Tests of parity_sweep.py: the batched trainer equals the lesson's plain loop, every metric of Table 1 means
what its name says, and the results file resumes without losing or duplicating a run."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import parity_mnist as pm
import parity_sweep as ps
from test_parity_mnist import check_scores, data, base, moved_model, one_thread, small  # noqa: F401 (fixtures)

EVAL_KEYS = ["kind", "run_id", "method", "lr", "scheduler", "epochs", "batch_size", "group_size", "seed", "step",
             "epoch", "wall_s", "parity_acc", "expected_reward", "fashion_acc", "forgetting", "forward_kl",
             "reverse_kl", "tv", "l2", "js", "weight_l1", "fisher_l2", "spectral_norm", "act_l1", "act_l2", "cka"]


@pytest.fixture(scope="module")
def ref(data, base):  # noqa: F811
    return ps.build_reference(base, data)


def config(method, lr=1e-3, **kw):
    kw.setdefault("batch_size", 32)
    kw.setdefault("group_size", 4)
    return ps.RunConfig(method, lr, **kw)


@pytest.mark.parametrize("method", pm.METHODS)
def test_batched_trainer_equals_the_lessons_plain_loop(method, small, ref, tmp_path):  # noqa: F811
    """Every method: two configurations trained as one batched model give, for the one the lesson also
    trains, the lesson's numbers at every evaluation point (and its weights), within 1e-5."""
    teacher = {k: v + 0.01 for k, v in ref.base.items()} if method == "sft-distill" else None
    settings = dict(scheduler="cosine", epochs=1, batch_size=32, group_size=4, seed=3, kl_direction="forward",
                    oracle_targets="soft" if method == "sft-oracle" else "sampled")
    configs = [config(method, 3e-4, **settings), config(method, 1e-3, **{**settings, "scheduler": "constant"})]
    batched_rows, batched_params = ps.train_runs(configs, small, ref, teacher, eval_every=0.5, progress=False)
    args = argparse.Namespace(**vars(configs[1]), eval_every=0.5)
    params, rows = pm.finetune(args, small, ref.base, teacher)
    assert [row["step"] for row in rows] == [row["step"] for row in batched_rows[1]] == [0, 10, 20]
    for row, batched in zip(rows, batched_rows[1]):
        for key in ("parity_acc", "fashion_acc", "forward_kl", "reverse_kl", "forgetting"):
            assert row[key] == pytest.approx(batched[key], abs=1e-5), key
    for key in pm.PARAM_SHAPES:
        torch.testing.assert_close(params[key], batched_params[1][key], atol=1e-5, rtol=1e-5)


def test_a_model_that_did_not_move_scores_exactly_as_the_base(ref, data):  # noqa: F811
    metrics = ps.evaluate(ref.base, data, ref)
    for key in ("forward_kl", "reverse_kl", "tv", "l2", "js", "forgetting", "weight_l1", "fisher_l2",
                "spectral_norm", "act_l1", "act_l2"):
        assert metrics[key] == 0, key
    assert metrics["cka"] == pytest.approx(1, abs=1e-12)
    assert metrics["fashion_acc"] == ref.fashion_acc


def test_table1_metrics_mean_what_their_names_say(ref, data):  # noqa: F811
    moved = moved_model(ref.base)
    metrics = ps.evaluate(moved, data, ref)
    check_scores(metrics, moved, ref.base, data, ref.fashion_acc)
    delta = {k: moved[k] - ref.base[k] for k in pm.PARAM_SHAPES}
    assert metrics["weight_l1"] == pytest.approx(sum(d.abs().sum().item() for d in delta.values()), rel=1e-5)
    fisher = ps.diagonal_fisher(ref.base, data.fashion_train_x[:ps.FISHER_INPUTS])  # prior-task inputs
    expected = math.sqrt(sum((fisher[k].double() * delta[k].double() ** 2).sum().item() for k in delta))
    assert metrics["fisher_l2"] == pytest.approx(expected, rel=1e-5)
    _, hidden = pm.mlp(moved, data.mnist_test_x, return_hidden=True)  # new-task inputs
    _, base_hidden = pm.mlp(ref.base, data.mnist_test_x, return_hidden=True)
    assert metrics["act_l2"] == pytest.approx((hidden - base_hidden).norm(dim=-1).mean().item(), rel=1e-5)
    assert 0 < metrics["cka"] < 1


def test_resume_says_how_many_runs_are_already_there(ref, small, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(ps, "reference_for", lambda data, seed: ref)
    monkeypatch.setattr(ps, "get_data", lambda data_dir: small)
    configs = [config("sft1", 1e-3), config("sft1", 3e-4)]
    monkeypatch.setattr(ps, "studies", lambda args, data: [(configs, "test study")])
    out = tmp_path / "results.jsonl"
    ps.run_sweep(configs[:1], out, small, eval_every=0.5)
    ps.reproduce(ps.parse_args(["--quick", "--out", str(out), "--no-figures"]))
    assert f"resuming: 1 of 2 runs already in {out}" in capsys.readouterr().out
    assert ps.completed_runs(out) == {c.run_id for c in configs}


@pytest.mark.parametrize("method", pm.METHODS)
def test_every_method_writes_well_formed_rows(method, small, ref, tmp_path):
    teacher = tmp_path / "teacher.pt"
    pm.save_params(ref.base, teacher)
    cfg = config(method, teacher=str(teacher) if method == "sft-distill" else "")
    rows, _ = ps.train_runs([cfg], small, ref, pm.load_params(teacher) if cfg.teacher else None, eval_every=0.5)
    out = tmp_path / "results.jsonl"
    ps.append_rows(out, rows[0])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["step"] for row in written] == [0, 10, 20]
    for row in written:
        assert row["kind"] == "eval" and row["method"] == method and set(EVAL_KEYS) <= set(row)
        assert all(math.isfinite(row[k]) for k in EVAL_KEYS[11:])
        assert 0 <= row["parity_acc"] <= 1 and 0 <= row["fashion_acc"] <= 1
    assert written[0]["forward_kl"] == 0 and written[0]["weight_l1"] == 0 and written[0]["forgetting"] == 0
    assert written[-1]["weight_l1"] > 0 and written[-1]["last"] is True


def test_batched_runs_match_runs_trained_alone(small, ref):
    """Stacking sweep configurations into one batched model must not change any run's numbers."""
    configs = [config("rl", lr, scheduler=sch) for lr, sch in ((3e-4, "constant"), (1e-3, "cosine"), (1e-4, "cosine"))]
    batched, batched_params = ps.train_runs(configs, small, ref, eval_every=0.5)
    alone, alone_params = ps.train_runs([configs[1]], small, ref, eval_every=0.5)
    for key in pm.PARAM_SHAPES:
        torch.testing.assert_close(batched_params[1][key], alone_params[0][key], atol=1e-5, rtol=1e-5)
    for row_b, row_a in zip(batched[1], alone[0]):
        for key in EVAL_KEYS[12:]:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-5), key


def test_resume_after_interruption_gives_the_same_rows_once(small, ref, tmp_path, monkeypatch):
    monkeypatch.setattr(ps, "reference_for", lambda data, seed: ref)
    configs = [config("sft1", 1e-3), config("sft1", 3e-4, scheduler="cosine"), config("simpo", 1e-3)]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    clean = tmp_path / "clean.jsonl"
    ps.run_sweep(configs, clean, small, eval_every=0.5)
    # Interrupted: the first batch finished, the simpo run died while its rows were being written.
    interrupted = tmp_path / "interrupted.jsonl"
    lines = clean.read_text().splitlines()
    simpo_lines = [line for line in lines if '"simpo"' in line]
    kept = [line for line in lines if '"simpo"' not in line] + simpo_lines[:1]
    interrupted.write_text("\n".join(kept) + "\n" + simpo_lines[1][:40])
    assert ps.completed_runs(interrupted) == {c.run_id for c in configs[:2]}
    ps.run_sweep(configs, interrupted, small, eval_every=0.5)
    resumed = [json.loads(line) for line in interrupted.read_text().splitlines()]
    original = [json.loads(line) for line in lines]
    assert sorted(map(json.dumps, strip(resumed))) == sorted(map(json.dumps, strip(original)))
    assert len({(r["run_id"], r["step"]) for r in resumed}) == len(resumed) == 9
    ps.run_sweep(configs, interrupted, small, eval_every=0.5)  # complete: nothing more is written
    assert len(interrupted.read_text().splitlines()) == 9


def test_worker_processes_write_what_one_process_writes(small, ref, tmp_path, monkeypatch):
    """--workers 2 (spawned processes, each with its own copy of the data) gives every run the rows that the
    in-process sweep gives it: the batches are independent, only the order of the file's lines differs."""
    monkeypatch.setattr(ps, "reference_for", lambda data, seed: ref)
    configs = [config("rl", 1e-3), config("rl", 3e-4, scheduler="cosine"), config("sft1", 1e-3), config("simpo", 1e-3)]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    ps.run_sweep(configs, one, small, eval_every=0.5, max_batch=1, workers=1, threads=1)
    ps.run_sweep(configs, two, small, eval_every=0.5, max_batch=1, workers=2, threads=1)
    key = lambda row: (row["run_id"], row["step"])  # noqa: E731
    in_process = {key(row): row for row in map(json.loads, one.read_text().splitlines())}
    in_workers = {key(row): row for row in map(json.loads, two.read_text().splitlines())}
    assert in_process.keys() == in_workers.keys() and len(in_process) == 12
    for k, row in in_process.items():
        for name in EVAL_KEYS[12:]:
            assert in_workers[k][name] == pytest.approx(row[name], rel=1e-6, abs=1e-9), (k, name)
    assert ps.completed_runs(two) == {c.run_id for c in configs}


def test_largest_singular_value_is_the_spectral_norm():
    gen = torch.Generator().manual_seed(0)
    for shape in [(785, 512), (512, 256), (256, 10), (10, 256)]:  # the layers' changes, and a wide matrix
        matrix = 1e-3 * torch.randn(*shape, generator=gen)
        matrix[:, 0] += 0.01  # one dominant direction, as a trained layer's change has
        expected = torch.linalg.matrix_norm(matrix.double(), 2).item()
        assert ps.largest_singular_value(matrix).item() == pytest.approx(expected, rel=1e-5), shape
    rank_one = torch.outer(torch.randn(50, generator=gen), torch.randn(20, generator=gen))
    expected = torch.linalg.matrix_norm(rank_one.double(), 2).item()
    assert ps.largest_singular_value(rank_one).item() == pytest.approx(expected, rel=1e-5)
    assert ps.largest_singular_value(torch.zeros(30, 20)).item() == 0


def test_in_place_forward_is_the_lessons_forward_bit_for_bit(ref, data):  # noqa: F811
    gen = torch.Generator().manual_seed(0)
    params = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in ref.base.items()}
    before = {k: v.clone() for k, v in params.items()}
    images = data.mnist_test_x[:500].clone()
    logits, hidden = ps.forward_in_place(params, images)
    expected_logits, expected_hidden = pm.mlp(params, images, return_hidden=True)
    assert torch.equal(logits, expected_logits) and torch.equal(hidden, expected_hidden)
    assert all(torch.equal(params[k], before[k]) for k in params)  # only the products are written into
    assert torch.equal(images, data.mnist_test_x[:500])


def test_plan_flops_counts_every_evaluation_point_and_probe():
    data = argparse.Namespace(mnist_train_x=torch.empty(60000, 0), mnist_test_x=torch.empty(10000, 0),
                              fashion_test_x=torch.empty(10000, 0))  # the datasets' sizes are all it reads
    per_image = ps.training_flops_per_image()
    eval_point = 20000 * ps.forward_flops_per_image()
    one_epoch, two_epochs = ps.RunConfig("sft1", 1e-3), ps.RunConfig("sft1", 1e-3, epochs=2)
    assert ps.plan_flops([one_epoch], data, 0.2) == (937 * 64 * per_image, (5 + 1) * eval_point)
    assert ps.plan_flops([one_epoch, two_epochs, two_epochs], data, 0.2) == (
        3 * 937 * 64 * per_image, (5 + 10 + 1) * eval_point)  # a run listed twice counts once; step 0 once
    logged = ps.RunConfig("sft1", 1e-3, log_steps=10)
    probe = ps.FIG10_FASHION * per_image + 2 * ps.FIG10_MNIST * ps.forward_flops_per_image()
    assert ps.plan_flops([logged], data, 0.2)[0] == 937 * 64 * per_image + 93 * probe


def test_step_rows_for_fig10(small, ref):
    configs = [config("sft1", 1e-3, log_steps=5), config("sft1", 3e-4, log_steps=5)]
    rows, _ = ps.train_runs(configs[:1], small, ref, eval_every=0.5)
    assert [(row["kind"], row["step"]) for row in rows[0]] == [
        ("eval", 0), ("step", 1), ("step", 6), ("eval", 10), ("step", 11), ("step", 16), ("eval", 20)]
    steps = [row for row in rows[0] if row["kind"] == "step"]
    # The first step of the warmup has lr 0 (transformers' schedule): no update, no KL change.
    assert steps[0]["cos_update_prior_grad"] == 0 and steps[0]["delta_forward_kl"] == 0
    for row in steps[1:]:
        assert 0 < abs(row["cos_update_prior_grad"]) <= 1 and row["delta_forward_kl"] != 0
    # Alone (weights are views of the trained tensors) and batched (copies) agree.
    batched, _ = ps.train_runs(configs[::-1], small, ref, eval_every=0.5)
    for alone_row, batched_row in zip(steps, [row for row in batched[1] if row["kind"] == "step"]):
        for key in ("cos_update_prior_grad", "delta_forward_kl"):
            assert alone_row[key] == pytest.approx(batched_row[key], rel=1e-3, abs=1e-6)


def test_diagonal_fisher_matches_per_example_autograd(ref, data):
    x = data.fashion_train_x[:3]
    fisher = ps.diagonal_fisher(ref.base, x)
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
    grid = ps.paper_grid()
    assert len(grid) == 300 and len({c.run_id for c in grid}) == 300
    paper = [3.0e-6, 4.54e-6, 6.88e-6, 1.04e-5, 1.58e-5, 2.39e-5, 3.62e-5, 5.48e-5, 8.29e-5, 1.26e-4, 1.90e-4,
             2.88e-4, 4.36e-4, 6.60e-4, 1.0e-3]
    np.testing.assert_allclose(ps.PAPER_LRS, paper, rtol=5e-3)
    for method in ps.FIG3_METHODS:
        assert sum(c.method == method for c in grid) == 60
    quick = ps.quick_grid("teacher.pt")
    assert {c.method for c in quick} == set(pm.METHODS) and len(quick) < len(grid) / 5
    assert {c.run_id for c in ps.seeds_grid() if c.seed == 0} <= {c.run_id for c in grid}


def test_fig10_rows_against_an_independent_computation(small, ref, data):  # noqa: F811
    """Step rows of every step telescope to the probe's final forward KL (so ΔKL has the right sign and
    inputs), and the first step's cosine is the one between that update and the FashionMNIST-loss gradient
    at π0 (a positive cosine: the update raises the prior task's loss to first order)."""
    cfg = config("sft1", 3e-3, warmup=0.0, log_steps=1)
    rows, (params,) = ps.train_runs([cfg], small, ref, eval_every=0, progress=False)
    steps = [row for row in rows[0] if row["kind"] == "step"]
    assert len(steps) == 20
    probe_x = data.mnist_test_x[:ps.FIG10_MNIST]
    final_kl = kl_divergence(Categorical(logits=pm.mlp(ref.base, probe_x)), Categorical(logits=pm.mlp(params, probe_x)))
    assert sum(row["delta_forward_kl"] for row in steps) == pytest.approx(final_kl.mean().item(), rel=1e-3)
    one_batch = pm.Data(**{**vars(small), "mnist_train_x": small.mnist_train_x[:32],
                           "mnist_train_y": small.mnist_train_y[:32]})
    one_step, (after_one,) = ps.train_runs([cfg], one_batch, ref, eval_every=0, progress=False)
    base = {k: v.clone().requires_grad_() for k, v in ref.base.items()}
    fashion_x, fashion_y = data.fashion_test_x[:ps.FIG10_FASHION], data.fashion_test_y[:ps.FIG10_FASHION]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(pm.mlp(base, fashion_x), fashion_y), list(base.values()))
    update = torch.cat([(after_one[k] - ref.base[k]).flatten() for k in base]).double()
    gradient = torch.cat([g.flatten() for g in grads]).double()
    expected = torch.nn.functional.cosine_similarity(update, gradient, dim=0).item()
    assert one_step[0][0]["cos_update_prior_grad"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
