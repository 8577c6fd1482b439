"""GRPO vs SFT on a chat LLM: RL's Razor (Shenfeld, Pari, Agrawal, 2025, https://arxiv.org/abs/2509.04259,
§4.1 and §5.1).

Fine-tune a causal LM on a new task with on-policy RL (GRPO, 1-0 REINFORCE) or offline training
(SFT, SimPO), and at fixed intervals record: new-task accuracy, the prior-task score (benchmarks
through lm-evaluation-harness), and the forward KL(pi0 || pi) on new-task prompts. The paper's
claims: at matched new-task accuracy RL forgets less, and forward KL predicts forgetting.

The update (rollouts, rewards, advantages, losses) is written out in this file (section 4); every loss
and divergence comes from kl.py. Everything around it comes from the field's libraries: transformers
(models, generation, chat templates), tokenizers, peft (LoRA), datasets (hub data), lm-eval
(prior tasks), accelerate (multi-GPU), math-verify (the math checker).

Three ways to run it (docs/llm_finetune.md has the details):
  Real path (GPUs, hub):  python llm_finetune.py --model Qwen/Qwen2.5-3B-Instruct --task math --method grpo
  CPU twin (any CPU):     python llm_finetune.py --build-twin            # tokenizer + small Qwen2, pretrained
                          python llm_finetune.py --method grpo sft       # sweeps on synthetic addition
                          python llm_finetune.py --plot                  # plots/llm_*.png
  Real shapes, no hub:    python llm_finetune.py --build-random qwen2.5-3b --model runs/llm/qwen-shape
                          (random weights with Qwen2.5-3B-Instruct's published architecture, for --bench)
Results: one JSON line per evaluation point in <out>/results.jsonl and one per optimizer step in
<out>/train_log.jsonl; rerunning a command resumes from each run's last checkpoint (finished runs are
skipped, finished points and steps are not written twice).
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
from dataclasses import dataclass
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, get_constant_schedule_with_warmup,
                          get_cosine_schedule_with_warmup)

import kl

TASKS = ("addition", "math", "science", "tools")
# The 2x2 study (§5.1, Fig. 4) and its controls: GRPO with a KL penalty to pi0 (Fig. 3's "RL + KL reg."),
# SFT on pi0's own correct samples (the LLM counterpart of ParityMNIST's oracle SFT, §3, Lemma A.1) and SFT
# on a trained RL policy's samples (Fig. 9).
METHODS = ("grpo", "grpo-kl", "reinforce", "sft", "self-sft", "sft-distill", "simpo")
ON_POLICY = ("grpo", "grpo-kl", "reinforce")
SFT_LOSS = ("sft", "self-sft", "sft-distill")  # cross-entropy on a fixed set of targets; they differ in the targets
# The paper's six prior benchmarks (§4.1). humaneval_instruct, not humaneval: the completion task scored
# under a chat template cuts the answer's code fence at its first "\ndef" and scores about 0.
PAPER_PRIOR_TASKS = "hellaswag,truthfulqa_mc2,mmlu,ifeval,winogrande,humaneval_instruct"
TWIN_PRIOR_TASKS = "twin_copy,twin_reverse,twin_sort"
# The one place where a default depends on the setup: the twin (--task addition) or the paper's real path
# (any other task; §4.1, Table 2). `--help` shows the defaults of the setup its --task selects, and names
# the other setup's value: `python llm_finetune.py --task math --help` lists the paper's.
SETUPS = {
    "twin": {"group_size": 8, "warmup_steps": 5, "max_new_tokens": 24, "eval_max_tokens": 24,
             "max_seq_len": 128, "micro_batch_tokens": 8192, "precision": "fp32", "gradient_checkpointing": False,
             "batch_size": [32], "rl_prompts": 1024, "sft_examples": 4096, "eval_every": 16,
             "prior_tasks": TWIN_PRIOR_TASKS, "prior_limit": 100},
    "paper": {"group_size": 64, "warmup_steps": 50, "max_new_tokens": 1024, "eval_max_tokens": 4096,
              "max_seq_len": 4096, "micro_batch_tokens": 4096, "precision": "mixed", "gradient_checkpointing": True,
              "batch_size": [16, 32, 64, 128], "rl_prompts": 4096, "sft_examples": 100_000, "eval_every": 25,
              "prior_tasks": PAPER_PRIOR_TASKS, "prior_limit": None},
}
# Learning-rate grids: the paper's Table 2 (RL; SFT, shared by SimPO and the SFT controls, §5.1); the twin is a
# 0.8M-parameter model whose useful learning rates span 3e-5 (slow) to 1e-3 (destructive in 100 steps).
LR_GRIDS = {
    "twin": {"grpo": [3e-5, 1e-4, 3e-4, 1e-3], "grpo-kl": [1e-4, 3e-4], "reinforce": [1e-4, 3e-4],
             "sft": [3e-5, 1e-4, 3e-4, 1e-3], "self-sft": [1e-4, 3e-4], "sft-distill": [1e-4, 3e-4],
             "simpo": [1e-4, 3e-4]},
    "paper": {"grpo": [1e-5, 2e-5, 3e-5, 4e-5, 5e-5], "grpo-kl": [1e-5, 3e-5, 5e-5], "reinforce": [1e-5, 3e-5, 5e-5],
              "sft": [1e-5, 3e-5, 5e-5, 7e-5, 9e-5], "self-sft": [1e-5, 3e-5, 5e-5],
              "sft-distill": [1e-5, 3e-5, 5e-5], "simpo": [1e-5, 3e-5, 5e-5]},
}
# The oldest versions whose APIs this file calls: lm-eval's TaskManager.load (0.4.12), transformers 5's
# `dtype=` and `logits_to_keep`, accelerate's free_memory.
VERSION_FLOORS = {"lm_eval": "0.4.12", "transformers": "5.0", "accelerate": "1.0", "math-verify": "0.7",
                  "peft": "0.17"}
# Architectures --build-random can build with random weights. "qwen2.5-3b" is Qwen2.5-3B-Instruct's
# published config.json; "tiny-151k" keeps its vocabulary and tied embeddings at a tiny width (the tests).
ARCHITECTURES = {
    "qwen2.5-3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6},
    "tiny-151k": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 4096},
}


def parse_args(argv=None):
    # --task picks the setup whose defaults the parser (and --help) shows: read it first.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="addition")
    task = pre.parse_known_args(argv)[0].task
    setup_name = "twin" if task == "addition" else "paper"
    setup, other_name = SETUPS[setup_name], "paper" if setup_name == "twin" else "twin"

    def other(name):
        """Help text naming the other setup's default."""
        return f"; {other_name}: {SETUPS[other_name][name]}"

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(**setup)
    g = p.add_argument_group(f"model and task (defaults shown: the {setup_name} setup, from --task {task})")
    g.add_argument("--model", default="runs/llm/twin", help="pi0: hub id or local directory (the twin by default)")
    g.add_argument("--task", default="addition", help=f"new task, one of {', '.join(TASKS)}; addition = the twin "
                   "setup, the others = the paper's setup")
    g.add_argument("--data-file", help="local JSON/JSONL with prompt/answer[/response/rejected] "
                   "fields instead of the hub source (schema in docs/llm_finetune.md)")
    g.add_argument("--num-test", type=int, default=200, help="held-out new-task prompts for accuracy")
    g.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning (the paper); >0 = peft LoRA")
    g.add_argument("--precision", choices=["fp32", "mixed", "bf16"], help="fp32; mixed = fp32 master weights, "
                   "bf16 autocast compute; bf16 = bf16 weights, which swallow small updates" + other("precision"))
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in the backward pass" + other("gradient_checkpointing"))
    g = p.add_argument_group("method and sweep (each listed value is swept)")
    g.add_argument("--method", nargs="+", default=["grpo"], help=f"any of {', '.join(METHODS)}")
    grids = "; ".join(f"{m} {' '.join(f'{lr:g}' for lr in lrs)}" for m, lrs in LR_GRIDS[setup_name].items())
    g.add_argument("--lr", nargs="+", type=float, help=f"learning rates for every method (default: each "
                   f"method's grid: {grids})")
    g.add_argument("--scheduler", nargs="+", default=["constant"], choices=["constant", "cosine"])
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps" + other("warmup_steps"))
    g.add_argument("--seed", nargs="+", type=int, default=[0])
    g.add_argument("--epochs", nargs="+", type=int, default=[1], help="passes over the RL prompts or the "
                   "SFT data (paper: 1 for RL, {1, 2} for SFT)")
    g.add_argument("--steps", type=int, help="optimizer steps per run, overriding --epochs")
    g = p.add_argument_group("RL (GRPO, GRPO+KL, 1-0 REINFORCE)")
    g.add_argument("--group-size", type=int, help="completions per prompt" + other("group_size"))
    g.add_argument("--prompts-per-step", type=int, default=8, help="prompts per generation round (paper 8)")
    g.add_argument("--mu", nargs="+", type=int, default=[1], help="updates per generation round; "
                   "mu > 1 uses the clipped ratio (paper: {1, 2})")
    g.add_argument("--clip-eps", type=float, default=0.2)
    g.add_argument("--scale-rewards", choices=["none", "group"], default="none",
                   help="GRPO advantage: none = r - mean (Dr. GRPO, the paper's loss type); group = divided "
                   "by the group's std (TRL's GRPOTrainer default)")
    g.add_argument("--kl-coef", nargs="+", type=float, default=[0.1], help="grpo-kl: coefficient of the KL "
                   "penalty to pi0 (the paper's RL + KL reg. uses 0.1, §3)")
    g.add_argument("--kl-direction", choices=["reverse", "forward"], default="reverse",
                   help="grpo-kl: reverse KL(pi || pi0) (the GRPO/RLHF regulariser) or forward KL(pi0 || pi) "
                   "(what the forgetting law measures), exact over the vocabulary at every sampled position")
    g.add_argument("--rl-prompts", type=int, help="training prompts for RL (one epoch)" + other("rl_prompts"))
    g.add_argument("--max-new-tokens", type=int, help="rollout length cap" + other("max_new_tokens"))
    g = p.add_argument_group("SFT, its controls, and SimPO")
    g.add_argument("--batch-size", nargs="+", type=int, help="examples per step" + other("batch_size"))
    g.add_argument("--sft-examples", type=int, help="training prompts/examples for the SFT methods and SimPO"
                   + other("sft_examples"))
    g.add_argument("--self-samples", type=int, default=8, help="self-sft: pi0 samples drawn per prompt; the "
                   "first correct one is the target (prompts with none are left out)")
    g.add_argument("--teacher", help="sft-distill: the trained RL policy whose samples (one per prompt, "
                   "temperature 1, unfiltered) are the targets: a model folder saved with --save-models")
    g.add_argument("--max-seq-len", type=int, help="prompt + target (SFT) or prompt + rollout (RL) tokens; "
                   "longer training examples are dropped and counted" + other("max_seq_len"))
    g = p.add_argument_group("memory")
    g.add_argument("--micro-batch-tokens", type=int, help="padded tokens per forward/backward pass; "
                   "sequences are grouped by length" + other("micro_batch_tokens"))
    g.add_argument("--generate-tokens", type=int, default=262_144, help="prompt + new tokens per generate() "
                   "call (the KV cache's size), at most 256 sequences")
    g.add_argument("--kl-cache-gb", type=float, default=4.0, help="keep pi0's log-probs on disk up to this "
                   "size; above it they are recomputed from a frozen pi0 at each evaluation")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-max-tokens", type=int, help="length cap of test answers and of pi0's KL samples"
                   + other("eval_max_tokens"))
    g.add_argument("--eval-every", type=int, help="optimizer steps between evaluation points" + other("eval_every"))
    g.add_argument("--eval-samples", type=int, default=4, help="temperature-1 samples per test prompt")
    g.add_argument("--kl-prompts", type=int, default=128, help="new-task prompts for forward KL")
    g.add_argument("--kl-samples", type=int, default=2, help="pi0 samples per KL prompt")
    g.add_argument("--prior-tasks", help="comma-separated lm-eval tasks" + other("prior_tasks"))
    g.add_argument("--prior-limit", type=float, help="lm-eval limit per task (None: all)" + other("prior_limit"))
    g.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: the task's own)")
    g.add_argument("--no-chat-template", action="store_true", help="score prior tasks without the chat template")
    g.add_argument("--allow-unsafe-code", action="store_true", help="consent to humaneval's code execution")
    g.add_argument("--lm-eval-batch-size", default="64", help="lm-eval batch size; 'auto' finds the largest on a GPU")
    g.add_argument("--eval-timeout-min", type=int, default=360, help="multi-GPU: how long the other processes "
                   "wait for the main process's evaluation (the collective timeout; NCCL's default is 10)")
    g = p.add_argument_group("what to do")
    g.add_argument("--measure", nargs="+", metavar="[NAME=]CHECKPOINT", help="measure fine-tuned checkpoints of "
                   "--model (hub ids, model folders, LoRA adapter folders) on --task and --prior-tasks: one row "
                   "each in <out>/measure.jsonl, then plots/llm_measure_*.png; NAME labels a series in the plots")
    g.add_argument("--save-models", choices=["none", "final", "every"], default="none", help="save_pretrained "
                   "each run's model (LoRA: its adapter) at its last / every evaluation point under <out>/models")
    g.add_argument("--build-twin", action="store_true", help="build and pretrain the twin at --model")
    g.add_argument("--twin-steps", type=int, default=2000, help="pretraining steps of the twin")
    g.add_argument("--build-random", choices=list(ARCHITECTURES), help="save a random-weight model of this "
                   "architecture (character tokenizer padded to its vocabulary) at --model and exit")
    g.add_argument("--plot", action="store_true", help="draw plots/llm_*.png from the results and exit")
    g.add_argument("--bench", action="store_true", help="time 2 GRPO and 2 SFT steps (peak GPU memory) and exit")
    g.add_argument("--no-checkpoint", action="store_true", help="do not save the trainable weights and "
                   "optimizer at each evaluation point (then an interrupted run restarts from step 0)")
    g.add_argument("--out", default="runs/llm", help="results, logs, checkpoints, caches, lm-eval tasks")
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
    if "sft-distill" in args.method and not args.measure and not args.teacher:
        p.error("sft-distill needs --teacher, a trained RL policy's folder (e.g. from --save-models final)")
    if args.teacher and not Path(args.teacher).is_dir():
        p.error(f"--teacher {args.teacher} is not a model folder")
    if isinstance(args.prior_tasks, str):
        args.prior_tasks = args.prior_tasks.split(",")
    args.lr_grid = {m: args.lr or LR_GRIDS[setup_name][m] for m in METHODS}
    return args


