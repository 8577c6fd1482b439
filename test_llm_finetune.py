"""Tests of llm_finetune.py on a tiny locally built Qwen2 (CPU, offline, one model build per module)."""
import copy
import gc
import json
import math
import os
import random
import re
import weakref
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, get_constant_schedule_with_warmup

import kl
import llm_finetune as L


class NoAccelerator:
    """The single-process, CPU behaviour of accelerate.Accelerator that the update functions use."""
    device, process_index, num_processes, is_main_process = torch.device("cpu"), 0, 1, True

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def backward(loss):
        loss.backward()

    @staticmethod
    def clip_grad_norm_(parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    @staticmethod
    def wait_for_everyone():
        pass


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """An untrained tiny twin (tokenizer + model) saved with save_pretrained."""
    torch.set_num_threads(1)
    tokenizer = L.build_char_tokenizer()
    model = L.build_twin_model(tokenizer, seed=0).eval()
    path = tmp_path_factory.mktemp("twin")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer, model, path


def args_for(path, *extra):
    return L.parse_args(["--model", str(path), *extra])


def make_optimizer(model, lr):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return optimizer, get_constant_schedule_with_warmup(optimizer, 0)


def make_run(model, lr, method, **settings):
    """A Run of `method` on `model` with AdamW at `lr` and a constant schedule."""
    optimizer, scheduler = make_optimizer(model, lr)
    return L.Run(model, optimizer, scheduler, method, **settings)


def experiment(tokenizer, args, reward_fn=None):
    return L.Experiment(NoAccelerator, tokenizer, args, reward_fn)


# ---------------------------------------------------------------------------- the wiring the paper's claims rest on
# Each fact below is one a one-line slip in llm_finetune.py would break while every loss in kl.py stays right:
# which model, which inputs, which targets, which flag. They come first and are fast (hand-made data, a few
# tokens, one step), so `.ci/mutate.py llm_finetune.py`, which stops at the first failure, stays quick.


class SweepAccelerator(NoAccelerator):
    """NoAccelerator plus what train_run calls around the updates."""

    @staticmethod
    def prepare(*objects):
        return objects

    @staticmethod
    def free_memory():
        pass


def perturbed(model, scale, seed):
    """A copy of `model` with Gaussian noise of std `scale` added to every weight: a policy pi that moved."""
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return moved


def flat_grad(model):
    return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in model.parameters()])


def direct_logits(model, prompt, response):
    """Logits predicting each response token, from one forward pass of prompt + response alone, [T, V]."""
    return model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]


def direct_logprobs(model, prompt, response):
    """log pi(y_t | x, y_<t) of one response, [T]."""
    logp = torch.log_softmax(direct_logits(model, prompt, response), -1)
    return logp.gather(-1, torch.tensor(response, dtype=torch.long).unsqueeze(-1)).squeeze(-1)


