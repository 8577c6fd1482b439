"""Tests for vla_finetune.py: OpenVLA's action tokenisation, the stand-in VLA, the RL/SFT updates, the
KL, LoRA, and a short ManiSkill3 rollout (skipped only where no Vulkan device exists). CPU, offline."""
import ctypes.util
import glob

import numpy as np
import pytest
import torch

import kl
import vla_finetune as vla

INSTRUCTION = vla.TASKS["PickCube-v1"]["instruction"]


# ---------------------------------------------------------------- tokenisation (PAPER.md §7.2)

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


def test_random_shift_moves_each_image_by_at_most_pad_and_keeps_its_content():
    images = np.zeros((200, 16, 16, 3), np.uint8)
    images[:, 8, 8] = 255  # one bright pixel in the middle of every image
    shifted = vla.random_shift(images, 3, np.random.default_rng(0))
    assert shifted.shape == images.shape and np.array_equal(vla.random_shift(images, 0, None), images)
    ys, xs = np.nonzero(shifted[..., 0] == 255)[1:]
    assert len(ys) == 200 and set(ys - 8) == set(range(-3, 4)) and set(xs - 8) == set(range(-3, 4))


def test_dart_noise_perturbs_the_executed_move_and_records_the_expert_action(monkeypatch):
    clean = np.array([0.95, -0.2, 0.1, 0.0, 0.0, 0.0, -1.0])
    monkeypatch.setitem(vla.TASKS, "Fake-v0", dict(instruction="x", expert=lambda env: clean.copy()))
    act = vla.expert_policy(None, "Fake-v0", 0.1, np.random.default_rng(0))
    steps = [act(None) for _ in range(2000)]
    executed = np.stack([e for e, _ in steps])
    assert all(np.array_equal(r, vla.to_policy_action(clean)) for _, r in steps)
    assert np.array_equal(executed[:, 3:], np.tile(clean[3:], (2000, 1))) and np.all(np.abs(executed) <= 1)
    np.testing.assert_allclose(executed[:, 1:3].std(0), 0.1, rtol=0.1)
    np.testing.assert_allclose(executed[:, 1:3].mean(0), clean[1:3], atol=0.01)
    assert executed[:, 0].max() == 1.0  # clipped at the action bound
    assert np.array_equal(vla.expert_policy(None, "Fake-v0")(None)[0], clean)