def check_versions():
    """One line naming the package to upgrade when an installed version is older than the file needs."""
    for package, floor in VERSION_FLOORS.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue  # optional here (peft only with --lora-rank); its import error names it
        have = tuple(int(x) for x in re.findall(r"\d+", installed)[:3])
        need = tuple(int(x) for x in floor.split("."))
        if have[:len(need)] < need:
            sys.exit(f"error: {package} {installed} is too old; llm_finetune.py needs {package}>={floor} "
                     "(pip install -r requirements-llm.txt)")


def autocast(args):
    """bf16 compute around fp32 master weights for --precision mixed; a no-op otherwise."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "mixed")


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
# Prior-task strings are 5-14 letters: exact match on long strings turns a small per-character change into
# a lost answer, so the prior score can move over a wide range (at 3-8 letters it stayed at 0.94-0.997).
PRIOR_LENGTHS = (5, 14)


def build_char_tokenizer(vocab_size=None):
    """One token per character plus the chat markers, wrapped as a transformers fast tokenizer.
    With vocab_size, filler entries <|x..|> pad the vocabulary to that size (a real LLM's width)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<|x{i}|>"] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<|pad|>",
                                   unk_token="<|unk|>", chat_template=CHAT_TEMPLATE, padding_side="left")


def build_twin_model(tokenizer, seed=0, architecture=None):
    """A 0.8M-parameter Qwen2 (same code path as Qwen2.5-3B: GQA, RoPE, SwiGLU, RMSNorm), or one of
    ARCHITECTURES with random weights."""
    shape = architecture or {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 384,
                             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 128}
    config = Qwen2Config(**shape, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def build_random_model(path, name, seed=0):
    """ARCHITECTURES[name] with random weights and the character tokenizer padded to its vocabulary,
    saved at `path`: the real model's memory and step time without the hub (its answers are noise, so
    every response runs to the length cap: the worst case)."""
    shape = ARCHITECTURES[name]
    tokenizer = build_char_tokenizer(shape["vocab_size"])
    model = build_twin_model(tokenizer, seed, shape)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def twin_example(task, rng):
    """One synthetic example: {"prompt", "answer"}. Prior tasks act on PRIOR_LENGTHS letters; the new task
    adds two 2-digit numbers."""
    if task == "addition":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        # The sum is written least-significant digit first (57+86 -> "341"), the order in which a small
        # transformer computes carries (Lee et al., 2023, "Teaching Arithmetic to Small Transformers"):
        # pi0 answers 0.94 of the test prompts right when greedy, against 0.16 with the usual order.
        return {"prompt": f"add: {a}+{b}", "answer": str(a + b)[::-1]}
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*PRIOR_LENGTHS)))
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
    off) in two styles, the bare sum "341" or the sum after the sum written out, "57+86=341". So pi0 has
    partial skill and several correct responses per prompt, like a base LLM."""
    total = example["answer"] if rng.random() < BASE_CORRECT_PROB else corrupt_number(example["answer"], rng)
    return total if rng.random() < 0.5 else f"{example['prompt'].split(': ')[1]}={total}"


def teacher_response(example, total=None):
    """The SFT target for the twin: the correct sum, written out with the operands swapped ("86+57=341"),
    a style pi0 never uses: correct labels far from pi0's distribution, as DeepSeek-R1 / GPT-4o chains
    are for Qwen (§6.1) and as ParityMNIST's "SFT dist. 1" (§3.4) is. With a wrong `total`: SimPO's
    rejected response."""
    a, b = example["prompt"].split(": ")[1].split("+")
    return f"{b}+{a}={total or example['answer']}"


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

# Public sources (the paper's §4.1 names the datasets, not the files; these are the ones we chose):
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
TOOLS_SUFFIX = ("\nCall the API to serve the request. Write the first call as one line 'Action: <function>' "
                "and one line 'Action Input: <JSON arguments>'.")


def math_reward(response, answer):
    """1 if the response's final \\boxed{} answer is mathematically equal to the ground truth (the chain
    is ignored, §4.1), by math-verify: the checker of the field's GRPO recipes (open-r1, TRL's examples).
    It reads `x=5`, `\\$5`, `5\\text{ cm}`, `\\sqrt3` as the values they name and `1,2` as a set."""
    from math_verify import LatexExtractionConfig, parse, verify
    gold = parse(f"\\boxed{{{answer}}}", extraction_config=[LatexExtractionConfig()])
    predicted = parse(response, extraction_config=[LatexExtractionConfig(boxed_match_priority=0,
                                                                         try_extract_without_anchor=False)],
                      extraction_mode="first_match")
    return float(bool(gold) and bool(predicted) and verify(gold, predicted))


SCIENCE_ANSWER = re.compile(r"(?i:answer)\s*(?:is\s*)?[:：]?\s*(?:\*\*|\(|\[|\\boxed\{|\s)*([A-J])(?![\w])")


def science_reward(response, answer):
    """1 if the last 'Answer: X' (also 'answer is X', bold, bracketed or boxed; X an upper-case option
    letter, so 'the answer is a mixture' names no option), or a bare letter, is the correct option."""
    found = SCIENCE_ANSWER.findall(response)
    if not found and re.fullmatch(r"\s*\(?([A-J])\)?\.?\s*", response):
        found = [response.strip(" ().")]
    return float(bool(found) and found[-1] == answer.strip().upper())


def parse_first_tool_call(text):
    """(function, arguments dict) of the first 'Action: f' / 'Action Input: {...}' pair, the JSON object
    read up to its own closing brace (it may span lines); None if there is none or it is not a JSON object."""
    match = re.search(r"Action:\s*([\w.\-]+)\s*\n\s*Action Input:\s*(?:```(?:json)?\s*)?", text)
    if not match:
        return None
    try:
        arguments, _ = json.JSONDecoder().raw_decode(text[match.end():])
    except json.JSONDecodeError:
        return None
    if not isinstance(arguments, dict):
        return None
    return match.group(1), {k: v for k, v in arguments.items() if v not in ("", None)}


def tools_reward(response, answer):
    """1 if the response's first API call (function and arguments) equals the reference's first call.

    ToolAlpaca's references are multi-step trajectories whose later calls depend on observations that a
    single turn never sees, so only the first call is reachable; the paper's §4.1 extracts calls by regex
    and matches them. Empty-string / null arguments count as absent."""
    reference = json.loads(answer)
    predicted = parse_first_tool_call(response)
    expected = (reference["name"], {k: v for k, v in reference["arguments"].items() if v not in ("", None)})
    return float(predicted == expected)


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
                     "(optional 'response', 'rejected'); see docs/llm_finetune.md")
    return rows


def math_example(row):
    """An OrzMath row: the first R1 trace with a correct final answer is the SFT target (the paper's
    recipe, §4.1), the first with a wrong one SimPO's negative (the paper used another model's)."""
    traces = row["responses"] or []
    graded = [(trace, math_reward(trace, row["answer"])) for trace in traces]
    return {"prompt": row["question"] + MATH_SUFFIX, "answer": str(row["answer"]),
            "response": next((t for t, ok in graded if ok), None),
            "rejected": next((t for t, ok in graded if not ok), None)}


def science_example(row, rng):
    """A SciKnowEval L3 row: the lettered options in the prompt; SFT target 'Answer: X' (the paper used
    GPT-4o reasoning annotations, not public); SimPO's negative 'Answer: Y' for a random wrong option."""
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    if not texts or len(labels) != len(texts) or row["answerKey"] not in labels:
        raise ValueError("no options, or the key is not one of them")
    options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
    wrong = rng.choice([label for label in labels if label != row["answerKey"]])
    return {"prompt": row["question"] + "\n" + options + SCIENCE_SUFFIX, "answer": row["answerKey"],
            "response": f"Answer: {row['answerKey']}", "rejected": f"Answer: {wrong}"}