def spy_on_sample(monkeypatch):
    """Record every L.sample call's output."""
    drawn, real_sample = [], L.sample

    def spy(*args, **kwargs):
        drawn.append(real_sample(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(L, "sample", spy)
    return drawn


def gradients_at_each_step(monkeypatch, then_step=False):
    """Record the flat gradient each time an update calls optimizer_step (and take the real step if asked)."""
    grads, models, real_step = [], [], L.optimizer_step

    def spy(accelerator, run):
        grads.append(flat_grad(run.model))
        if not then_step:
            return 0.0
        norm = real_step(accelerator, run)
        models.append(copy.deepcopy(run.model))
        return norm

    monkeypatch.setattr(L, "optimizer_step", spy)
    return grads, models


def rl_wiring_examples():
    return [{"prompt": "copy: abc", "answer": "x"}, {"prompt": "sort: dcba", "answer": "y"},
            {"prompt": "reverse: ab", "answer": "z"}]


def answer_dependent_reward(response, answer):
    """A reward that depends on the answer, so scoring a sample against another prompt's answer changes it."""
    return float((sum(map(ord, response)) + ord(answer)) % 3 == 0)


@pytest.mark.parametrize("method,scale", [("grpo", "none"), ("grpo", "group"), ("reinforce", "none"),
                                          ("grpo-kl", "none")])
def test_rl_step_gradient_is_the_full_batch_gradient_of_each_methods_objective(twin, monkeypatch, method, scale):
    """One rl_step's gradient equals, computed here one sequence at a time from hand-made advantages,
    -(1 / (N x max_new_tokens)) sum_i A_i grad log pi(y_i | x_i)  (Dr. GRPO's constant aggregation)
    with A = r - mean_G(r) (GRPO, the default --scale-rewards none), (r - mean_G) / std_G (--scale-rewards group),
    A = r (1-0 REINFORCE); grpo-kl adds coef x grad of the token-mean reverse KL(pi || pi0) (the default
    --kl-direction). Each sample is scored against its own prompt's answer, G = --group-size samples per prompt,
    and the micro-batches accumulate to the full batch."""
    tokenizer, base, path = twin
    group, max_new = 3, 10
    args = args_for(path, "--group-size", str(group), "--max-new-tokens", str(max_new), "--micro-batch-tokens", "50",
                    "--scale-rewards", scale)
    policy = perturbed(base, 0.05, seed=1)
    drawn = spy_on_sample(monkeypatch)
    grads, _ = gradients_at_each_step(monkeypatch)
    run = L.Run(policy, None, None, method, kl_coef=0.25 if method == "grpo-kl" else 0.0, reference=base)
    examples = rl_wiring_examples()
    torch.manual_seed(4)
    info = L.rl_step(experiment(tokenizer, args, answer_dependent_reward), run, examples)

    responses = drawn[0][0]
    assert len(responses) == group * len(examples)
    prompts, rewards = [], torch.zeros(len(examples), group)
    for e, ex in enumerate(examples):
        for j in range(group):
            prompts.append(L.chat_prompt(tokenizer, ex["prompt"]))
            rewards[e, j] = answer_dependent_reward(L.decode(tokenizer, responses[e * group + j]), ex["answer"])
    assert len(L.micro_batches(prompts, responses, 50)) > 1
    assert min(map(len, responses)) < max_new == max(map(len, responses))  # --max-new-tokens; lengths differ
    assert (rewards.std(1) > 0).any() and 0 < rewards.mean() < 1  # the advantages are not all zero
    assert info["reward"] == pytest.approx(rewards.mean().item())
    if method == "reinforce":
        advantages = rewards
    else:
        advantages = rewards - rewards.mean(1, keepdim=True)
        if scale == "group":
            advantages = advantages / (rewards.std(1, correction=0, keepdim=True) + 1e-8)
    reference = copy.deepcopy(policy)
    reference.zero_grad()
    tokens, loss = sum(map(len, responses)), torch.tensor(0.0)
    for prompt, response, advantage in zip(prompts, responses, advantages.flatten()):
        if not response:
            continue
        logits = direct_logits(reference, prompt, response)
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
        loss = loss - advantage * logp.sum() / (len(responses) * max_new)
        if method == "grpo-kl":
            with torch.no_grad():
                base_logits = direct_logits(base, prompt, response)
            pi, pi0 = torch.distributions.Categorical(logits=logits), torch.distributions.Categorical(logits=base_logits)
            loss = loss + 0.25 * torch.distributions.kl_divergence(pi, pi0).sum() / tokens
    loss.backward()
    torch.testing.assert_close(grads[0], flat_grad(reference), atol=1e-7, rtol=1e-3)


def test_the_second_update_of_a_round_uses_the_ratio_to_the_sampler_clipped_at_clip_eps(twin, monkeypatch):
    """mu = 2: the second optimizer step's gradient is that of -(1 / (N x max_new_tokens)) sum min(r A, clip(r,
    1 - eps, 1 + eps) A) over every sampled token, r = pi / pi_sampler, eps = --clip-eps (not the default 0.2)."""
    tokenizer, base, path = twin
    group, max_new, eps = 4, 4, 0.02
    args = args_for(path, "--group-size", str(group), "--max-new-tokens", str(max_new), "--clip-eps", str(eps),
                    "--micro-batch-tokens", "40")
    sampler = perturbed(base, 0.05, seed=2)
    drawn = spy_on_sample(monkeypatch)
    grads, models = gradients_at_each_step(monkeypatch, then_step=True)
    run = make_run(copy.deepcopy(sampler), 1e-3, "grpo", mu=2)
    examples = rl_wiring_examples()[:2]
    torch.manual_seed(5)
    L.rl_step(experiment(tokenizer, args, answer_dependent_reward), run, examples)
    assert len(grads) == 2
    responses = drawn[0][0]
    prompts = [L.chat_prompt(tokenizer, ex["prompt"]) for ex in examples for _ in range(group)]
    assert len(L.micro_batches(prompts, responses, 40)) > 1
    rewards = torch.tensor([answer_dependent_reward(L.decode(tokenizer, r), examples[i // group]["answer"])
                            for i, r in enumerate(responses)]).view(len(examples), group)
    advantages = (rewards - rewards.mean(1, keepdim=True)).flatten()
    assert advantages.abs().sum() > 0

    def clipped_objective_gradient(clip):
        policy = copy.deepcopy(models[0])  # the policy after the first step
        policy.zero_grad()
        loss = torch.tensor(0.0)
        for prompt, response, advantage in zip(prompts, responses, advantages):
            if response:
                logp = direct_logprobs(policy, prompt, response)
                with torch.no_grad():
                    old = direct_logprobs(sampler, prompt, response)
                ratio = (logp - old).exp()
                terms = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
                loss = loss - terms.sum() / (len(responses) * max_new)
        loss.backward()
        return flat_grad(policy)

    expected = clipped_objective_gradient(eps)
    assert not torch.allclose(expected, clipped_objective_gradient(0.2), atol=1e-7, rtol=1e-3)  # eps matters here
    torch.testing.assert_close(grads[1], expected, atol=1e-7, rtol=1e-3)


@pytest.mark.parametrize("method", ["sft", "simpo"])
def test_offline_step_gradient_is_the_full_batch_sft_or_simpo_gradient(twin, monkeypatch, method):
    """SFT: the gradient of the mean negative log-likelihood of every target token (the response's tokens and
    EOS; prompts not counted) over the whole batch. SimPO: of mean_i -log sigmoid(log pi(chosen_i | x_i)
    - log pi(rejected_i | x_i) - 1) with summed sequence log-probs, chosen = the response, rejected = the
    example's negative. Computed one example at a time; offline_step splits the batch in micro-batches."""
    tokenizer, base, path = twin
    args = args_for(path, "--micro-batch-tokens", "40")
    examples = [{"prompt": f"add: {10 + i}+{i}", "response": "y" * n, "rejected": "z" * (n % 4 + 1)}
                for i, n in enumerate((2, 9, 5, 8, 1, 4))]
    grads, _ = gradients_at_each_step(monkeypatch)
    L.offline_step(experiment(tokenizer, args), L.Run(copy.deepcopy(base), None, None, method), examples)
    reference = copy.deepcopy(base)
    terms = []
    for ex in examples:
        prompt = L.chat_prompt(tokenizer, ex["prompt"])
        chosen = tokenizer(ex["response"] + "<|end|>")["input_ids"]
        if method == "sft":
            terms.append(-direct_logprobs(reference, prompt, chosen))
        else:
            rejected = tokenizer(ex["rejected"] + "<|end|>")["input_ids"]
            margin = direct_logprobs(reference, prompt, chosen).sum() - direct_logprobs(reference, prompt, rejected).sum()
            terms.append(-torch.nn.functional.logsigmoid(margin - 1.0))
    loss = torch.cat(terms).mean() if method == "sft" else torch.stack(terms).mean()
    loss.backward()
    torch.testing.assert_close(grads[0], flat_grad(reference), atol=1e-7, rtol=1e-3)


def wiring_data():
    """Training data in which every list is recognisable: RL prompts, SFT examples (half with a negative),
    and the two controls' sampled targets."""
    return {"rl": [{"prompt": f"add: {i}+1", "answer": str(i + 1)} for i in range(9)],
            "offline": [{"prompt": f"add: {i}+2", "answer": str(i + 2), "response": str(i + 2),
                         **({"rejected": str(i + 3)} if i % 2 else {})} for i in range(8)],
            "self-sft": [{"prompt": f"add: {i}+3", "answer": str(i + 3), "response_ids": [5, 1]} for i in range(4)],
            "sft-distill": [{"prompt": f"add: {i}+4", "answer": str(i + 4), "response_ids": [6, 1]} for i in range(4)],
            "dropped": {"rl": 0, "offline": 0}, "skipped": 0}


def run_with_spies(twin, tmp_path, monkeypatch, config, *flags):
    """train_run with the updates and the evaluation replaced by recorders: what each step was handed."""
    tokenizer, _, path = twin
    args = args_for(path, "--out", str(tmp_path), "--no-checkpoint", "--eval-every", "1000", *flags)
    exp = L.Experiment(SweepAccelerator, tokenizer, args, None, data=wiring_data())
    calls = []

    def step(exp, run, examples):
        calls.append({"run": run, "examples": list(examples), "lr": run.optimizer.param_groups[0]["lr"],
                      "seed": torch.initial_seed()})
        run.optimizer.step()
        run.scheduler.step()
        return {"reward": 0.0, "generated_tokens": 0, "update_tokens": 0}

    monkeypatch.setattr(L, "rl_step", step)
    monkeypatch.setattr(L, "offline_step", step)
    monkeypatch.setattr(L, "evaluate", lambda exp, model: {})
    L.train_run(exp, "run", config)
    return calls


def test_train_run_hands_each_update_its_flags_pi0_and_its_prompts(twin, tmp_path, monkeypatch):
    """grpo-kl: the learning rate (after --warmup-steps), mu, the KL coefficient, a frozen pi0 as the reference,
    AdamW without weight decay (Table 2), --seed, a policy that starts at pi0, --prompts-per-step distinct prompts per
    step and every RL prompt once per epoch."""
    _, base, _ = twin
    config = {"method": "grpo-kl", "lr": 2e-4, "scheduler": "constant", "seed": 3, "mu": 2, "kl_coef": 0.3, "epochs": 1}
    calls = run_with_spies(twin, tmp_path, monkeypatch, config, "--prompts-per-step", "3", "--warmup-steps", "2")
    assert [c["lr"] for c in calls] == pytest.approx([0.0, 1e-4, 2e-4])  # 9 prompts / 3 per step = 3 steps
    run = calls[0]["run"]
    assert (run.method, run.mu, run.kl_coef, calls[0]["seed"]) == ("grpo-kl", 2, 0.3, 3)
    assert run.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert run.reference is not run.model and not any(p.requires_grad for p in run.reference.parameters())
    for model in (run.reference, run.model):
        assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), base.state_dict().values()))
    prompts = [ex["prompt"] for c in calls for ex in c["examples"]]
    assert all(len(c["examples"]) == 3 for c in calls)
    assert sorted(prompts) == sorted(ex["prompt"] for ex in wiring_data()["rl"])


@pytest.mark.parametrize("method,source", [("sft", "offline"), ("simpo", "offline"), ("self-sft", "self-sft"),
                                           ("sft-distill", "sft-distill")])
def test_train_run_trains_each_offline_method_on_its_own_targets(twin, tmp_path, monkeypatch, method, source):
    """SFT on the dataset's responses, SimPO on the examples that have a negative, self-sft on pi0's sampled
    targets, sft-distill on the teacher's; --batch-size examples per step, every example once per epoch."""
    config = {"method": method, "lr": 1e-4, "scheduler": "constant", "seed": 0, "batch_size": 2, "epochs": 2}
    calls = run_with_spies(twin, tmp_path, monkeypatch, config, "--warmup-steps", "0")
    expected = [ex for ex in wiring_data()[source] if method != "simpo" or "rejected" in ex]
    assert len(calls) == 2 * len(expected) // 2 and all(len(c["examples"]) == 2 for c in calls)
    assert all(c["lr"] == 1e-4 and c["run"].method == method for c in calls)
    for epoch in (calls[:len(calls) // 2], calls[len(calls) // 2:]):
        assert sorted(ex["prompt"] for c in epoch for ex in c["examples"]) == sorted(ex["prompt"] for ex in expected)


def test_cosine_schedule_and_sft_examples_cap(twin, tmp_path, monkeypatch):
    config = {"method": "sft", "lr": 1e-4, "scheduler": "cosine", "seed": 0, "batch_size": 2, "epochs": 1}
    calls = run_with_spies(twin, tmp_path, monkeypatch, config, "--warmup-steps", "0", "--sft-examples", "6")
    assert len(calls) == 3 and len({ex["prompt"] for c in calls for ex in c["examples"]}) == 6
    assert [c["lr"] for c in calls] == pytest.approx([1e-4 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)])


def test_sweep_crosses_each_methods_own_grid_and_only_the_flags_that_apply():
    args = L.parse_args(["--method", "grpo", "grpo-kl", "sft", "simpo", "--mu", "1", "2", "--kl-coef", "0.1", "0.5",
                         "--batch-size", "16", "32", "--seed", "0", "1"])
    configs = [config for _, config in L.sweep(args)]
    for method in ("grpo", "grpo-kl", "sft", "simpo"):
        mine = [c for c in configs if c["method"] == method]
        assert sorted({c["lr"] for c in mine}) == sorted(L.LR_GRIDS["twin"][method])
        assert {c["seed"] for c in mine} == {0, 1}
        assert {c.get("mu") for c in mine} == ({1, 2} if method in L.ON_POLICY else {None})
        assert {c.get("kl_coef") for c in mine} == ({0.1, 0.5} if method == "grpo-kl" else {None})
        assert {c.get("batch_size") for c in mine} == ({None} if method in L.ON_POLICY else {16, 32})
    paper = L.parse_args(["--task", "math", "--method", "grpo", "sft"])
    assert paper.prior_tasks == ["hellaswag", "truthfulqa_mc2", "mmlu", "ifeval", "winogrande", "humaneval_instruct"]
    table_2 = (64, 8, [1], 0.2, 50, [16, 32, 64, 128], ["constant"], [1], [0.1], "reverse")
    assert (paper.group_size, paper.prompts_per_step, paper.mu, paper.clip_eps, paper.warmup_steps, paper.batch_size,
            paper.scheduler, paper.epochs, paper.kl_coef, paper.kl_direction) == table_2
    assert {c["lr"] for _, c in L.sweep(paper) if c["method"] == "grpo"} == {1e-5, 2e-5, 3e-5, 4e-5, 5e-5}
    assert {c["lr"] for _, c in L.sweep(paper) if c["method"] == "sft"} == {1e-5, 3e-5, 5e-5, 7e-5, 9e-5}
    assert [c["lr"] for _, c in L.sweep(L.parse_args(["--method", "sft", "grpo", "--lr", "7e-4"]))] == [7e-4, 7e-4]


def test_each_paper_benchmark_is_scored_by_the_metric_the_docs_name():
    """The prior-task score averages one metric per benchmark (§4.1 names the benchmarks, not the metrics): the
    one docs/llm_finetune.md's table of choices names is the one read from lm-eval's results."""
    line = next(line for line in (Path(__file__).parent / "docs" / "llm_finetune.md").read_text().splitlines()
                if line.startswith("| prior-task score"))
    named = {task: metric for task, metric in re.findall(r"(\w+)\*{0,2} `([\w@]+)`", line)
             if task in L.PAPER_PRIOR_TASKS.split(",")}
    assert set(named) == set(L.PAPER_PRIOR_TASKS.split(","))
    assert {task: L.PRIMARY_METRIC[task].split(",")[0] for task in named} == named


def test_self_sft_targets_come_from_pi0_with_self_samples_draws_on_the_first_sft_examples_prompts(twin, tmp_path):
    tokenizer, base, path = twin
    args = args_for(path, "--max-new-tokens", "4", "--self-samples", "3", "--sft-examples", "5", "--out", str(tmp_path))
    examples = [{"prompt": f"copy: {c * 3}", "answer": c} for c in "abcdefg"]

    def reward(response, answer):  # about one draw in eight
        return float(response[:1] in "abcdefgh")

    exp = experiment(tokenizer, args, reward)
    exp.data = {"rl": examples}
    targets = L.policy_targets(exp, "self-sft", base, tmp_path)
    assert targets == L.sampled_targets(base, tokenizer, examples[:5], args, 3, reward, seed=0)
    assert 0 < len(targets) < 5 and all(reward(L.decode(tokenizer, t["response_ids"]), "") for t in targets)
    unfiltered = L.sampled_targets(base, tokenizer, examples[:5], args, 1, None, seed=0)
    assert targets != unfiltered


def test_kl_samples_are_pi0s_temperature_1_draws_on_the_kl_prompts_and_the_kl_is_forward(twin, tmp_path):
    """pi0's KL samples: --kl-samples draws per KL prompt at temperature 1, up to --eval-max-tokens, each paired
    with its own prompt; the cached log-probs are pi0's; the recorded KL is the forward KL(pi0 || pi) summed over
    each response (k1 = log pi0(y) - log pi(y), k3 = r - 1 - log r with r = pi(y) / pi0(y)), averaged over
    sequences, and not the reverse."""
    tokenizer, base, path = twin
    args = args_for(path, "--kl-samples", "3", "--eval-max-tokens", "5")
    examples = [{"prompt": f"copy: {c * 3}"} for c in "abcd"]
    samples = L.BaseSamples(base, tokenizer, examples, args, tmp_path / "cache.pt")
    prompts = [L.chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
    torch.manual_seed(0)
    drawn, _ = L.sample(base, tokenizer, prompts, 3, 5)
    pairs = [(prompts[i], drawn[3 * i + j]) for i in range(len(prompts)) for j in range(3)]
    assert list(zip(samples.prompts, samples.responses)) == pairs
    assert max(map(len, samples.responses)) == 5
    moved = perturbed(base, 0.05, seed=3)
    forward, reverse, k1, k3 = [], [], [], []
    for (prompt, response), base_logprobs in zip(pairs, samples.base_logprobs):
        if not response:
            for values in (forward, reverse, k1, k3):
                values.append(0.0)
            continue
        with torch.no_grad():
            base_logits, logits = direct_logits(base, prompt, response), direct_logits(moved, prompt, response)
        torch.testing.assert_close(base_logprobs, torch.log_softmax(base_logits, -1), atol=1e-5, rtol=1e-4)
        p0, p1 = torch.distributions.Categorical(logits=base_logits), torch.distributions.Categorical(logits=logits)
        forward.append(torch.distributions.kl_divergence(p0, p1).sum().item())
        reverse.append(torch.distributions.kl_divergence(p1, p0).sum().item())
        log_ratio = p1.log_prob(torch.tensor(response)) - p0.log_prob(torch.tensor(response))  # log pi / pi0
        k1.append(-log_ratio.sum().item())
        k3.append((log_ratio.exp() - 1 - log_ratio).sum().item())
    got = samples.kl_estimates(moved)

    def mean(values):
        return sum(values) / len(values)

    assert abs(mean(forward) - mean(reverse)) > 0.01 * mean(forward)  # the two directions differ here
    assert got["kl_seq"] == pytest.approx(mean(forward), rel=1e-4)
    assert got["k1_seq"] == pytest.approx(mean(k1), rel=1e-4, abs=1e-5)
    assert got["k3_seq"] == pytest.approx(mean(k3), rel=1e-3, abs=1e-5)
    per_token = [f / len(r) for f, (_, r) in zip(forward, pairs) if r] + [0.0] * sum(not r for _, r in pairs)
    assert got["kl_token"] == pytest.approx(mean(per_token), rel=1e-4)


def test_new_task_accuracy_scores_each_sample_against_its_own_prompts_answer(twin, monkeypatch):
    """--eval-samples temperature-1 samples per test prompt (on their own seed) and one greedy answer each,
    up to --eval-max-tokens; each scored against its own prompt's answer (the greedy answers are all scored
    right here, so the two accuracies differ)."""
    tokenizer, base, path = twin
    args = args_for(path, "--eval-samples", "2", "--eval-max-tokens", "3")
    test = [{"prompt": f"copy: {c}", "answer": a} for c, a in zip("abcd", "1000")]
    scored = []

    def reward(response, answer):
        scored.append(answer)
        return float(answer) if len(scored) <= 8 else 1.0

    calls = []
    real_sample = L.sample

    def spy(model, tokenizer, prompts, num_samples, max_new_tokens, greedy=False, max_tokens=262_144):
        calls.append((prompts, num_samples, max_new_tokens, greedy))
        return real_sample(model, tokenizer, prompts, num_samples, max_new_tokens, greedy, max_tokens)

    monkeypatch.setattr(L, "sample", spy)
    point = L.new_task_accuracy(base, tokenizer, test, reward, args, seed=7)
    prompts = [L.chat_prompt(tokenizer, ex["prompt"]) for ex in test]
    assert calls == [(prompts, 2, 3, False), (prompts, 1, 3, True)]
    assert scored == list("11000000") + list("1000")
    assert (point["new_task_acc"], point["new_task_acc_greedy"]) == (0.25, 1.0)


def test_sample_returns_each_prompts_responses_together_in_prompt_order(twin):
    """Every caller pairs response k with prompt k // num_samples: the responses are prompt-major."""
    tokenizer, base, _ = twin
    model = perturbed(base, 0.3, seed=1)  # distinct greedy answers for distinct prompts
    prompts = [L.chat_prompt(tokenizer, text) for text in ("copy: abc", "sort: dcba", "reverse: xy")]
    alone = [L.sample(model, tokenizer, [prompt], 1, 4, greedy=True)[0][0] for prompt in prompts]
    assert len({tuple(r) for r in alone}) == 3
    together, _ = L.sample(model, tokenizer, prompts, 2, 4, greedy=True)
    assert together == [alone[0], alone[0], alone[1], alone[1], alone[2], alone[2]]


def test_sample_draws_from_the_raw_policy_at_temperature_1(twin):
    """Whatever the model's generation_config (Qwen2.5-Instruct ships T 0.7, top-k 20, top-p 0.8, repetition
    penalty 1.05), the first sampled token's frequencies match pi's exact probabilities."""
    tokenizer, base, _ = twin
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.model.norm.weight.mul_(10)  # a peaked pi, on which temperature and truncation matter
    model.generation_config.update(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, do_sample=True)
    prompt = L.chat_prompt(tokenizer, "copy: abc")
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
    torch.manual_seed(0)
    responses, _ = L.sample(model, tokenizer, [prompt], 4000, 1)
    first = torch.tensor([r[0] if r else tokenizer.pad_token_id for r in responses])
    frequencies = torch.bincount(first, minlength=len(probs)).float() / len(first)
    sharpened = torch.softmax(torch.log(probs) / 0.7, -1)
    assert 0.5 * (sharpened - probs).abs().sum() > 0.1  # temperature 0.7 would be visible
    assert 0.5 * (frequencies - probs).abs().sum() < 0.05
    top = probs.argmax()
    assert top in prompt  # so a repetition penalty would lower it
    assert abs(frequencies[top] - probs[top]) < 4 * (probs[top] * (1 - probs[top]) / len(first)) ** 0.5
    assert (frequencies > 0).sum() > 20  # top-k 20 would cut the rest


def test_cut_at_eos_keeps_the_eos_and_stops_at_padding():
    assert L.cut_at_eos([7, 8, 1, 9], eos_id=1, pad_id=0) == ([7, 8, 1], True)
    assert L.cut_at_eos([7, 0, 0], eos_id=1, pad_id=0) == ([7], False)
    assert L.cut_at_eos([7, 8], eos_id=1, pad_id=0) == ([7, 8], False)


def test_the_twins_prior_tasks_ask_for_copy_reverse_and_sort():
    rng = random.Random(0)
    for task, transform in (("copy", lambda s: s), ("reverse", lambda s: s[::-1]), ("sort", lambda s: "".join(sorted(s)))):
        for _ in range(5):
            ex = L.twin_example(task, rng)
            letters = ex["prompt"].split(": ")[1]
            assert ex["prompt"].startswith(task) and ex["answer"] == transform(letters)
            assert L.PRIOR_LENGTHS[0] <= len(letters) <= L.PRIOR_LENGTHS[1]


def test_optimizer_step_clips_the_gradient_norm_at_1_steps_the_schedule_and_clears_the_gradient(twin):
    _, base, _ = twin
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    seen = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(flat_grad(model).norm().item())

    run = L.Run(model, Recorder(model.parameters(), lr=0.1), None, "sft")
    run.scheduler = get_constant_schedule_with_warmup(run.optimizer, 2)
    assert run.optimizer.param_groups[0]["lr"] == 0.0
    norm = L.optimizer_step(NoAccelerator, run)
    assert norm == pytest.approx(3.0 * sum(p.numel() for p in model.parameters()) ** 0.5, rel=1e-5)
    assert seen == [pytest.approx(1.0, rel=1e-3)]  # max grad norm 1 (Table 2)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # the schedule moved one step
    assert all(p.grad is None for p in model.parameters())


def test_the_law_is_fitted_on_forward_kl_per_sequence_against_the_prior_score(tmp_path, monkeypatch):
    """--plot: every method's Pareto frontier on (new-task accuracy, prior score) includes the base point; the
    pooled quadratic law is fitted on (kl_seq, prior_avg) of every point, base included, resampled by run."""
    monkeypatch.chdir(tmp_path)
    rows = [{"run_id": "base", "method": "base", "new_task_acc": 0.1, "prior_avg": 0.9, "kl_seq": 0.0, "kl_token": 0.0}]
    for r, method in enumerate(("grpo", "grpo", "sft", "sft")):
        for step in (1, 2):
            rows.append({"run_id": f"{method}-{r}", "method": method, "new_task_acc": 0.1 + 0.1 * step + 0.01 * r,
                         "prior_avg": 0.9 - 0.05 * step * (r + 1), "kl_seq": 0.5 * step * (r + 1),
                         "kl_token": 0.1 * step})
    fits, boots, fronts = [], [], []
    real_fit, real_boot, real_front = kl.fit_law, kl.bootstrap_r2, kl.pareto_frontier

    def fit(x, y, *a, **k):
        fits.append((list(x), list(y)))
        return real_fit(x, y, *a, **k)

    def boot(x, y, groups=None, **k):
        boots.append((list(x), list(y), list(groups)))
        return real_boot(x, y, groups=groups, n_boot=20)

    def front(new, prior):
        fronts.append((list(new), list(prior)))
        return real_front(new, prior)

    monkeypatch.setattr(L.kl, "fit_law", fit)
    monkeypatch.setattr(L.kl, "bootstrap_r2", boot)
    monkeypatch.setattr(L.kl, "pareto_frontier", front)
    L.plot_results(rows, "addition", "law")
    trained, base = rows[1:], rows[0]
    points = trained + [base]
    assert fits[0] == ([r["kl_seq"] for r in points], [r["prior_avg"] for r in points])
    assert boots[0] == ([r["kl_seq"] for r in points], [r["prior_avg"] for r in points], [r["run_id"] for r in points])
    for method in ("grpo", "sft"):
        mine = [r for r in trained if r["method"] == method] + [base]
        assert ([r["new_task_acc"] for r in mine], [r["prior_avg"] for r in mine]) in fronts
    assert (tmp_path / "plots" / "law_forgetting_vs_kl.png").is_file()


def test_a_run_that_does_not_move_scores_exactly_the_base_on_the_right_prompts(twin, tmp_path, monkeypatch):
    """A GRPO and an SFT run at learning rate 0 through main: every point equals the base row (accuracy, greedy
    accuracy, each prior task; KL, k1, k3 exactly 0: no forgetting, no move). Accuracy is measured on the test
    prompts and pi0's KL samples are drawn on the KL prompts, the two held-out sets of load_new_task."""
    tokenizer, _, path = twin
    tests_seen, real_accuracy = [], L.new_task_accuracy

    def spy(model, tokenizer, test, *a, **k):
        tests_seen.append([ex["prompt"] for ex in test])
        return real_accuracy(model, tokenizer, test, *a, **k)

    monkeypatch.setattr(L, "new_task_accuracy", spy)
    monkeypatch.setitem(L.REWARDS, "addition", lambda response, answer: float(sum(map(ord, response)) % 2))
    argv = ["--model", str(path), "--out", str(tmp_path), "--method", "grpo", "sft", "--lr", "0", "--steps", "1",
            "--num-test", "4", "--kl-prompts", "3", "--kl-samples", "2", "--eval-samples", "2", "--max-new-tokens", "3",
            "--eval-max-tokens", "4", "--group-size", "2", "--prompts-per-step", "2", "--batch-size", "2",
            "--sft-examples", "4", "--rl-prompts", "4", "--prior-tasks", "twin_copy,twin_sort", "--prior-limit", "2",
            "--warmup-steps", "0", "--no-checkpoint"]
    L.main(argv)
    rows = L.read_jsonl(tmp_path / "results.jsonl")
    assert [r["method"] for r in rows] == ["base", "grpo", "sft"]
    base = rows[0]
    assert set(base["prior"]) == {"twin_copy", "twin_sort"}
    for row in rows[1:]:
        assert row["step"] == 1
        for key in ("new_task_acc", "new_task_acc_greedy", "prior", "prior_avg", "truncated"):
            assert row[key] == base[key], key
        assert row["kl_seq"] == row["k1_seq"] == row["k3_seq"] == row["kl_token"] == 0.0
    train, test, kl_prompts, _ = L.load_new_task(L.parse_args(argv))
    assert (len(test), len(kl_prompts)) == (4, 3)
    assert tests_seen == [[ex["prompt"] for ex in test]] * 3
    (cache,) = tmp_path.glob("kl_cache-*.pt")
    kl_chat = [L.chat_prompt(tokenizer, ex["prompt"]) for ex in kl_prompts]
    assert torch.load(cache)["prompts"] == [p for p in kl_chat for _ in range(2)]


# ---------------------------------------------------------------------------- tokenizer and model


def test_save_load_through_auto_classes_keeps_ids_template_and_logits(twin):
    tokenizer, model, path = twin
    loaded_tok = L.load_tokenizer(str(path))
    text = "<|user|>add: 12+34<|assistant|>12+34=46<|end|>"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    # The known trap: next to a Qwen2 config, AutoTokenizer builds a Qwen2Tokenizer that drops spaces.
    assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] != tokenizer(text)["input_ids"]
    assert len(tokenizer(text)["input_ids"]) == 3 + len("add: 12+34") + len("12+34=46")  # one id per char
    assert loaded_tok.padding_side == "left"
    assert L.chat_prompt(loaded_tok, "copy: ab") == tokenizer("<|user|>copy: ab<|assistant|>")["input_ids"]
    assert tokenizer.decode(tokenizer("sort: cba")["input_ids"]) == "sort: cba"
    loaded = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_generate_with_kv_cache_and_padding(twin):
    tokenizer, model, _ = twin
    prompts = [L.chat_prompt(tokenizer, "copy: ab"), L.chat_prompt(tokenizer, "reverse: abcdefg")]
    greedy, _ = L.sample(model, tokenizer, prompts, 1, 6, greedy=True)
    assert all(1 <= len(r) <= 6 for r in greedy)
    # Left padding must not change a prompt's greedy continuation: compare with the prompt alone.
    alone, _ = L.sample(model, tokenizer, prompts[:1], 1, 6, greedy=True)
    assert alone[0] == greedy[0]
    # The teacher-forced log-probs of a sampled response agree with a direct forward pass.
    batch = L.pack(tokenizer, prompts, greedy)
    logprobs = L.response_logprobs(model, batch)
    direct = torch.log_softmax(model(torch.tensor([prompts[1] + greedy[1]])).logits[0], -1)
    expected = direct[len(prompts[1]) - 1:-1].gather(-1, torch.tensor(greedy[1]).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs[1, :len(greedy[1])], expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- the updates


def first_token_prob(model, tokenizer, prompts, token):
    """Exact pi(first response token = token | prompt), averaged over prompts."""
    batch = L.pack(tokenizer, prompts, [[token]] * len(prompts))
    with torch.no_grad():
        return L.response_logprobs(model, batch)[:, 0].exp().mean().item()


def test_grpo_steps_raise_the_reward_on_a_trivially_learnable_toy(twin, tmp_path):
    tokenizer, base, path = twin
    model = copy.deepcopy(base)
    args = args_for(path, "--group-size", "8", "--max-new-tokens", "3")
    examples = [{"prompt": f"add: {100 + i}+{200 + i}", "answer": "0"} for i in range(4)]
    prompts = [L.chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
    seven = tokenizer.convert_tokens_to_ids("7")

    def reward(response, answer):
        return float(response.startswith("7"))

    exp, run = experiment(tokenizer, args, reward), make_run(model, 3e-3, "grpo")
    before = first_token_prob(model, tokenizer, prompts, seven)
    torch.manual_seed(0)
    rewards = [L.rl_step(exp, run, examples)["reward"] for _ in range(8)]
    after = first_token_prob(model, tokenizer, prompts, seven)
    assert after > before + 0.2, (before, after, rewards)


def test_one_grpo_step_moves_the_surrogate_uphill(twin):
    """After one small step, sum_i A_i log pi(y_i) on the same samples goes up (the PG direction)."""
    tokenizer, base, path = twin
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    prompts = [L.chat_prompt(tokenizer, "copy: abc")] * 2
    responses, _ = L.sample(model, tokenizer, prompts, 8, 4)
    batch = L.pack(tokenizer, [p for p in prompts for _ in range(8)], responses)
    rewards = torch.tensor([float(tokenizer.decode(r).startswith("a")) for r in responses]).view(2, 8)
    if rewards.std() == 0:
        rewards[0, 0] = 1 - rewards[0, 0]  # make sure some advantage is non-zero
    advantages = kl.group_advantages(rewards, normalize_std=False).flatten()

    def surrogate():
        with torch.no_grad():
            logprobs = L.response_logprobs(model, batch)
        return (advantages * (logprobs * batch["response_mask"]).sum(-1)).sum().item()

    before = surrogate()
    optimizer, _ = make_optimizer(model, 1e-4)
    loss = kl.policy_gradient_loss(L.response_logprobs(model, batch), advantages, batch["response_mask"],
                                   aggregation="constant", max_tokens=4)
    loss.backward()
    optimizer.step()
    assert surrogate() > before


def test_grpo_with_mu_2_takes_two_clipped_steps_on_one_round(twin, monkeypatch):
    tokenizer, base, path = twin
    model = copy.deepcopy(base)
    args = args_for(path, "--group-size", "8", "--max-new-tokens", "3", "--clip-eps", "0.2")
    calls = []
    real_loss = kl.policy_gradient_loss

    def spy(logprobs, advantages, mask, old_logprobs=None, **kwargs):
        calls.append(None if old_logprobs is None else (logprobs - old_logprobs).abs().max().item())
        return real_loss(logprobs, advantages, mask, old_logprobs=old_logprobs, **kwargs)

    monkeypatch.setattr(L.kl, "policy_gradient_loss", spy)
    def reward(response, answer):
        return float(response[:1] < "m")  # about half the samples

    run = make_run(model, 1e-3, "grpo", mu=2)
    torch.manual_seed(0)
    info = L.rl_step(experiment(tokenizer, args, reward), run, [{"prompt": "copy: abc", "answer": "abc"}] * 2)
    assert 0 < info["reward"] < 1
    assert run.optimizer.state_dict()["state"][0]["step"] == 2  # two optimizer steps on one generation round
    assert len(calls) == 2 and calls[0] == 0.0 and calls[1] > 0.0  # ratio 1 first, then pi / pi_old != 1


def test_sft_step_lowers_the_loss_and_ignores_prompt_tokens(twin):
    tokenizer, base, path = twin
    model = copy.deepcopy(base)
    examples = [{"prompt": f"add: {100 + i}+{300 + i}", "response": f"the sum is {400 + 2 * i}"} for i in range(8)]
    prompts = [L.chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
    responses = [tokenizer(ex["response"] + tokenizer.eos_token)["input_ids"] for ex in examples]
    batch = L.pack(tokenizer, prompts, responses)
    loss = L.sft_batch_loss(model, batch)
    # Same number as transformers' own loss with every prompt and pad label set to -100.
    labels = batch["input_ids"].clone()
    labels[:, :batch["prompt_len"]] = -100
    labels[batch["attention_mask"] == 0] = -100
    hf_loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], labels=labels).loss
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    # Perturbing the targets at prompt positions leaves the loss unchanged; a response target does not.
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits[:, :-1]
    targets, mask = batch["input_ids"][:, 1:].clone(), labels[:, 1:] != -100
    reference = kl.sft_loss(full, targets, mask)
    perturbed = targets.clone()
    perturbed[~mask] = random.Random(0).randrange(len(tokenizer))
    assert kl.sft_loss(full, perturbed, mask).item() == pytest.approx(reference.item(), abs=1e-6)
    perturbed[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] += 1
    assert kl.sft_loss(full, perturbed, mask).item() != pytest.approx(reference.item(), abs=1e-6)
    # One SFT step lowers the loss on its batch.
    args = args_for(path, "--method", "sft")
    L.offline_step(experiment(tokenizer, args), make_run(model, 1e-3, "sft"), examples)
    with torch.no_grad():
        assert L.sft_batch_loss(model, batch).item() < loss.item()


def test_simpo_step_prefers_the_chosen_response(twin):
    tokenizer, base, path = twin
    model = copy.deepcopy(base)
    examples = [{"prompt": "add: 100+200", "response": "the sum is 300", "rejected": "the sum is 301"}] * 4
    args = args_for(path, "--method", "simpo")
    prompt = [L.chat_prompt(tokenizer, examples[0]["prompt"])]
    chosen, rejected = (L.pack(tokenizer, prompt, [tokenizer(text + "<|end|>")["input_ids"]])
                        for text in ("the sum is 300", "the sum is 301"))

    def gap():
        return (L.sequence_logprob(model, chosen) - L.sequence_logprob(model, rejected)).item()

    before = gap()
    L.offline_step(experiment(tokenizer, args), make_run(model, 1e-3, "simpo"), examples)
    assert gap() > before


# ---------------------------------------------------------------------------- the controls: self-SFT, SFT on RL samples, GRPO + KL


def test_self_sft_targets_are_pi0s_first_correct_samples_and_sft_trains_on_those_ids(twin, monkeypatch):
    tokenizer, base, path = twin
    args = args_for(path, "--max-new-tokens", "4")
    examples = [{"prompt": f"copy: {c * 3}", "answer": c} for c in "abcde"] + [{"prompt": "copy: zz", "answer": "none"}]

    def reward(response, answer):  # about half of the samples, and never for the prompt whose answer is "none"
        return float(answer != "none" and response[:1] < "m")

    targets = L.sampled_targets(base, tokenizer, examples, args, 4, reward, seed=3)
    # Independently: the same draws (same seed), then the first correct sample of each prompt, if any.
    torch.manual_seed(3)
    drawn, _ = L.sample(base, tokenizer, [L.chat_prompt(tokenizer, ex["prompt"]) for ex in examples], 4, 4)
    expected = []
    for i, ex in enumerate(examples):
        correct = [r for r in drawn[4 * i:4 * i + 4] if reward(tokenizer.decode(r, skip_special_tokens=True), ex["answer"])]
        if correct:
            expected.append((ex["prompt"], correct[0]))
    assert [(t["prompt"], t["response_ids"]) for t in targets] == expected
    assert 0 < len(targets) < len(examples) and "copy: zz" not in [t["prompt"] for t in targets]
    # The SFT step packs exactly those token ids as its targets (not a re-encoding of their text).
    packed, real_pack = [], L.pack

    def spy_pack(tokenizer, prompts, responses):
        packed.extend(responses)
        return real_pack(tokenizer, prompts, responses)

    monkeypatch.setattr(L, "pack", spy_pack)
    L.offline_step(experiment(tokenizer, args), make_run(copy.deepcopy(base), 1e-3, "self-sft"), targets)
    assert sorted(packed) == sorted(t["response_ids"] for t in targets)


def test_sft_distill_targets_are_the_teachers_unfiltered_samples(twin, tmp_path):
    tokenizer, base, path = twin
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    teacher.save_pretrained(tmp_path / "teacher")
    args = args_for(path, "--max-new-tokens", "5", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path))
    examples = [{"prompt": f"copy: {c * 4}", "answer": c} for c in "abcdefgh"]
    exp = experiment(tokenizer, args, lambda response, answer: 0.0)
    exp.data = {"rl": examples}
    targets = L.policy_targets(exp, "sft-distill", None, tmp_path)  # loads the teacher folder, caches its samples
    prompts = [L.chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
    torch.manual_seed(0)
    teacher_samples, _ = L.sample(teacher, tokenizer, prompts, 1, 5)
    torch.manual_seed(0)
    base_samples, _ = L.sample(base, tokenizer, prompts, 1, 5)
    assert [t["response_ids"] for t in targets] == teacher_samples  # every prompt, reward 0 or not
    assert teacher_samples != base_samples
    assert L.policy_targets(exp, "sft-distill", None, tmp_path) == targets  # the cache returns the same


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_grpo_kl_penalty_gradient_equals_an_independent_kl(twin, monkeypatch, direction):
    """With equal rewards (advantage 0) the grpo-kl gradient is coef x the gradient of the token-mean KL
    between pi and pi0 at the sampled positions, here computed one sequence at a time by torch.distributions,
    in both directions; micro-batches accumulate to it."""
    tokenizer, base, path = twin
    args = args_for(path, "--group-size", "4", "--max-new-tokens", "5", "--micro-batch-tokens", "60",
                     "--kl-direction", direction)
    policy = copy.deepcopy(base)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    drawn, grads, real_sample = [], [], L.sample

    def spy_sample(*args, **kwargs):
        drawn.append(real_sample(*args, **kwargs))
        return drawn[-1]

    def spy_step(accelerator, run):
        grads.append([p.grad.clone() for p in run.model.parameters()])

    monkeypatch.setattr(L, "sample", spy_sample)
    monkeypatch.setattr(L, "optimizer_step", spy_step)
    examples = [{"prompt": "copy: abc", "answer": "abc"}, {"prompt": "sort: dcba", "answer": "abcd"}]
    run = L.Run(policy, None, None, "grpo-kl", kl_coef=0.5, reference=base)
    torch.manual_seed(0)
    info = L.rl_step(experiment(tokenizer, args, lambda response, answer: 1.0), run, examples)
    responses = drawn[0][0]
    prompts = [L.chat_prompt(tokenizer, ex["prompt"]) for ex in examples for _ in range(4)]
    assert len(L.micro_batches(prompts, responses, 60)) > 1
    reference = copy.deepcopy(policy)
    reference.zero_grad()
    total, tokens = 0.0, sum(map(len, responses))
    for prompt, response in zip(prompts, responses):
        if response:
            ids = torch.tensor([prompt + response])
            logits = reference(ids).logits[0, len(prompt) - 1:-1]
            with torch.no_grad():
                base_logits = base(ids).logits[0, len(prompt) - 1:-1]
            pi, pi0 = torch.distributions.Categorical(logits=logits), torch.distributions.Categorical(logits=base_logits)
            pair = (pi, pi0) if direction == "reverse" else (pi0, pi)
            total = total + torch.distributions.kl_divergence(*pair).sum()
    (0.5 * total / tokens).backward()
    assert info["kl_penalty"] == pytest.approx(total.item() / tokens, rel=1e-4) and info["kl_penalty"] > 1e-4
    for got, want in zip(grads[0], [p.grad for p in reference.parameters()]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-3)


def test_help_lists_every_method_and_shows_each_setups_defaults(capsys):
    for argv, shown, other in ((["--help"], "completions per prompt; paper: 64 (default: 8)", "twin_copy"),
                               (["--task", "math", "--help"], "completions per prompt; twin: 8 (default: 64)", "mmlu")):
        with pytest.raises(SystemExit):
            L.parse_args(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert shown in text and other in text
        assert all(method in text for method in L.METHODS) and "--teacher" in text and "--measure" in text


def test_measure_reproduces_the_in_training_rows_for_saved_models_and_lora_adapters(twin, tmp_path, monkeypatch):
    """Models saved by a grpo-kl run and LoRA adapters saved by self-sft and sft-distill runs (the teacher is
    the grpo-kl run's final model), measured afterwards with --measure, give the rows training wrote."""
    _, _, path = twin
    monkeypatch.chdir(tmp_path)  # the plots go to tmp_path/plots
    # The untrained twin never writes a sum: reward the parity of the characters, so some samples are correct.
    monkeypatch.setitem(L.REWARDS, "addition", lambda response, answer: float(sum(map(ord, response)) % 2))
    common = ["--model", str(path), "--out", str(tmp_path / "out"), "--lr", "1e-3", "--steps", "2", "--eval-every", "1",
              "--num-test", "4", "--kl-prompts", "4", "--kl-samples", "2", "--eval-samples", "2", "--max-new-tokens", "4",
              "--eval-max-tokens", "6", "--prior-tasks", "twin_copy", "--prior-limit", "3", "--group-size", "2",
              "--prompts-per-step", "2", "--batch-size", "4", "--sft-examples", "8", "--self-samples", "2",
              "--warmup-steps", "0"]
    L.main(common + ["--method", "grpo-kl", "--save-models", "every"])
    models = tmp_path / "out" / "models"
    (teacher,) = [d for d in models.iterdir() if d.name.endswith("grpo-kl-lr0.001-schedulerconstant-seed0-mu1-kl_coef0.1-epochs1")]
    L.main(common + ["--method", "self-sft", "sft-distill", "--teacher", str(teacher / "step-2"), "--lora-rank", "4",
                     "--save-models", "final"])
    trained = {(r["run_id"], r["step"]): r for r in L.read_jsonl(tmp_path / "out" / "results.jsonl") if r["step"]}
    assert {run_id.split("-lr")[0] for run_id, _ in trained} == {"grpo-kl", "self-sft", "sft-distill"}
    folders = sorted(models.glob("*/step-*"))
    assert len(folders) == 4 and sum((f / "adapter_config.json").is_file() for f in folders) == 2
    L.main(common + ["--measure", *[f"{f.parent.name.split('-lr')[0].split('-', 2)[2]}={f}" for f in folders]])
    measured = [r for r in L.read_jsonl(tmp_path / "out" / "measure.jsonl") if r["checkpoint"] != "base"]
    assert len(measured) == 4
    keys = ("new_task_acc", "new_task_acc_greedy", "prior_avg", "kl_seq", "kl_token", "k1_seq", "k3_seq")
    for row in measured:
        folder = Path(row["checkpoint"])
        run_id = folder.parent.name.split("-", 2)[2]  # <task>-<fingerprint>-<run_id>
        original = trained[(run_id, int(folder.name.split("-")[1]))]
        assert row["method"] == original["method"] and row["prior"] == original["prior"]
        assert {k: row[k] for k in keys} == pytest.approx({k: original[k] for k in keys}, abs=1e-6)
    assert any(r["kl_seq"] > 0.01 for r in measured)
    assert (tmp_path / "plots" / "llm_measure_pareto.png").is_file()
    L.main(common + ["--measure", str(folders[0])])  # measured already: no new row
    assert len(L.read_jsonl(tmp_path / "out" / "measure.jsonl")) == 5


# ---------------------------------------------------------------------------- forward KL


def test_forward_kl_is_zero_for_identical_models_and_matches_k1_on_many_samples(twin, tmp_path):
    tokenizer, base, path = twin
    args = args_for(path, "--kl-samples", "16", "--eval-max-tokens", "8", "--micro-batch-tokens", "600")
    examples = [{"prompt": f"copy: {c * 3}"} for c in "abcdefghijklmnop"]
    samples = L.BaseSamples(base, tokenizer, examples, args, tmp_path / "cache.pt")
    assert len(list(samples.batches())) > 2  # several length-grouped micro-batches
    same = samples.kl_estimates(copy.deepcopy(base))
    assert same["kl_seq"] == pytest.approx(0.0, abs=1e-6) and same["k1_seq"] == pytest.approx(0.0, abs=1e-6)
    moved = copy.deepcopy(base)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exact = samples.kl_estimates(moved)
    # Independent computation: full-sequence forwards of both models, one (prompt, response) at a time,
    # the exact KL from torch.distributions and k1 from the sampled tokens.
    exact_direct, k1_direct = [], []
    for prompt, response in zip(samples.prompts, samples.responses):
        if not response:  # a pad sampled first: an empty response, KL 0
            exact_direct.append(0.0)
            k1_direct.append(0.0)
            continue
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            base_logits, logits = (m(ids).logits[0, len(prompt) - 1:-1] for m in (base, moved))
        p0, p1 = torch.distributions.Categorical(logits=base_logits), torch.distributions.Categorical(logits=logits)
        exact_direct.append(torch.distributions.kl_divergence(p0, p1).sum().item())
        k1_direct.append((p0.log_prob(torch.tensor(response)) - p1.log_prob(torch.tensor(response))).sum().item())
    assert exact["kl_seq"] == pytest.approx(sum(exact_direct) / len(exact_direct), rel=1e-4)
    assert exact["k1_seq"] == pytest.approx(sum(k1_direct) / len(k1_direct), rel=1e-4, abs=1e-5)
    # k1 and k3 are unbiased estimates of the same sequence KL under y ~ pi0: agreement within ~4 standard errors.
    stderr = torch.tensor(k1_direct).std().item() / len(k1_direct) ** 0.5
    assert exact["kl_seq"] > 0.05
    assert abs(exact["k1_seq"] - exact["kl_seq"]) < 4 * stderr + 1e-3
    assert abs(exact["k3_seq"] - exact["kl_seq"]) < 4 * stderr + 1e-3
    # The cache reloads to the same numbers, and recomputing pi0's log-probs from the frozen pi0 (what
    # happens when the cache would be too large) gives them too.
    assert L.BaseSamples(base, tokenizer, examples, args, tmp_path / "cache.pt").kl_estimates(moved) == exact
    uncached_args = args_for(path, "--kl-samples", "16", "--eval-max-tokens", "8", "--kl-cache-gb", "0")
    uncached = L.BaseSamples(base, tokenizer, examples, uncached_args, tmp_path / "samples.pt")
    assert uncached.base_logprobs is None and uncached.reference is base
    assert uncached.kl_estimates(moved) == pytest.approx(exact, rel=1e-5, abs=1e-6)
    assert uncached.kl_estimates(base)["kl_seq"] == pytest.approx(0.0, abs=1e-6)  # pi0 against itself


# ---------------------------------------------------------------------------- reward checkers


def first_call(name, arguments):
    return json.dumps({"name": name, "arguments": arguments})


@pytest.mark.parametrize("task,response,answer,expected", [
    ("addition", "357+486=843", "843", 1.0),
    ("addition", "the sum is 843", "843", 1.0),
    ("addition", "357+486=842", "843", 0.0),
    ("addition", "+=", "843", 0.0),
    # math-verify on the formats a reasoning model writes (string/float comparison missed the first five)
    ("math", "Solving gives $x = 5$. Final answer: \\boxed{x=5}", "5", 1.0),
    ("math", "It costs \\boxed{\\$5}.", "5", 1.0),
    ("math", "The side is \\boxed{5\\text{ cm}}", "5", 1.0),
    ("math", "\\boxed{\\sqrt3}", "\\sqrt{3}", 1.0),
    ("math", "The roots are \\boxed{1,2}", "1,2", 1.0),
    ("math", "The roots are \\boxed{1,2}", "12", 0.0),  # a set, not twelve
    ("math", "So x = 2 and the answer is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", 1.0),
    ("math", "\\boxed{0.5}", "1/2", 1.0),
    ("math", "\\boxed{\\left( 3, 4 \\right)}", "(3,4)", 1.0),
    ("math", "The answer is \\boxed{3}", "4", 0.0),
    ("math", "The answer is 4", "4", 0.0),  # no \boxed{}: not graded as an answer
    ("math", "\\boxed{4", "4", 0.0),  # unbalanced braces
    ("science", "The electron count gives... Answer: C", "C", 1.0),
    ("science", "Let me think.\n\nAnswer: **C**", "C", 1.0),
    ("science", "The correct option is (B), so the answer is (B).", "B", 1.0),
    ("science", "the answer is a mixture of both products", "A", 0.0),  # 'a' is an article, not option A
    ("science", "Answer: A", "C", 0.0),
    ("science", "I am not sure.", "C", 0.0),
    ("science", "D", "D", 1.0),
    # ToolAlpaca: the first call of the trajectory is the reference
    ("tools", 'Thought: I need facts.\nAction: getAxolotlFacts\nAction Input: {"category": "habitat", "limit": 3}',
     first_call("getAxolotlFacts", {"category": "habitat", "limit": 3}), 1.0),
    ("tools", 'Action: getAxolotlFacts\nAction Input: {\n  "category": "habitat",\n  "limit": 3\n}\nObservation:',
     first_call("getAxolotlFacts", {"category": "habitat", "limit": 3}), 1.0),
    ("tools", 'Action: searchAxolotlImages\nAction Input: {"color": "albino", "gender": ""}\n'
     'Action: getAxolotlFacts\nAction Input: {}', first_call("searchAxolotlImages", {"color": "albino", "size": ""}), 1.0),
    ("tools", 'Action: getAxolotlFacts\nAction Input: {"category": "habits", "limit": 3}',
     first_call("getAxolotlFacts", {"category": "habitat", "limit": 3}), 0.0),
    ("tools", 'Action: getRandomAxolotlImage\nAction Input: {}', first_call("getAxolotlFacts", {}), 0.0),
    ("tools", 'Action: getAxolotlFacts\nAction Input: {"category": habitat}',
     first_call("getAxolotlFacts", {"category": "habitat"}), 0.0),
    ("tools", "I would call the facts API.", first_call("getAxolotlFacts", {}), 0.0),
])
def test_reward_checkers(task, response, answer, expected):
    assert L.REWARDS[task](response, answer) == expected


# ---------------------------------------------------------------------------- prior tasks via lm-eval


def test_lm_eval_on_local_yaml_tasks_returns_scores(twin, tmp_path):
    tokenizer, model, path = twin
    args = args_for(path, "--out", str(tmp_path), "--prior-limit", "4")
    prior = L.PriorTasks(args)
    scores = prior.scores(model, tokenizer)
    assert set(scores["prior"]) == {"twin_copy", "twin_reverse", "twin_sort"}
    assert all(0.0 <= s <= 1.0 for s in scores["prior"].values())
    assert scores["prior_avg"] == pytest.approx(sum(scores["prior"].values()) / 3)


def test_lm_eval_scores_a_perfect_model_as_one(twin, tmp_path):
    """exact_match through lm-eval's generate_until path: a model that copies perfectly scores 1."""
    tokenizer, model, path = twin
    args = args_for(path, "--out", str(tmp_path), "--prior-tasks", "twin_copy", "--prior-limit", "3")
    prior = L.PriorTasks(args)
    docs = [json.loads(line) for line in (tmp_path / "lm_eval_tasks" / "twin_copy.jsonl").read_text().splitlines()[:3]]
    perfect = copy.deepcopy(model)
    answers = {tuple(L.chat_prompt(tokenizer, d["prompt"])): tokenizer(d["answer"] + "<|end|>")["input_ids"] for d in docs}

    def generate(input_ids, attention_mask=None, **kwargs):
        rows = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(t for t, m in zip(row, mask) if m)
            rows.append(row + answers[prompt])
        width = max(map(len, rows))
        return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])

    perfect.generate = generate
    assert prior.scores(perfect, tokenizer)["prior"]["twin_copy"] == 1.0


# ---------------------------------------------------------------------------- data and bad input


def test_local_data_file_round_trip_and_split(tmp_path, twin):
    _, _, path = twin
    rows = [{"prompt": f"add: {i}+1", "answer": str(i + 1), "response": f"the sum is {i + 1}"} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = args_for(path, "--data-file", str(data), "--num-test", "10", "--kl-prompts", "5")
    train, test, kl_prompts, skipped = L.load_new_task(args)
    assert (len(train), len(test), len(kl_prompts), skipped) == (25, 10, 5, 0)
    assert sorted(r["prompt"] for r in train + test + kl_prompts) == sorted(r["prompt"] for r in rows)


def test_twin_task_sets_are_disjoint_and_teacher_targets_are_correct():
    train, test, kl_prompts = L.twin_new_task(300, 50, 20, random.Random(0))
    prompts = [ex["prompt"] for ex in train + test + kl_prompts]
    assert len(set(prompts)) == len(prompts)
    assert all(L.addition_reward(ex["response"], ex["answer"]) == 1.0 for ex in train)
    assert all(L.addition_reward(ex["rejected"], ex["answer"]) == 0.0 for ex in train)
    rng = random.Random(1)
    styles = [L.base_style_response(train[0], rng) for _ in range(400)]
    correct = sum(L.addition_reward(s, train[0]["answer"]) for s in styles) / 400
    assert abs(correct - L.BASE_CORRECT_PROB) < 0.1 and any("=" in s for s in styles)


def test_twin_sum_is_reversed_and_teacher_style_is_one_pi0_never_uses():
    example = L.twin_example("addition", random.Random(0))
    a, b = map(int, example["prompt"].removeprefix("add: ").split("+"))
    assert a != b and example["answer"] == str(a + b)[::-1]  # least-significant digit first
    assert L.teacher_response(example) == f"{b}+{a}={example['answer']}"
    base_styles = {L.base_style_response(example, random.Random(i)) for i in range(200)}
    assert L.teacher_response(example) not in base_styles
    assert L.addition_reward(L.teacher_response(example), example["answer"]) == 1.0


def one_line_exit(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        L.main(argv)
    message = caught.value.code if isinstance(caught.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in message and "\n" not in message
    return message


def test_bad_input_gives_one_clear_line(tmp_path, twin, capsys):
    _, _, path = twin
    assert "unknown task 'chess'" in one_line_exit(["--task", "chess"], capsys)
    assert "unknown method 'ppo'" in one_line_exit(["--method", "grpo", "ppo"], capsys)
    assert "not found" in one_line_exit(["--model", str(tmp_path / "nope"), "--out", str(tmp_path)], capsys)
    assert "not found" in one_line_exit(["--model", "no-such-org/no-such-model", "--out", str(tmp_path)], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    message = one_line_exit(["--model", str(path), "--data-file", str(bad), "--out", str(tmp_path)], capsys)
    assert "needs string fields 'prompt' and 'answer'" in message
    assert "does not exist" in one_line_exit(["--data-file", str(tmp_path / "missing.jsonl")], capsys)
    message = one_line_exit(["--model", str(path), "--task", "math", "--out", str(tmp_path)], capsys)
    assert "cannot load the math dataset" in message and "--data-file" in message
    message = one_line_exit(["--model", str(path), "--prior-tasks", "no_such_task", "--out", str(tmp_path)], capsys)
    assert "unknown lm-eval task" in message
    # A built-in task whose data is not on this offline machine: advice, not a hub traceback.
    message = one_line_exit(["--model", str(path), "--prior-tasks", "winogrande", "--out", str(tmp_path)], capsys)
    assert "on a connected machine run `lm-eval run" in message


def test_sweep_appends_one_line_per_point_and_resumes_to_the_same_numbers(twin, tmp_path):
    _, _, path = twin
    argv = ["--model", str(path), "--out", str(tmp_path), "--method", "sft", "--lr", "1e-3", "--batch-size", "8",
            "--sft-examples", "16", "--eval-every", "1", "--num-test", "4", "--kl-prompts", "4", "--kl-samples", "1",
            "--eval-samples", "1", "--max-new-tokens", "4", "--prior-tasks", "twin_copy", "--prior-limit", "2"]
    L.main(argv)
    results = tmp_path / "results.jsonl"
    lines = results.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]  # base, then the run's two steps
    assert json.loads(lines[-1])["done"] and json.loads(lines[-1])["kl_seq"] > 0
    L.main(argv)  # finished: nothing is rerun or appended
    assert results.read_text().splitlines() == lines
    results.write_text("\n".join(lines[:2]) + "\n")  # as if interrupted before the last point
    L.main(argv)
    resumed = results.read_text().splitlines()

    def strip(line):
        return {k: v for k, v in json.loads(line).items() if k != "wall_s"}

    assert [strip(line) for line in resumed] == [strip(line) for line in lines]


# ---------------------------------------------------------------------------- the real path, at real shapes


def test_real_shaped_sweep_frees_each_run_and_survives_the_uncached_kl_and_length_limit(tmp_path, monkeypatch):
    """Qwen2.5-3B's vocabulary (151,936, tied embeddings) at a tiny width, responses of a few hundred
    tokens, a 2-step GRPO and a 2-step SFT sweep of two runs each in one process, pi0's log-probs too
    large for the cache (--kl-cache-gb 0), SFT targets over --max-seq-len dropped."""
    torch.set_num_threads(1)
    model_dir = tmp_path / "tiny151k"
    L.build_random_model(model_dir, "tiny-151k")
    rows = [{"prompt": f"add: {10 + i}+{20 + i}", "answer": str(30 + 2 * i),
             "response": "let me add the tens and the ones. " * (4 if i % 2 else 12) + str(30 + 2 * i)}
            for i in range(24)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    alive = []  # weakrefs to (model, optimizer) of each training run, in order
    real_load, real_adamw = L.load_model, torch.optim.AdamW
    checks = []

    def spy_load(args, device):
        gc.collect()
        checks.append([ref() is None for pair in alive for ref in pair])
        model = real_load(args, device)
        alive.append([weakref.ref(model)])
        return model

    class SpyAdamW(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            alive[-1].append(weakref.ref(self))

    monkeypatch.setattr(L, "load_model", spy_load)
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    # Random weights never write a sum: reward the parity of the characters instead, so groups vary.
    monkeypatch.setitem(L.REWARDS, "addition", lambda response, answer: float(sum(map(ord, response)) % 2))
    argv = ["--model", str(model_dir), "--data-file", str(data), "--out", str(tmp_path / "out"),
            "--method", "grpo", "sft", "--lr", "1e-4", "3e-4", "--steps", "2", "--eval-every", "2",
            "--group-size", "2", "--prompts-per-step", "2", "--batch-size", "2", "--max-new-tokens", "160",
            "--eval-max-tokens", "40", "--max-seq-len", "300", "--micro-batch-tokens", "512", "--kl-cache-gb", "0",
            "--num-test", "2", "--kl-prompts", "2", "--kl-samples", "1", "--eval-samples", "1",
            "--prior-tasks", "twin_copy", "--prior-limit", "1", "--warmup-steps", "0"]
    L.main(argv)
    gc.collect()
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in results] == ["base", "grpo-lr0.0001-schedulerconstant-seed0-mu1-epochs1",
                                              "grpo-lr0.0003-schedulerconstant-seed0-mu1-epochs1",
                                              "sft-lr0.0001-schedulerconstant-seed0-batch_size2-epochs1",
                                              "sft-lr0.0003-schedulerconstant-seed0-batch_size2-epochs1"]
    base = results[0]
    assert base["kl_seq"] == pytest.approx(0.0, abs=1e-5)  # pi0 against the frozen pi0: the uncached branch
    assert base["kl_truncated"] == 1.0  # random weights never say EOS: every KL sample runs to the cap
    assert all(r["kl_seq"] > 0 and r["done"] and r["step"] == 2 for r in results[1:])
    assert all(r["dropped_for_length"]["offline"] > 0 for r in results[1:])  # the 12-copy targets are too long
    assert not list((tmp_path / "out").glob("kl_cache-*.pt"))[0].stat().st_size > 10**6  # samples only
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["run_id"][:3], r["step"]) for r in log] == [("grp", 1), ("grp", 2)] * 2 + [("sft", 1), ("sft", 2)] * 2
    assert all(r["response_len"] == 160 and r["truncated"] == 1.0 for r in log if "reward" in r)
    assert any(r["zero_variance_groups"] < 1 for r in log if "reward" in r)
    # load_model ran for pi0, then for each of the 4 runs; at each run's start every earlier run's model and
    # optimizer were gone, and after the sweep all 4 are gone (pi0 stays: it is the uncached KL's reference).
    assert len(alive) == 5 and len(checks) == 5
    for k in range(2, 5):
        assert all(checks[k][2:]), f"run {k - 1}'s model or optimizer was still alive when run {k} started"
    assert all(ref() is None for pair in alive[1:] for ref in pair)
    assert not any(checks[k][0] for k in range(2, 5))  # pi0 stayed alive during the sweep: the KL reference


def test_micro_batches_bound_the_padded_tokens_and_accumulate_to_the_full_batch_gradient(twin):
    tokenizer, base, path = twin
    prompts = [L.chat_prompt(tokenizer, f"add: {10 + i}+{i}") for i in range(6)]
    responses = [L.encode_response(tokenizer, "x" * n) for n in (2, 30, 5, 28, 1, 12)]
    groups = L.micro_batches(prompts, responses, 100)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert g == sorted(g)
        batch = L.pack(tokenizer, [prompts[i] for i in g], [responses[i] for i in g])
        assert batch["input_ids"].numel() <= 100 or len(g) == 1
    assert {1, 3} in [set(g) for g in groups]  # the two long responses share a micro-batch

    def gradient(method, micro_batch_tokens, examples, monkeypatch_target):
        model = copy.deepcopy(base)
        args = args_for(path, "--micro-batch-tokens", str(micro_batch_tokens))
        grads = []
        monkeypatch_target.setattr(L, "optimizer_step", lambda *a: grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters()])))
        L.offline_step(experiment(tokenizer, args), L.Run(model, None, None, method), examples)
        return grads[0]

    examples = [{"prompt": f"add: {10 + i}+{i}", "response": "y" * n, "rejected": "z" * (n + 1)}
                for i, n in enumerate((2, 30, 5, 28, 1, 12))]
    with pytest.MonkeyPatch.context() as mp:
        for method in ("sft", "simpo"):  # SFT: the mean over all response tokens; SimPO: over examples
            whole, split = gradient(method, 10_000, examples, mp), gradient(method, 60, examples, mp)
            torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-4)