def test_one_axis_expert_keeps_only_the_lift_experts_largest_move(monkeypatch):
    moves = [np.array([0.3, -0.7, 0.2, 0, 0, 0, 1.0]), np.array([0.01, 0.02, -0.5, 0, 0, 0, -1.0])]
    for move in moves:
        monkeypatch.setattr(vla, "lift_expert", lambda env: move.copy())
        action = vla.one_axis_lift_expert(None)
        largest = np.argmax(np.abs(move[:3]))
        assert np.count_nonzero(action[:3]) == 1 and action[largest] == move[largest]
        assert np.array_equal(action[3:], move[3:])  # rotation and gripper untouched


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
    kl_sum, kl_token = vla.forward_kl_on_states(model, processor, states, INSTRUCTION)
    assert abs(kl_sum) < 1e-6 and abs(kl_token) < 1e-6
    optimizer, scheduler = vla.make_optimizer(model, 1e-3, warmup=0)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [vla.sft_step(model, processor, optimizer, scheduler, INSTRUCTION, batch[0], batch[1])
              for _ in range(5)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    kl_sum, kl_token = vla.forward_kl_on_states(model, processor, states, INSTRUCTION)
    assert kl_sum > 1e-4 and kl_token == pytest.approx(kl_sum / 7, rel=1e-5)


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


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        vla.parse_args(["--method", "rl", "--lr", "-1"])
    assert "--lr must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------- ManiSkill3 (needs a Vulkan device)

def vulkan_available():
    return ctypes.util.find_library("vulkan") is not None and bool(glob.glob("/usr/share/vulkan/icd.d/*.json"))


needs_vulkan = pytest.mark.skipif(not vulkan_available(), reason="ManiSkill's renderer needs a Vulkan driver "
                                  "(no libvulkan / ICD found); see README for the lavapipe install")


@needs_vulkan
def test_expert_and_stand_in_rollout_in_maniskill(stand_in):
    env = vla.make_env("PickCube-v1", image_size=32, horizon=15)
    _, success = vla.run_episode(env, "PickCube-v1", 0, 15, vla.expert_policy(env, "PickCube-v1"))
    assert success  # the scripted expert grasps and lifts the cube
    long_env = vla.make_env("PickCube-v1", image_size=32, horizon=20)  # one axis per step needs > 15 steps
    _, success = vla.run_episode(long_env, "PickCube-v1", 0, 20,
                                 vla.expert_policy(long_env, "PickCube-v1", expert=vla.one_axis_lift_expert))
    assert success  # and so does the other demonstrator (in 26 of seeds 0-31 within 20 steps)
    model, processor = vla.load_policy(stand_in)
    stats = model.norm_stats["maniskill"]
    act = vla.model_policy(model, processor, INSTRUCTION, stats, greedy=False,
                           generator=torch.Generator().manual_seed(0))
    records, _ = vla.run_episode(env, "PickCube-v1", 0, 3, act)
    assert len(records) == 3 and records[0][0].shape == (32, 32, 3)
    assert all(r[1].shape == (7,) and r[1].min() >= 31744 for r in records)


@needs_vulkan
def test_an_episode_replays_exactly_after_other_episodes():
    """A plain env.reset(seed) kept physics state from earlier episodes (the cube ended 1 mm elsewhere)."""
    env = vla.make_env("PushCube-v1", image_size=32, horizon=15)

    def episode(seed):
        records, _ = vla.run_episode(env, "PushCube-v1", seed, 15, vla.expert_policy(env, "PushCube-v1"))
        return np.stack([r[0] for r in records]), vla._xyz(env.unwrapped.obj)
    first = episode(0)
    episode(1), episode(2)
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


@needs_vulkan
@pytest.mark.parametrize("method", ["rl", "sft"])
def test_runs_are_deterministic_resumable_and_never_duplicate_a_line(stand_in, tmp_path, method):
    horizon = "15" if method == "sft" else "3"  # the SFT expert needs ~13 steps to succeed; RL needs none
    tiny = ["--method", method, "--model", stand_in, "--prior-envs", "PushCube-v1", "--image-size", "32",
            "--horizon", horizon, "--train-states", "1", "--sft-epochs", "1", "--batch-size", "8",
            "--iterations", "2", "--states-per-iter", "1", "--group-size", "2", "--eval-points", "2",
            "--eval-episodes", "1", "--kl-episodes", "1"]
    runs = {}
    for name in ("a", "b"):
        vla.main(tiny + ["--out-dir", str(tmp_path / name)])
        runs[name] = vla.read_results(tmp_path / name / "results.jsonl")
    drop_wall = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert len(runs["a"]) == 2 and drop_wall(runs["a"]) == drop_wall(runs["b"])  # same seed, same numbers
    if method == "sft":
        assert runs["a"][-1]["forward_kl"] > 0  # the update moved the policy away from pi0
    vla.main(tiny + ["--out-dir", str(tmp_path / "a")])  # complete: nothing is appended
    assert vla.read_results(tmp_path / "a" / "results.jsonl") == runs["a"]
    with pytest.raises(SystemExit, match="other --iterations"):  # another schedule under the same run name
        longer = ["--iterations", "3"] if method == "rl" else ["--sft-epochs", "2"]
        vla.main(tiny + ["--out-dir", str(tmp_path / "a")] + longer)
    # interrupted after its last checkpoint but before writing the last line: the rerun writes it once
    path = tmp_path / "b" / "results.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    vla.main(tiny + ["--out-dir", str(tmp_path / "b")])
    assert drop_wall(vla.read_results(path)) == drop_wall(runs["a"])
