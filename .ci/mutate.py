"""Mutation check: apply one-line mistakes to the experiment scripts, one at a time, run the tests that
guard them, and report which mistakes no test catches.

    python .ci/mutate.py                 # every script's list (minutes); `make mutations` does the same
    python .ci/mutate.py parity_mnist.py # one script

Each mutation is a plausible slip (a swapped argument, a flipped sign, a wrong label set, an ignored flag,
a dropped factor) in a line the paper's claims depend on. A mutation survives when its tests still pass.
"""
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# script -> (tests that guard it, [(description, original text, mutated text)])
MUTATIONS = {
    "parity_mnist.py": (["test_parity_mnist.py", "test_parity_sweep.py"], [
        ("forward and reverse KL swapped in the scores",
         "kl.divergences(base_logits, logits).items()", "kl.divergences(logits, base_logits).items()"),
        ("forgetting with the wrong sign",
         'base_fashion_acc - metrics["fashion_acc"]', 'metrics["fashion_acc"] - base_fashion_acc'),
        ("the lesson's KL measured on FashionMNIST inputs",
         "base_test_logits = mlp(base, data.mnist_test_x)", "base_test_logits = mlp(base, data.fashion_test_x)"),
        ("SFT dist. 1 labels flipped", "targets = digits % 2\n", "targets = 1 - digits % 2\n"),
        ("SFT dist. 2 labels replaced by SFT dist. 1's", "targets = sft2_labels", "targets = digits % 2"),
        ("SFT dist. 2 drawn from all five labels of the parity",
         "sft2_labels = train_digits % 2 + 4 * torch.randint(0, 2,", "sft2_labels = train_digits % 2 + 2 * torch.randint(0, 5,"),
        ("oracle restricted to the wrong parity", "correct_labels(digits))", "correct_labels(digits + 1))"),
        ("distillation from the teacher's argmax, not its samples",
         "targets = gumbel_sample(teacher_logits, 1, gen).squeeze(-1)", "targets = teacher_logits.argmax(-1)"),
        ("1-0 REINFORCE with GRPO's advantages",
         "advantages = kl.reinforce_advantages(rewards)", "advantages = kl.group_advantages(rewards)"),
        ("GRPO without the group std", "advantages = kl.group_advantages(rewards)\n",
         "advantages = kl.group_advantages(rewards, normalize_std=False)\n"),
        ("reward for the wrong parity",
         "rewards = parity_reward(labels, digits.unsqueeze(-1))", "rewards = parity_reward(labels, 1 + digits.unsqueeze(-1))"),
        ("--group-size ignored", "gumbel_sample(logits.detach(), cfg.group_size, gen)", "gumbel_sample(logits.detach(), 8, gen)"),
        ("--kl-direction ignored", "direction=cfg.kl_direction", 'direction="reverse"'),
        ("--kl-coef ignored", "loss + cfg.kl_coef * kl.kl_penalty", "loss + 0.1 * kl.kl_penalty"),
        ("SimPO's negatives drawn from the correct parity",
         "rejected = (1 - digits % 2) + 2 * torch.randint", "rejected = digits % 2 + 2 * torch.randint"),
        ("SimPO's chosen and rejected swapped",
         "kl.simpo_loss(chosen_logprobs, rejected_logprobs)", "kl.simpo_loss(rejected_logprobs, chosen_logprobs)"),
        ("pi0 pretrained as a digit classifier",
         "parity_labels = digits % 2 + 2 * torch.randint(0, 5, (PRETRAIN_IMAGES,), generator=gen)",
         "parity_labels = digits + 0 * torch.randint(0, 5, (PRETRAIN_IMAGES,), generator=gen)"),
    ]),
    "parity_sweep.py": (["test_parity_sweep.py"], [
        ("the sweep's KL against the model itself",
         "pm.scores(logits, fashion_logits, data, ref.mnist_test_logits, ref.fashion_acc)",
         "pm.scores(logits, fashion_logits, data, logits, ref.fashion_acc)"),
        ("Fisher on the new task's inputs",
         "diagonal_fisher(base, data.fashion_train_x[:FISHER_INPUTS])", "diagonal_fisher(base, data.mnist_train_x[:FISHER_INPUTS])"),
        ("weight change L1 without the absolute value",
         "sum(d.abs().sum() for d in delta.values())", "sum(d.sum() for d in delta.values())"),
        ("activation change on FashionMNIST inputs",
         "change = hidden - ref.mnist_test_hidden", "change = fashion_hidden - ref.mnist_test_hidden"),
        ("CKA on MNIST inputs", "kl.linear_cka(fashion_hidden[:CKA_PROBES]", "kl.linear_cka(hidden[:CKA_PROBES]"),
        ("batched SFT dist. 2 without its coin",
         "sft2_labels = train_digits % 2 + 4 * torch.randint(0, 2,", "sft2_labels = train_digits % 2 + 4 * torch.randint(0, 1,"),
        ("batched base logits of the wrong images",
         "None if base_logits is None else base_logits[idx]", "None if base_logits is None else base_logits[:len(idx)]"),
        ("Fig. 10's KL change with the wrong sign",
         "delta_kl = self.mean_forward_kl(params) - self.kl_before", "delta_kl = self.kl_before - self.mean_forward_kl(params)"),
        ("Fig. 10's update with the wrong sign",
         "update, grad = flatten(params) - flatten(self.params)", "update, grad = flatten(self.params) - flatten(params)"),
        ("resume keeps the rows of unfinished runs",
         'done = {row["run_id"] for row in rows if row.get("last")}', 'done = {row["run_id"] for row in rows}'),
        ("one learning rate for the whole batch",
         '[{"params": list(p.values()), "lr": c.lr} for p, c in zip(per_run, configs)]',
         '[{"params": list(p.values()), "lr": configs[0].lr} for p in per_run]'),
    ]),
    "vla_finetune.py": (["test_vla_finetune.py"], [
        ("forward and reverse KL swapped in the recorded KL",
         "per_dim.append(kl.forward_kl(base, logits).cpu())", "per_dim.append(kl.forward_kl(logits, base).cpu())"),
        ("the KL summed over observations, not averaged",
         "return torch.cat(per_dim).mean(0)", "return torch.cat(per_dim).sum(0)"),
        ("the recorded KL is the mean of the 7 dimensions, not their sum",
         "forward_kl=float(per_dim.sum())", "forward_kl=float(per_dim.mean())"),
        ("the KL measured with a prior task's instruction",
         'setup["kl_states"], task_info(args.env)["instruction"])',
         'setup["kl_states"], task_info(args.prior_envs[0])["instruction"])'),
        ("the KL observations taken from a prior task",
         "kl_states_for(model, processor, envs[args.env], args.env,",
         "kl_states_for(model, processor, envs[args.prior_envs[0]], args.prior_envs[0],"),
        ("the KL observations at the evaluation positions",
         'records, _ = run_episode(env, env_id, (SEEDS["kl"] + i, None)',
         'records, _ = run_episode(env, env_id, (SEEDS["eval"] + i, None)'),
        ("the KL's action prefixes greedy, not sampled from pi0",
         "sampled = sample_action_tokens(model, ids, pixels, generator)",
         "sampled = sample_action_tokens(model, ids, pixels, generator, greedy=True)"),
        ("prior-task success averaged with the new task",
         "prior = {e: float(np.mean(outcomes[e])) for e in args.prior_envs}",
         "prior = {e: float(np.mean(outcomes[e])) for e in outcomes}"),
        ("new-task success read from a prior task",
         "new_success=float(np.mean(outcomes[args.env]))", "new_success=float(np.mean(outcomes[args.prior_envs[0]]))"),
        ("evaluation samples instead of acting greedily",
         'task_info(env_id)["instruction"], stats, greedy=True)',
         'task_info(env_id)["instruction"], stats, greedy=False)'),
        ("a point measures pi0 instead of the fine-tuned model",
         'record = evaluate_point(model, setup["processor"], setup, args)',
         'record = evaluate_point(setup["model"], setup["processor"], setup, args)'),
        ("RL samples from pi0, not from the policy it updates",
         'act = model_policy(model, setup["processor"], instruction, setup["stats"], greedy=False',
         'act = model_policy(setup["model"], setup["processor"], instruction, setup["stats"], greedy=False'),
        ("GRPO groups mix positions",
         "rewards = torch.tensor(rewards).view(args.states_per_iter, args.group_size)",
         "rewards = torch.tensor(rewards).view(args.group_size, args.states_per_iter)"),
        ("1-0 REINFORCE with GRPO's advantages",
         "advantages = kl.reinforce_advantages(rewards).flatten()",
         "advantages = kl.group_advantages(rewards).flatten()"),
        ("GRPO without the group std",
         "advantages = kl.group_advantages(rewards).flatten()",
         "advantages = kl.group_advantages(rewards, normalize_std=False).flatten()"),
        ("--group-size ignored", "for _ in range(args.group_size):", "for _ in range(4):"),
        ("--kl-coef ignored", 'kl_coef = args.kl_coef if arm == "grpo-kl" else 0.0',
         'kl_coef = 0.1 if arm == "grpo-kl" else 0.0'),
        ("the KL penalty on every RL arm", 'kl_coef = args.kl_coef if arm == "grpo-kl" else 0.0',
         'kl_coef = args.kl_coef if arm != "grpo" else 0.0'),
        ("the KL penalty against the policy itself", 'setup["model"], kl_coef)', "model, kl_coef)"),
        ("the KL penalty is the forward KL", "penalty = kl.reverse_kl(base_logits, logits)",
         "penalty = kl.forward_kl(base_logits, logits)"),
        ("the penalty not divided by the number of episodes", ".index_put(where, penalty).sum() / len(episodes)",
         ".index_put(where, penalty).sum()"),
        ("REINFORCE's loss averaged over an episode's steps",
         'aggregation="constant", max_tokens=1', 'aggregation="sequence_mean", max_tokens=1'),
        ("sft-demonstrator imitates pi0's own expert",
         'grid, out / "cache", expert=motion_planning_demonstrator)', 'grid, out / "cache", expert=None)'),
        ("--samples-per-position ignored", "starts = grid * args.samples_per_position", "starts = grid * 4"),
        ("failed samples imitated too", "            if success:\n                kept.append",
         "            if True:\n                kept.append"),
        ("sft-rl imitates pi0's samples, not the GRPO run's",
         "return successful_rollouts(rl_model, processor,", "return successful_rollouts(setup[\"model\"], processor,"),
        ("sft-rl imitates seed 0's GRPO run whatever its seed",
         "run_name('grpo', args.grpo_lr, seed)", "run_name('grpo', args.grpo_lr, 0)"),
        ("demonstrations not normalised with pi0's statistics",
         "torch.as_tensor(actions_to_tokens(normalize_actions(actions, stats)))",
         "torch.as_tensor(actions_to_tokens(actions))"),
        ("--lr ignored", "make_optimizer(model, lr, args.warmup_steps)",
         "make_optimizer(model, ARMS[arm][2], args.warmup_steps)"),
        ("episodes counted per position", 'state["episodes_seen"] += args.states_per_iter * args.group_size',
         'state["episodes_seen"] += args.states_per_iter'),
        ("teacher forcing shifted by a token", "action_tokens[:, :-1]", "action_tokens[:, 1:]"),
        ("the action ids off by one", "logits[..., ACTION_TOKEN_BEGIN:VOCAB_SIZE]",
         "logits[..., ACTION_TOKEN_BEGIN - 1:VOCAB_SIZE - 1]"),
        ("sampling at temperature 2", "torch.softmax(logits.float(), -1)", "torch.softmax(logits.float() / 2, -1)"),
        ("a step's log-prob the mean of its 7 tokens'",
         "(action_tokens - ACTION_TOKEN_BEGIN).to(logits.device)).sum(-1)",
         "(action_tokens - ACTION_TOKEN_BEGIN).to(logits.device)).mean(-1)"),
        ("SFT's gradient clipped at 10, not 1",
         "optimizer.zero_grad()\n    loss.backward()\n    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)",
         "optimizer.zero_grad()\n    loss.backward()\n    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)"),
        ("the law fitted on new-task success", 'np.array([r["prior_mean"] for r in points])',
         'np.array([r["new_success"] for r in points])'),
        ("RL's gradient clipped at 10, not 1",
         "        loss.backward()\n    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)",
         "        loss.backward()\n    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)"),
        ("REINFORCE's loss divided by the longest episode's steps too",
         'aggregation="constant", max_tokens=1', 'aggregation="constant", max_tokens=None'),
        ("RL positions drawn with replacement", "size=args.states_per_iter, replace=False)",
         "size=args.states_per_iter, replace=True)"),
        ("the KL observations from pi0's greedy episodes",
         "act = model_policy(model, processor, instruction, stats, False, generator)\n        model.eval()\n        images",
         "act = model_policy(model, processor, instruction, stats, True, generator)\n        model.eval()\n        images"),
        ("sft-pi0 and sft-rl imitate greedy episodes, not samples",
         'act = model_policy(model, processor, task_info(env_id)["instruction"], stats, False, generator)',
         'act = model_policy(model, processor, task_info(env_id)["instruction"], stats, True, generator)'),
        ("every seed's sft-pi0 imitates the same samples",
         'SEEDS["samples"] + seed, out / "cache", setup["policy_key"])', 'SEEDS["samples"], out / "cache", setup["policy_key"])'),
        ("failed demonstrations imitated too", "            if success:\n                demos.append",
         "            if True:\n                demos.append"),
        ("SFT sees the same order every epoch", "pick = orders[epoch][batch", "pick = orders[0][batch"),
        ("SFT drops the last partial batch of an epoch", "per_epoch = math.ceil(len(tokens) / args.batch_size)",
         "per_epoch = len(tokens) // args.batch_size"),
        ("--lr ignored by main", "for lr in args.lr or [ARMS[args.method][2]]:", "for lr in [ARMS[args.method][2]]:"),
        ("pi0 cloned with the new task's prompt on every task",
         'scheduler, task_info(env_id)["instruction"],\n', 'scheduler, task_info(args.env)["instruction"],\n'),
        ("the prompt without the space token (29871) that OpenVLA ends it with",
         "ids = torch.cat([ids, ids.new_full((len(ids), 1), SPIECE_UNDERLINE_ID)], dim=1)", "ids = ids"),
    ]),
}


def main(scripts):
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill still restores the script (finally below)
    survived, total = [], 0
    for script in scripts or MUTATIONS:
        tests, mutations = MUTATIONS[script]
        path = ROOT / script
        original = path.read_text()
        for description, before, after in mutations:
            if original.count(before) != 1:
                sys.exit(f"error: {script}: the text of mutation {description!r} occurs {original.count(before)} "
                         f"times, not once; update .ci/mutate.py to the script")
            path.write_text(original.replace(before, after))
            try:
                result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                        cwd=ROOT, capture_output=True, text=True)
            finally:
                path.write_text(original)
            total += 1
            caught = result.returncode != 0
            print(f"{'caught  ' if caught else 'SURVIVED'} {script}: {description}", flush=True)
            if not caught:
                survived.append(f"{script}: {description}")
    print(f"{total - len(survived)} of {total} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
