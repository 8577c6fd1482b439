"""Tests for vla_finetune.py: OpenVLA's action tokenisation, the stand-in VLA, the RL/SFT updates, the
KL, LoRA, the caches, the study's statistics, and short ManiSkill3 rollouts (skipped only where no Vulkan
device exists). CPU, offline."""
import ctypes.util
import glob
import inspect
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kl
import vla_finetune as vla

INSTRUCTION = vla.TASKS["PickCube-v1"]["instruction"]


# ---------------------------------------------------------------- tokenisation (OpenVLA's public code)

def test_action_token_constants():
    assert vla.ACTION_TOKEN_BEGIN == 31744 and vla.SPIECE_UNDERLINE_ID == 29871
    assert vla.actions_to_tokens([-1.0, 0.0, 1.0]).tolist() == [31999, 31872, 31744]
    assert vla.tokens_to_actions([31744])[0] == pytest.approx(0.99608, abs=1e-5)
    assert vla.tokens_to_actions([31999])[0] == pytest.approx(-0.99608, abs=1e-5)
    assert vla.prompt_for("Pick Up the Cube") == "In: What action should the robot take to pick up the cube?\nOut:"


def test_tokenisation_round_trip_within_half_a_bin():
    a = np.random.default_rng(0).uniform(-1.2, 1.2, size=(1000, 7))
    tokens = vla.actions_to_tokens(a)
    assert tokens.min() >= 31744 and tokens.max() <= 31999
    decoded = vla.tokens_to_actions(tokens)
    assert np.abs(decoded - np.clip(a, -1, 1)).max() <= 1 / 255 + 1e-9  # half of a bin of width 2/255


def test_normalisation_round_trip_and_gripper_untouched():
    rng = np.random.default_rng(1)
    actions = np.c_[rng.normal(size=(500, 6)) * 0.3, rng.integers(0, 2, size=(500, 1))]
    stats = vla.action_stats(actions)
    normalized = vla.normalize_actions(actions, stats)
    assert np.all(np.abs(normalized) <= 1) and np.array_equal(normalized[:, 6], actions[:, 6])
    q01, q99 = np.array(stats["action"]["q01"][:6]), np.array(stats["action"]["q99"][:6])
    inside = np.all((actions[:, :6] >= q01) & (actions[:, :6] <= q99), 1)
    restored = vla.unnormalize_actions(normalized, stats)
    np.testing.assert_allclose(restored[inside], actions[inside], atol=1e-6)


def test_an_unused_action_dimension_maps_to_zero_as_in_openvla():
    """OpenVLA's data_utils: clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1), then min == max dims -> 0."""
    rng = np.random.default_rng(2)
    actions = np.c_[rng.normal(size=(300, 3)) * 0.3, np.zeros((300, 2)), np.full((300, 1), 0.25),
                    rng.integers(0, 2, size=(300, 1))]
    stats = vla.action_stats(actions)
    normalized = vla.normalize_actions(actions, stats)
    assert np.array_equal(normalized[:, 3:6], np.zeros((300, 3)))  # was -1 (token 31999) before
    assert np.all(vla.actions_to_tokens(normalized[:, 3:6]) == 31872)  # the zero bin
    q01, q99 = np.array(stats["action"]["q01"][:3]), np.array(stats["action"]["q99"][:3])
    np.testing.assert_allclose(normalized[:, :3], np.clip(2 * (actions[:, :3] - q01) / (q99 - q01 + 1e-8) - 1, -1, 1))
    decoded = vla.unnormalize_actions(vla.tokens_to_actions(vla.actions_to_tokens(normalized)), stats)
    np.testing.assert_allclose(decoded[:, 3:6], actions[:, 3:6])  # an unused dimension decodes to its constant


# ---------------------------------------------------------------- the stand-in through the Auto classes

@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    path = tmp_path_factory.mktemp("stand_in")
    stats = {"maniskill": vla.action_stats(np.random.default_rng(0).uniform(-1, 1, size=(100, 7)))}
    vla.build_stand_in(path, image_size=32, norm_stats=stats)
    return str(path)


@pytest.fixture(scope="module")
def batch():
    images = list(np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8))
    tokens = torch.as_tensor(vla.actions_to_tokens(np.random.default_rng(1).uniform(-1, 1, (6, 7))))
    return images, tokens


def test_loads_through_auto_classes_and_predicts_a_7d_action(stand_in, batch):
    model, processor = vla.load_policy(stand_in)
    assert isinstance(model, vla.TinyVLAForActionPrediction) and isinstance(processor, vla.TinyVLAProcessor)
    assert model.get_input_embeddings().num_embeddings == 32000
    inputs = processor(vla.prompt_for(INSTRUCTION), batch[0][0])
    assert inputs["input_ids"][0, 0] == 1  # <s>
    action = model.predict_action(inputs["input_ids"], unnorm_key="maniskill", pixel_values=inputs["pixel_values"])
    q01, q99 = (np.array(model.norm_stats["maniskill"]["action"][k]) for k in ("q01", "q99"))
    assert action.shape == (7,) and np.all(action[:6] >= q01[:6] - 1e-9) and np.all(action[:6] <= q99[:6] + 1e-9)
    # the patches sit after <s>: 16 patch positions + text positions
    out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] + (32 // 8) ** 2


def test_sampling_stays_on_action_ids_and_logprobs_match(stand_in, batch):
    model, processor = vla.load_policy(stand_in)
    ids, pixels = vla.encode(processor, model, INSTRUCTION, batch[0])
    tokens = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(0))
    assert tokens.shape == (6, 7) and tokens.min() >= 31744 and tokens.max() <= 31999
    logits = vla.action_logits(model, ids, pixels, tokens)
    assert logits.shape == (6, 7, 256)
    # teacher-forced restricted logits of the first token equal the sampler's next-token logits
    first = model(input_ids=ids, pixel_values=pixels).logits[:, -1, 31744:32000]
    torch.testing.assert_close(logits[:, 0], first.float(), atol=1e-5, rtol=1e-5)


def kl_states(model, processor, images):
    ids, pixels = vla.encode(processor, model, INSTRUCTION, images)
    tokens = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = vla.action_logits(model, ids, pixels, tokens)
    return dict(images=np.stack(images), tokens=tokens, base_logits=base)


def test_sft_update_changes_model_and_kl_grows_from_zero(stand_in, batch):
    model, processor = vla.load_policy(stand_in)
    states = kl_states(model, processor, batch[0])
    per_dim = vla.forward_kl_on_states(model, processor, states, INSTRUCTION)
    assert per_dim.shape == (7,) and per_dim.abs().max() < 1e-6
    optimizer, scheduler = vla.make_optimizer(model, 1e-3, warmup=0)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [vla.sft_step(model, processor, optimizer, scheduler, INSTRUCTION, batch[0], batch[1])
              for _ in range(5)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    per_dim = vla.forward_kl_on_states(model, processor, states, INSTRUCTION)
    ids, pixels = vla.encode(processor, model, INSTRUCTION, batch[0])
    with torch.no_grad():
        logits = vla.action_logits(model, ids, pixels, states["tokens"])
    whole = kl.sequence_forward_kl(states["base_logits"], logits, torch.ones(6, 7))["sum"].mean()
    assert per_dim.sum() > 1e-4 and float(per_dim.sum()) == pytest.approx(float(whole), rel=1e-5)
    assert (per_dim > 0).all()  # every dimension's KL, reported as well as the sum


def test_rl_update_raises_logprob_of_the_rewarded_episode(stand_in, batch):
    model, processor = vla.load_policy(stand_in)
    images, _ = batch
    ids, pixels = vla.encode(processor, model, INSTRUCTION, images)
    tokens = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(1))
    episodes = [list(zip(images[:3], tokens[:3])), list(zip(images[3:], tokens[3:]))]
    advantages = kl.group_advantages(torch.tensor([[1.0, 0.0]])).flatten()  # episode 0 won, 1 lost
    with torch.no_grad():
        before = vla.step_logprobs(model, ids, pixels, tokens)
    optimizer, scheduler = vla.make_optimizer(model, 1e-3, warmup=0)
    vla.rl_step(model, processor, optimizer, scheduler, INSTRUCTION, episodes, advantages, minibatch=4)
    with torch.no_grad():
        after = vla.step_logprobs(model, ids, pixels, tokens)
    assert (after[:3] - before[:3]).mean() > 0 > (after[3:] - before[3:]).mean()


def test_rl_minibatch_gradient_equals_full_batch(stand_in, batch):
    """Accumulating over minibatches of steps gives the exact kl.policy_gradient_loss gradient."""
    images, _ = batch
    grads = []
    for minibatch in (6, 2):
        model, processor = vla.load_policy(stand_in)
        ids, pixels = vla.encode(processor, model, INSTRUCTION, images)
        tokens = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(2))
        episodes = [list(zip(images[:4], tokens[:4])), list(zip(images[4:], tokens[4:]))]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        vla.rl_step(model, processor, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                    INSTRUCTION, episodes, torch.tensor([1.0, -1.0]), minibatch=minibatch)
        grads.append(model.projector[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_rl_loss_sums_each_episodes_steps_as_reinforce(stand_in, batch):
    """The gradient is -(1/B) sum_e A_e sum_t grad log pi(a_t|o_t): a long episode's steps weigh as much as a
    short one's (a per-episode mean would weigh the one step of a short episode 4 times more here)."""
    images, _ = batch
    model, processor = vla.load_policy(stand_in)
    ids, pixels = vla.encode(processor, model, INSTRUCTION, images)
    tokens = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(3))
    episodes = [list(zip(images[:1], tokens[:1])), list(zip(images[1:5], tokens[1:5]))]
    advantages = torch.tensor([1e-4, 5e-5])  # small: the gradient's norm stays under the clip, its scale is seen
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    vla.rl_step(model, processor, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                INSTRUCTION, episodes, advantages)
    got = model.projector[0].weight.grad.clone()
    model.zero_grad()
    logprobs = vla.step_logprobs(model, ids[:5], pixels[:5], tokens[:5])
    manual = -(1e-4 * logprobs[0] + 5e-5 * logprobs[1:5].sum()) / 2
    manual.backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) < 1.0
    torch.testing.assert_close(got, model.projector[0].weight.grad, atol=1e-8, rtol=1e-4)
    vla.rl_step(model, processor, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                INSTRUCTION, episodes, 1e4 * advantages)  # a gradient of norm ~ 370, clipped to 1 (App. B.2)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(norm) == pytest.approx(1.0, rel=1e-4)