def tool_example(api, instance):
    """A ToolAlpaca instance: API description + request; the reference and SFT target are the first call
    of its trajectory; SimPO's negative is that call with no arguments (or, if it has none, a call to
    another of the API's functions)."""
    name, raw_arguments = instance["intermediate_steps"][0][0][:2]
    arguments = json.loads(raw_arguments or "{}")
    if not isinstance(arguments, dict):
        raise ValueError("Action Input is not a JSON object")
    others = [f for f in (api.get("Function_Description") or {}) if f not in (name, "components")]
    if arguments:
        rejected = tool_call_text(name, {})
    else:
        rejected = tool_call_text(others[0], {}) if others else None
    return {"prompt": f"API: {api['Name']}\n{api['NLDocumentation']}\nRequest: {instance['input']}{TOOLS_SUFFIX}",
            "answer": json.dumps({"name": name, "arguments": arguments}), "response": tool_call_text(name, arguments),
            "rejected": rejected}


def tool_call_text(name, arguments):
    return f"Action: {name}\nAction Input: {json.dumps(arguments)}"


def hub_rows(task):
    """The task's raw public rows (the only function that touches the network or the datasets cache)."""
    import datasets
    if task == "math":
        return list(datasets.load_dataset(HUB_SOURCES["math"], split="train"))
    if task == "science":
        rows = datasets.load_dataset(HUB_SOURCES["science"], "Chemistry", split="test")
        return [r for r in rows if (r.get("details") or {}).get("level") == "L3"]
    # ToolAlpaca's JSON is read with json, not datasets' Arrow schema inference (which fails on its
    # mixed-type fields); cached_path downloads once into the datasets cache and works offline after.
    from datasets.utils.file_utils import cached_path
    apis = json.loads(Path(cached_path(HUB_SOURCES["tools"])).read_text())
    return [(api, instance) for api in apis for instance in api.get("Instances") or []]


def examples_from_rows(task, rows):
    """Prompt/answer/response/rejected examples from raw rows; a malformed row is skipped and counted."""
    rng = random.Random(0)
    examples, skipped = [], 0
    for row in rows:
        try:
            if task == "math":
                examples.append(math_example(row))
            elif task == "science":
                examples.append(science_example(row, rng))
            else:
                examples.append(tool_example(*row))
        except (KeyError, IndexError, TypeError, ValueError):  # JSONDecodeError is a ValueError
            skipped += 1
    return examples, skipped


def load_hub_examples(task):
    """The task's public source as examples; one line of advice when the data is not reachable."""
    try:
        rows = hub_rows(task)
    except (ConnectionError, FileNotFoundError) as error:
        sys.exit(f"error: cannot load the {task} dataset ({type(error).__name__}); on a connected machine run "
                 f"once without HF_DATASETS_OFFLINE to cache {HUB_SOURCES[task]}, or pass --data-file")
    except Exception as error:  # noqa: BLE001 (datasets raises many types; say which one it was)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        sys.exit(f"error: cannot load the {task} dataset {HUB_SOURCES[task]}: {type(error).__name__}: "
                 f"{first_line[:300]} (offline: run once on a connected machine; or pass --data-file)")
    examples, skipped = examples_from_rows(task, rows)
    print(f"{task}: {len(examples)} examples from {HUB_SOURCES[task]}, {skipped} malformed rows skipped")
    return examples, skipped


