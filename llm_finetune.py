"""GRPO vs SFT on a chat LLM: RL's Razor, §4 and §6 of PAPER.md (arXiv 2509.04259, §4.1 and §5.1).

Fine-tune a causal LM on a new task with on-policy RL (GRPO, 1-0 REINFORCE) or offline training
(SFT, SimPO), and at fixed intervals record: new-task accuracy, the prior-task score (benchmarks
through lm-evaluation-harness), and the forward KL(pi0 || pi) on new-task prompts. The paper's
claims: at matched new-task accuracy RL forgets less, and forward KL predicts forgetting.

The update (rollouts, rewards, advantages, losses) is written out in this file; every loss and
divergence comes from kl.py. Everything around it comes from the field's libraries: transformers
(models, generation, chat templates), tokenizers, peft (LoRA), datasets (hub data), lm-eval
(prior tasks), accelerate (multi-GPU).

Two ways to run it:
  Real path (GPUs, hub):  python llm_finetune.py --model Qwen/Qwen2.5-3B-Instruct --task math --method grpo
  CPU twin (runs here):   python llm_finetune.py --build-twin            # tokenizer + small Qwen2, pretrained
                          python llm_finetune.py --method grpo sft       # sweeps on synthetic addition
                          python llm_finetune.py --plot                  # plots/llm_*.png
The twin is a small Qwen2-architecture model pretrained here on copy/reverse/sort (its prior tasks,
scored through lm-eval on local YAML tasks) and on a noisy source of 2-digit additions (the new task,
so pi0 starts with some skill). Results: one JSON line per evaluation point in runs/llm/results.jsonl;
rerunning a command resumes (finished runs are skipped, finished points are not written twice).
"""
import argparse
import hashlib
import itertools
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, get_constant_schedule_with_warmup,
                          get_cosine_schedule_with_warmup)

import kl

TASKS = ("addition", "math", "science", "tools")
METHODS = ("grpo", "reinforce", "sft", "simpo")
ON_POLICY = ("grpo", "reinforce")
PAPER_PRIOR_TASKS = "hellaswag,truthfulqa_mc2,mmlu,ifeval,winogrande,humaneval"
TWIN_PRIOR_TASKS = "twin_copy,twin_reverse,twin_sort"
# Learning-rate grids: PAPER.md §6.3 (RL) and §6.4 (SFT, SimPO); the twin is a 0.8M-parameter
# model whose useful learning rates span 3e-5 (slow) to 1e-3 (destructive in 100 steps).
PAPER_LRS = {"grpo": [1e-5, 2e-5, 3e-5, 4e-5, 5e-5], "reinforce": [1e-5, 3e-5, 5e-5],
             "sft": [1e-5, 3e-5, 5e-5, 7e-5, 9e-5], "simpo": [1e-5, 3e-5, 5e-5]}