def test_kl_penalty_is_the_summed_reverse_kl_and_pulls_the_policy_back_to_pi0(stand_in, batch):
    """With zero advantages the gradient is kl_coef (1/B) sum_e sum_t sum_tokens grad KL(pi || pi0), and a small
    step along it lowers that KL. The gradient's norm stays under rl_step's clip, so its scale is tested too."""
    images, _ = batch
    base, processor = vla.load_policy(stand_in)
    model, _ = vla.load_policy(stand_in)
    with torch.no_grad():
        weight = model.projector[0].weight
        weight.add_(0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)))
    ids, pixels = vla.encode(processor, model, INSTRUCTION, images)
    tokens = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(4))

    def summed_reverse_kl():
        return kl.reverse_kl(vla.action_logits(base, ids, pixels, tokens).detach(),
                             vla.action_logits(model, ids, pixels, tokens)).sum()
    before = summed_reverse_kl()
    (0.002 * before / 2).backward()  # kl_coef 0.002, B = 2 episodes
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) < 1.0  # the clip would hide a wrong scale
    manual = model.projector[0].weight.grad.clone()
    model.zero_grad()
    episodes = [list(zip(images[:2], tokens[:2])), list(zip(images[2:], tokens[2:]))]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    vla.rl_step(model, processor, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                INSTRUCTION, episodes, torch.zeros(2), base_model=base, kl_coef=0.002, minibatch=4)
    torch.testing.assert_close(model.projector[0].weight.grad, manual, atol=1e-8, rtol=1e-4)
    assert float(summed_reverse_kl()) < float(before)


def test_lora_applies_and_merges(stand_in, batch):
    model, processor = vla.load_policy(stand_in, lora=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("projector" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)  # the output layer is tied to the embeddings
    ids, pixels = vla.encode(processor, model, INSTRUCTION, batch[0][:2])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        adapted = model(input_ids=ids, pixel_values=pixels).logits
        with model.disable_adapter():
            base = model(input_ids=ids, pixel_values=pixels).logits
        merged = model.merge_and_unload()(input_ids=ids, pixel_values=pixels).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_cache_is_keyed_by_every_setting():
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        calls = []

        def build():
            calls.append(1)
            return len(calls)
        settings = dict(env_id="PickCube-v1", image_size=64, horizon=20, camera=vla.CAMERA, starts=[(0, None)])
        assert vla.cached(folder, "demos", settings, build) == 1
        assert vla.cached(folder, "demos", dict(settings), build) == 1 and len(calls) == 1  # reused
        for change in (dict(camera=((0.3, 0.0, 0.4), (0.0, 0.0, 0.0), 0.9)), dict(image_size=32), dict(horizon=15),
                       dict(starts=[(1, None)])):
            assert vla.cached(folder, "demos", {**settings, **change}, build) == len(calls)  # rebuilt
        assert len(calls) == 5


def test_training_grid_covers_pickcubes_range_and_is_not_the_evaluation_set():
    grid = vla.training_grid(8)
    xy = np.array([p for _, p in grid])
    assert len(grid) == 64 and len({tuple(p) for p in xy}) == 64 and np.abs(xy).max() < 0.1
    assert xy[:, 0].min() == pytest.approx(-0.0875) and xy[:, 0].max() == pytest.approx(0.0875)
    assert {s for s, _ in grid}.isdisjoint({s for s, _ in vla.evaluation_starts(vla.parse_args(["--method", "plot"]))})


def test_only_placespheres_initial_pose_warning_is_silenced():
    import logging
    record = lambda message: logging.LogRecord("mani_skill ", logging.WARNING, "", 0, message, None, None)  # noqa: E731
    assert not vla.not_the_initial_pose_warning(record("No initial pose set for actor builder of sphere, ..."))
    assert vla.not_the_initial_pose_warning(record('Requested to use render device "sapien_cuda", ...'))


def test_demonstrations_lie_within_their_grid_cells_at_distinct_seeds():
    grid, starts = vla.training_grid(8), vla.demonstration_starts(8, 10)
    assert len(starts) == 640 and starts == vla.demonstration_starts(8, 10)  # the same on every call
    for k, (_, centre) in enumerate(grid):  # ten per cell, inside it (cells are 2.5 cm wide), not all at its centre
        cell = np.array([xy for _, xy in starts[10 * k:10 * k + 10]])
        assert np.abs(cell - centre).max() <= 0.0125 and cell.std(0).min() > 0.002
    seeds = [s for s, _ in starts]
    assert len(set(seeds)) == 640
    others = [vla.training_grid(8), vla.evaluation_starts(vla.parse_args(["--method", "plot"]))]
    assert set(seeds).isdisjoint({s for starts_ in others for s, _ in starts_})


def _rows():
    """Two arms, two seeds each, 3 later points; outcomes per episode as the study stores them."""
    def point(run, arm, seed, new, prior, kl_value, fraction=1.0):
        outcomes = {"PickCube-v1": [1] * new + [0] * (10 - new), "PushCube-v1": [1] * prior + [0] * (10 - prior)}
        return dict(run=run, arm=arm, seed=seed, new_task="PickCube-v1", new_success=new / 10,
                    prior_success={"PushCube-v1": prior / 10}, prior_mean=prior / 10, forward_kl=kl_value,
                    outcomes=outcomes, eval_episodes=10, fraction=fraction, forward_kl_per_dim=[kl_value / 7] * 7)
    rows = [point("base", "base", None, 1, 8, 0.0)]
    for seed in (0, 1):
        rows += [point(f"grpo_lr0.0003_seed{seed}", "grpo", seed, n, p, k, f)
                 for n, p, k, f in ((3, 8, 0.2 + seed, 1 / 3), (4, 7, 0.5 + seed, 2 / 3), (5, 7, 1.0 + seed, 1.0))]
        rows += [point(f"sft-demonstrator_lr0.0001_seed{seed}", "sft-demonstrator", seed, n, p, k, f)
                 for n, p, k, f in ((2, 6, 1.0, 1 / 3), (4, 4, 3.0 + seed, 2 / 3), (4, 3, 5.0, 1.0))]
    return rows


def test_matched_success_reads_the_frontier_with_intervals():
    rows = _rows()
    grpo = [r for r in rows if r["arm"] in ("base", "grpo")]
    prior, kl_value, prior_ci, kl_ci, share = vla.matched_success(grpo, sorted({r["run"] for r in grpo[1:]}), 0.4)
    assert prior == pytest.approx(0.7) and kl_value == pytest.approx(0.5)  # best prior / lowest KL with new >= 0.4
    assert prior_ci[0] <= prior <= prior_ci[1] and kl_ci[0] <= kl_value <= kl_ci[1] and 0 < share <= 1
    assert prior_ci[1] > prior_ci[0]  # episodes resampled: the interval has width
    assert np.isnan(kl.frontier_at([0.1, 0.2], [0.9, 0.8], [0.0, 1.0], 0.5)[0])  # never reached


def test_forgetting_law_groups_by_run_and_counts_pi0_once():
    rows = _rows()
    rows.insert(1, dict(rows[0]))  # pi0 evaluated twice (e.g. two folders merged): still one point
    kls, prior, groups = vla.law_points(rows)
    assert len(kls) == 1 + 12 and groups.count("base") == 1 and groups.count("grpo_lr0.0003_seed0") == 3
    r2, low, high, n_points, n_runs = vla.forgetting_law(rows)
    assert (r2, low, high) == kl.bootstrap_r2(kls, prior, groups=groups) and (n_points, n_runs) == (13, 4)
    assert (low, high) != kl.bootstrap_r2(kls, prior)[1:]  # resampling points instead would give another interval
    table = vla.summarize(rows, [0.4])
    assert "R² = " in table and "SFT, other demonstrator" in table and "2 (0, 1)" in table
    assert "RL, GRPO advantages: " + ", ".join(["0.214"] * 7) in table  # KL per dimension at the last points


def test_demonstrator_table_shows_pi0s_nll_only_when_measured():
    stats = dict(success=0.97, steps=14.2, grid_success=1.0, mean=[0.1] * 7, std=[0.2] * 7, saturated_xyz=0.01,
                 step_length_m=0.044)
    record = dict(pi0_expert=dict(stats, pi0_nll_per_step=3.25), demonstrator=dict(stats, gap_to_pi0_expert=[0.1] * 7))
    lines = vla.describe_demonstrators(record)
    assert lines[2].startswith("| pi0_expert | 0.97 | 14.2 | 1.00 |") and lines[2].endswith("| 3.25 |")
    assert lines[3].endswith("| 4.4 cm | – |") and "differ in 10% of steps" in lines[-1]


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        vla.parse_args(["--method", "grpo", "--lr", "-1"])
    assert "--lr must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vla.parse_args(["--method", "study", "--lr", "1e-4"])


# ---------------------------------------------------------------- the wiring the claims rest on (no simulator)
# Which policy acts, on which observations, which divergence is recorded under which name, each arm's data
# and advantages, each flag. Hand-made logits and a fake simulator (FakeSimulator): fast, and exact where
# ManiSkill's episodes would be slow.


class FixedPolicy(torch.nn.Module):
    """OpenVLA's output layout (the full 32000-id vocabulary, none of the stand-in's shortcuts) with known
    next-token logits: at action position k, ids 31744 + k, + 10 + k and + 100 + k have probabilities 0.6, 0.3
    and 0.1 among the 256 action ids, and every other id has a higher logit than any action id."""

    def __init__(self, prompt_length):
        super().__init__()
        self.prompt_length = prompt_length
        self.config = SimpleNamespace(model_type="fixed")
        self.unused = torch.nn.Parameter(torch.zeros(1))

    @staticmethod
    def restricted_logits(k):
        logits = torch.full((256,), -30.0)
        logits[[k, 10 + k, 100 + k]] = torch.tensor([0.6, 0.3, 0.1]).log()
        return logits

    def forward(self, input_ids, pixel_values, **kwargs):
        assert not kwargs  # OpenVLA's forward knows no logits_to_keep / action_ids_only
        length = input_ids.shape[1]
        logits = torch.full((length, 32000), 5.0)
        for j in range(length):  # position j predicts action token j - prompt_length + 1
            logits[j, 31744:] = self.restricted_logits(min(max(j - self.prompt_length + 1, 0), 6))
        return SimpleNamespace(logits=logits.expand(input_ids.shape[0], length, 32000))


def test_sampling_draws_each_token_from_the_256_action_ids_renormalised_at_temperature_1():
    model = FixedPolicy(prompt_length=3)
    tokens = vla.sample_action_tokens(model, torch.ones(4000, 3, dtype=torch.long), None,
                                      torch.Generator().manual_seed(0))
    assert tokens.shape == (4000, 7)
    for k in range(7):
        shares = [float((tokens[:, k] == 31744 + i).float().mean()) for i in (k, 10 + k, 100 + k)]
        np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.03)  # 4000 draws: standard error <= 0.008
    greedy = vla.sample_action_tokens(model, torch.ones(2, 3, dtype=torch.long), None, greedy=True)
    assert greedy.tolist() == [[31744 + k for k in range(7)]] * 2