def test_generate_calls_are_sized_by_the_token_budget_and_defaults_fit_the_real_path(twin, monkeypatch):
    tokenizer, model, path = twin
    sizes = []
    real_generate = model.generate

    def spy(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    prompts = [L.chat_prompt(tokenizer, "copy: abcd")] * 5  # 13 tokens + 7 new = 20 per sequence
    responses, _ = L.sample(model, tokenizer, prompts, 1, 7, max_tokens=45)
    assert sizes == [2, 2, 1] and len(responses) == 5
    real = L.parse_args(["--task", "math"])
    assert (real.micro_batch_tokens, real.precision, real.gradient_checkpointing) == (4096, "mixed", True)
    assert (real.max_new_tokens, real.eval_max_tokens, real.max_seq_len) == (1024, 4096, 4096)
    assert "humaneval_instruct" in real.prior_tasks and "humaneval" not in real.prior_tasks
    assert real.scale_rewards == "none"


def test_old_versions_and_unexpected_loader_errors_say_what_they_are(monkeypatch, capsys, twin, tmp_path):
    monkeypatch.setattr(L, "version", lambda package: "0.4.9" if package == "lm_eval" else "99.0")
    with pytest.raises(SystemExit) as caught:
        L.check_versions()
    assert "lm_eval 0.4.9 is too old" in caught.value.code and "lm_eval>=0.4.12" in caught.value.code
    monkeypatch.undo()
    _, _, path = twin

    def broken(task):
        raise TypeError("Couldn't cast array of type struct<a: int64> to null\nmore detail")

    monkeypatch.setattr(L, "hub_rows", broken)
    message = one_line_exit(["--model", str(path), "--task", "tools", "--out", str(tmp_path)], capsys)
    assert "TypeError: Couldn't cast array" in message and "HF_DATASETS_OFFLINE" not in message


# Real-format rows, as the hub sources store them.
TOOLALPACA_API = {"Name": "Axolotl", "NLDocumentation": "getAxolotlFacts(category, limit): facts.",
                  "Function_Description": {"getAxolotlFacts": "...", "searchAxolotlImages": "...", "components": {}},
                  "Instances": [
                      {"input": "Tell me 3 habitat facts.", "intermediate_steps": [
                          [["getAxolotlFacts", '{"category": "habitat", "limit": 3}', "Thought..."], "Status 200"],
                          [["searchAxolotlImages", '{"color": "wild"}', "Thought..."], "Status 200"]]},
                      {"input": "Broken call.", "intermediate_steps": [
                          [["getAxolotlFacts", "{category: habitat}", "Thought..."], "Status 400"]]},
                      {"input": "No steps.", "intermediate_steps": []}]}
SCIKNOWEVAL_ROWS = [
    {"question": "Which gas is inert?", "choices": {"label": ["A", "B", "C", "D"], "text": ["O2", "Ar", "H2", "Cl2"]},
     "answerKey": "B", "details": {"level": "L3"}},
    {"question": "Broken row", "choices": {"label": [], "text": []}, "answerKey": "A", "details": {"level": "L3"}}]
ORZ_ROWS = [
    {"question": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}",
     "responses": ["<think>...</think> so \\boxed{\\frac{2}{4}}", "<think>...</think> so \\boxed{0.75}"]},
    {"answer": "3"}]  # no question