def load_new_task(args):
    """(train, test, kl_prompts, skipped rows) for the chosen task."""
    rng = random.Random(1234)
    if args.task == "addition" and not args.data_file:
        train, test, kl_prompts = twin_new_task(max(args.rl_prompts, args.sft_examples), args.num_test,
                                                args.kl_prompts, rng)
        return train, test, kl_prompts, 0
    if args.data_file:
        rows, skipped = read_local_examples(args.data_file), 0
    else:
        rows, skipped = load_hub_examples(args.task)
    rng.shuffle(rows)
    held_out = args.num_test + args.kl_prompts
    if len(rows) <= held_out:
        sys.exit(f"error: {len(rows)} examples are too few for --num-test {args.num_test} "
                 f"+ --kl-prompts {args.kl_prompts}")
    return rows[held_out:], rows[:args.num_test], rows[args.num_test:held_out], skipped


# --------------------------------------------------------------------------------------------------
# 3. Sequences: chat prompts, packing, teacher-forced logits, rollouts with a KV cache
# --------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer, text):
    """Token ids of a one-turn chat prompt ending with the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def encode_response(tokenizer, text):
    """Token ids of a target response, EOS included."""
    return tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


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


def micro_batches(prompts, responses, max_tokens):
    """Index lists whose packed batches hold at most max_tokens padded tokens each (one sequence
    alone may exceed it). Sequences are grouped by length, longest first, so padding stays small;
    inside a group the original order is kept."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]), reverse=True)
    groups, current, widths = [], [], (0, 0)
    for i in order:
        grown = (max(widths[0], len(prompts[i])), max(widths[1], len(responses[i]), 1))
        if current and (len(current) + 1) * sum(grown) > max_tokens:
            groups.append(sorted(current))
            current, grown = [], (len(prompts[i]), max(len(responses[i]), 1))
        current.append(i)
        widths = grown
    groups.append(sorted(current))
    return groups