def test_teacher_forced_logits_and_step_logprob_on_openvlas_output_layout():
    model = FixedPolicy(prompt_length=3)
    tokens = torch.tensor([[31744 + k for k in range(7)], [31744 + (k, 10 + k, 100 + k)[k % 3] for k in range(7)]])
    logits = vla.action_logits(model, torch.ones(2, 3, dtype=torch.long), None, tokens)
    expected = torch.stack([FixedPolicy.restricted_logits(k) for k in range(7)])
    torch.testing.assert_close(logits, expected.expand(2, 7, 256))
    logp = vla.step_logprobs(model, torch.ones(2, 3, dtype=torch.long), None, tokens)
    manual = sum(torch.distributions.Categorical(logits=expected[k]).log_prob(tokens[:, k] - 31744) for k in range(7))
    torch.testing.assert_close(logp, manual)
    assert float(logp[0]) == pytest.approx(7 * np.log(0.6), rel=1e-5)  # the 7 tokens' log-probs summed


def test_teacher_forcing_matches_decoding_token_by_token_at_all_7_positions(stand_in, batch, monkeypatch):
    """Position k's logits are the next-token logits after the prompt and the first k action tokens; the same
    through the full-vocabulary path that OpenVLA takes (no stand-in shortcuts)."""
    model, processor = vla.load_policy(stand_in)
    ids, pixels = vla.encode(processor, model, INSTRUCTION, batch[0][:3])
    tokens = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = vla.action_logits(model, ids, pixels, tokens)
        for k in range(7):
            step = model(input_ids=torch.cat([ids, tokens[:, :k]], 1), pixel_values=pixels).logits[:, -1, 31744:]
            torch.testing.assert_close(logits[:, k], step, atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(vla, "_last", lambda model, n: {})
        torch.testing.assert_close(vla.action_logits(model, ids, pixels, tokens), logits, atol=1e-5, rtol=1e-5)


def test_recorded_kl_is_forward_kl_from_pi0_per_dimension_averaged_over_observations(stand_in, batch):
    """forward_kl_on_states = E_o KL(pi0(.|o) || pi(.|o)) at each of the 7 positions, against
    torch.distributions, with a hand-made pi0 and batches that do not divide the observations."""
    model, processor = vla.load_policy(stand_in)
    images = batch[0]
    ids, pixels = vla.encode(processor, model, INSTRUCTION, images)
    tokens = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(0))
    base = 2 * torch.randn(6, 7, 256, generator=torch.Generator().manual_seed(1))
    states = dict(images=np.stack(images), tokens=tokens, base_logits=base)
    per_dim = vla.forward_kl_on_states(model, processor, states, INSTRUCTION, batch=4)
    with torch.no_grad():
        logits = vla.action_logits(model, ids, pixels, tokens)
    pi0, pi = torch.distributions.Categorical(logits=base), torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(per_dim, torch.distributions.kl_divergence(pi0, pi).mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(per_dim, torch.distributions.kl_divergence(pi, pi0).mean(0), rtol=0.05)


def test_a_step_of_sft_is_cross_entropy_on_the_action_ids_with_the_gradient_clipped_to_1(stand_in, batch):
    model, processor = vla.load_policy(stand_in)
    images, tokens = batch
    reference, _ = vla.load_policy(stand_in)
    ids, pixels = vla.encode(processor, reference, INSTRUCTION, images)
    loss = torch.nn.functional.cross_entropy(vla.action_logits(reference, ids, pixels, tokens).reshape(-1, 256),
                                             (tokens - 31744).reshape(-1))
    loss.backward()
    assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0) > 1.0  # the clip is active here
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    got = vla.sft_step(model, processor, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       INSTRUCTION, images, tokens)
    assert got == pytest.approx(float(loss), rel=1e-5)
    step = reference.projector[0].weight.detach() - model.projector[0].weight.detach()  # SGD, lr 1: the gradient
    torch.testing.assert_close(step, reference.projector[0].weight.grad, atol=1e-6, rtol=1e-4)


def test_optimizer_is_adamw_without_weight_decay_and_a_linear_warmup_to_the_given_lr():
    optimizer, scheduler = vla.make_optimizer(torch.nn.Linear(2, 2), 3e-4, warmup=3)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.0
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs, [0.75e-4, 1.5e-4, 2.25e-4, 3e-4, 3e-4, 3e-4])