def test_malformed_rows_are_skipped_and_counted_and_each_task_has_negatives():
    tools, skipped = L.examples_from_rows("tools", [(TOOLALPACA_API, i) for i in TOOLALPACA_API["Instances"]])
    assert (len(tools), skipped) == (1, 2)
    assert L.tools_reward(tools[0]["response"], tools[0]["answer"]) == 1.0  # the SFT target is the first call
    assert L.tools_reward(tools[0]["rejected"], tools[0]["answer"]) == 0.0
    science, skipped = L.examples_from_rows("science", SCIKNOWEVAL_ROWS)
    assert (len(science), skipped) == (1, 1)
    assert "B. Ar" in science[0]["prompt"] and science[0]["response"] == "Answer: B"
    assert L.science_reward(science[0]["rejected"], "B") == 0.0 and science[0]["rejected"].startswith("Answer: ")
    math, skipped = L.examples_from_rows("math", ORZ_ROWS)
    assert (len(math), skipped) == (1, 1)
    assert math[0]["response"].endswith("\\boxed{0.75}") and math[0]["rejected"].endswith("\\boxed{\\frac{2}{4}}")


def test_mixed_precision_keeps_small_updates_that_bf16_weights_swallow(twin):
    tokenizer, _, path = twin
    examples = [{"prompt": f"add: {10 + i}+{i}", "response": str(10 + 2 * i)} for i in range(8)]
    changed = {}
    for precision in ("mixed", "bf16"):
        args = args_for(path, "--precision", precision, "--no-gradient-checkpointing")
        model = L.load_model(args, torch.device("cpu"))
        before = [p.detach().clone() for p in model.parameters()]
        L.offline_step(experiment(tokenizer, args), make_run(model, 1e-5, "sft"), examples)
        moved = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
        changed[precision] = moved / sum(p.numel() for p in model.parameters())
        with L.autocast(args):
            logits = L.forward_logits(model, L.pack(tokenizer, [[5, 6, 7]], [[8, 9]]))
        assert logits.dtype == torch.bfloat16 and next(model.parameters()).dtype == (
            torch.float32 if precision == "mixed" else torch.bfloat16)
    assert changed["mixed"] > 0.9 and changed["bf16"] < 0.5, changed