def forward_logits(model, batch):
    """Logits predicting each response token, [B, T_response, V], computed only at those positions
    (logits_to_keep: the prompt's positions never reach the vocabulary projection). Position ids
    follow the attention mask, as in generate(), so left padding does not shift RoPE."""
    device = next(model.parameters()).device
    response_len = batch["response_ids"].shape[1]
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), use_cache=False, logits_to_keep=response_len + 1)
    return out.logits[:, :-1]


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
def sample(model, tokenizer, prompts, num_samples, max_new_tokens, greedy=False, max_tokens=262_144):
    """Responses (token id lists) from the raw policy: temperature 1, no top-k / top-p / repetition
    penalty, whatever the model's generation_config says (Qwen2.5-Instruct ships top_p 0.8, top_k 20,
    T 0.7, repetition penalty 1.05: those would not sample pi). KV-cached generate(), at most 256
    sequences and max_tokens prompt + new tokens (the KV cache's size) per call.
    Returns (responses in prompt-major order, fraction truncated at max_new_tokens)."""
    flat = [p for p in prompts for _ in range(num_samples)]
    rows = max(1, min(256, max_tokens // (max(map(len, prompts)) + max_new_tokens)))
    device = next(model.parameters()).device
    responses, truncated = [], 0
    for start in range(0, len(flat), rows):
        chunk = flat[start:start + rows]
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
# 4. The updates (the lesson): GRPO (with or without a KL penalty) / 1-0 REINFORCE on the policy's own
#    samples; SFT on fixed targets (a teacher's, pi0's own correct samples, an RL policy's samples); SimPO
# --------------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    """What every run of a sweep shares: the process group, pi0's tokenizer, the settings, the new task's
    checker and data, and the evaluation (pi0's KL samples, the prior tasks)."""
    accelerator: object
    tokenizer: object
    args: argparse.Namespace
    reward_fn: object
    data: dict = None
    test: list = None
    base_samples: object = None
    prior: object = None


@dataclass
class Run:
    """One fine-tuning run: the policy, its optimizer and schedule, and its method's settings."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    method: str
    mu: int = 1
    kl_coef: float = 0.0
    reference: torch.nn.Module = None  # the frozen pi0 of grpo-kl's penalty


def rl_step(exp, run, examples):
    """One generation round of GRPO (Dr. GRPO), GRPO + KL or 1-0 REINFORCE, then mu optimizer steps on it.

    The paper's Table 2: group of G completions per prompt, binary reward, no KL penalty, loss type
    Dr. GRPO (Liu et al., 2025): token terms summed and divided by a constant (batch x max_new_tokens),
    advantage r - mean_G(r) (--scale-rewards group divides by the group's std, as TRL does by default).
    1-0 REINFORCE (§5.1): advantage = reward. grpo-kl adds kl_coef x KL(pi || pi0) (--kl-direction reverse;
    forward: KL(pi0 || pi)), exact over the vocabulary at every sampled position and averaged over the
    round's response tokens (§3's "RL + KL reg."). With mu > 1 the later steps reuse the samples through
    the clipped ratio to the sampling policy.
    """
    args, tokenizer, model = exp.args, exp.tokenizer, run.model
    model.eval()
    started = time.perf_counter()
    prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
    with autocast(args):
        responses, truncated = sample(exp.accelerator.unwrap_model(model), tokenizer, prompts, args.group_size,
                                      args.max_new_tokens, max_tokens=args.generate_tokens)
    rollout_s = time.perf_counter() - started
    rewards = torch.tensor([exp.reward_fn(decode(tokenizer, r), examples[i // args.group_size]["answer"])
                            for i, r in enumerate(responses)]).view(len(prompts), args.group_size)
    if run.method == "reinforce":
        advantages = kl.reinforce_advantages(rewards).flatten()
    else:
        advantages = kl.group_advantages(rewards, normalize_std=args.scale_rewards == "group").flatten()
    flat_prompts = [p for p in prompts for _ in range(args.group_size)]
    groups = micro_batches(flat_prompts, responses, args.micro_batch_tokens)
    batches = [pack(tokenizer, [flat_prompts[i] for i in group], [responses[i] for i in group]) for group in groups]
    response_tokens = max(1, sum(map(len, responses)))
    old_logprobs = None
    if run.mu > 1:  # log-probs of the policy that sampled, for the clipped ratio of the later iterations
        with torch.no_grad(), autocast(args):
            old_logprobs = [response_logprobs(model, batch) for batch in batches]
    model.train()
    clipped, kl_to_sampler, penalty_sum = [], [], 0.0
    for iteration in range(run.mu):
        for k, (group, batch) in enumerate(zip(groups, batches)):
            with autocast(args):
                logits = forward_logits(model, batch)
            logprobs = kl.token_logprobs(logits, batch["response_ids"].to(logits.device))
            mask = batch["response_mask"].to(logprobs.device)
            old = None if old_logprobs is None else old_logprobs[k]
            loss = kl.policy_gradient_loss(logprobs, advantages[group].to(logprobs.device), mask, old_logprobs=old,
                                           clip_eps=args.clip_eps, aggregation="constant",
                                           max_tokens=args.max_new_tokens)
            loss = loss * len(group) / len(responses)  # micro-batches sum to the batch loss
            if run.method == "grpo-kl":
                with torch.no_grad(), autocast(args):
                    base_logits = forward_logits(run.reference, batch)
                penalty = kl.kl_penalty(base_logits, logits, mask, direction=args.kl_direction)
                loss = loss + run.kl_coef * penalty * mask.sum() / response_tokens
                penalty_sum += penalty.item() * mask.sum().item() / response_tokens / run.mu
            exp.accelerator.backward(loss)
            if iteration > 0:  # how far the policy moved from the sampler, on its own tokens
                log_ratio = (logprobs - old).detach()
                clipped.append(((log_ratio.exp() - 1).abs() > args.clip_eps)[mask.bool()].float().mean().item())
                kl_to_sampler.append(kl.kl_estimators(old, logprobs.detach(), mask)["k3"].mean().item())
        grad_norm = optimizer_step(exp.accelerator, run)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.float32)
    return {"reward": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
            "zero_variance_groups": (rewards.std(-1, correction=0) == 0).float().mean().item(),
            "response_len": lengths.mean().item(), "truncated": truncated, "grad_norm": grad_norm,
            "kl_penalty": penalty_sum if run.method == "grpo-kl" else None,
            "clip_fraction": float(np.mean(clipped)) if clipped else None,
            "kl_to_sampler_k3": float(np.mean(kl_to_sampler)) if kl_to_sampler else None,
            "rollout_s": rollout_s, "update_s": time.perf_counter() - started - rollout_s,
            "generated_tokens": sum(map(len, responses)),
            "update_tokens": run.mu * sum(int(b["attention_mask"].sum()) for b in batches)}


def offline_step(exp, run, examples):
    """One optimizer step of SFT (cross-entropy on the target response, prompt masked, averaged over the
    step's response tokens: a teacher's text, or the token ids a policy sampled for self-sft / sft-distill)
    or SimPO (chosen = reference response, rejected = the example's negative; sequence log-probs, margin 1,
    averaged over examples)."""
    tokenizer, model = exp.tokenizer, run.model
    model.train()
    prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
    chosen_ids = [ex["response_ids"] if "response_ids" in ex else encode_response(tokenizer, ex["response"])
                  for ex in examples]
    response_tokens = sum(map(len, chosen_ids))
    started, tokens, total_loss = time.perf_counter(), 0, 0.0
    for group in micro_batches(prompts, chosen_ids, exp.args.micro_batch_tokens):
        chosen = pack(tokenizer, [prompts[i] for i in group], [chosen_ids[i] for i in group])
        with autocast(exp.args):
            if run.method in SFT_LOSS:
                loss = sft_batch_loss(model, chosen)
                weight = int(chosen["response_mask"].sum()) / response_tokens
            else:
                rejected = pack(tokenizer, [prompts[i] for i in group],
                                [encode_response(tokenizer, examples[i]["rejected"]) for i in group])
                loss = kl.simpo_loss(sequence_logprob(model, chosen), sequence_logprob(model, rejected))
                weight = len(group) / len(examples)
                tokens += int(rejected["attention_mask"].sum())
        exp.accelerator.backward(loss * weight)
        total_loss += loss.item() * weight
        tokens += int(chosen["attention_mask"].sum())
    grad_norm = optimizer_step(exp.accelerator, run)
    return {"loss": total_loss, "grad_norm": grad_norm, "update_tokens": tokens,
            "update_s": time.perf_counter() - started}


def sampled_targets(model, tokenizer, examples, args, samples_per_prompt, reward_fn=None, seed=0):
    """SFT targets sampled from a policy at temperature 1, kept as the sampled token ids (EOS included when
    the sample ended), so the SFT loss is computed on exactly those samples.

    self-sft (reward_fn given): `samples_per_prompt` samples of pi0 per prompt; the first correct one is the
    target, a draw from pi0 restricted to its correct responses, pi0(y | x, correct): the LLM counterpart of
    ParityMNIST's oracle (§3, Lemma A.1; kl.restrict_to_correct). Prompts with no correct sample are left out.
    sft-distill (reward_fn None): one sample of the teacher per prompt, kept whatever its reward (Fig. 9:
    labels sampled from an RL-trained policy)."""
    prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
    with torch.random.fork_rng(), autocast(args):
        torch.manual_seed(seed)
        responses, _ = sample(model, tokenizer, prompts, samples_per_prompt, args.max_new_tokens,
                              max_tokens=args.generate_tokens)
    targets = []
    for i, ex in enumerate(examples):
        drawn = responses[i * samples_per_prompt:(i + 1) * samples_per_prompt]
        if reward_fn is None:
            kept = drawn[0]
        else:
            kept = next((r for r in drawn if reward_fn(decode(tokenizer, r), ex["answer"])), None)
        if kept is not None:
            targets.append({"prompt": ex["prompt"], "answer": ex["answer"], "response_ids": kept})
    return targets


def sequence_logprob(model, batch):
    """log pi(y | x) of each whole response: the sum of its token log-probs, [B]."""
    logprobs = response_logprobs(model, batch)
    return (logprobs * batch["response_mask"].to(logprobs.device)).sum(-1)


def sft_batch_loss(model, batch):
    """Cross-entropy on the response tokens only: the prompt's positions never enter (kl.sft_loss)."""
    logits = forward_logits(model, batch)
    return kl.sft_loss(logits, batch["response_ids"].to(logits.device), batch["response_mask"].to(logits.device))


def optimizer_step(accelerator, run):
    """AdamW step with max grad norm 1 (the paper's Table 2), then the LR schedule. Returns the
    gradient norm before clipping."""
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


# --------------------------------------------------------------------------------------------------
# 5. Evaluation: new-task accuracy, forward KL on new-task prompts, prior tasks through lm-eval
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def new_task_accuracy(model, tokenizer, test, reward_fn, args, seed):
    """Mean reward of temperature-1 samples (the policy itself; the RL objective) and of greedy
    decoding, on held-out prompts, up to --eval-max-tokens (longer than rollouts: a cut answer scores 0,
    and SFT on long traces writes long answers). Sampling runs on its own seed."""
    model.eval()
    prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in test]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sampled, truncated = sample(model, tokenizer, prompts, args.eval_samples, args.eval_max_tokens,
                                    max_tokens=args.generate_tokens)
    greedy, greedy_truncated = sample(model, tokenizer, prompts, 1, args.eval_max_tokens, greedy=True,
                                      max_tokens=args.generate_tokens)

    def score(responses, per_prompt):
        return float(np.mean([reward_fn(decode(tokenizer, r), test[i // per_prompt]["answer"])
                              for i, r in enumerate(responses)]))

    return {"new_task_acc": score(sampled, args.eval_samples), "new_task_acc_greedy": score(greedy, 1),
            "truncated": truncated, "truncated_greedy": greedy_truncated}


class BaseSamples:
    """pi0's responses on the KL prompts, sampled once at temperature 1 with no truncation of the
    distribution, and pi0's log-probs over the whole vocabulary at every response position.

    The paper does not say how its LLM KL was computed; this is our estimator (docs/llm_finetune.md).
    pi0's log-probs are cached on disk when they fit in --kl-cache-gb (a 152k-token vocabulary makes
    them ~0.6 MB per response token, so only short responses fit); otherwise they are recomputed at
    each evaluation from a frozen pi0 kept on the CPU between evaluations (or, with LoRA, from the same
    model with its adapter disabled): same numbers, one more forward.
    """

    def __init__(self, model, tokenizer, examples, args, path, seed=0):
        self.tokenizer, self.args, self.reference = tokenizer, args, None
        if path.exists():
            cached = torch.load(path)
            self.prompts, self.responses = cached["prompts"], cached["responses"]
            self.truncated, self.base_logprobs = cached["truncated"], cached["logprobs"]
        else:
            prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in examples]
            with torch.random.fork_rng(), autocast(args):
                torch.manual_seed(seed)
                self.responses, self.truncated = sample(model, tokenizer, prompts, args.kl_samples,
                                                        args.eval_max_tokens, max_tokens=args.generate_tokens)
            self.prompts = [p for p in prompts for _ in range(args.kl_samples)]
            self.base_logprobs = None
            size_gb = sum(map(len, self.responses)) * model.config.vocab_size * 4 / 1e9
            if size_gb <= args.kl_cache_gb:
                self.base_logprobs = [None] * len(self.responses)
                for group, batch in self.batches():
                    with autocast(args):
                        rows = self.position_logprobs(model, batch).cpu()
                    for i, part in zip(group, rows.split([len(self.responses[i]) for i in group])):
                        self.base_logprobs[i] = part
            torch.save({"prompts": self.prompts, "responses": self.responses, "truncated": self.truncated,
                        "logprobs": self.base_logprobs}, path)
        if self.base_logprobs is None and not hasattr(model, "disable_adapter"):
            self.reference = model

    def batches(self):
        for group in micro_batches(self.prompts, self.responses, self.args.micro_batch_tokens):
            yield group, pack(self.tokenizer, [self.prompts[i] for i in group], [self.responses[i] for i in group])

    @staticmethod
    @torch.no_grad()
    def position_logprobs(model, batch):
        """log pi(. | x, y_<t) in float32 at the batch's real response positions only, [N, V]: the one
        log-softmax per model that the exact KL, k1 and k3 share."""
        model.eval()
        logits = forward_logits(model, batch)
        return torch.log_softmax(logits[batch["response_mask"].bool().to(logits.device)].float(), -1)

    @torch.no_grad()
    def kl_estimates(self, model, chunk=1024):
        """Forward KL(pi0 || pi) per sequence (sum over tokens, primary) and per token, exact over the
        vocabulary (kl.forward_kl, `chunk` positions at a time), plus the k1 and k3 Monte-Carlo estimates
        from the sampled tokens (kl.kl_estimators) as a check: all are unbiased for the same quantity."""
        device = next(model.parameters()).device
        offload = self.reference is not None and self.reference is not model
        if offload:
            self.reference.to(device)
        totals = {"kl_seq": [], "kl_token": [], "k1_seq": [], "k3_seq": []}
        for group, batch in self.batches():
            logp = self.position_logprobs(model, batch)
            if self.base_logprobs is not None:
                base = torch.cat([self.base_logprobs[i] for i in group]).to(device)
            elif self.reference is not None:
                base = self.position_logprobs(self.reference, batch)
            else:
                with model.disable_adapter():
                    base = self.position_logprobs(model, batch)
            mask = batch["response_mask"].bool().to(device)
            tokens = batch["response_ids"].to(device)[mask].unsqueeze(-1)
            exact = torch.zeros(len(logp), device=device)
            for start in range(0, len(logp), chunk):  # bounds the float32 copies inside kl.forward_kl
                exact[start:start + chunk] = kl.forward_kl(base[start:start + chunk], logp[start:start + chunk])
            per_position = {name: torch.zeros(mask.shape, device=device) for name in ("exact", "base", "policy")}
            per_position["exact"][mask] = exact
            per_position["base"][mask] = base.gather(-1, tokens).squeeze(-1)
            per_position["policy"][mask] = logp.gather(-1, tokens).squeeze(-1)
            estimates = kl.kl_estimators(per_position["base"], per_position["policy"], mask)
            sequence_kl = per_position["exact"].sum(-1)
            totals["kl_seq"] += sequence_kl.tolist()
            totals["kl_token"] += (sequence_kl / mask.sum(-1).clamp(min=1)).tolist()
            totals["k1_seq"] += estimates["k1"].tolist()
            totals["k3_seq"] += estimates["k3"].tolist()
        if offload:
            self.reference.to("cpu")
        return {name: float(np.mean(values)) for name, values in totals.items()}


# The score each benchmark contributes to the prior-task average (the paper's §4.1 names the benchmarks,
# not their metrics).
PRIMARY_METRIC = {"hellaswag": "acc_norm,none", "truthfulqa_mc2": "acc,none", "mmlu": "acc,none",
                  "ifeval": "prompt_level_strict_acc,none", "winogrande": "acc,none",
                  "humaneval": "pass@1,create_test", "humaneval_instruct": "pass@1,create_test"}


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
        if any(task.startswith("humaneval") for task in args.prior_tasks):
            if not args.allow_unsafe_code:
                sys.exit("error: humaneval executes model-written code: pass --allow-unsafe-code to consent, "
                         "or drop it from --prior-tasks")
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"
        try:  # fetch (or find in the cache) every task's data now, not after an hour of training
            self.manager.load(args.prior_tasks)
        except (ConnectionError, FileNotFoundError) as error:
            sys.exit(f"error: lm-eval could not load {','.join(args.prior_tasks)} ({type(error).__name__}); "
                     f"on a connected machine run `lm-eval run --model hf --model_args pretrained={args.model} "
                     f"--tasks {','.join(args.prior_tasks)} --limit 1` once to cache their data, then rerun")
        except Exception as error:  # noqa: BLE001 (anything else is not missing data: say what it is)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            sys.exit(f"error: lm-eval could not load {','.join(args.prior_tasks)}: {type(error).__name__}: "
                     f"{first_line[:300]}")

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
    """pi0 from --model: fp32 weights (also under --precision mixed) or bf16, optional gradient
    checkpointing and LoRA (peft)."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    except OSError:
        sys.exit(f"error: cannot load model weights from {args.model!r}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.to(device)


def load_finetuned(args, location, device):
    """A fine-tuned checkpoint of pi0 for --measure and --teacher: a LoRA adapter folder (adapter_config.json,
    as peft and TRL save it) is applied to --model; anything else (a model folder, e.g. a TRL checkpoint-N
    folder, or a hub id) is loaded whole."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    try:
        if (Path(location) / "adapter_config.json").is_file():
            from peft import PeftModel
            base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
            model = PeftModel.from_pretrained(base, location)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot load checkpoint {location!r}: {type(error).__name__}: "
                 f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}")
    return model.to(device).eval()


def sweep(args):
    """Every configuration to run: the product of the listed values that apply to each method."""
    for method in args.method:
        axes = {"lr": args.lr_grid[method], "scheduler": args.scheduler, "seed": args.seed}
        if method in ON_POLICY:
            axes["mu"] = args.mu
        if method == "grpo-kl":
            axes["kl_coef"] = args.kl_coef
        if method not in ON_POLICY:
            axes["batch_size"] = args.batch_size
        axes["epochs"] = args.epochs
        for values in itertools.product(*axes.values()):
            config = dict(zip(axes, values))
            yield "-".join([method] + [f"{k}{v}" for k, v in config.items()]), {"method": method, **config}


def model_fingerprint(name):
    """Short hash of a model's name and, for a local directory, its weight files' sizes and times:
    results and caches of a rebuilt twin never mix with the old ones."""
    files = sorted(Path(name).glob("*.safetensors")) if Path(name).is_dir() else []
    stamp = [str(name)] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:10]