def test_behaviour_cloning_decays_its_rate_to_zero_on_a_cosine_after_the_warmup():
    optimizer, scheduler = vla.make_optimizer(torch.nn.Linear(2, 2), 1e-3, warmup=2, cosine_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    progress = (np.arange(2, 10) - 2) / 8
    np.testing.assert_allclose(lrs, [0.0, 5e-4] + list(1e-3 * 0.5 * (1 + np.cos(np.pi * progress))), atol=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last step


def test_policy_actions_decode_tokens_with_pi0s_statistics_and_openvlas_gripper(stand_in, batch):
    open_, closed = vla.to_env_action(np.r_[np.zeros(6), 1.0]), vla.to_env_action(np.r_[np.zeros(6), 0.0])
    assert open_[6] == 1.0 and closed[6] == -1.0  # OpenVLA: 1 = open; ManiSkill: +1 = open
    np.testing.assert_allclose(vla.to_policy_action(vla.to_env_action(np.r_[0.1, -0.2, 0.3, 0, 0, 0, 0.0])),
                               [0.1, -0.2, 0.3, 0, 0, 0, 0.0], atol=1e-7)
    model, processor = vla.load_policy(stand_in)
    stats = dict(action=dict(q01=[-0.1] * 7, q99=[0.3] * 7, min=[-1] * 7, max=[1] * 7, mask=[True] * 6 + [False]))
    env_action, tokens = vla.model_policy(model, processor, INSTRUCTION, stats, greedy=True)(batch[0][0])
    ids, pixels = vla.encode(processor, model, INSTRUCTION, batch[0][:1])
    assert torch.equal(tokens, vla.sample_action_tokens(model, ids, pixels, greedy=True)[0])
    expected = vla.unnormalize_actions(vla.tokens_to_actions(tokens.numpy()), stats)
    np.testing.assert_allclose(env_action, vla.to_env_action(expected), atol=1e-6)


def test_the_defaults_are_the_documented_design():
    """docs/vla_finetune.md's table: 8 x 8 grid, 16 positions x 8 episodes per iteration, 24 iterations, KL
    coefficient 0.1 (Fig. 3), 4 samples per position, 10 demonstrations per cell, 16 SFT epochs of 32 frames,
    100 evaluation episodes (OpenVLA's own: test_openvla_gets_memory_safe_defaults_and_the_stand_in_keeps_its_own)."""
    args = vla.parse_args(["--method", "grpo"])
    assert (args.grid, args.states_per_iter, args.group_size, args.iterations, args.kl_coef) == (8, 16, 8, 24, 0.1)
    assert (args.samples_per_position, args.sft_epochs, args.batch_size, args.eval_episodes) == (4, 16, 32, 100)
    assert args.demos_per_position == 10
    assert (args.env, args.prior_envs) == ("PickCube-v1", ["PlaceSphere-v1", "LiftPegUpright-v1"])
    assert (args.horizon, args.eval_points) == (20, 4)
    assert {arm: (kind, lr) for arm, (kind, _, lr) in vla.ARMS.items()} == {
        "grpo": ("rl", 3e-4), "reinforce": ("rl", 3e-4), "grpo-kl": ("rl", 3e-4),
        "sft-demonstrator": ("sft", 3e-4), "sft-pi0": ("sft", 3e-4), "sft-rl": ("sft", 3e-4)}
    assert args.grpo_lr == vla.ARMS["grpo"][2]


def test_the_law_fits_prior_task_mean_against_forward_kl():
    rows = _rows()
    kls, prior, _ = vla.law_points(rows)
    points = rows[:1] + rows[1:]
    assert kls.tolist() == [r["forward_kl"] for r in points] and prior.tolist() == [r["prior_mean"] for r in points]


# A fake simulator: images are a fixed function of (task, start, step); scripted demonstrators always succeed;
# a policy's episode succeeds by a rule of its tokens (or a rule a test sets). Every episode is logged.

def pi0_expert(env):
    return np.r_[0.5, 0.0, -0.5, 0, 0, 0, 1.0]


def other_demonstrator(env):
    return np.r_[-0.9, 0.9, 0.9, 0, 0, 0, -1.0]


class FakeSimulator:
    def __init__(self):
        self.calls = []
        self.success = self.by_tokens

    @staticmethod
    def by_tokens(env_id, start, records):
        first = records[0][1]
        if not torch.is_tensor(first):  # a scripted demonstrator
            return True
        return int(first[["PickCube-v1", "PushCube-v1", "PullCube-v1"].index(env_id)]) % 2 == 0

    def make_env(self, env_id, image_size, horizon, camera=vla.CAMERA, num_envs=1):
        assert num_envs == 1  # the stand-in's CPU path: one episode after another
        return SimpleNamespace(settings=dict(env_id=env_id, image_size=image_size, horizon=horizon, camera=camera),
                               unwrapped=SimpleNamespace(num_envs=num_envs))

    def run_episode(self, env, env_id, start, horizon, act):
        assert env.settings["env_id"] == env_id
        records = []
        for t in range(horizon):
            seed = zlib.crc32(repr((env_id, start, t)).encode())
            size = env.settings["image_size"]
            image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
            records.append((image, act(image)[1]))
        success = bool(self.success(env_id, start, records))
        self.calls.append(dict(env_id=env_id, start=start, horizon=horizon, records=records, success=success))
        return records, success


@pytest.fixture
def sim(monkeypatch):
    fake = FakeSimulator()
    monkeypatch.setattr(vla, "make_env", fake.make_env)
    monkeypatch.setattr(vla, "run_episode", fake.run_episode)
    monkeypatch.setitem(vla.TASKS["PickCube-v1"], "expert", pi0_expert)
    monkeypatch.setattr(vla, "motion_planning_demonstrator", other_demonstrator)
    return fake


def tiny_args(stand_in, *extra):
    return vla.parse_args(["--model", stand_in, "--prior-envs", "PushCube-v1", "PullCube-v1", "--image-size", "32",
                           "--horizon", "2", "--grid", "2",
                           "--eval-episodes", "3", "--kl-episodes", "2", "--eval-points", "2", "--iterations", "2",
                           "--states-per-iter", "2", "--group-size", "2", "--samples-per-position", "2",
                           "--batch-size", "4", "--demos-per-position", "1", "--sft-epochs", "1", *extra])


def greedy_tokens(model, processor, image, instruction=INSTRUCTION):
    ids, pixels = vla.encode(processor, model, instruction, [image])
    return vla.sample_action_tokens(model, ids, pixels, greedy=True)[0]


def moved(stand_in, scale=0.3):
    model, _ = vla.load_policy(stand_in)
    with torch.no_grad():
        weight = model.projector[0].weight
        weight.add_(scale * torch.randn(weight.shape, generator=torch.Generator().manual_seed(9)))
    return model


def test_kl_observations_are_pi0s_sampled_new_task_episodes_with_prefixes_sampled_from_pi0(stand_in, sim, tmp_path):
    args = tiny_args(stand_in, "--method", "grpo")
    setup = vla.load_setup(args, tmp_path)
    pi0, processor = setup["model"], setup["processor"]
    kl_calls = sim.calls[:args.kl_episodes]  # the KL observations come first, then pi0's evaluation
    assert [(c["env_id"], c["start"], c["horizon"]) for c in kl_calls] == [
        ("PickCube-v1", (vla.SEEDS["kl"] + i, None), args.horizon) for i in range(args.kl_episodes)]
    images = [image for c in kl_calls for image, _ in c["records"]]
    states = setup["kl_states"]
    assert np.array_equal(states["images"], np.stack(images))
    greedy = torch.stack([greedy_tokens(pi0, processor, image) for image in images])
    acted = torch.stack([tokens for c in kl_calls for _, tokens in c["records"]])
    assert (acted == greedy).float().mean() < 0.5 and (states["tokens"] == greedy).float().mean() < 0.5  # sampled
    ids, pixels = vla.encode(processor, pi0, INSTRUCTION, images)
    with torch.no_grad():
        torch.testing.assert_close(states["base_logits"], vla.action_logits(pi0, ids, pixels, states["tokens"]))
    base = vla.read_results(tmp_path / "results.jsonl")[0]
    assert base["run"] == "base" and base["forward_kl"] == 0.0 and base["forward_kl_per_dim"] == [0.0] * 7


def test_a_point_records_greedy_success_per_task_and_the_forward_kl_of_the_model_it_is_given(stand_in, sim, tmp_path):
    args = tiny_args(stand_in, "--method", "grpo", "--eval-episodes", "6")
    every = {"PickCube-v1": 2, "PushCube-v1": 3, "PullCube-v1": 6}
    sim.success = lambda env_id, start, records: start[0] % every[env_id] == 0
    setup = vla.load_setup(args, tmp_path)
    model = moved(stand_in)
    sim.calls.clear()
    record = vla.evaluate_point(model, setup["processor"], setup, args)
    starts = vla.evaluation_starts(args)
    assert starts == [(vla.SEEDS["eval"] + i, None) for i in range(6)]
    assert [(c["env_id"], c["start"], c["horizon"]) for c in sim.calls] == [
        (e, s, args.horizon) for e in ("PickCube-v1", "PushCube-v1", "PullCube-v1") for s in starts]
    for c in sim.calls[::5]:  # greedy actions of the model under evaluation, with each task's instruction
        instruction = vla.task_info(c["env_id"])["instruction"]
        image, tokens = c["records"][0]
        assert torch.equal(tokens, greedy_tokens(model, setup["processor"], image, instruction))
    # seeds 10000..10005: PickCube succeeds on even seeds (3 of 6), PushCube on multiples of 3 (2), PullCube of 6 (1)
    assert record["new_task"] == "PickCube-v1" and record["new_success"] == pytest.approx(0.5)
    assert record["prior_success"] == pytest.approx({"PushCube-v1": 2 / 6, "PullCube-v1": 1 / 6})
    assert record["prior_mean"] == pytest.approx(0.25)
    assert record["outcomes"]["PullCube-v1"] == [0, 0, 1, 0, 0, 0]
    states = setup["kl_states"]
    ids, pixels = vla.encode(setup["processor"], model, INSTRUCTION, list(states["images"]))
    with torch.no_grad():
        logits = vla.action_logits(model, ids, pixels, states["tokens"])
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=states["base_logits"]),
                                                 torch.distributions.Categorical(logits=logits)).mean(0)
    np.testing.assert_allclose(record["forward_kl_per_dim"], expected.numpy(), rtol=1e-4)
    assert record["forward_kl"] == pytest.approx(float(expected.sum()), rel=1e-4) and record["forward_kl"] > 0.01
    assert record["kl_states"] == len(states["tokens"]) == args.kl_episodes * args.horizon
    # pi0 itself: exactly zero KL, and the base point's success (no forgetting)
    again = vla.evaluate_point(setup["model"], setup["processor"], setup, args)
    assert again["forward_kl"] == 0.0 and again["forward_kl_per_dim"] == [0.0] * 7


@pytest.mark.parametrize("arm", ["grpo", "reinforce", "grpo-kl"])
def test_an_rl_iteration_samples_groups_at_one_position_and_gives_each_arm_its_advantages(stand_in, sim, monkeypatch,
                                                                                           arm):
    args = vla.parse_args(["--method", arm, "--model", stand_in, "--grid", "3", "--states-per-iter", "2",
                           "--group-size", "3", "--horizon", "2", "--kl-coef", "0.37", "--image-size", "32"])
    pi0, processor = vla.load_policy(stand_in)
    model = moved(stand_in)
    setup = dict(model=pi0, processor=processor, stats=pi0.norm_stats["maniskill"],
                 envs={"PickCube-v1": sim.make_env("PickCube-v1", 32, 2)})
    updates = []
    signature = inspect.signature(vla.rl_step)
    monkeypatch.setattr(vla, "rl_step", lambda *a, **k: updates.append(signature.bind(*a, **k).arguments))
    outcomes = iter([1, 0, 0, 1, 1, 0])
    sim.success = lambda env_id, start, records: next(outcomes)
    mean_reward = vla.rl_iteration(args, arm, model, setup, None, None, torch.Generator().manual_seed(7),
                                   np.random.default_rng(0))
    assert mean_reward == pytest.approx(0.5)
    starts = [c["start"] for c in sim.calls]
    assert len(starts) == 6 and starts[0] == starts[1] == starts[2] != starts[3] == starts[4] == starts[5]
    assert set(starts) <= set(vla.training_grid(3))
    assert all(c["env_id"] == "PickCube-v1" and c["horizon"] == 2 for c in sim.calls)
    replay = torch.Generator().manual_seed(7)  # on-policy: the fine-tuned model's temperature-1 samples
    for c in sim.calls:
        for image, tokens in c["records"]:
            ids, pixels = vla.encode(processor, model, INSTRUCTION, [image])
            row_seed = int(torch.randint(2 ** 62, (1,), generator=replay))  # each step's row: its own stream
            drawn = vla.sample_action_tokens(model, ids, pixels, torch.Generator().manual_seed(row_seed))
            assert torch.equal(tokens, drawn[0])
    (update,) = updates
    assert update["model"] is model and update["instruction"] == INSTRUCTION
    assert update["episodes"] == [c["records"] for c in sim.calls]
    rewards = np.array([[1.0, 0, 0], [1, 1, 0]])
    if arm == "reinforce":
        expected = rewards.flatten()  # 1-0 REINFORCE: advantage = reward
    else:  # (r - mean) / std within the group of one position, std without Bessel's correction
        expected = ((rewards - rewards.mean(1, keepdims=True)) / rewards.std(1, keepdims=True)).flatten()
    np.testing.assert_allclose(update["advantages"].numpy(), expected, rtol=1e-5)
    if arm == "grpo-kl":
        assert update["kl_coef"] == 0.37 and update["base_model"] is pi0
    else:
        assert update.get("kl_coef", 0.0) == 0.0
    sim.success = lambda env_id, start, records: False
    sim.calls.clear()
    args.grid, args.states_per_iter, args.group_size, args.horizon = 2, 4, 1, 1
    vla.rl_iteration(args, arm, model, setup, None, None, torch.Generator(), np.random.default_rng(1))
    assert len(updates) == 1  # every group tied: no update
    assert sorted(c["start"] for c in sim.calls) == vla.training_grid(2)  # positions drawn without replacement