TWIN_LRS = {"grpo": [3e-5, 1e-4, 3e-4, 1e-3], "reinforce": [1e-4, 3e-4], "sft": [3e-5, 1e-4, 3e-4, 1e-3],
            "simpo": [1e-4, 3e-4]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and task")
    g.add_argument("--model", default="runs/llm/twin", help="hub id or local directory (the twin by default)")
    g.add_argument("--task", default="addition", help=f"new task, one of {', '.join(TASKS)}")
    g.add_argument("--data-file", help="local JSON/JSONL with prompt/answer[/response/rejected] "
                   "fields instead of the hub source (schema in README)")
    g.add_argument("--num-test", type=int, default=200, help="held-out new-task prompts for accuracy")
    g.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning (the paper); >0 = peft LoRA")
    g.add_argument("--bf16", action="store_true", help="bf16 weights (the paper); log-probs stay float32")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g = p.add_argument_group("method and sweep (each listed value is swept)")
    g.add_argument("--method", nargs="+", default=["grpo"], help=f"any of {', '.join(METHODS)}")
    g.add_argument("--lr", nargs="+", type=float, help="default: the paper's grid, or the twin's")
    g.add_argument("--scheduler", nargs="+", default=["constant"], choices=["constant", "cosine"])
    g.add_argument("--warmup-steps", type=int, help="default 50 (the paper), 5 for the twin")
    g.add_argument("--seed", nargs="+", type=int, default=[0])
    g.add_argument("--epochs", nargs="+", type=int, default=[1], help="passes over the RL prompts or the "
                   "SFT data (paper: 1 for RL, {1, 2} for SFT)")
    g.add_argument("--steps", type=int, help="optimizer steps per run, overriding --epochs")
    g = p.add_argument_group("RL (GRPO, 1-0 REINFORCE)")
    g.add_argument("--group-size", type=int, help="completions per prompt (paper 64, twin 8)")
    g.add_argument("--prompts-per-step", type=int, default=8, help="prompts per generation round (paper 8)")
    g.add_argument("--mu", nargs="+", type=int, default=[1], help="updates per generation round; "
                   "mu > 1 uses the clipped ratio (paper: {1, 2})")
    g.add_argument("--clip-eps", type=float, default=0.2)
    g.add_argument("--rl-prompts", type=int, help="training prompts for RL (one epoch; paper: all)")
    g = p.add_argument_group("SFT and SimPO")
    g.add_argument("--batch-size", nargs="+", type=int, help="examples per step (paper {16,32,64,128})")
    g.add_argument("--sft-examples", type=int, help="training examples for SFT/SimPO")
    g = p.add_argument_group("generation and evaluation")
    g.add_argument("--max-new-tokens", type=int, help="response length cap (default 1024, twin 24)")
    g.add_argument("--micro-batch", type=int, default=64, help="sequences per forward pass")
    g.add_argument("--eval-every", type=int, help="optimizer steps between evaluation points")
    g.add_argument("--eval-samples", type=int, default=4, help="temperature-1 samples per test prompt")
    g.add_argument("--kl-prompts", type=int, default=128, help="new-task prompts for forward KL")
    g.add_argument("--kl-samples", type=int, default=2, help="pi0 samples per KL prompt")
    g.add_argument("--prior-tasks", help=f"lm-eval tasks (default {PAPER_PRIOR_TASKS}; twin: {TWIN_PRIOR_TASKS})")
    g.add_argument("--prior-limit", type=float, help="lm-eval limit per task (default: all; twin 100)")
    g.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: the task's own)")
    g.add_argument("--no-chat-template", action="store_true", help="score prior tasks without the chat template")
    g.add_argument("--allow-unsafe-code", action="store_true", help="consent to humaneval's code execution")
    g.add_argument("--lm-eval-batch-size", default="64", help="lm-eval batch size; 'auto' finds the largest on a GPU")
    g = p.add_argument_group("what to do")
    g.add_argument("--build-twin", action="store_true", help="build and pretrain the twin at --model")
    g.add_argument("--twin-steps", type=int, default=3000, help="pretraining steps of the twin")
    g.add_argument("--plot", action="store_true", help="draw plots/llm_*.png from the results and exit")
    g.add_argument("--bench", action="store_true", help="measure rollout and update tokens/s and exit")
    g.add_argument("--out", default="runs/llm", help="results, caches and generated lm-eval tasks")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    args = p.parse_args(argv)

    if args.task not in TASKS:
        p.error(f"unknown task {args.task!r}: choose one of {', '.join(TASKS)}")
    for method in args.method:
        if method not in METHODS:
            p.error(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if any(mu < 1 for mu in args.mu):
        p.error("--mu must be >= 1")
    if args.data_file and not Path(args.data_file).is_file():
        p.error(f"--data-file {args.data_file} does not exist")
    twin = args.task == "addition"
    args.group_size = args.group_size or (8 if twin else 64)
    args.warmup_steps = (5 if twin else 50) if args.warmup_steps is None else args.warmup_steps
    args.max_new_tokens = args.max_new_tokens or (24 if twin else 1024)
    args.batch_size = args.batch_size or ([32] if twin else [16, 32, 64, 128])
    args.rl_prompts = args.rl_prompts or (1024 if twin else 4096)
    args.sft_examples = args.sft_examples or (4096 if twin else 100_000)
    args.eval_every = args.eval_every or (16 if twin else 25)
    args.prior_tasks = (args.prior_tasks or (TWIN_PRIOR_TASKS if twin else PAPER_PRIOR_TASKS)).split(",")
    args.prior_limit = args.prior_limit or (100 if twin else None)
    args.lr_grid = {m: args.lr or (TWIN_LRS if twin else PAPER_LRS)[m] for m in METHODS}
    return args


# --------------------------------------------------------------------------------------------------
# 1. The CPU twin: a character-level tokenizer with a chat template, a small Qwen2, synthetic tasks
# --------------------------------------------------------------------------------------------------

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz +=-*/:;,.?!()[]{}'\"_\n")
SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|unk|>"]
# Same shape as Qwen's ChatML, with one token per role marker so sequences stay short.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}<|end|>{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
PRIOR_TWIN_TASKS = ("copy", "reverse", "sort")
BASE_CORRECT_PROB = 0.5  # fraction of correct sums in the twin's pretraining source (§ "The CPU twin")


def build_char_tokenizer():
    """One token per character plus the chat markers, wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<|pad|>",
                                   unk_token="<|unk|>", chat_template=CHAT_TEMPLATE, padding_side="left")


def build_twin_model(tokenizer, seed=0):
    """A 0.8M-parameter Qwen2 (same code path as Qwen2.5-3B: GQA, RoPE, SwiGLU, RMSNorm)."""
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def twin_example(task, rng):
    """One synthetic example: {"prompt", "answer"}. Prior tasks act on 3-8 letters; the new task
    adds two 2-digit numbers."""
    if task == "addition":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"prompt": f"add: {a}+{b}", "answer": str(a + b)}
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    answer = {"copy": s, "reverse": s[::-1], "sort": "".join(sorted(s))}[task]
    return {"prompt": f"{task}: {s}", "answer": answer}


def corrupt_number(number, rng):
    """The same number with one digit changed (a near miss), never the number itself."""
    digits = list(number)
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
    return "".join(digits)


def base_style_response(example, rng):
    """How pi0 learned to answer additions: a noisy source (right half the time, else one digit
    off) in two styles, "143" or "57+86=143". So pi0 has partial skill and several correct
    responses per prompt, like a base LLM."""
    total = example["answer"] if rng.random() < BASE_CORRECT_PROB else corrupt_number(example["answer"], rng)
    return total if rng.random() < 0.5 else f"{example['prompt'].split(': ')[1]}={total}"


def teacher_response(example, total=None):
    """The SFT target for the twin: the correct sum, always in the terse style ("143"). pi0 answers in
    two styles; a teacher that uses one of them is an external labeling like ParityMNIST's "SFT dist. 1"
    (§3.4), and as DeepSeek-R1 / GPT-4o chains are for Qwen (§6.1): correct, but not pi0's distribution.
    With a wrong `total`: SimPO's rejected response."""
    return total or example["answer"]


def twin_new_task(num_train, num_test, num_kl, rng):
    """Disjoint train / test / KL prompt sets for the addition task, with SFT and SimPO targets.
    Test and KL prompts are drawn first, so they do not depend on the training-set size."""
    seen, splits = set(), []
    for size in (num_test, num_kl, num_train):
        split = []
        while len(split) < size:
            ex = twin_example("addition", rng)
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                ex["response"] = teacher_response(ex)
                ex["rejected"] = teacher_response(ex, corrupt_number(ex["answer"], rng))
                split.append(ex)
        splits.append(split)
    test, kl_prompts, train = splits
    return train, test, kl_prompts


def pretrain_twin(path, steps, batch_size=64, lr=3e-3, seed=0):
    """Build the twin and pretrain it on copy / reverse / sort and noisy additions (chat format,
    prompt masked, kl.sft_loss); save model and tokenizer at `path` with save_pretrained."""
    tokenizer = build_char_tokenizer()
    model = build_twin_model(tokenizer, seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 100, steps)
    tasks = PRIOR_TWIN_TASKS + ("addition", "addition")  # 40 % additions
    model.train()
    bar = tqdm(range(steps), desc="pretrain twin", mininterval=10)
    for _ in bar:
        examples = [twin_example(rng.choice(tasks), rng) for _ in range(batch_size)]
        responses = [base_style_response(ex, rng) if ex["prompt"].startswith("add") else ex["answer"]
                     for ex in examples]
        batch = pack(tokenizer, [chat_prompt(tokenizer, ex["prompt"]) for ex in examples],
                     [tokenizer(r + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                      for r in responses])
        loss = sft_batch_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# 2. New tasks: loaders (hub source or local file) and reward checkers
# --------------------------------------------------------------------------------------------------

# Public sources (PAPER.md §6.1 leaves the files open; these are the ones we found and chose):
HUB_SOURCES = {
    # Open-Reasoner-Zero's orz_math_57k, 16k-question subset with up to 5 DeepSeek-R1-0528 traces per
    # question: the paper's SFT recipe (R1 samples filtered for a correct final answer) on public data.
    "math": "OctoMed/OrzMath",
    # SciKnowEval, config "Chemistry", split "test", rows with details.level == "L3" (multiple choice).
    "science": "hicai-zju/SciKnowEval",
    # ToolAlpaca (Tang et al., 2023) training instances: instruction, API docs, the calls made.
    "tools": "https://raw.githubusercontent.com/tangqiaoyu/ToolAlpaca/main/data/train_data.json",
}
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
SCIENCE_SUFFIX = "\nAnswer with the letter of the correct option, as 'Answer: X'."
TOOLS_SUFFIX = ("\nCall the API to serve the request. For each call write one line 'Action: <function>' "
                "and one line 'Action Input: <JSON arguments>'.")


def last_boxed(text):
    """Content of the last \\boxed{...} in text (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def normalize_math(answer):
    """Canonical string for a final answer: no spaces, $, \\left/\\right, text wrappers, or
    trailing period; \\dfrac/\\tfrac -> \\frac; a plain number as a float string."""
    s = answer.strip().strip("$").rstrip(".")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), (" ", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    try:
        if frac:
            value = float(frac.group(2)) / float(frac.group(3)) * (-1 if frac.group(1) else 1)
        else:
            value = float(s.replace(",", ""))
        return f"{value:.6g}"
    except (ValueError, ZeroDivisionError):
        return s


def math_reward(response, answer):
    """1 if the final \\boxed{} answer equals the ground truth (the reasoning chain is ignored, §6.1)."""
    predicted = last_boxed(response)
    return float(predicted is not None and normalize_math(predicted) == normalize_math(answer))


def science_reward(response, answer):
    """1 if the last 'Answer: X' (or a bare letter) names the correct option."""
    found = re.findall(r"answer\s*(?:is)?\s*[:：]?\s*\(?([A-J])\)?\b", response, flags=re.IGNORECASE)
    if not found and re.fullmatch(r"\s*\(?([A-J])\)?\.?\s*", response):
        found = [response.strip(" ().")]
    return float(bool(found) and found[-1].upper() == answer.strip().upper())


def parse_tool_calls(text):
    """[(function, arguments dict)] from 'Action: f' / 'Action Input: {...}' lines; None if any
    Action Input is not a JSON object (malformed output)."""
    calls = []
    for name, raw in re.findall(r"Action:\s*([\w.\-]+)\s*\n\s*Action Input:\s*(\{.*?\})\s*(?=\n|$)", text, re.S):
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append((name, {k: v for k, v in arguments.items() if v not in ("", None)}))
    return calls


def tools_reward(response, answer):
    """1 if the called functions and their arguments match the reference calls, in order (§6.1:
    API calls extracted by regex and matched). Empty-string / null arguments count as absent."""
    predicted = parse_tool_calls(response)
    reference = [(c["name"], {k: v for k, v in c["arguments"].items() if v not in ("", None)})
                 for c in json.loads(answer)]
    return float(bool(predicted) and predicted == reference)


def addition_reward(response, answer):
    """1 if the last integer in the response is the sum (the twin's new task)."""
    numbers = re.findall(r"\d+", response)
    return float(bool(numbers) and numbers[-1] == answer)


REWARDS = {"addition": addition_reward, "math": math_reward, "science": science_reward, "tools": tools_reward}


def read_local_examples(path):
    """Examples from a local JSON list or JSONL file; each needs "prompt" and "answer" (strings),
    optionally "response" (SFT target) and "rejected" (SimPO negative)."""
    text = Path(path).read_text()
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        sys.exit(f"error: {path} is not JSON or JSONL ({error.msg} at line {error.lineno})")
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)):
            sys.exit(f"error: {path} row {i}: each row needs string fields 'prompt' and 'answer' "
                     "(optional 'response', 'rejected'); see README")
    return rows


def load_hub_examples(task):
    """The task's public source as prompt/answer/response rows; one line of advice when offline."""
    import datasets
    try:
        if task == "math":
            rows = datasets.load_dataset(HUB_SOURCES["math"], split="train")
            return [{"prompt": r["question"] + MATH_SUFFIX, "answer": r["answer"],
                     "response": next((t for t in r["responses"] or [] if math_reward(t, r["answer"])), None)}
                    for r in rows]
        if task == "science":
            rows = datasets.load_dataset(HUB_SOURCES["science"], "Chemistry", split="test")
            rows = [r for r in rows if r["details"]["level"] == "L3" and r["choices"]["text"]]
            # No public GPT-4o annotations: the SFT target is the bare correct option.
            return [{"prompt": r["question"] + "\n" + "\n".join(f"{l}. {t}" for l, t in zip(
                        r["choices"]["label"], r["choices"]["text"])) + SCIENCE_SUFFIX,
                     "answer": r["answerKey"], "response": f"Answer: {r['answerKey']}"} for r in rows]
        apis = datasets.load_dataset("json", data_files=HUB_SOURCES["tools"], split="train")
        return [tool_example(api, instance) for api in apis for instance in api["Instances"] or []
                if instance.get("intermediate_steps")]
    except (ConnectionError, OSError, ValueError) as error:
        sys.exit(f"error: cannot load the {task} dataset ({type(error).__name__}); on a connected machine "
                 f"run once without HF_DATASETS_OFFLINE to cache {HUB_SOURCES[task]}, or pass --data-file")


def tool_example(api, instance):
    """A ToolAlpaca instance as a prompt (API description + request) and its reference calls."""
    calls = [{"name": step[0][0], "arguments": json.loads(step[0][1] or "{}")}
             for step in instance["intermediate_steps"]]
    prompt = f"API: {api['Name']}\n{api['NLDocumentation']}\nRequest: {instance['input']}{TOOLS_SUFFIX}"
    response = "\n".join(f"Action: {c['name']}\nAction Input: {json.dumps(c['arguments'])}" for c in calls)
    return {"prompt": prompt, "answer": json.dumps(calls), "response": response}


def load_new_task(args):
    """(train, test, kl_prompts) example lists for the chosen task."""
    rng = random.Random(1234)
    if args.task == "addition" and not args.data_file:
        return twin_new_task(max(args.rl_prompts, args.sft_examples), args.num_test, args.kl_prompts, rng)
    rows = read_local_examples(args.data_file) if args.data_file else load_hub_examples(args.task)
    rng.shuffle(rows)
    held_out = args.num_test + args.kl_prompts
    if len(rows) <= held_out:
        sys.exit(f"error: {len(rows)} examples are too few for --num-test {args.num_test} "
                 f"+ --kl-prompts {args.kl_prompts}")
    return rows[held_out:], rows[:args.num_test], rows[args.num_test:held_out]


# --------------------------------------------------------------------------------------------------
# 3. Sequences: chat prompts, packing, teacher-forced logits, rollouts with a KV cache
# --------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer, text):
    """Token ids of a one-turn chat prompt ending with the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def pack(tokenizer, prompts, responses):
    """Left-pad prompts and right-pad responses into one batch, so response position t sits at
    column prompt_len + t for every row. Returns input ids, attention mask, position ids, and the
    response tokens with their mask (1 = a real response token, EOS included)."""
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), prompt_len + response_len), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, prompt_len - len(p):prompt_len + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, prompt_len - len(p):prompt_len + len(r)] = 1
    return {"input_ids": ids, "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "prompt_len": prompt_len,
            "response_ids": ids[:, prompt_len:], "response_mask": attention[:, prompt_len:]}


def forward_logits(model, batch):
    """Logits predicting each response token, [B, T_response, V]. Position ids follow the attention
    mask, as in generate(), so left padding does not shift RoPE."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), use_cache=False)
    start = batch["prompt_len"] - 1
    return out.logits[:, start:start + batch["response_ids"].shape[1]]


def response_logprobs(model, batch):
    """log pi(y_t | x, y_<t) of the batch's response tokens in float32, [B, T] (kl.token_logprobs)."""
    logits = forward_logits(model, batch)
    return kl.token_logprobs(logits, batch["response_ids"].to(logits.device))


def cut_at_eos(tokens, eos_id, pad_id):
    """Generated ids up to and including the first EOS (pads dropped); and whether EOS was reached."""
    out = []
    for t in tokens:
        if t == pad_id:
            break
        out.append(t)
        if t == eos_id:
            return out, True
    return out, False


@torch.no_grad()
def sample(model, tokenizer, prompts, num_samples, max_new_tokens, greedy=False, batch_size=256):
    """Responses (token id lists) from the raw policy: temperature 1, no top-k / top-p / repetition
    penalty, whatever the model's generation_config says (Qwen2.5-Instruct ships top_p 0.8, top_k 20,
    T 0.7, repetition penalty 1.05: those would not sample pi). KV-cached generate(), a whole group
    per call. Returns (responses in prompt-major order, fraction truncated at max_new_tokens)."""
    flat = [p for p in prompts for _ in range(num_samples)]
    device = next(model.parameters()).device
    responses, truncated = [], 0
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt").to(device)
        raw = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=not greedy, repetition_penalty=1.0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **raw)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            response, ended = cut_at_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
            responses.append(response)
            truncated += not ended
    return responses, truncated / max(1, len(flat))


def decode(tokenizer, response):
    return tokenizer.decode(response, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# 4. The updates (the lesson): GRPO / 1-0 REINFORCE on own samples, SFT / SimPO on fixed data
# --------------------------------------------------------------------------------------------------


def rl_step(accelerator, model, optimizer, scheduler, tokenizer, prompts, answers, reward_fn, args, method, mu):
    """One generation round of GRPO (Dr. GRPO) or 1-0 REINFORCE, then mu optimizer steps on it.

    PAPER.md §6.3: group of G completions per prompt, binary reward, no KL penalty. Dr. GRPO
    (Liu et al., 2025): advantage r - mean_G(r) without the std division, token terms summed and
    divided by a constant (batch x max_new_tokens). 1-0 REINFORCE (§4): advantage = reward. With
    mu > 1 the later steps reuse the samples through the clipped ratio to the sampling policy.
    """
    model.eval()
    started = time.perf_counter()
    responses, _ = sample(accelerator.unwrap_model(model), tokenizer, prompts, args.group_size, args.max_new_tokens)
    rollout_s = time.perf_counter() - started
    rewards = torch.tensor([reward_fn(decode(tokenizer, r), answers[i // args.group_size])
                            for i, r in enumerate(responses)]).view(len(prompts), args.group_size)
    if method == "grpo":
        advantages = kl.group_advantages(rewards, normalize_std=False).flatten()
    else:
        advantages = kl.reinforce_advantages(rewards).flatten()
    flat_prompts = [p for p in prompts for _ in range(args.group_size)]
    chunks = [range(s, min(s + args.micro_batch, len(responses))) for s in range(0, len(responses), args.micro_batch)]
    batches = [pack(tokenizer, [flat_prompts[i] for i in c], [responses[i] for i in c]) for c in chunks]
    old_logprobs = None
    if mu > 1:  # log-probs of the policy that sampled, for the clipped ratio of the later iterations
        with torch.no_grad():
            old_logprobs = [response_logprobs(model, b) for b in batches]
    model.train()
    for _ in range(mu):
        for k, (chunk, batch) in enumerate(zip(chunks, batches)):
            logprobs = response_logprobs(model, batch)
            loss = kl.policy_gradient_loss(
                logprobs, advantages[list(chunk)].to(logprobs.device), batch["response_mask"].to(logprobs.device),
                old_logprobs=None if old_logprobs is None else old_logprobs[k], clip_eps=args.clip_eps,
                aggregation="constant", max_tokens=args.max_new_tokens)
            accelerator.backward(loss * len(chunk) / len(responses))  # micro-batches sum to the batch loss
        optimizer_step(accelerator, model, optimizer, scheduler)
    return {"reward": rewards.mean().item(), "rollout_s": rollout_s,
            "update_s": time.perf_counter() - started - rollout_s, "generated_tokens": sum(map(len, responses)),
            "update_tokens": mu * sum(int(b["attention_mask"].sum()) for b in batches)}


def offline_step(accelerator, model, optimizer, scheduler, tokenizer, examples, args, method):
    """One optimizer step of SFT (cross-entropy on the reference response, prompt masked) or SimPO
    (chosen = reference response, rejected = the example's negative; sequence log-probs, margin 1)."""
    model.train()
    prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
    encode = lambda text: tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]  # noqa: E731
    tokens = 0
    for start in range(0, len(examples), args.micro_batch):
        part = slice(start, start + args.micro_batch)
        chosen = pack(tokenizer, prompts[part], [encode(ex["response"]) for ex in examples[part]])
        weight = len(prompts[part]) / len(examples)
        if method == "sft":
            loss = sft_batch_loss(model, chosen)
        else:
            rejected = pack(tokenizer, prompts[part], [encode(ex["rejected"]) for ex in examples[part]])
            loss = kl.simpo_loss(sequence_logprob(model, chosen), sequence_logprob(model, rejected))
            tokens += int(rejected["attention_mask"].sum())
        accelerator.backward(loss * weight)
        tokens += int(chosen["attention_mask"].sum())
    optimizer_step(accelerator, model, optimizer, scheduler)
    return {"loss": loss.item(), "update_tokens": tokens}


def sequence_logprob(model, batch):
    """log pi(y | x) of each whole response: the sum of its token log-probs, [B]."""
    logprobs = response_logprobs(model, batch)
    return (logprobs * batch["response_mask"].to(logprobs.device)).sum(-1)


def sft_batch_loss(model, batch):
    """Cross-entropy on the response tokens only: the prompt's positions never enter (kl.sft_loss)."""
    logits = forward_logits(model, batch)
    return kl.sft_loss(logits, batch["response_ids"].to(logits.device), batch["response_mask"].to(logits.device))


def optimizer_step(accelerator, model, optimizer, scheduler):
    """AdamW step with max grad norm 1 (PAPER.md §6.3-6.4), then the LR schedule."""
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# 5. Evaluation: new-task accuracy, forward KL on new-task prompts, prior tasks through lm-eval
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def new_task_accuracy(model, tokenizer, test, reward_fn, args, seed):
    """Mean reward of temperature-1 samples (the policy itself; the RL objective) and of greedy
    decoding, on held-out prompts. Sampling runs on its own seed and leaves the training RNG alone."""
    model.eval()
    prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in test]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sampled, truncated = sample(model, tokenizer, prompts, args.eval_samples, args.max_new_tokens)
    greedy, _ = sample(model, tokenizer, prompts, 1, args.max_new_tokens, greedy=True)
    score = lambda responses, k: float(np.mean([reward_fn(decode(tokenizer, r), test[i // k]["answer"])  # noqa: E731
                                               for i, r in enumerate(responses)]))
    return {"new_task_acc": score(sampled, args.eval_samples), "new_task_acc_greedy": score(greedy, 1),
            "truncated": truncated}


class BaseSamples:
    """pi0's responses on the KL prompts and pi0's log-probs over the whole vocabulary at every
    response position (PAPER.md §6.6): sampled once at temperature 1 with no truncation of the
    distribution, cached on disk, so each evaluation costs one teacher-forced forward of pi.

    When the cache would exceed `max_gb` (a 150k-token vocabulary makes it ~0.6 MB per token), pi0's
    log-probs are recomputed at each evaluation instead, from a frozen copy of pi0 (or, with LoRA,
    from the same model with its adapter disabled): same numbers, one more forward.
    """

    def __init__(self, model, tokenizer, examples, args, path, max_gb=4.0, seed=0):
        self.tokenizer, self.micro_batch = tokenizer, args.micro_batch
        if path.exists():
            cached = torch.load(path)
            self.batches, self.truncated = cached["batches"], cached["truncated"]
            self.base_logprobs = cached["logprobs"]
            return
        prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            responses, self.truncated = sample(model, tokenizer, prompts, args.kl_samples, args.max_new_tokens)
        flat = [p for p in prompts for _ in range(args.kl_samples)]
        self.batches = [pack(tokenizer, flat[s:s + self.micro_batch], responses[s:s + self.micro_batch])
                        for s in range(0, len(flat), self.micro_batch)]
        size_gb = sum(b["response_ids"].numel() for b in self.batches) * model.config.vocab_size * 4 / 1e9
        self.base_logprobs = None
        if size_gb <= max_gb:
            self.base_logprobs = [self._logprobs(model, b) for b in self.batches]
        torch.save({"batches": self.batches, "truncated": self.truncated, "logprobs": self.base_logprobs}, path)

    @staticmethod
    @torch.no_grad()
    def _logprobs(model, batch):
        model.eval()
        return torch.log_softmax(forward_logits(model, batch).float(), -1).cpu()

    @torch.no_grad()
    def forward_kl(self, model, reference=None):
        """Forward KL(pi0 || pi) per sequence (sum over tokens, primary) and per token, exact over the
        vocabulary (kl.sequence_forward_kl), plus the k1 and k3 Monte-Carlo estimates from the sampled
        tokens (kl.kl_estimators) as a check: all are unbiased for the same quantity."""
        model.eval()
        totals = {"kl_seq": [], "kl_token": [], "k1_seq": [], "k3_seq": []}
        for i, batch in enumerate(self.batches):
            logits = forward_logits(model, batch).float()
            if self.base_logprobs is not None:
                base = self.base_logprobs[i].to(logits.device)
            elif hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    base = forward_logits(model, batch).float()
            else:
                base = forward_logits(reference, batch).float()
            mask, tokens = batch["response_mask"].to(logits.device), batch["response_ids"].to(logits.device)
            exact = kl.sequence_forward_kl(base, logits, mask)
            estimates = kl.kl_estimators(kl.token_logprobs(base, tokens), kl.token_logprobs(logits, tokens), mask)
            totals["kl_seq"] += exact["sum"].tolist()
            totals["kl_token"] += exact["mean"].tolist()
            totals["k1_seq"] += estimates["k1"].tolist()
            totals["k3_seq"] += estimates["k3"].tolist()
        return {name: float(np.mean(values)) for name, values in totals.items()}


# The score each benchmark contributes to the prior-task average (PAPER.md §6.2 leaves them open).
PRIMARY_METRIC = {"hellaswag": "acc_norm,none", "truthfulqa_mc2": "acc,none", "mmlu": "acc,none",
                  "ifeval": "prompt_level_strict_acc,none", "winogrande": "acc,none",
                  "humaneval": "pass@1,create_test"}


def write_twin_prior_tasks(directory, num_examples=200, seed=7):
    """lm-eval YAML tasks over local JSONL files for the twin's prior tasks (greedy generation,
    exact match), generated under runs/ so the same lm-eval path runs offline."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for task in PRIOR_TWIN_TASKS:
        data = directory / f"twin_{task}.jsonl"
        data.write_text("".join(json.dumps(twin_example(task, rng)) + "\n" for _ in range(num_examples)))
        (directory / f"twin_{task}.yaml").write_text(f"""task: twin_{task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data.resolve()}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|end|>"]
  do_sample: false
  max_gen_toks: 16
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return directory


class PriorTasks:
    """The prior-task score: lm-eval's simple_evaluate on the in-memory model, averaged over tasks."""

    def __init__(self, args):
        import importlib.util
        import logging
        from lm_eval.tasks import TaskManager
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.args = args
        twin_tasks = [t for t in args.prior_tasks if t.startswith("twin_")]
        include = str(write_twin_prior_tasks(Path(args.out) / "lm_eval_tasks")) if twin_tasks else None
        self.manager = TaskManager(include_path=include, include_defaults=len(twin_tasks) < len(args.prior_tasks))
        for task in args.prior_tasks:
            if task not in self.manager.all_tasks:
                sys.exit(f"error: unknown lm-eval task {task!r} in --prior-tasks (see `lm_eval ls tasks`)")
        ifeval_modules = ("langdetect", "immutabledict")
        if "ifeval" in args.prior_tasks and not all(importlib.util.find_spec(m) for m in ifeval_modules):
            sys.exit("error: ifeval needs `pip install langdetect immutabledict` (or drop it from --prior-tasks)")
        if "humaneval" in args.prior_tasks:
            if not args.allow_unsafe_code:
                sys.exit("error: humaneval executes model-written code: pass --allow-unsafe-code to consent, "
                         "or drop it from --prior-tasks")
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"
        try:  # fetch (or find in the cache) every task's data now, not after an hour of training
            self.manager.load(args.prior_tasks)
        except Exception as error:  # noqa: BLE001 (datasets raises many types when offline)
            sys.exit(f"error: lm-eval could not load {','.join(args.prior_tasks)} ({type(error).__name__}); "
                     f"on a connected machine run `lm-eval run --model hf --model_args pretrained={args.model} "
                     f"--tasks {','.join(args.prior_tasks)} --limit 1` once to cache their data, then rerun")

    def scores(self, model, tokenizer):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        model.eval()
        batch_size = self.args.lm_eval_batch_size
        batch_size = int(batch_size) if batch_size.isdigit() else batch_size
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = simple_evaluate(model=lm, tasks=self.args.prior_tasks, task_manager=self.manager,
                                 limit=self.args.prior_limit, num_fewshot=self.args.num_fewshot,
                                 apply_chat_template=not self.args.no_chat_template, log_samples=False,
                                 bootstrap_iters=0, confirm_run_unsafe_code=self.args.allow_unsafe_code)
        scores = {}
        for task in self.args.prior_tasks:
            metrics = output["results"][task]
            key = PRIMARY_METRIC.get(task) or next(k for k in metrics if "," in k and "stderr" not in k)
            scores[task] = float(metrics[key])
        return {"prior": scores, "prior_avg": float(np.mean(list(scores.values())))}


# --------------------------------------------------------------------------------------------------
# 6. Runs: model loading, the sweep, the training loop, results (one JSON line per point)
# --------------------------------------------------------------------------------------------------


def load_tokenizer(name):
    """The tokenizer exactly as its tokenizer.json defines it (Qwen2.5 ships one too).

    Not AutoTokenizer: next to a Qwen2 config it rebuilds the twin's character tokenizer as a
    Qwen2Tokenizer whose pre-tokenizer drops spaces, so the ids change (measured with transformers
    5.24; the tests pin it). padding_side is set here (left, for batched generation)."""
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(name)
    except (OSError, ValueError):
        sys.exit(f"error: model {name!r} not found: no such local directory and the hub is unreachable "
                 "(offline); build the twin with --build-twin, or pass a downloaded model directory")
    if tokenizer.chat_template is None:
        sys.exit(f"error: {name} has no chat template; use an instruct/chat model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(args, device):
    """pi0 from --model: float32 (or bf16), optional gradient checkpointing and LoRA (peft)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    except OSError:
        sys.exit(f"error: cannot load model weights from {args.model!r}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.to(device)


def sweep(args):
    """Every configuration to run: the product of the listed values that apply to each method."""
    for method in args.method:
        shape = (args.mu, [None], args.epochs) if method in ON_POLICY else ([None], args.batch_size, args.epochs)
        for lr, scheduler, seed, (mu, batch_size, epochs) in itertools.product(
                args.lr_grid[method], args.scheduler, args.seed, itertools.product(*shape)):
            config = {"method": method, "lr": lr, "scheduler": scheduler, "seed": seed, "mu": mu,
                      "batch_size": batch_size, "epochs": epochs}
            config = {k: v for k, v in config.items() if v is not None}
            yield "-".join(f"{k}{v}" if k != "method" else v for k, v in config.items()), config


def model_fingerprint(name):
    """Short hash of a model's name and, for a local directory, its weight files' sizes and times:
    results and caches of a rebuilt twin never mix with the old ones."""
    files = sorted(Path(name).glob("*.safetensors")) if Path(name).is_dir() else []
    stamp = [name] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:10]


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_result(path, record):
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate(model, tokenizer, test, reward_fn, base_samples, prior, args, reference=None):
    """One evaluation point. Every random state is restored afterwards (lm-eval reseeds torch, numpy
    and random), so training draws the same numbers whether a point is evaluated or skipped on resume."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        point = new_task_accuracy(model, tokenizer, test, reward_fn, args, seed=10_000)
        point.update(base_samples.forward_kl(model, reference))
        point.update(prior.scores(model, tokenizer))
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return point


def train_run(run_id, config, context, args):
    """Fine-tune a fresh copy of pi0 with one configuration, evaluating every --eval-every steps.
    Same seed, same numbers: an interrupted run restarts from step 0 and skips the points it has."""
    accelerator, tokenizer, train, test, reward_fn, base_samples, prior, results_path, done_steps, reference = context
    method, mu = config["method"], config.get("mu", 1)
    random.seed(config["seed"])
    torch.manual_seed(config["seed"] + accelerator.process_index)
    model = load_model(args, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"], weight_decay=0.0)
    if method in ON_POLICY:
        per_step = args.prompts_per_step * accelerator.num_processes
        examples = random.sample(train, min(args.rl_prompts, len(train)))
        total_steps = args.steps or config["epochs"] * len(examples) // per_step
    else:
        examples = [ex for ex in train if ex.get("response") and (method == "sft" or ex.get("rejected"))]
        if not examples:
            sys.exit(f"error: {method} needs a 'response'{' and a rejected' if method == 'simpo' else ''} field "
                     "in the training data (pass --data-file with them; README)")
        examples = examples[:args.sft_examples]
        per_step = config["batch_size"] * accelerator.num_processes
        total_steps = args.steps or config["epochs"] * len(examples) // per_step
    if config["scheduler"] == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, args.warmup_steps)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)
    # The scheduler stays unprepared: accelerate would step it once per process, and our steps are global.
    model, optimizer = accelerator.prepare(model, optimizer)
    order = random.Random(config["seed"])
    started, tokens = time.time(), {"rollout": 0, "update": 0}
    for step in tqdm(range(1, total_steps + 1), desc=run_id, mininterval=10, disable=not accelerator.is_main_process):
        # Each process takes its own slice of the step's prompts; a group never spans processes.
        if method in ON_POLICY:
            start = ((step - 1) * per_step + accelerator.process_index * args.prompts_per_step) % len(examples)
            batch = [examples[(start + i) % len(examples)] for i in range(args.prompts_per_step)]
            info = rl_step(accelerator, model, optimizer, scheduler, tokenizer,
                           [chat_prompt(tokenizer, ex["prompt"]) for ex in batch], [ex["answer"] for ex in batch],
                           reward_fn, args, method, mu)
            tokens["rollout"] += info["generated_tokens"]
        else:
            steps_per_epoch = len(examples) // per_step
            if (step - 1) % steps_per_epoch == 0:  # a new epoch: reshuffle
                order.shuffle(examples)
            start = (step - 1) % steps_per_epoch * per_step + accelerator.process_index * config["batch_size"]
            info = offline_step(accelerator, model, optimizer, scheduler, tokenizer,
                                examples[start:start + config["batch_size"]], args, method)
        tokens["update"] += info["update_tokens"]
        if (step % args.eval_every == 0 or step == total_steps) and step not in done_steps:
            if accelerator.is_main_process:
                point = evaluate(accelerator.unwrap_model(model), tokenizer, test, reward_fn, base_samples,
                                 prior, args, reference)
                append_result(results_path, {
                    "run_id": run_id, "task": args.task, "model": args.model,
                    "fingerprint": model_fingerprint(args.model), **config, "step": step,
                    "total_steps": total_steps, "done": step == total_steps, **point,
                    "train_reward": info.get("reward"), "tokens_generated": tokens["rollout"],
                    "tokens_updated": tokens["update"], "wall_s": round(time.time() - started, 1)})
            accelerator.wait_for_everyone()


def plot_results(results_path, args):
    """plots/llm_pareto.png (Fig. 2/4 analogue) and plots/llm_forgetting_vs_kl.png (Fig. 11)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fingerprint = model_fingerprint(args.model)
    rows = [r for r in read_results(results_path) if r["task"] == args.task and r.get("fingerprint") == fingerprint]
    if not rows:
        sys.exit(f"error: no results for task {args.task} and model {args.model} in {results_path}; train first")
    base = next((r for r in rows if r["method"] == "base"), None)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    colors = dict(zip(METHODS, ["tab:blue", "tab:cyan", "tab:red", "tab:orange"]))
    Path("plots").mkdir(exist_ok=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    frontier_priors = []
    for ax in axes:  # the same points twice: all of them, then zoomed on the frontiers
        for method in methods:  # the base model is a point of every method's frontier (PAPER.md §8)
            points = [r for r in rows if r["method"] == method] + ([base] if base else [])
            new, prior = [r["new_task_acc"] for r in points], [r["prior_avg"] for r in points]
            ax.scatter(new, prior, s=12, alpha=0.35, color=colors[method])
            front = kl.pareto_frontier(new, prior)
            frontier_priors += [prior[i] for i in front]
            ax.plot([new[i] for i in front], [prior[i] for i in front], "-o", ms=4, color=colors[method], label=method)
        if base:
            ax.scatter([base["new_task_acc"]], [base["prior_avg"]], marker="*", s=150, color="k", zorder=5,
                       label="base")
        ax.set(xlabel="new-task accuracy (T=1 samples)", ylabel="prior-task score (lm-eval average)")
    axes[0].set_title(f"{args.task}: trade-off, Pareto frontiers")
    low, high = min(frontier_priors), max(frontier_priors)
    axes[1].set_ylim(low - 0.2 * (high - low) - 1e-3, high + 0.2 * (high - low) + 1e-3)
    axes[1].set_title("zoom on the frontiers")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("plots/llm_pareto.png", dpi=130)

    trained = [r for r in rows if r["method"] in METHODS] + ([base] if base else [])
    x, y = np.array([r["kl_seq"] for r in trained]), np.array([r["prior_avg"] for r in trained])
    coefficients, r2 = kl.fit_law(x, y)
    _, low, high = kl.bootstrap_r2(x, y, groups=[r["run_id"] for r in trained])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for method in methods + (["base"] if base else []):
        pts = [r for r in trained if r["method"] == method]
        for ax, key in zip(axes, ("prior_avg", "new_task_acc")):
            ax.scatter([r["kl_seq"] for r in pts], [r[key] for r in pts], s=14, alpha=0.7,
                       color=colors.get(method, "k"), label=method)
    grid = np.linspace(0, x.max(), 100)
    axes[0].plot(grid, np.polyval(coefficients, grid), "k--", lw=1,
                 label=f"quadratic fit, R$^2$={r2:.2f} [{low:.2f}, {high:.2f}]")
    axes[0].set(xlabel="forward KL(pi0 || pi) per sequence, new-task prompts (nats)", ylabel="prior-task score",
                title="forgetting vs KL (all methods pooled)")
    axes[1].set(xlabel="forward KL(pi0 || pi) per sequence (nats)", ylabel="new-task accuracy", title="accuracy vs KL")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("plots/llm_forgetting_vs_kl.png", dpi=130)
    print(f"plots/llm_pareto.png, plots/llm_forgetting_vs_kl.png: {len(trained)} points, "
          f"R^2 = {r2:.3f} (run-bootstrap 95% CI {low:.3f}-{high:.3f})")


def bench(accelerator, tokenizer, train, reward_fn, args, rounds=5):
    """Rollout tokens/s (KV-cached sampling of a GRPO round) and update tokens/s (forward + backward +
    AdamW over prompt and response tokens) for GRPO and SFT on this machine."""
    model = load_model(args, accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scheduler = get_constant_schedule_with_warmup(optimizer, 0)
    totals = {"rollout_s": 0.0, "update_s": 0.0, "generated_tokens": 0, "update_tokens": 0}
    for i in range(rounds):
        batch = train[i * args.prompts_per_step:(i + 1) * args.prompts_per_step]
        prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in batch]
        info = rl_step(accelerator, model, optimizer, scheduler, tokenizer, prompts, [ex["answer"] for ex in batch],
                       reward_fn, args, "grpo", 1)
        for key in totals:
            totals[key] += info[key]
    sft_tokens, started = 0, time.perf_counter()
    for i in range(rounds):
        batch = train[i * args.batch_size[0]:(i + 1) * args.batch_size[0]]
        info = offline_step(accelerator, model, optimizer, scheduler, tokenizer, batch, args, "sft")
        sft_tokens += info["update_tokens"]
    sft_s = time.perf_counter() - started
    print(f"bench {args.model} on {accelerator.device} ({torch.get_num_threads()} threads): rollout "
          f"{totals['generated_tokens'] / totals['rollout_s']:.0f} tokens/s (batch {args.prompts_per_step}x"
          f"{args.group_size}, KV cache), GRPO update {totals['update_tokens'] / totals['update_s']:.0f} tokens/s, "
          f"SFT update {sft_tokens / sft_s:.0f} tokens/s (batch {args.batch_size[0]})")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    if args.plot:
        return plot_results(results_path, args)
    if args.build_twin:
        if (Path(args.model) / "config.json").exists():
            return print(f"{args.model} exists; delete it to rebuild the twin")
        started = time.time()
        pretrain_twin(args.model, args.twin_steps)
        return print(f"twin pretrained in {time.time() - started:.0f} s and saved at {args.model}")

    from accelerate import Accelerator
    accelerator = Accelerator()
    tokenizer = load_tokenizer(args.model)
    reward_fn = REWARDS[args.task]
    train, test, kl_examples = load_new_task(args)
    if args.bench:
        return bench(accelerator, tokenizer, train, reward_fn, args)
    fingerprint = model_fingerprint(args.model)
    mine = [r for r in read_results(results_path) if r["task"] == args.task and r.get("fingerprint") == fingerprint]
    prior = base_samples = reference = None
    if accelerator.is_main_process:  # evaluation runs on the main process only
        prior = PriorTasks(args)
        base_model = load_model(args, accelerator.device)
        kl_key = hashlib.sha1(json.dumps([[ex["prompt"] for ex in kl_examples], args.kl_samples,
                                          args.max_new_tokens]).encode()).hexdigest()[:10]
        cache = out / f"kl_cache-{fingerprint}-{kl_key}.pt"
        base_samples = BaseSamples(base_model, tokenizer, kl_examples, args, cache)
        if not any(r["run_id"] == "base" for r in mine):
            append_result(results_path, {"run_id": "base", "task": args.task, "model": args.model,
                                         "fingerprint": fingerprint, "method": "base", "step": 0, "done": True,
                                         "kl_truncated": base_samples.truncated,
                                         **evaluate(base_model, tokenizer, test, reward_fn, base_samples, prior, args)})
        if base_samples.base_logprobs is None and not args.lora_rank:
            reference = base_model  # pi0's log-probs are recomputed at each evaluation (BaseSamples)
        del base_model
    for run_id, config in sweep(args):
        if any(r.get("done") for r in mine if r["run_id"] == run_id):
            continue
        done_steps = {r["step"] for r in mine if r["run_id"] == run_id}
        context = (accelerator, tokenizer, train, test, reward_fn, base_samples, prior, results_path, done_steps,
                   reference)
        train_run(run_id, config, context, args)


if __name__ == "__main__":
    main()
