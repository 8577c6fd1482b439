"""Tests of llm_finetune.py on a tiny locally built Qwen2 (CPU, offline, one model build per module)."""
import copy
import gc
import json
import os
import random
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