@pytest.mark.parametrize("arm", ["sft-demonstrator", "sft-pi0", "sft-rl"])
def test_each_sft_arm_imitates_its_own_data(stand_in, sim, tmp_path, monkeypatch, capsys, arm):
    """sft-demonstrator: the other demonstrator's episodes, --demos-per-position in each grid cell; sft-pi0: pi0's
    own sampled episodes, --samples-per-position per position, successful ones only; sft-rl: the same from the
    finished GRPO run of the same seed."""
    args = tiny_args(stand_in, "--method", arm, "--samples-per-position", "3", "--demos-per-position", "2",
                     "--grpo-lr", "0.002")
    pi0, processor = vla.load_policy(stand_in)
    setup = dict(model=pi0, processor=processor, stats=pi0.norm_stats["maniskill"],
                 envs={"PickCube-v1": sim.make_env("PickCube-v1", 32, 2)}, policy_key=vla.model_fingerprint(stand_in))
    rollouts = []
    original = vla.successful_rollouts
    monkeypatch.setattr(vla, "successful_rollouts", lambda model, *a: rollouts.append(model) or original(model, *a))
    if arm == "sft-rl":
        with pytest.raises(SystemExit, match="run it first"):
            vla.sft_dataset(args, arm, 1, setup, tmp_path)
        rl_model = moved(stand_in)
        (tmp_path / "ckpt").mkdir()
        for seed, weights in ((0, pi0), (1, rl_model), (2, rl_model)):  # seed 0's run: not seed 1's to imitate
            torch.save(dict(model=weights.state_dict(), step=args.iterations, wall=1.0),
                       tmp_path / "ckpt" / f"grpo_lr0.002_seed{seed}.pt")
    grid = vla.training_grid(2)
    demo_starts = vla.demonstration_starts(2, 2)
    if arm == "sft-demonstrator":  # a demonstration that fails is not imitated
        sim.success = lambda env_id, start, records: start != demo_starts[0]
    episodes = vla.sft_dataset(args, arm, 1, setup, tmp_path)
    assert all(c["env_id"] == "PickCube-v1" and c["horizon"] == args.horizon for c in sim.calls)
    if arm == "sft-demonstrator":
        assert [c["start"] for c in sim.calls] == demo_starts and not rollouts
        images, tokens = vla.episodes_to_batch(episodes, setup["stats"])
        action = vla.to_policy_action(other_demonstrator(None))
        expected = vla.actions_to_tokens(vla.normalize_actions(action, setup["stats"]))
        assert not np.array_equal(expected, vla.actions_to_tokens(action))  # the normalisation matters here
        assert len(episodes) == 7 and [e["start"] for e in episodes] == demo_starts[1:]
        assert len(tokens) == 7 * args.horizon and (tokens.numpy() == expected).all()
        return
    assert sorted(c["start"] for c in sim.calls) == sorted(grid * 3)
    kept = [c for c in sim.calls if c["success"]]
    assert 0 < len(kept) < len(sim.calls) and len(episodes) == len(kept)
    assert f"{len(kept)} of {len(sim.calls)} sampled episodes succeeded" in capsys.readouterr().out  # the yield, said
    for episode, c in zip(episodes, kept):
        assert episode["start"] == c["start"]
        assert torch.equal(episode["tokens"], torch.stack([tokens for _, tokens in c["records"]]))
    images, tokens = vla.episodes_to_batch(episodes, setup["stats"])
    assert torch.equal(tokens, torch.cat([e["tokens"] for e in episodes]))  # sampled tokens, imitated as they are
    greedy = torch.stack([greedy_tokens(rollouts[0], processor, image) for c in sim.calls for image, _ in c["records"]])
    assert (torch.stack([t for c in sim.calls for _, t in c["records"]]) == greedy).float().mean() < 0.5  # sampled
    (policy,) = rollouts
    source = pi0 if arm == "sft-pi0" else rl_model
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), source.state_dict().values()))
    other_seed = vla.sft_dataset(args, arm, 2, setup, tmp_path)  # each fine-tuning seed draws its own samples
    assert [e["start"] for e in other_seed] != [e["start"] for e in episodes] or not all(
        torch.equal(a["tokens"], b["tokens"]) for a, b in zip(other_seed, episodes))


def test_an_rl_run_measures_the_fine_tuned_model_and_honours_its_flags(stand_in, sim, tmp_path, monkeypatch):
    args = tiny_args(stand_in, "--method", "grpo-kl", "--iterations", "4", "--eval-points", "3", "--lr", "0.002",
                     "--states-per-iter", "3", "--group-size", "2", "--warmup-steps", "1")
    setup = vla.load_setup(args, tmp_path)
    optimizers = []
    original = vla.make_optimizer
    monkeypatch.setattr(vla, "make_optimizer", lambda *a: optimizers.append(a[1:]) or original(*a))
    sim.calls.clear()
    vla.finetune(args, "grpo-kl", 0.002, 0, setup, tmp_path)
    assert optimizers == [(0.002, 1)]
    rl_calls = [c for c in sim.calls if c["start"][0] < vla.SEEDS["eval"]]
    assert len(rl_calls) == 4 * 3 * 2  # iterations x states per iteration x group size
    base, *rows = vla.read_results(tmp_path / "results.jsonl")
    assert {(r["run"], r["arm"], r["lr"], r["seed"]) for r in rows} == {("grpo-kl_lr0.002_seed0", "grpo-kl", 0.002, 0)}
    assert [(r["step"], r["fraction"], r["episodes_seen"]) for r in rows] == [(2, 0.5, 12), (4, 1.0, 24)]
    fresh, _ = vla.load_policy(stand_in)
    assert all(torch.equal(a, b) for a, b in zip(setup["model"].state_dict().values(), fresh.state_dict().values()))
    vla.load_checkpoint(tmp_path / "ckpt" / "grpo-kl_lr0.002_seed0.pt", fresh, *original(fresh, 1.0, 0),
                        torch.Generator(), np.random.default_rng())
    record = vla.evaluate_point(fresh, setup["processor"], setup, args)  # the last point, measured again
    assert rows[-1]["forward_kl"] > 0 and rows[-1]["forward_kl"] == pytest.approx(record["forward_kl"], rel=1e-5)
    assert rows[-1]["outcomes"] == record["outcomes"] and rows[-1]["prior_mean"] == record["prior_mean"]


def test_an_sft_run_takes_sft_epochs_of_batches_of_its_data(stand_in, sim, tmp_path, monkeypatch):
    args = tiny_args(stand_in, "--method", "sft-demonstrator", "--sft-epochs", "2", "--batch-size", "3",
                     "--lr", "0.003")
    setup = vla.load_setup(args, tmp_path)
    batches, optimizers = [], []
    sft_step, make_optimizer = vla.sft_step, vla.make_optimizer
    monkeypatch.setattr(vla, "sft_step", lambda *a: batches.append(a[5:7]) or sft_step(*a))
    monkeypatch.setattr(vla, "make_optimizer", lambda *a: optimizers.append(a[1]) or make_optimizer(*a))
    vla.finetune(args, "sft-demonstrator", 0.003, 0, setup, tmp_path)
    assert optimizers == [0.003]
    demos = [c for c in sim.calls if c["start"] in vla.demonstration_starts(2, 1)]
    frames = {image.tobytes() for c in demos for image, _ in c["records"]}
    assert len(frames) == 8 and len(batches) == 2 * 3  # 8 frames, batches of 3: 3 per epoch
    epochs = [[image.tobytes() for images, _ in epoch for image in images] for epoch in (batches[:3], batches[3:])]
    assert all(sorted(seen) == sorted(frames) for seen in epochs)  # every frame once per epoch
    assert epochs[0] != epochs[1]  # in a fresh order
    action = vla.to_policy_action(other_demonstrator(None))
    expected = torch.as_tensor(vla.actions_to_tokens(vla.normalize_actions(action, setup["stats"])))
    assert all((tokens == expected).all() for _, tokens in batches)
    rows = vla.read_results(tmp_path / "results.jsonl")
    assert rows[-1]["step"] == 6 and rows[-1]["lr"] == 0.003 and rows[-1]["forward_kl"] > 0


def test_a_run_that_never_updates_has_kl_exactly_0_and_forgets_nothing(stand_in, sim, tmp_path):
    """No new-task success: every GRPO group ties, no step is taken, and every point equals pi0's."""
    sim.success = lambda env_id, start, records: env_id != "PickCube-v1" and start[0] % 2 == 0
    vla.main(["--method", "grpo", "--model", stand_in, "--out-dir", str(tmp_path), "--image-size", "32",
              "--horizon", "2", "--grid", "2", "--eval-episodes", "4", "--kl-episodes", "2", "--eval-points", "3",
              "--iterations", "2", "--states-per-iter", "2", "--group-size", "2", "--lr", "0.002", "--seeds", "3"])
    base, *rows = vla.read_results(tmp_path / "results.jsonl")
    assert len(rows) == 2 and base["prior_mean"] == 0.5
    assert {(r["run"], r["lr"], r["seed"]) for r in rows} == {("grpo_lr0.002_seed3", 0.002, 3)}
    for row in rows:
        assert row["forward_kl"] == 0.0 and row["forward_kl_per_dim"] == [0.0] * 7
        assert base["prior_mean"] - row["prior_mean"] == 0.0 and row["outcomes"] == base["outcomes"]