def run_settings(args):
    """The settings stored with every result row (everything that shapes a number)."""
    skip = ("build_twin", "twin_steps", "build_random", "plot", "bench", "out", "threads", "lr_grid", "measure")
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path, record):
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate(exp, model):
    """One evaluation point. Every random state is restored afterwards (lm-eval reseeds torch, numpy
    and random), so training draws the same numbers whether a point is evaluated or skipped on resume."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(), autocast(exp.args):
        point = new_task_accuracy(model, exp.tokenizer, exp.test, exp.reward_fn, exp.args, seed=10_000)
        point.update(exp.base_samples.kl_estimates(model))
        point.update(exp.prior.scores(model, exp.tokenizer))
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    point["kl_truncated"] = exp.base_samples.truncated
    return point


def training_data(train, tokenizer, args):
    """RL prompts and SFT/SimPO examples within --max-seq-len, and how many were dropped for length
    (prompt + max_new_tokens for RL, self-sft and sft-distill; prompt + target, and prompt + rejected, for
    SFT/SimPO)."""
    rl, offline, dropped = [], [], {"rl": 0, "offline": 0}
    for ex in train[:max(args.rl_prompts, args.sft_examples) * 2]:
        prompt_len = len(chat_prompt(tokenizer, ex["prompt"]))
        if prompt_len + args.max_new_tokens <= args.max_seq_len:
            rl.append(ex)
        else:
            dropped["rl"] += 1
        if ex.get("response"):
            longest = max(len(encode_response(tokenizer, ex[k])) for k in ("response", "rejected") if ex.get(k))
            if prompt_len + longest <= args.max_seq_len:
                offline.append(ex)
            else:
                dropped["offline"] += 1
    return rl, offline, dropped


def policy_targets(exp, method, base_model, out):
    """self-sft's or sft-distill's targets (sampled_targets) on the first --sft-examples RL prompts, drawn
    once by the main process and cached in <out>, so every learning rate and seed trains on the same ones."""
    args = exp.args
    source = args.model if method == "self-sft" else args.teacher
    key = [model_fingerprint(source), args.sft_examples, args.self_samples, args.max_new_tokens, args.precision]
    path = out / f"targets-{method}-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]}.pt"
    if exp.accelerator.is_main_process and not path.exists():
        examples = exp.data["rl"][:args.sft_examples]
        if method == "self-sft":
            targets = sampled_targets(base_model, exp.tokenizer, examples, args, args.self_samples, exp.reward_fn)
        else:
            teacher = load_finetuned(args, args.teacher, exp.accelerator.device)
            targets = sampled_targets(teacher, exp.tokenizer, examples, args, 1)
            del teacher
        torch.save(targets, path)
        correct = sum(exp.reward_fn(decode(exp.tokenizer, t["response_ids"]), t["answer"]) for t in targets)
        print(f"{method}: {len(targets)} targets from {len(examples)} prompts, {correct:.0f} of them correct")
    exp.accelerator.wait_for_everyone()
    return torch.load(path)


def checkpoint_path(args, run_id):
    return Path(args.out) / "checkpoints" / f"{args.task}-{model_fingerprint(args.model)}-{run_id}.pt"


def save_checkpoint(path, run, step, progress):
    """The trainable weights (the adapter only, for LoRA), optimizer, schedule and RNG at `step`; written
    to a temporary file and renamed, so an interruption never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    trainable = {name: p.detach().cpu() for name, p in run.model.named_parameters() if p.requires_grad}
    state = {"step": step, "model": trainable, "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "progress": progress,
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def load_checkpoint(path, run):
    """Restore what save_checkpoint wrote; returns (step, progress)."""
    state = torch.load(path, weights_only=False)
    missing = set(state["model"]) - {name for name, _ in run.model.named_parameters()}
    if missing:
        sys.exit(f"error: checkpoint {path} does not fit this model ({len(missing)} unknown tensors); delete it")
    run.model.load_state_dict(state["model"], strict=False)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["progress"]


def train_run(exp, run_id, config):
    """Fine-tune a fresh copy of pi0 with one configuration, evaluating every --eval-every steps and
    saving a checkpoint there; an interrupted run resumes from its last checkpoint (same numbers)."""
    args, accelerator, data = exp.args, exp.accelerator, exp.data
    method, out = config["method"], Path(args.out)
    results_path, log_path, ckpt = out / "results.jsonl", out / "train_log.jsonl", checkpoint_path(args, run_id)
    fingerprint = model_fingerprint(args.model)
    mine = [r for r in read_jsonl(results_path) if r["run_id"] == run_id and r.get("fingerprint") == fingerprint
            and r["task"] == args.task]
    done_steps = {r["step"] for r in mine}
    logged_steps = {r["step"] for r in read_jsonl(log_path) if r["run_id"] == run_id
                    and r.get("fingerprint") == fingerprint and r["task"] == args.task}
    random.seed(config["seed"])
    torch.manual_seed(config["seed"] + accelerator.process_index)
    model = load_model(args, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"], weight_decay=0.0)
    if method in ON_POLICY:
        per_step = args.prompts_per_step * accelerator.num_processes
        examples = random.sample(data["rl"], min(args.rl_prompts, len(data["rl"])))
    else:
        if method in ("self-sft", "sft-distill"):
            examples = data[method]
            if not examples:
                sys.exit(f"error: self-sft: none of pi0's --self-samples {args.self_samples} samples was correct "
                         "on any prompt; raise --self-samples")
        else:
            examples = [ex for ex in data["offline"] if method == "sft" or ex.get("rejected")][:args.sft_examples]
        if not examples:
            sys.exit(f"error: {method} needs a 'response'{' and a rejected' if method == 'simpo' else ''} field "
                     f"within --max-seq-len {args.max_seq_len} in the training data (pass --data-file with them)")
        per_step = config["batch_size"] * accelerator.num_processes
    total_steps = args.steps or config["epochs"] * len(examples) // per_step
    if config["scheduler"] == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, args.warmup_steps)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)
    run = Run(model, optimizer, scheduler, method, mu=config.get("mu", 1), kl_coef=config.get("kl_coef", 0.0))
    if method == "grpo-kl":
        run.reference = load_model(args, accelerator.device).requires_grad_(False).eval()
    resumed, progress = 0, {"rollout": 0, "update": 0, "wall_s": 0.0}
    if ckpt.exists() and not args.no_checkpoint:
        resumed, progress = load_checkpoint(ckpt, run)
    # The scheduler stays unprepared: accelerate would step it once per process, and our steps are global.
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    del model, optimizer
    order = random.Random(config["seed"])
    started = time.time() - progress["wall_s"]
    for step in tqdm(range(1, total_steps + 1), desc=run_id, mininterval=10, disable=not accelerator.is_main_process):
        if method not in ON_POLICY:
            steps_per_epoch = len(examples) // per_step
            if (step - 1) % steps_per_epoch == 0:  # a new epoch: reshuffle (replayed when resuming)
                order.shuffle(examples)
        if step <= resumed:
            continue
        # Each process takes its own slice of the step's prompts; a group never spans processes.
        if method in ON_POLICY:
            start = ((step - 1) * per_step + accelerator.process_index * args.prompts_per_step) % len(examples)
            info = rl_step(exp, run, [examples[(start + i) % len(examples)] for i in range(args.prompts_per_step)])
            progress["rollout"] += info["generated_tokens"]
        else:
            start = (step - 1) % steps_per_epoch * per_step + accelerator.process_index * config["batch_size"]
            info = offline_step(exp, run, examples[start:start + config["batch_size"]])
        progress["update"] += info["update_tokens"]
        if accelerator.is_main_process and step not in logged_steps:
            append_jsonl(log_path, {"run_id": run_id, "task": args.task, "fingerprint": fingerprint, "step": step,
                                    "lr": run.scheduler.get_last_lr()[0], **info})
        if step % args.eval_every == 0 or step == total_steps:
            progress["wall_s"] = round(time.time() - started, 1)
            policy = accelerator.unwrap_model(run.model)
            if accelerator.is_main_process and step not in done_steps:
                append_jsonl(results_path, {
                    "run_id": run_id, "task": args.task, "model": args.model, "fingerprint": fingerprint, **config,
                    "step": step, "total_steps": total_steps, "done": step == total_steps, **evaluate(exp, policy),
                    "train_reward": info.get("reward"), "tokens_generated": progress["rollout"],
                    "tokens_updated": progress["update"], "wall_s": progress["wall_s"],
                    "dropped_for_length": data["dropped"], "skipped_rows": data["skipped"],
                    "settings": run_settings(args)})
            saved_model = out / "models" / f"{args.task}-{fingerprint}-{run_id}" / f"step-{step}"
            if accelerator.is_main_process and (args.save_models == "every" or
                                                args.save_models == "final" and step == total_steps):
                policy.save_pretrained(saved_model)  # a LoRA model saves its adapter folder
                exp.tokenizer.save_pretrained(saved_model)
            if accelerator.is_main_process and not args.no_checkpoint and step < total_steps:
                save_checkpoint(ckpt, run, step, progress)
            accelerator.wait_for_everyone()
    if accelerator.is_main_process and ckpt.exists():
        ckpt.unlink()  # the run is done: its rows are the record
    # The Accelerator keeps every model and optimizer it prepared: release them before the next run.
    accelerator.free_memory()


