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
    "llm_finetune.py": (["test_llm_finetune.py"], [
        ("forward and reverse KL swapped in the recorded KL",
         "kl.forward_kl(base[start:start + chunk], logp[start:start + chunk])",
         "kl.forward_kl(logp[start:start + chunk], base[start:start + chunk])"),
        ("k1 and k3 with pi0 and pi swapped",
         'kl.kl_estimators(per_position["base"], per_position["policy"], mask)',
         'kl.kl_estimators(per_position["policy"], per_position["base"], mask)'),
        ("per-token KL divided by the batch's longest response, not the sequence's own length",
         "sequence_kl / mask.sum(-1).clamp(min=1)", "sequence_kl / mask.shape[-1]"),
        ("pi0's KL samples paired with the wrong prompts",
         "self.prompts = [p for p in prompts for _ in range(args.kl_samples)]",
         "self.prompts = [p for _ in range(args.kl_samples) for p in prompts]"),
        ("the KL measured on the test prompts, not the KL prompts",
         "BaseSamples(base_model, exp.tokenizer, kl_examples, args, cache)",
         "BaseSamples(base_model, exp.tokenizer, exp.test, args, cache)"),
        ("test samples scored against another prompt's answer",
         'test[i // per_prompt]["answer"]', 'test[i % len(test)]["answer"]'),
        ("samples drawn at Qwen's temperature 0.7, not from pi",
         '"temperature": 1.0, "top_k": 0', '"temperature": 0.7, "top_k": 0'),
        ("samples truncated to the generation_config's top-k",
         '"temperature": 1.0, "top_k": 0, "top_p": 1.0', '"temperature": 1.0, "top_p": 1.0'),
        ("the law fitted on the per-token KL",
         'x, y = np.array([r["kl_seq"] for r in points])', 'x, y = np.array([r["kl_token"] for r in points])'),
        ("the law fitted against new-task accuracy",
         'np.array([r["prior_avg"] for r in points])', 'np.array([r["new_task_acc"] for r in points])'),
        ("1-0 REINFORCE with Dr. GRPO's advantages",
         "advantages = kl.reinforce_advantages(rewards).flatten()",
         "advantages = kl.group_advantages(rewards, normalize_std=False).flatten()"),
        ("--scale-rewards ignored", 'normalize_std=args.scale_rewards == "group"', "normalize_std=False"),
        ("GRPO's std division inverted", 'normalize_std=args.scale_rewards == "group"',
         'normalize_std=args.scale_rewards == "none"'),
        ("rollouts scored against another prompt's answer",
         'examples[i // args.group_size]["answer"]', 'examples[i % len(examples)]["answer"]'),
        ("rewards grouped across prompts", ".view(len(prompts), args.group_size)", ".view(args.group_size, len(prompts))"),
        ("rollouts paired with the wrong prompts in the loss",
         "flat_prompts = [p for p in prompts for _ in range(args.group_size)]",
         "flat_prompts = [p for _ in range(args.group_size) for p in prompts]"),
        ("GRPO's token mean per sequence, not Dr. GRPO's constant", 'aggregation="constant"', 'aggregation="sequence_mean"'),
        ("--clip-eps ignored", "clip_eps=args.clip_eps", "clip_eps=0.2"),
        ("RL micro-batches not weighted to the full batch",
         "loss = loss * len(group) / len(responses)", "loss = loss / len(groups)"),
        ("--kl-direction ignored", "direction=args.kl_direction", 'direction="forward"'),
        ("grpo-kl's penalty subtracted", "loss = loss + run.kl_coef * penalty", "loss = loss - run.kl_coef * penalty"),
        ("grpo-kl's penalty weighted per sequence, not per token",
         "run.kl_coef * penalty * mask.sum() / response_tokens", "run.kl_coef * penalty * len(group) / len(responses)"),
        ("--kl-coef ignored", 'kl_coef=config.get("kl_coef", 0.0)', "kl_coef=0.1"),
        ("--mu ignored", 'mu=config.get("mu", 1)', "mu=1"),
        ("grpo-kl's reference is the policy itself",
         "run.reference = load_model(args, accelerator.device).requires_grad_(False).eval()",
         "run.reference = model"),
        ("SimPO's chosen and rejected swapped",
         "kl.simpo_loss(sequence_logprob(model, chosen), sequence_logprob(model, rejected))",
         "kl.simpo_loss(sequence_logprob(model, rejected), sequence_logprob(model, chosen))"),
        ("SimPO's rejected replaced by the chosen response",
         'encode_response(tokenizer, examples[i]["rejected"])', 'encode_response(tokenizer, examples[i]["response"])'),
        ("SFT micro-batches weighted by examples, not tokens",
         'weight = int(chosen["response_mask"].sum()) / response_tokens', "weight = len(group) / len(examples)"),
        ("SFT trained only on the examples that have a negative",
         'if method == "sft" or ex.get("rejected")', 'if ex.get("rejected")'),
        ("sft-distill trained on self-sft's targets", "examples = data[method]", 'examples = data["self-sft"]'),
        ("self-sft keeps pi0's first wrong sample",
         'if reward_fn(decode(tokenizer, r), ex["answer"])', 'if not reward_fn(decode(tokenizer, r), ex["answer"])'),
        ("--self-samples ignored", "args, args.self_samples, exp.reward_fn)", "args, 1, exp.reward_fn)"),
        ("sft-distill keeps only the teacher's correct samples",
         "sampled_targets(teacher, exp.tokenizer, examples, args, 1)",
         "sampled_targets(teacher, exp.tokenizer, examples, args, 1, exp.reward_fn)"),
        ("--lr ignored", 'lr=config["lr"], weight_decay=0.0)', "lr=1e-4, weight_decay=0.0)"),
        ("AdamW with weight decay", 'lr=config["lr"], weight_decay=0.0)', 'lr=config["lr"], weight_decay=0.01)'),
        ("--warmup-steps ignored", "get_constant_schedule_with_warmup(optimizer, args.warmup_steps)",
         "get_constant_schedule_with_warmup(optimizer, 0)"),
        ("max grad norm 10, not Table 2's 1", "clip_grad_norm_(run.model.parameters(), 1.0)",
         "clip_grad_norm_(run.model.parameters(), 10.0)"),
        ("the schedule never stepped", "    run.scheduler.step()\n", ""),
        ("--seed ignored by the policy's sampling", 'torch.manual_seed(config["seed"] + accelerator.process_index)',
         "torch.manual_seed(accelerator.process_index)"),
        ("samples drawn with Qwen's repetition penalty", "repetition_penalty=1.0,", "repetition_penalty=1.05,"),
        ("responses returned sample-major, paired with the wrong prompts",
         "flat = [p for p in prompts for _ in range(num_samples)]", "flat = [p for _ in range(num_samples) for p in prompts]"),
        ("k3 recorded as k2", 'totals["k3_seq"] += estimates["k3"].tolist()', 'totals["k3_seq"] += estimates["k2"].tolist()'),
        ("the sequence KL averaged over tokens, not summed", 'sequence_kl = per_position["exact"].sum(-1)',
         'sequence_kl = per_position["exact"].mean(-1)'),
        ("greedy and sampled accuracy swapped",
         '"new_task_acc": score(sampled, args.eval_samples), "new_task_acc_greedy": score(greedy, 1)',
         '"new_task_acc": score(greedy, 1), "new_task_acc_greedy": score(sampled, args.eval_samples)'),
        ("the base point left out of each method's frontier",
         'points = [r for r in trained if r["method"] == method] + ([base] if base else [])',
         'points = [r for r in trained if r["method"] == method]'),
        ("the later updates of a round clipped against the first micro-batch's sampler log-probs",
         "old = None if old_logprobs is None else old_logprobs[k]", "old = None if old_logprobs is None else old_logprobs[0]"),
        ("the KL penalty over padding too", "kl.kl_penalty(base_logits, logits, mask,", "kl.kl_penalty(base_logits, logits, None,"),
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