def test_pi0_is_cloned_on_prior_task_demos_plus_some_new_task_demos_one_task_and_prompt_per_batch(sim, tmp_path,
                                                                                                   monkeypatch):
    experts = {"PickCube-v1": pi0_expert, "PushCube-v1": lambda env: np.r_[0.2, 0, 0, 0, 0, 0, -1.0],
               "PullCube-v1": lambda env: np.r_[-0.2, 0, 0, 0, 0, 0, -1.0]}
    for env_id, expert in experts.items():
        monkeypatch.setitem(vla.TASKS[env_id], "expert", expert)
    batches, lrs = [], []
    sft_step = vla.sft_step
    monkeypatch.setattr(vla, "sft_step",
                        lambda *a: batches.append(a[4:]) or lrs.append(a[2].param_groups[0]["lr"]) or sft_step(*a))
    args = vla.parse_args(["--method", "bc", "--out-dir", str(tmp_path), "--image-size", "32", "--horizon", "2",
                           "--prior-envs", "PushCube-v1", "PullCube-v1", "--prior-demos", "3",
                           "--new-demos-in-base", "2", "--bc-steps", "12", "--batch-size", "2"])
    vla.behaviour_clone(args, tmp_path)
    starts = {e: [c["start"] for c in sim.calls if c["env_id"] == e] for e in experts}
    assert starts == {"PickCube-v1": [(vla.SEEDS["base_new_demos"] + i, None) for i in range(2)],
                      "PushCube-v1": [(vla.SEEDS["prior_demos"] + i, None) for i in range(3)],
                      "PullCube-v1": [(vla.SEEDS["prior_demos"] + i, None) for i in range(3)]}
    actions = {e: vla.to_policy_action(expert(None)) for e, expert in experts.items()}
    stats = vla.load_policy(str(tmp_path / "base"))[0].norm_stats["maniskill"]  # pi0's statistics: every demo
    all_actions = np.concatenate([np.tile(actions[e], (len(starts[e]) * args.horizon, 1)) for e in experts])
    assert stats == vla.action_stats(all_actions)
    tokens_of = {e: vla.actions_to_tokens(vla.normalize_actions(a, stats)).tolist() for e, a in actions.items()}
    assert len(batches) == 12 and all(len(tokens) == 2 for _, _, tokens in batches)
    # a 1-step warm-up (a tenth of the steps) to --bc-lr, then a cosine decay towards 0
    assert lrs[1] == pytest.approx(args.bc_lr) and all(np.diff(lrs[1:]) < 0) and lrs[-1] < 0.03 * args.bc_lr
    tasks = set()
    for instruction, _, tokens in batches:  # one task per batch, under that task's instruction
        (env_id,) = [e for e in experts if tokens.tolist() == [tokens_of[e]] * 2]
        assert instruction == vla.TASKS[env_id]["instruction"]
        tasks.add(env_id)
    assert tasks == set(experts)


def test_encode_gives_the_prompt_with_bos_and_the_space_token_openvla_ends_it_with(stand_in, batch):
    model, processor = vla.load_policy(stand_in)
    ids, pixels = vla.encode(processor, model, "Pick Up the Cube", batch[0][:2])
    text = processor.tokenizer(vla.prompt_for("pick up the cube"))["input_ids"]
    assert ids.tolist() == [text + [29871]] * 2 and text[0] == 1 and text[-1] != 29871
    expected = torch.as_tensor(np.stack(batch[0][:2])).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(pixels, expected)


# ---------------------------------------------------------------- ManiSkill3 (needs a Vulkan device)

def vulkan_available():
    return ctypes.util.find_library("vulkan") is not None and bool(glob.glob("/usr/share/vulkan/icd.d/*.json"))


needs_vulkan = pytest.mark.skipif(not vulkan_available(), reason="ManiSkill's renderer needs a Vulkan driver "
                                  "(no libvulkan / ICD found); see README for the lavapipe install")


@needs_vulkan
def test_both_demonstrators_pick_the_cube_and_the_stand_in_rolls_out(stand_in):
    env = vla.make_env("PickCube-v1", image_size=32, horizon=20)
    for expert in (vla.lift_expert, vla.motion_planning_demonstrator):
        for seed in (10_000, 10_001):  # held-out starts; the study measures both on 100 of them
            act = vla.expert_policy(env, "PickCube-v1", expert)
            _, success = vla.run_episode(env, "PickCube-v1", (seed, None), 20, act)
            assert success  # grasped, and lifted 4 cm
    model, processor = vla.load_policy(stand_in)
    act = vla.model_policy(model, processor, INSTRUCTION, model.norm_stats["maniskill"], greedy=False,
                           generator=torch.Generator().manual_seed(0))
    records, _ = vla.run_episode(env, "PickCube-v1", (0, None), 3, act)
    assert len(records) == 3 and records[0][0].shape == (32, 32, 3)
    assert all(r[1].shape == (7,) and r[1].min() >= 31744 for r in records)


@needs_vulkan
@pytest.mark.parametrize("env_id", ["PlaceSphere-v1", "LiftPegUpright-v1"])
def test_the_default_prior_tasks_are_another_skill_on_other_objects_and_their_experts_succeed(env_id):
    assert env_id in vla.PRIOR_TASKS and vla.NEW_TASK not in vla.PRIOR_TASKS
    env = vla.make_env(env_id, image_size=32, horizon=20)
    assert "cube" not in env.unwrapped.scene.actors  # the new task's object is not in the prior task's scene
    horizon = env.settings["horizon"]
    assert horizon == {"PlaceSphere-v1": 30, "LiftPegUpright-v1": 20}[env_id]  # the ball's expert needs <= 28
    for seed in (20_000, 20_001, 20_002):  # the first starts of pi0's prior-task demos
        records, success = vla.run_episode(env, env_id, (seed, None), horizon, vla.expert_policy(env, env_id))
        assert success and len(records) < horizon


@needs_vulkan
def test_a_grid_start_puts_the_cube_there_and_the_demonstrator_still_picks_it():
    env = vla.make_env("PickCube-v1", image_size=32, horizon=20)
    seed, xy = vla.training_grid(4)[5]
    records, success = vla.run_episode(env, "PickCube-v1", (seed, xy), 20,
                                       vla.expert_policy(env, "PickCube-v1", vla.motion_planning_demonstrator))
    assert success
    first = records[0][0]
    env.reset(seed=seed, options=dict(reconfigure=True))
    assert not np.allclose(vla._xyz(env.unwrapped.cube)[:2], xy, atol=5e-3)  # the seed alone puts it elsewhere
    vla.run_episode(env, "PickCube-v1", (seed, xy), 1, lambda image: (np.zeros(7, np.float32), None))
    np.testing.assert_allclose(vla._xyz(env.unwrapped.cube)[:2], xy, atol=2e-3)
    assert np.array_equal(vla.run_episode(env, "PickCube-v1", (seed, xy), 1,
                                          lambda image: (np.zeros(7, np.float32), None))[0][0][0], first)


@needs_vulkan
def test_a_demo_cache_built_with_one_camera_is_not_reused_with_another(tmp_path):
    starts = [(10_000, None)]
    views = []
    for camera in (vla.CAMERA, ((0.35, 0.0, 0.4), (-0.05, 0.0, 0.02), 0.9)):
        env = vla.make_env("PickCube-v1", image_size=32, horizon=20, camera=camera)
        views.append(vla.collect_demos(env, "PickCube-v1", starts, tmp_path)[0]["images"][0])
    assert len(list(tmp_path.glob("demos_*.pt"))) == 2 and not np.array_equal(views[0], views[1])
    again = vla.collect_demos(vla.make_env("PickCube-v1", 32, 20), "PickCube-v1", starts, tmp_path)
    assert np.array_equal(again[0]["images"][0], views[0])  # the first camera's cache, reused for that camera


@needs_vulkan
def test_an_episode_replays_exactly_after_other_episodes():
    """A plain env.reset(seed) kept physics state from earlier episodes (the cube ended 1 mm elsewhere)."""
    env = vla.make_env("PushCube-v1", image_size=32, horizon=15)

    def episode(seed):
        records, _ = vla.run_episode(env, "PushCube-v1", (seed, None), 15, vla.expert_policy(env, "PushCube-v1"))
        return np.stack([r[0] for r in records]), vla._xyz(env.unwrapped.obj)
    first = episode(0)
    for seed in (1, 2):
        episode(seed)
    again = episode(0)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


@needs_vulkan
def test_missing_assets_fail_with_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vla.make_env("OpenCabinetDrawer-v1", image_size=32, horizon=5)
    assert "download_asset" in str(exit_info.value)


def test_missing_policy_fails_with_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        vla.load_policy(str(tmp_path / "no_such_policy"))
    assert "cannot load a policy" in str(exit_info.value) and "--method bc" in str(exit_info.value)


def drop_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@needs_vulkan
@pytest.mark.parametrize("method", ["grpo-kl", "sft-demonstrator"])
def test_runs_are_deterministic_resumable_and_never_duplicate_a_line(stand_in, tmp_path, method):
    tiny = ["--method", method, "--model", stand_in, "--prior-envs", "PushCube-v1", "--image-size", "32",
            "--grid", "1", "--demos-per-position", "2", "--batch-size", "8", "--iterations", "2",
            "--states-per-iter", "1", "--group-size", "2", "--eval-points", "2", "--eval-episodes", "1",
            "--kl-episodes", "1", "--sft-epochs", "1"]
    if method == "grpo-kl":
        tiny += ["--horizon", "3"]  # RL needs no success to run; the demonstrator needs ~14 steps
    runs = {}
    for name in ("a", "b"):
        vla.main(tiny + ["--out-dir", str(tmp_path / name)])
        runs[name] = vla.read_results(tmp_path / name / "results.jsonl")
    assert [r["run"] for r in runs["a"]] == ["base", f"{method}_lr{vla.ARMS[method][2]:g}_seed0"]
    assert drop_wall(runs["a"]) == drop_wall(runs["b"])  # same seed, same numbers
    assert len(runs["a"][-1]["forward_kl_per_dim"]) == 7 and runs["a"][0]["forward_kl"] == 0
    if method == "sft-demonstrator":
        assert runs["a"][-1]["forward_kl"] > 0  # the update moved the policy away from pi0
    vla.main(tiny + ["--out-dir", str(tmp_path / "a")])  # complete: nothing is appended
    assert vla.read_results(tmp_path / "a" / "results.jsonl") == runs["a"]
    with pytest.raises(SystemExit, match="other --iterations"):  # another schedule under the same run name
        longer = ["--iterations", "3"] if method == "grpo-kl" else ["--sft-epochs", "2"]
        vla.main(tiny + ["--out-dir", str(tmp_path / "a")] + longer)
    # interrupted after its last checkpoint but before writing the last line: the rerun writes it once
    path = tmp_path / "b" / "results.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    vla.main(tiny + ["--out-dir", str(tmp_path / "b")])
    assert drop_wall(vla.read_results(path)) == drop_wall(runs["a"])


# ==================================================================================================
# The OpenVLA-7B path's pieces, on CPU (issue 16): fp32 adapters under bf16 autocast, adapter-only
# checkpoints with strict resume, memory settings, batched KV-cached generation, the WidowX/Bridge units and
# scenes, external demonstrations and statistics. The stand-in stands in for OpenVLA's shapes and interface.
# ==================================================================================================