def measure(exp, checkpoints, base_row):
    """--measure: evaluate each checkpoint exactly as training evaluates its own points (same test prompts
    and samples, pi0's same KL samples, the same prior tasks) and append one row per checkpoint to
    <out>/measure.jsonl; a checkpoint already measured against this pi0 is skipped. A checkpoint's run is
    its parent folder (TRL's output_dir/checkpoint-N, or <out>/models/<run>/step-N), the unit the law's
    bootstrap resamples."""
    args, path = exp.args, Path(exp.args.out) / "measure.jsonl"
    fingerprint = model_fingerprint(args.model)
    measured = {(r["checkpoint"], r["checkpoint_fingerprint"]) for r in read_jsonl(path)
                if r.get("fingerprint") == fingerprint and r["task"] == args.task}
    if ("base", fingerprint) not in measured:
        append_jsonl(path, {**base_row, "checkpoint": "base", "checkpoint_fingerprint": fingerprint})
    for spec in checkpoints:
        name, _, location = spec.rpartition("=")
        if (location, model_fingerprint(location)) in measured:
            continue
        model = load_finetuned(args, location, exp.accelerator.device)
        point = evaluate(exp, model)
        del model
        append_jsonl(path, {"run_id": str(Path(location).parent), "task": args.task, "model": args.model,
                            "fingerprint": fingerprint, "method": name or "checkpoint", "checkpoint": location,
                            "checkpoint_fingerprint": model_fingerprint(location), **point,
                            "settings": run_settings(args)})
        print(f"{location}: new-task accuracy {point['new_task_acc']:.3f}, prior {point['prior_avg']:.3f}, "
              f"forward KL {point['kl_seq']:.3f} nats/sequence (k1 {point['k1_seq']:.3f}, k3 {point['k3_seq']:.3f})")
    return path