def test_humaneval_instruct_is_scored_by_its_own_filter_and_needs_consent(twin, tmp_path, capsys):
    import lm_eval.tasks
    folder = Path(lm_eval.tasks.__file__).parent / "humaneval"
    text = (folder / "humaneval_instruct.yaml").read_text()
    metric, filter_name = L.PRIMARY_METRIC["humaneval_instruct"].split(",")
    assert f"name: \"{filter_name}\"" in text and "include: humaneval.yaml" in text
    inherited = (folder / "humaneval.yaml").read_text()  # code_eval's pass_at_k, k=[1]: "pass@1"
    assert metric == "pass@1" and "utils.pass_at_k" in inherited and "k: [1]" in inherited
    _, _, path = twin
    message = one_line_exit(["--model", str(path), "--prior-tasks", "humaneval_instruct", "--out", str(tmp_path)], capsys)
    assert "--allow-unsafe-code" in message


@pytest.mark.parametrize("scale", ["none", "group"])
def test_grpo_advantages_follow_scale_rewards(twin, monkeypatch, scale):
    tokenizer, base, path = twin
    args = args_for(path, "--group-size", "8", "--max-new-tokens", "3", "--scale-rewards", scale)
    seen = []
    real_loss = kl.policy_gradient_loss

    def spy(logprobs, advantages, mask, **kwargs):
        seen.append(advantages)
        return real_loss(logprobs, advantages, mask, **kwargs)

    monkeypatch.setattr(L.kl, "policy_gradient_loss", spy)
    rewards = iter([1.0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
    model = copy.deepcopy(base)
    def reward(response, answer):
        return next(rewards)

    L.rl_step(experiment(tokenizer, args, reward), make_run(model, 1e-4, "grpo"),
              [{"prompt": "copy: ab", "answer": "ab"}] * 2)
    advantages = torch.cat(seen)
    expected = torch.tensor([[7 / 8] + [-1 / 8] * 7, [6 / 8] * 2 + [-2 / 8] * 6])
    if scale == "group":
        expected = expected / torch.tensor([[0.125 * 7 ** 0.5], [(2 / 8 * 6 / 8) ** 0.5]])
    assert sorted(advantages.tolist()) == pytest.approx(sorted(expected.flatten().tolist()), abs=1e-5)


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_numbers(twin, tmp_path, monkeypatch):
    _, _, path = twin
    import accelerate
    timeouts = []

    class SpyAccelerator(accelerate.Accelerator):
        def __init__(self, *a, kwargs_handlers=(), **k):
            timeouts.extend(h.timeout for h in kwargs_handlers)
            super().__init__(*a, kwargs_handlers=kwargs_handlers, **k)

    monkeypatch.setattr(accelerate, "Accelerator", SpyAccelerator)
    argv = ["--model", str(path), "--method", "sft", "--lr", "1e-3", "--batch-size", "4", "--sft-examples", "8",
            "--steps", "4", "--eval-every", "1", "--num-test", "4", "--kl-prompts", "4", "--kl-samples", "1",
            "--eval-samples", "1", "--max-new-tokens", "4", "--eval-max-tokens", "6", "--prior-tasks", "twin_copy",
            "--prior-limit", "2"]
    L.main(argv + ["--out", str(tmp_path / "whole")])
    assert timeouts == [timedelta(minutes=360)]  # the other processes outwait one evaluation point
    steps, evaluated, real_step, real_evaluate = [], [], L.offline_step, L.evaluate

    def counting_step(*a):
        steps.append(1)
        return real_step(*a)

    def crashing_evaluate(*a):
        evaluated.append(1)
        if len(evaluated) == 4:  # base, step 1, step 2, then the crash at step 3's point
            raise KeyboardInterrupt
        return real_evaluate(*a)

    monkeypatch.setattr(L, "offline_step", counting_step)
    monkeypatch.setattr(L, "evaluate", crashing_evaluate)
    with pytest.raises(KeyboardInterrupt):
        L.main(argv + ["--out", str(tmp_path / "split")])
    assert len(steps) == 3 and list((tmp_path / "split" / "checkpoints").glob("*.pt"))
    monkeypatch.setattr(L, "evaluate", real_evaluate)
    L.main(argv + ["--out", str(tmp_path / "split")])
    assert len(steps) == 3 + 2  # resumed after step 2 (its checkpoint): steps 3 and 4 only
    assert not list((tmp_path / "split" / "checkpoints").glob("*.pt"))  # removed when the run is done

    def rows(out, name, drop=("wall_s", "settings", "update_s")):
        return [{k: v for k, v in json.loads(line).items() if k not in drop}
                for line in (tmp_path / out / name).read_text().splitlines()]

    assert rows("split", "results.jsonl") == rows("whole", "results.jsonl")
    assert [r["step"] for r in rows("split", "results.jsonl")] == [0, 1, 2, 3, 4]
    assert rows("split", "train_log.jsonl") == rows("whole", "train_log.jsonl")  # no step lost or logged twice
    last = json.loads((tmp_path / "whole" / "results.jsonl").read_text().splitlines()[-1])
    assert last["settings"]["eval_max_tokens"] == 6 and last["settings"]["max_new_tokens"] == 4
    assert {"truncated", "kl_truncated", "dropped_for_length", "skipped_rows"} <= set(last)


def test_matched_accuracy_table_reads_each_method_at_the_levels():
    def row(method, run, acc, prior, kl_seq):
        return {"method": method, "run_id": run, "new_task_acc": acc, "prior_avg": prior, "kl_seq": kl_seq}
    rows = [row("base", "base", 0.2, 0.99, 0.0),
            row("grpo", "g1", 0.26, 0.98, 1.0), row("grpo", "g1", 0.31, 0.95, 2.0), row("grpo", "g2", 0.32, 0.97, 3.0),
            row("sft", "s1", 0.26, 0.50, 9.0)]
    table = L.matched_accuracy_table(rows, gains=(0.05, 0.1))
    lines = table.splitlines()
    assert "accuracy >= 0.25" in lines[0] and "accuracy >= 0.30" in lines[0]
    assert lines[2] == "| grpo | 2 | 0.980, 1.00 | 0.970, 2.00 |"  # best prior and lowest KL need not share a point
    assert lines[3] == "| sft | 1 | 0.500, 9.00 | not reached |"