def test_lora_weights_are_fp32_beside_a_bf16_base_and_keep_a_1e_6_update(stand_in, batch):
    model, processor = vla.load_policy(stand_in, lora=True, dtype=torch.bfloat16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():  # a trained adapter: B no longer 0, so A has gradients too
        for name, p in trainable.items():
            if "lora_B" in name:
                p.normal_(0, 0.03)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer, scheduler = vla.make_optimizer(model, 1e-6, warmup=0)
    vla.sft_step(model, processor, optimizer, scheduler, INSTRUCTION, batch[0], batch[1])  # under bf16 autocast
    moved = [(trainable[n] - before[n])[trainable[n].grad != 0] for n in trainable if "lora_A" in n]
    moved = torch.cat([m.flatten() for m in moved])
    assert moved.numel() > 1000 and (moved.abs() > 0.5e-6).float().mean() > 0.99  # Adam's first step: ~lr each
    a = torch.cat([before[n].flatten() for n in before if "lora_A" in n])
    assert ((a.bfloat16() + 1e-6) == a.bfloat16()).float().mean() > 0.95  # lost to rounding in bf16 adapters


def adapter_run(stand_in, seed):
    torch.manual_seed(seed)
    model, _ = vla.load_policy(stand_in, lora=True)
    optimizer, scheduler = vla.make_optimizer(model, 1e-3, warmup=0)
    return model, optimizer, scheduler, torch.Generator().manual_seed(seed), np.random.default_rng(seed)


def test_a_lora_checkpoint_holds_the_adapter_only_and_resumes_strictly(stand_in, batch, tmp_path):
    import vla_finetune
    model, optimizer, scheduler, generator, rng = adapter_run(stand_in, 0)
    _, processor = vla.load_policy(stand_in)
    vla.sft_step(model, processor, optimizer, scheduler, INSTRUCTION, batch[0], batch[1])
    path = tmp_path / "run.pt"
    vla.save_checkpoint(path, model, optimizer, scheduler, generator, rng, dict(step=1, episodes_seen=0, wall=0.0))
    saved = torch.load(path, weights_only=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model" not in saved and set(saved["adapter"]) == trainable and all("lora_" in n for n in trainable)
    assert sum(v.numel() for v in saved["adapter"].values()) < 0.2 * sum(p.numel() for p in model.parameters())
    fresh, optimizer2, scheduler2, generator2, rng2 = adapter_run(stand_in, 1)
    state = vla.load_checkpoint(path, fresh, optimizer2, scheduler2, generator2, rng2)
    assert state["step"] == 1
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(generator.get_state(), generator2.get_state())
    # a renamed, a missing or an extra key, or another shape: one line, no partial load
    first = sorted(saved["adapter"])[0]
    broken = [{**saved["adapter"], first + "_renamed": saved["adapter"][first]},
              {k: v for k, v in saved["adapter"].items() if k != first},
              {**saved["adapter"], first: saved["adapter"][first][:1]}]
    for adapter in broken:
        torch.save({**saved, "adapter": adapter}, path)
        with pytest.raises(SystemExit, match="does not match this model"):
            vla.load_checkpoint(path, *adapter_run(stand_in, 2))
    plain, _ = vla.load_policy(stand_in)  # saved with --lora, resumed without
    with pytest.raises(SystemExit, match="with --lora"):
        vla_finetune.load_trainable(plain, saved, path)


def test_a_full_checkpoint_keeps_its_format_and_strict_load(stand_in, tmp_path):
    model, _ = vla.load_policy(stand_in)
    state = vla.trainable_state(model)
    assert list(state) == ["model"] and set(state["model"]) == set(model.state_dict())
    state["model"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        vla.load_trainable(model, state, tmp_path / "x.pt")


def test_openvla_gets_memory_safe_defaults_and_the_stand_in_keeps_its_own():
    real = vla.parse_args(["--method", "grpo", "--model", "openvla/openvla-7b"])
    assert (real.lora, real.micro_batch, real.gradient_checkpointing, real.image_size) == (True, 8, True, 224)
    assert (real.group_size, real.iterations, real.sft_epochs) == (4, 16, 1)  # the paper's one SFT epoch
    mine = vla.parse_args(["--method", "grpo", "--model", "openvla/openvla-7b", "--no-lora", "--micro-batch", "4",
                           "--group-size", "3", "--iterations", "5", "--sft-epochs", "2"])
    assert (mine.lora, mine.micro_batch, mine.group_size, mine.iterations, mine.sft_epochs) == (False, 4, 3, 5, 2)
    stand_in = vla.parse_args(["--method", "grpo"])
    assert (stand_in.lora, stand_in.micro_batch, stand_in.gradient_checkpointing, stand_in.image_size) == (
        False, 64, False, 64)


def lora_gradients(stand_in, batch, gradient_checkpointing, micro_batch):
    torch.manual_seed(0)
    model, processor = vla.load_policy(stand_in, lora=True, gradient_checkpointing=gradient_checkpointing)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.03)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loss = vla.sft_step(model, processor, optimizer, scheduler, INSTRUCTION, batch[0], batch[1], micro_batch)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, model


def test_gradient_checkpointing_and_micro_batches_give_the_whole_batchs_gradient(stand_in, batch):
    loss, grads, _ = lora_gradients(stand_in, batch, gradient_checkpointing=False, micro_batch=None)
    for checkpointing, micro in ((True, None), (False, 4), (True, 1)):
        other_loss, other, model = lora_gradients(stand_in, batch, checkpointing, micro)
        assert model.get_base_model().language_model.is_gradient_checkpointing == checkpointing
        assert other_loss == pytest.approx(loss, rel=1e-5)
        for name in grads:
            torch.testing.assert_close(other[name], grads[name], atol=1e-6, rtol=1e-4)


def test_kv_cached_batched_generation_equals_one_at_a_time(stand_in):
    model, processor = vla.load_policy(stand_in)
    images = list(np.random.default_rng(3).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8))
    ids, pixels = vla.encode(processor, model, INSTRUCTION, images)
    greedy = vla.generate_action_tokens(model, ids, pixels, greedy=True)
    single = torch.cat([vla.sample_action_tokens(model, ids[i:i + 1], pixels[i:i + 1], greedy=True) for i in range(5)])
    assert torch.equal(greedy, single)
    # sampling: row i with its own generator draws what the uncached sampler draws for it alone, same seed
    sampled = vla.generate_action_tokens(model, ids, pixels, [torch.Generator().manual_seed(i) for i in range(5)])
    alone = torch.cat([vla.sample_action_tokens(model, ids[i:i + 1], pixels[i:i + 1], torch.Generator().manual_seed(i))
                       for i in range(5)])
    assert torch.equal(sampled, alone) and sampled.min() >= 31744 and sampled.max() <= 31999
    # the cached pass's distributions are the teacher-forced ones (the policy the updates and the KL see)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        step = model(input_ids=sampled[:, :1], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    forced = vla.action_logits(model, ids, pixels, sampled)
    torch.testing.assert_close(step[:, 31744:32000], forced[:, 1], atol=1e-5, rtol=1e-5)


def test_bridge_actions_convert_to_the_widowx_controllers_units_and_back():
    """bridge_orig (metres, roll/pitch/yaw about static x, y, z, gripper 1 = open) -> the twin's controller
    (metres, the same rotation as euler_angles_to_matrix(., "XYZ"), gripper +1 open / -1 closed) -> back."""
    from mani_skill.utils.geometry.rotation_conversions import euler_angles_to_matrix
    from transforms3d.euler import euler2mat
    rng = np.random.default_rng(4)
    bridge = np.c_[rng.normal(0, 0.01, (500, 3)), rng.uniform(-0.4, 0.4, (500, 3)), rng.integers(0, 2, (500, 1))]
    for action in bridge:
        env_action = vla.bridge_to_widowx_action(action)
        assert env_action.dtype == np.float32 and np.array_equal(env_action[:3], action[:3].astype(np.float32))
        controller = euler_angles_to_matrix(torch.tensor(env_action[3:6], dtype=torch.float64), "XYZ").numpy()
        np.testing.assert_allclose(controller, euler2mat(*action[3:6], axes="sxyz"), atol=1e-6)
        assert env_action[6] == (1.0 if action[6] == 1 else -1.0)
        np.testing.assert_allclose(vla.widowx_to_bridge_action(env_action), action, atol=1e-6)
    # a large yaw with roll: the two conventions differ, so passing the angles through unchanged would be wrong
    action = np.array([0, 0, 0, 0.3, 0.0, 0.5, 1.0])
    assert not np.allclose(vla.bridge_to_widowx_action(action)[3:6], action[3:6], atol=1e-3)
    assert vla.bridge_to_widowx_action(np.r_[np.zeros(6), 0.6])[6] == 1.0  # SimplerEnv's rule: open if > 0.5
    assert vla.bridge_to_widowx_action(np.r_[np.zeros(6), 0.4])[6] == -1.0


def test_openvla_defaults_to_the_bridge_scenes_and_their_statistics():
    args = vla.parse_args(["--method", "grpo", "--model", "openvla/openvla-7b"])
    assert (args.env, args.prior_envs, args.horizon, args.unnorm_key, args.num_envs) == (
        "GraspCarrotInScene", ["PutSpoonOnTableClothInScene-v1", "StackGreenCubeOnYellowCubeBakedTexInScene-v1",
                               "PutEggplantInBasketScene-v1"], 60, "bridge_orig", 16)
    stand_in = vla.parse_args(["--method", "grpo"])
    assert (stand_in.env, stand_in.prior_envs, stand_in.horizon, stand_in.num_envs) == (
        "PickCube-v1", ["PlaceSphere-v1", "LiftPegUpright-v1"], 20, 1)
    starts = vla.training_starts(8, "GraspCarrotInScene")
    assert [layout for _, layout in starts] == list(range(24))
    assert [layout for _, layout in vla.evaluation_starts(args)][:26] == list(range(24)) + [0, 1]
    assert {s for s, _ in starts}.isdisjoint({s for s, _ in vla.evaluation_starts(args)})
    with pytest.raises(SystemExit):  # 25 positions without replacement from 24 layouts
        vla.parse_args(["--method", "grpo", "--model", "openvla/openvla-7b", "--states-per-iter", "25"])


def test_a_bridge_scene_without_its_assets_says_what_to_download(monkeypatch):
    from mani_skill.utils import assets
    monkeypatch.setattr(assets, "is_data_source_downloaded", lambda uid: False)
    for task in ("GraspCarrotInScene", "PutEggplantInBasketScene-v1"):
        with pytest.raises(SystemExit) as exit_info:
            vla.make_env(task, image_size=224, horizon=60)
        message = str(exit_info.value)
        assert message.count("\n") == 0 and "bridge_v2_real2sim" in message and "widowx250s" in message
        assert "python -m mani_skill.utils.download_asset bridge_v2_real2sim" in message
    with pytest.raises(SystemExit, match="unknown ManiSkill env"):
        vla.make_env("NoSuchScene-v1", image_size=224, horizon=60)


class FakeVectorEnv:
    """ManiSkill's vectorised-env interface, no simulator: each env shows a 48 x 64 image that changes with its
    seed, the step and the actions taken, and succeeds once its summed x action passes a seed-set bar."""
    def __init__(self, num_envs, horizon=6):
        self.num_envs, self.unwrapped = num_envs, self
        self.settings = dict(env_id="GraspCarrotInScene", image_size=32, horizon=horizon)

    def reset(self, seed, options):
        seeds = seed if isinstance(seed, list) else [seed]
        layouts = torch.atleast_1d(torch.as_tensor(options["episode_id"]))
        self.bar = torch.tensor([0.1 * (s % 4) + 0.001 * int(l) for s, l in zip(seeds, layouts)])
        self.progress, self.step_count, self.seeds = torch.zeros(self.num_envs), 0, seeds
        return self.obs()

    def obs(self):
        base = torch.tensor(self.seeds).view(-1, 1, 1, 1) * 7 + self.step_count * 13
        image = (base + (self.progress * 1000).view(-1, 1, 1, 1) + torch.arange(64).view(1, 1, 64, 1)) % 256
        return {"sensor_data": {"3rd_view_camera": {"rgb": image.expand(-1, 48, 64, 3).to(torch.uint8)}}}, {}

    def step(self, action):
        action = torch.atleast_2d(torch.as_tensor(action, dtype=torch.float32))
        self.progress += action[:, 0].abs()
        self.step_count += 1
        done = self.progress > self.bar
        return self.obs()[0], None, None, None, {"consecutive_grasp": done}


def test_batched_rollouts_equal_one_episode_at_a_time(stand_in):
    model, processor = vla.load_policy(stand_in)
    stats = {"action": dict(q01=[-0.03] * 6 + [0], q99=[0.03] * 6 + [1], min=[-0.05] * 6 + [0],
                            max=[0.05] * 6 + [1], mask=[True] * 6 + [False])}
    starts = [(10 + i, i % 5) for i in range(7)]
    batched = vla.policy_rollouts(model, processor, FakeVectorEnv(3), "GraspCarrotInScene", starts, stats, greedy=True)
    single = vla.policy_rollouts(model, processor, FakeVectorEnv(1), "GraspCarrotInScene", starts, stats, greedy=True)
    assert len(batched) == len(single) == 7
    assert [s for _, s in batched] == [s for _, s in single] and 0 < sum(s for _, s in single) < 7
    for (records_b, _), (records_s, _) in zip(batched, single):
        assert len(records_b) == len(records_s)  # each episode ends at its own success
        for (image_b, tokens_b), (image_s, tokens_s) in zip(records_b, records_s):
            assert image_b.shape == (32, 32, 3) and np.array_equal(image_b, image_s)
            assert torch.equal(tokens_b, tokens_s)


BRIDGE_STATS = {"action": dict(q01=[-0.03] * 3 + [-0.1] * 3 + [0.0], q99=[0.03] * 3 + [0.1] * 3 + [1.0],
                               min=[-0.05] * 3 + [-0.2] * 3 + [0.0], max=[0.05] * 3 + [0.2] * 3 + [1.0],
                               mask=[True] * 6 + [False])}


def write_episode(path, steps, success, instruction="pick up the carrot", scale=0.01, size=40):
    rng = np.random.default_rng(steps)
    actions = np.c_[rng.normal(0, scale, (steps, 6)), rng.integers(0, 2, (steps, 1))]
    images = rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8)
    np.savez(path, images=images, actions=actions, instruction=instruction, success=success)
    return images, actions