def matched_accuracy_table(rows, gains=(0.05, 0.1, 0.2)):
    """Each method's trade-off read at matched new-task accuracy, as Fig. 2 and 4 compare methods: at
    pi0's accuracy plus each gain, the best prior-task score and the lowest forward KL among the method's
    points (pi0's included) that reach it. A markdown table, one line per method."""
    base = next(r for r in rows if r["method"] == "base")
    levels = [base["new_task_acc"] + gain for gain in gains]
    lines = ["| method | runs | " + " | ".join(f"accuracy >= {level:.2f}: prior, KL" for level in levels) + " |",
             "|---" * (2 + len(levels)) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "base"):
        points = [r for r in rows if r["method"] == method] + [base]
        cells = []
        for level in levels:
            prior, kl_seq = kl.frontier_at([r["new_task_acc"] for r in points], [r["prior_avg"] for r in points],
                                           [r["kl_seq"] for r in points], level)
            cells.append("not reached" if np.isnan(prior) else f"{prior:.3f}, {kl_seq:.2f}")
        runs = len({r["run_id"] for r in points if r["method"] != "base"})
        lines.append(f"| {method} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(rows, task, prefix):
    """plots/<prefix>_pareto.png (Fig. 2/4 analogue: the trade-off and each method's Pareto frontier) and
    plots/<prefix>_forgetting_vs_kl.png (Fig. 11: the pooled quadratic law, R^2 with its run-bootstrap
    interval, kl.bootstrap_r2 grouped by run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = next((r for r in rows if r["method"] == "base"), None)
    trained = [r for r in rows if r["method"] != "base"]
    methods = list(dict.fromkeys([m for m in METHODS if any(r["method"] == m for r in trained)] +
                                 [r["method"] for r in trained]))
    palette = plt.get_cmap("tab10").colors
    colors = {method: palette[i % len(palette)] for i, method in enumerate(methods)}
    Path("plots").mkdir(exist_ok=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    frontier_priors = []
    for ax in axes:  # the same points twice: all of them, then zoomed on the frontiers
        for method in methods:  # the base model is a point of every method's frontier (our choice)
            points = [r for r in trained if r["method"] == method] + ([base] if base else [])
            new, prior = [r["new_task_acc"] for r in points], [r["prior_avg"] for r in points]
            ax.scatter(new, prior, s=12, alpha=0.35, color=colors[method])
            front = kl.pareto_frontier(new, prior)
            frontier_priors += [prior[i] for i in front]
            ax.plot([new[i] for i in front], [prior[i] for i in front], "-o", ms=4, color=colors[method], label=method)
        if base:
            ax.scatter([base["new_task_acc"]], [base["prior_avg"]], marker="*", s=150, color="k", zorder=5,
                       label="base")
        ax.set(xlabel="new-task accuracy (T=1 samples)", ylabel="prior-task score (lm-eval average)")
    axes[0].set_title(f"{task}: trade-off, Pareto frontiers")
    low, high = min(frontier_priors), max(frontier_priors)
    axes[1].set_ylim(low - 0.2 * (high - low) - 1e-3, high + 0.2 * (high - low) + 1e-3)
    axes[1].set_title("zoom on the frontiers")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"plots/{prefix}_pareto.png", dpi=130)

    points = trained + ([base] if base else [])
    x, y = np.array([r["kl_seq"] for r in points]), np.array([r["prior_avg"] for r in points])
    coefficients, r2 = kl.fit_law(x, y)
    if len({r["run_id"] for r in points}) < 3 or np.isnan(r2):
        return print(f"plots/{prefix}_pareto.png; no law fitted: {len(points)} points, fewer than 3 runs or a "
                     "constant prior score")
    _, low, high = kl.bootstrap_r2(x, y, groups=[r["run_id"] for r in points])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for method in methods + (["base"] if base else []):
        pts = [r for r in points if r["method"] == method]
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
    fig.savefig(f"plots/{prefix}_forgetting_vs_kl.png", dpi=130)
    print(f"plots/{prefix}_pareto.png, plots/{prefix}_forgetting_vs_kl.png: {len(points)} points, "
          f"R^2 = {r2:.3f} (run-bootstrap 95% CI {low:.3f}-{high:.3f})")
    if base:
        print(f"pi0: new-task accuracy {base['new_task_acc']:.3f}, prior {base['prior_avg']:.3f}\n"
              + matched_accuracy_table(points))


def bench(exp, train, steps=2):
    """Time `steps` GRPO steps and `steps` SFT steps at the given settings and print seconds per step,
    tokens per second and (on a GPU) peak memory. SFT targets are stretched to --max-seq-len, the worst
    case the length limit allows."""
    args, accelerator = exp.args, exp.accelerator
    model = load_model(args, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0)
    scheduler = get_constant_schedule_with_warmup(optimizer, 0)
    model, optimizer = accelerator.prepare(model, optimizer)
    on_gpu = accelerator.device.type == "cuda"
    report = []
    for method in ("grpo", "sft"):
        run = Run(model, optimizer, scheduler, method)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        seconds, tokens = [], 0
        for i in range(steps):
            started = time.perf_counter()
            if method == "grpo":
                info = rl_step(exp, run, train[i * args.prompts_per_step:(i + 1) * args.prompts_per_step])
                tokens += info["generated_tokens"] + info["update_tokens"]
            else:
                batch = [dict(ex, response=stretched_target(exp.tokenizer, ex, args))
                         for ex in train[i * args.batch_size[0]:(i + 1) * args.batch_size[0]]]
                tokens += offline_step(exp, run, batch)["update_tokens"]
            seconds.append(time.perf_counter() - started)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak" if on_gpu else "peak memory: CPU"
        report.append(f"{method}: {np.mean(seconds):.1f} s/step, {tokens / sum(seconds):.0f} tokens/s, {peak}")
    print(f"bench {args.model} on {accelerator.device}, precision {args.precision}, group {args.prompts_per_step}x"
          f"{args.group_size} up to {args.max_new_tokens} new tokens, SFT batch {args.batch_size[0]} up to "
          f"{args.max_seq_len} tokens, micro-batch {args.micro_batch_tokens} tokens: " + "; ".join(report))


def stretched_target(tokenizer, example, args):
    """The example's response repeated until prompt + target is about --max-seq-len tokens."""
    room = args.max_seq_len - len(chat_prompt(tokenizer, example["prompt"])) - 1
    unit = example["response"] + " "
    return unit * max(1, room // max(1, len(encode_response(tokenizer, unit)) - 1))


def rows_of(path, args):
    """The rows of a results file that belong to --task and to this pi0 (its fingerprint)."""
    fingerprint = model_fingerprint(args.model)
    rows = [r for r in read_jsonl(path) if r["task"] == args.task and r.get("fingerprint") == fingerprint]
    if not rows:
        sys.exit(f"error: no results for task {args.task} and model {args.model} in {path}; train or measure first")
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        return plot_results(rows_of(out / "results.jsonl", args), args.task, "llm")
    if args.build_twin or args.build_random:
        if (Path(args.model) / "config.json").exists():
            return print(f"{args.model} exists; delete it to rebuild")
        started = time.time()
        if args.build_twin:
            pretrain_twin(args.model, args.twin_steps)
        else:
            build_random_model(args.model, args.build_random)
        return print(f"built in {time.time() - started:.0f} s and saved at {args.model}")

    check_versions()
    from accelerate import Accelerator, InitProcessGroupKwargs
    # Only the main process evaluates; the others wait for it in a collective, whose timeout must outlast
    # one evaluation point (NCCL's default of 10 minutes does not).
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=args.eval_timeout_min))])
    exp = Experiment(accelerator, load_tokenizer(args.model), args, REWARDS[args.task])
    train, exp.test, kl_examples, skipped = load_new_task(args)
    if args.bench:
        return bench(exp, train)
    rl_prompts, offline_examples, dropped = training_data(train, exp.tokenizer, args)
    print(f"dropped for --max-seq-len {args.max_seq_len}: {dropped['rl']} RL prompts, "
          f"{dropped['offline']} SFT/SimPO examples; {skipped} malformed rows skipped")
    exp.data = {"rl": rl_prompts, "offline": offline_examples, "dropped": dropped, "skipped": skipped}
    fingerprint = model_fingerprint(args.model)
    mine = [r for r in read_jsonl(out / "results.jsonl") if r["task"] == args.task and r.get("fingerprint") == fingerprint]
    base_model = None
    if accelerator.is_main_process:  # evaluation runs on the main process only
        exp.prior = PriorTasks(args)
        base_model = load_model(args, accelerator.device)
        shape = [[ex["prompt"] for ex in kl_examples], args.kl_samples, args.eval_max_tokens, args.precision]
        cache = out / f"kl_cache-{fingerprint}-{hashlib.sha1(json.dumps(shape).encode()).hexdigest()[:10]}.pt"
        exp.base_samples = BaseSamples(base_model, exp.tokenizer, kl_examples, args, cache)
        base_row = next((r for r in mine if r["run_id"] == "base"), None)
        if base_row is None:
            base_row = {"run_id": "base", "task": args.task, "model": args.model, "fingerprint": fingerprint,
                        "method": "base", "step": 0, "done": True, **evaluate(exp, base_model),
                        "settings": run_settings(args)}
            append_jsonl(out / "results.jsonl", base_row)
        if args.measure:
            measured = measure(exp, args.measure, base_row)
            return plot_results(rows_of(measured, args), args.task, "llm_measure")
    for method in ("self-sft", "sft-distill"):
        if method in args.method:
            exp.data[method] = policy_targets(exp, method, base_model, out)
    if base_model is not None:
        base_model.to("cpu")  # kept only as the frozen pi0 of an uncached KL (BaseSamples.reference)
        del base_model
    for run_id, config in sweep(args):
        if not any(r.get("done") for r in mine if r["run_id"] == run_id):
            train_run(exp, run_id, config)


if __name__ == "__main__":
    main()