def test_external_demonstrations_load_successful_episodes_resized_and_tokenised(tmp_path, capsys):
    _, first = write_episode(tmp_path / "ep0.npz", 5, True)
    write_episode(tmp_path / "ep1.npz", 4, False)
    _, last = write_episode(tmp_path / "ep2.npz", 3, True)
    episodes = vla.load_demonstrations(tmp_path, "pick up the carrot", 32, BRIDGE_STATS)
    assert [e["start"] for e in episodes] == ["ep0.npz", "ep2.npz"]
    assert episodes[0]["images"].shape == (5, 32, 32, 3) and episodes[0]["images"].dtype == np.uint8
    np.testing.assert_array_equal(episodes[1]["actions"], last)
    images, tokens = vla.episodes_to_batch(episodes, BRIDGE_STATS)
    assert images.shape == (8, 32, 32, 3) and tokens.shape == (8, 7)
    decoded = vla.unnormalize_actions(vla.tokens_to_actions(tokens.numpy()), BRIDGE_STATS)
    inside = np.all(np.abs(first[:, :3]) <= 0.03, axis=1)
    np.testing.assert_allclose(decoded[:5][inside, :3], first[inside, :3], atol=0.03 / 255 + 1e-9)  # half a bin
    assert "warning" not in capsys.readouterr().out
    write_episode(tmp_path / "ep3.npz", 6, True, scale=0.5)  # Panda-sized deltas against Bridge's metres
    vla.load_demonstrations(tmp_path, "pick up the carrot", 32, BRIDGE_STATS)
    assert "fall outside the statistics" in capsys.readouterr().out


def test_bad_demonstrations_and_statistics_end_with_one_line(tmp_path):
    import json
    with pytest.raises(SystemExit, match="no .npz episodes"):
        vla.load_demonstrations(tmp_path, "pick up the carrot", 32, BRIDGE_STATS)
    write_episode(tmp_path / "ep0.npz", 3, True, instruction="put carrot on plate")
    with pytest.raises(SystemExit, match="not the new task's"):
        vla.load_demonstrations(tmp_path, "pick up the carrot", 32, BRIDGE_STATS)
    np.savez(tmp_path / "ep0.npz", images=np.zeros((2, 8, 8, 3), np.uint8), success=True)
    with pytest.raises(SystemExit, match=r"lacks \['actions', 'instruction'\]"):
        vla.load_demonstrations(tmp_path, "pick up the carrot", 32, BRIDGE_STATS)
    write_episode(tmp_path / "ep0.npz", 3, False)
    with pytest.raises(SystemExit, match="none of the 1 episodes"):
        vla.load_demonstrations(tmp_path, "pick up the carrot", 32, BRIDGE_STATS)
    stats_file = tmp_path / "dataset_statistics.json"
    stats_file.write_text(json.dumps({"my_robot": {"action": {k: BRIDGE_STATS["action"][k]
                                                              for k in ("q01", "q99", "mask")}}}))
    stats = vla.load_norm_stats(stats_file)
    assert stats["my_robot"]["action"]["min"] == BRIDGE_STATS["action"]["q01"]
    np.testing.assert_allclose(vla.normalize_actions(np.zeros((1, 7)), stats["my_robot"])[0, :6], 0, atol=1e-6)
    stats_file.write_text(json.dumps({"my_robot": {"action": {"q01": [0] * 6, "q99": [1] * 7, "mask": [True] * 7}}}))
    with pytest.raises(SystemExit, match="7 values each"):
        vla.load_norm_stats(stats_file)


def test_the_bridge_scenes_need_external_demonstrations_for_sft(stand_in, tmp_path, monkeypatch):
    args = vla.parse_args(["--method", "sft-demonstrator", "--env", "GraspCarrotInScene", "--model", stand_in])
    setup = dict(envs={"GraspCarrotInScene": None}, stats=BRIDGE_STATS)
    with pytest.raises(SystemExit, match="pass another policy's episodes with --demos"):
        vla.sft_dataset(args, "sft-demonstrator", 0, setup, tmp_path)
    write_episode(tmp_path / "ep0.npz", 3, True)
    args.demos = str(tmp_path)
    assert len(vla.sft_dataset(args, "sft-demonstrator", 0, setup, tmp_path)) == 1


def test_a_missing_package_says_what_to_install(stand_in, monkeypatch):
    import sys
    def needs_timm(*args, **kwargs):  # what transformers raises for OpenVLA's remote code without timm
        raise ImportError("This modeling file requires the following packages that were not found in your "
                          "environment: timm. Run `pip install timm`")
    monkeypatch.setattr(vla.AutoVLA, "from_pretrained", needs_timm)
    with pytest.raises(SystemExit) as exit_info:
        vla.load_policy(stand_in)
    assert "timm" in str(exit_info.value) and "requirements-openvla.txt" in str(exit_info.value)
    assert "\n" not in str(exit_info.value)
    monkeypatch.setitem(sys.modules, "mani_skill.envs", None)
    with pytest.raises(SystemExit, match="install the simulator: pip install -r requirements-vla.txt"):
        vla.make_env("PickCube-v1", image_size=16, horizon=3, num_envs=7)  # not built before: not cached


def test_kv_cached_generation_runs_through_a_bf16_lora_wrapper(stand_in):
    """The real path's combination: a peft wrapper, fp32 adapters, bf16 weights, autocast, the cache."""
    model, processor = vla.load_policy(stand_in, lora=True, dtype=torch.bfloat16)
    images = list(np.random.default_rng(5).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8))
    ids, pixels = vla.encode(processor, model, INSTRUCTION, images)
    model.eval()
    tokens = vla.generate_action_tokens(model, ids, pixels, [torch.Generator().manual_seed(i) for i in range(3)])
    assert tokens.shape == (3, 7) and tokens.min() >= 31744 and tokens.max() <= 31999
    greedy = vla.generate_action_tokens(model, ids, pixels, greedy=True)
    forced = vla.action_logits(model, ids, pixels, greedy)  # teacher-forced, uncached, same autocast
    assert (forced.argmax(-1) + 31744 == greedy).float().mean() >= 6 / 7  # bf16 rounding may flip a near-tie
