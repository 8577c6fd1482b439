"""ParityMNIST, the controlled toy experiment of "RL's Razor" (Shenfeld, Pari, Agrawal, 2025, §3, App. B.3).

A 785 -> 512 -> 256 -> 10 MLP is pretrained jointly on a little MNIST (parity task: any digit label with
the right parity is correct) and a little FashionMNIST (the prior task). It is then fine-tuned on
ParityMNIST alone with RL or SFT, and we watch how much FashionMNIST it forgets and how far its outputs
move from the base model in forward KL(pi0 || pi), the paper's predictor of forgetting.

    python parity_mnist.py --method rl          # one run in seconds: before -> after summary
    python parity_mnist.py --quick              # reduced sweep + figures, a few minutes
    python parity_mnist.py --reproduce          # the paper's grid, the 2x2, distillation, seeds, figures
    python parity_mnist.py --bench              # speed figures (written into README.md)

Sections: 1. arguments; 2. data; 3. model; 4. pretraining (the base model pi0); 5. reference quantities
of the base; 6. fine-tuning (one branch per method; many sweep configurations trained at once);
7. evaluation; 8. results file (append-only, resumable); 9. sweeps; 10. benchmark; 11. main.
All divergences and losses come from kl.py.
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import kl

# --------------------------------------------------------------------------------------------------
# 1. Arguments
# --------------------------------------------------------------------------------------------------

METHODS = ["rl", "rl-kl", "reinforce", "sft1", "sft2", "sft-oracle", "sft-distill", "simpo"]
FIG3_METHODS = ["sft1", "sft2", "sft-oracle", "rl", "rl-kl"]  # the paper's Fig. 3 legend
PAPER_LRS = np.geomspace(3e-6, 1e-3, 15)  # §3.6 / App. B.3: 15 learning rates, log-spaced
RUNS_DIR = Path("runs/parity")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="rl", choices=METHODS, help="fine-tuning method (default rl)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the 60k MNIST training images")
    p.add_argument("--scheduler", default="cosine", choices=["constant", "cosine"],
                   help="learning-rate schedule, both with a linear warmup")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup as a fraction of all steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per optimizer step")
    p.add_argument("--group-size", type=int, default=8, help="labels sampled per image (RL methods)")
    p.add_argument("--kl-coef", type=float, default=0.1, help="rl-kl penalty coefficient (paper: 0.1)")
    p.add_argument("--kl-direction", default="reverse", choices=["reverse", "forward"],
                   help="rl-kl penalty direction: reverse KL(pi||pi0) (GRPO's) or forward KL(pi0||pi)")
    p.add_argument("--oracle-targets", default="sampled", choices=["sampled", "soft"],
                   help="sft-oracle: labels sampled from pi0(.|correct) (paper) or the soft distribution")
    p.add_argument("--teacher", default="", help="sft-distill: checkpoint of an RL-trained model")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining, data order and sampling")
    p.add_argument("--eval-every", type=float, default=0.2, help="evaluation interval in epochs")
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/ and FashionMNIST/")
    p.add_argument("--out", default="", help="results file (JSON Lines); default under runs/parity/")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads (default: torch's, one per physical core; on a machine busy with "
                        "other jobs 1 can be faster, a second thread then mostly waits)")
    p.add_argument("--max-batch", type=int, default=10,
                   help="sweeps: at most this many configurations trained at once as one batched model")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--reproduce", action="store_true", help="full sweep of the paper, then figures")
    mode.add_argument("--quick", action="store_true", help="reduced sweep for labs (a few minutes)")
    mode.add_argument("--seeds", action="store_true", help="only the 3-seed study on a reduced grid")
    mode.add_argument("--bench", action="store_true", help="speed benchmark; updates README.md")
    p.add_argument("--no-figures", action="store_true", help="sweeps: skip parity_figures.make_all")
    args = p.parse_args(argv)
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.epochs < 1 or args.batch_size < 1 or args.group_size < 1 or args.threads < 1:
        p.error("--epochs, --batch-size, --group-size and --threads must be positive integers")
    if not 0 < args.eval_every:
        p.error(f"--eval-every must be > 0 epochs, got {args.eval_every}")
    if not 0 <= args.warmup < 1:
        p.error(f"--warmup is a fraction of all steps in [0, 1), got {args.warmup}")
    single_run = not (args.reproduce or args.quick or args.seeds or args.bench)
    if single_run and args.method == "sft-distill" and not args.teacher:
        p.error("--method sft-distill needs --teacher PATH (a checkpoint of an RL-trained model, "
                "e.g. one saved by --reproduce under runs/parity/)")
    return args


# --------------------------------------------------------------------------------------------------
# 2. Data: both datasets as in-memory tensors, flattened, with the task indicator appended (App. B.3)
# --------------------------------------------------------------------------------------------------

NORMALISATION = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530)}  # (unspecified) per-dataset
INDICATOR = {"MNIST": 1.0, "FashionMNIST": -1.0}  # +1 = ParityMNIST, -1 = FashionMNIST (§3.2)


@dataclasses.dataclass
class Data:
    mnist_train_x: torch.Tensor  # [N, 785], last column +1
    mnist_train_y: torch.Tensor  # digit labels
    mnist_test_x: torch.Tensor
    mnist_test_y: torch.Tensor
    fashion_train_x: torch.Tensor  # [N, 785], last column -1
    fashion_train_y: torch.Tensor
    fashion_test_x: torch.Tensor
    fashion_test_y: torch.Tensor


def load_split(name, train, data_dir):
    """One torchvision split as (inputs [N, 785], labels [N]); a clear exit if it is missing offline."""
    from torchvision import datasets
    cls = getattr(datasets, name)
    try:
        dataset = cls(data_dir, train=train, download=False)
    except RuntimeError:
        try:
            dataset = cls(data_dir, train=train, download=True)
        except Exception:
            sys.exit(f"error: {name} not found in {data_dir}/{name}/raw and it could not be downloaded; "
                     f"run `make data` or pass --data-dir pointing at a folder with MNIST/ and FashionMNIST/")
    mean, std = NORMALISATION[name]
    inputs = torch.empty(len(dataset.data), 785)
    inputs[:, :784] = dataset.data.reshape(len(dataset.data), -1)
    inputs[:, :784].div_(255).sub_(mean).div_(std)  # in place: the same float ops as (x / 255 - mean) / std
    inputs[:, 784] = INDICATOR[name]
    return inputs, dataset.targets.clone()


def load_data(data_dir, train_size=None, test_size=None):
    """MNIST and FashionMNIST, train and test; optional leading subsets (the tests use small ones)."""
    parts = {}
    for name, key in (("MNIST", "mnist"), ("FashionMNIST", "fashion")):
        for train, split, size in ((True, "train", train_size), (False, "test", test_size)):
            x, y = load_split(name, train, data_dir)
            parts[f"{key}_{split}_x"], parts[f"{key}_{split}_y"] = x[:size], y[:size]
    return Data(**parts)


def correct_labels(digits):
    """Boolean [..., 10]: which labels have the digit's parity, the correct set S(x) of §3.1."""
    return torch.arange(10) % 2 == (digits % 2).unsqueeze(-1)


def parity_reward(labels, digits):
    """Binary reward R(x, y) = 1[y mod 2 == digit(x) mod 2] (§3.1)."""
    return (labels % 2 == digits % 2).float()


# --------------------------------------------------------------------------------------------------
# 3. Model: MLP 785 -> 512 -> 256 -> 10, ReLU (§3.2), as a plain dict of weights so that the same
#    function runs one model (w: [in, out]) or R models stacked for a batched sweep (w: [R, in, out])
# --------------------------------------------------------------------------------------------------

LAYER_SIZES = [785, 512, 256, 10]
PARAM_SHAPES = {}
for _i, (_fan_in, _fan_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]), start=1):
    PARAM_SHAPES[f"w{_i}"], PARAM_SHAPES[f"b{_i}"] = (_fan_in, _fan_out), (_fan_out,)
WEIGHTS = [name for name in PARAM_SHAPES if name.startswith("w")]


def init_params(seed):
    """PyTorch's default nn.Linear initialisation, weights stored transposed as [in, out]."""
    torch.manual_seed(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]), start=1):
        layer = torch.nn.Linear(fan_in, fan_out)
        params[f"w{i}"], params[f"b{i}"] = layer.weight.detach().T.contiguous(), layer.bias.detach().clone()
    return params


def mlp(params, x, return_hidden=False):
    """Logits [..., B, 10] for inputs x [B, 785]; with return_hidden also the last hidden layer [..., B, 256]."""
    hidden = torch.relu(x @ params["w1"] + params["b1"].unsqueeze(-2))
    hidden = torch.relu(hidden @ params["w2"] + params["b2"].unsqueeze(-2))
    logits = hidden @ params["w3"] + params["b3"].unsqueeze(-2)
    return (logits, hidden) if return_hidden else logits


def save_params(params, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    torch.save({k: v.detach().clone() for k, v in params.items()}, tmp)
    os.replace(tmp, path)


def load_params(path):
    """A checkpoint saved by this script (weights_only=True); a clear exit if corrupt or mismatched."""
    try:
        params = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        sys.exit(f"error: checkpoint {path} does not exist")
    except Exception as err:
        sys.exit(f"error: checkpoint {path} is corrupt or not a ParityMNIST checkpoint ({type(err).__name__}); "
                 f"delete it and rerun to retrain")
    if not isinstance(params, dict) or set(params) != set(PARAM_SHAPES) or any(
            not isinstance(params[k], torch.Tensor) or tuple(params[k].shape) != shape
            for k, shape in PARAM_SHAPES.items()):
        sys.exit(f"error: checkpoint {path} does not hold a 785-512-256-10 ParityMNIST MLP; "
                 f"delete it and rerun to retrain")
    return {k: v.float() for k, v in params.items()}


# --------------------------------------------------------------------------------------------------
# 4. Pretraining the base model pi0 (§3.3): 500 MNIST + 500 FashionMNIST images, jointly
# --------------------------------------------------------------------------------------------------

PRETRAIN = dict(images_per_task=500, epochs=2, lr=1e-3, batch_size=50)  # (unspecified): lands near the paper's pi0


def pretrain(data, seed, progress=True):
    """Adam on cross-entropy. Each MNIST label is redrawn every epoch uniformly among the five digits of
    the image's parity, so pi0 spreads its mass over the correct-parity labels (§3.3)."""
    gen = torch.Generator().manual_seed(seed)
    n = PRETRAIN["images_per_task"]
    mnist_idx = torch.randperm(len(data.mnist_train_x), generator=gen)[:n]
    fashion_idx = torch.randperm(len(data.fashion_train_x), generator=gen)[:n]
    x = torch.cat([data.mnist_train_x[mnist_idx], data.fashion_train_x[fashion_idx]])
    digits, fashion_labels = data.mnist_train_y[mnist_idx], data.fashion_train_y[fashion_idx]
    params = {k: v.requires_grad_() for k, v in init_params(seed).items()}
    optimizer = torch.optim.Adam(params.values(), lr=PRETRAIN["lr"])
    for _ in tqdm(range(PRETRAIN["epochs"]), desc=f"pretrain pi0 (seed {seed})", disable=not progress,
                  leave=False):
        parity_labels = digits % 2 + 2 * torch.randint(0, 5, (n,), generator=gen)
        labels = torch.cat([parity_labels, fashion_labels])
        for idx in torch.randperm(2 * n, generator=gen).split(PRETRAIN["batch_size"]):
            loss = kl.sft_loss(mlp(params, x[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.detach() for k, v in params.items()}


def base_model(data, seed, progress=True):
    """pi0 for this seed, pretrained once and cached under runs/parity/."""
    path = RUNS_DIR / f"base_seed{seed}.pt"
    if path.exists():
        return load_params(path)
    params = pretrain(data, seed, progress)
    save_params(params, path)
    return params


# --------------------------------------------------------------------------------------------------
# 5. Quantities of the base model that every evaluation compares against (computed once per seed)
# --------------------------------------------------------------------------------------------------

FISHER_INPUTS = 2000  # FashionMNIST training images for the diagonal Fisher (prior-task inputs, Table 1)
CKA_PROBES = 2000  # first FashionMNIST test images: the probe set for CKA (Fig. 7 analogue)
FIG10_FASHION, FIG10_MNIST = 256, 500  # Fig. 10: fixed FashionMNIST batch (gradient), MNIST-test subset (KL)


@dataclasses.dataclass
class Reference:
    base: dict
    mnist_test_logits: torch.Tensor
    mnist_test_hidden: torch.Tensor
    fashion_probe_hidden: torch.Tensor
    fashion_acc: float
    fisher: dict


def diagonal_fisher(params, x):
    """Exact diagonal Fisher E_x E_{y~pi(.|x)} [(d log pi(y|x) / d theta)^2] of one model on inputs x.

    For a linear layer the per-example gradient is outer(a, delta) (a: layer input, delta: gradient at its
    output), so its square summed over examples is (a^2)^T (delta^2), one matmul. The deltas of each
    label y come from one autograd pass over sum_i log pi(y | x_i) (examples do not interact).
    """
    with torch.no_grad():
        a1 = torch.relu(x @ params["w1"] + params["b1"])
        a2 = torch.relu(a1 @ params["w2"] + params["b2"])
        probs = torch.softmax(a2 @ params["w3"] + params["b3"], -1)
    inputs = {"1": x, "2": a1, "3": a2}
    weighted_sq = {layer: 0.0 for layer in inputs}
    for y in range(10):
        z1 = (x @ params["w1"] + params["b1"]).requires_grad_()
        z2 = (torch.relu(z1) @ params["w2"] + params["b2"]).requires_grad_()
        z3 = (torch.relu(z2) @ params["w3"] + params["b3"]).requires_grad_()
        deltas = torch.autograd.grad(F.log_softmax(z3, -1)[:, y].sum(), [z1, z2, z3])
        for layer, delta in zip(inputs, deltas):
            weighted_sq[layer] = weighted_sq[layer] + probs[:, y:y + 1] * delta**2
    fisher = {}
    for layer, a in inputs.items():
        fisher[f"w{layer}"] = (a**2).T @ weighted_sq[layer] / len(x)
        fisher[f"b{layer}"] = weighted_sq[layer].mean(0)
    return fisher


@torch.no_grad()
def build_reference(base, data):
    mnist_logits, mnist_hidden = mlp(base, data.mnist_test_x, return_hidden=True)
    fashion_logits, fashion_hidden = mlp(base, data.fashion_test_x, return_hidden=True)
    with torch.enable_grad():
        fisher = diagonal_fisher(base, data.fashion_train_x[:FISHER_INPUTS])
    return Reference(
        base=base, mnist_test_logits=mnist_logits, mnist_test_hidden=mnist_hidden,
        fashion_probe_hidden=fashion_hidden[:CKA_PROBES],
        fashion_acc=(fashion_logits.argmax(-1) == data.fashion_test_y).float().mean().item(), fisher=fisher)


# --------------------------------------------------------------------------------------------------
# 6. Fine-tuning
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run. Runs that differ only in lr and scheduler can be trained together."""
    method: str
    lr: float
    scheduler: str = "constant"
    epochs: int = 1
    batch_size: int = 64
    group_size: int = 8
    seed: int = 0
    warmup: float = 0.1
    kl_coef: float = 0.1
    kl_direction: str = "reverse"
    oracle_targets: str = "sampled"
    teacher: str = ""
    study: str = "single"
    log_steps: int = 0  # Fig. 10: also a "step" row every log_steps optimizer steps

    @property
    def run_id(self):
        parts = [self.method, f"lr={self.lr:.4g}", self.scheduler, f"ep={self.epochs}",
                 f"bs={self.batch_size}", f"seed={self.seed}"]
        if self.method in ("rl", "rl-kl", "reinforce"):
            parts.insert(-1, f"G={self.group_size}")
        if self.warmup != 0.1:
            parts.append(f"warmup={self.warmup:g}")
        if self.method == "rl-kl":
            parts.append(f"kl={self.kl_coef:g}-{self.kl_direction}")
        if self.method == "sft-oracle":
            parts.append(f"targets={self.oracle_targets}")
        if self.method == "sft-distill":
            parts.append(f"teacher={Path(self.teacher).stem}")
        if self.log_steps:
            parts.append(f"steps/{self.log_steps}")
        return "|".join(parts)

    def batch_key(self):
        """Everything but lr and scheduler: configurations sharing it see the same data and noise."""
        return dataclasses.replace(self, lr=0.0, scheduler="", study="")


def lr_multiplier(scheduler, warmup_steps, total_steps):
    """Linear warmup, then constant or cosine decay to 0, as transformers' get_{constant,cosine}_schedule_with_warmup."""
    def multiplier(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return multiplier


def gumbel_sample(logits, num_samples, gen):
    """Labels [..., B, num_samples] sampled from softmax(logits [..., B, 10]) by the Gumbel-max trick.

    The noise [B, num_samples, 10] is drawn once and shared by all stacked runs, so a run samples exactly
    the labels it would sample if trained alone.
    """
    noise = -torch.empty(logits.shape[-2], num_samples, logits.shape[-1]).exponential_(generator=gen).log()
    return (logits.unsqueeze(-2) + noise).argmax(-1)


def method_loss(cfg, logits, digits, idx, ref, fixed, gen):
    """The fine-tuning loss of one method (§3.4, §4), averaged over every run and sample in the batch.

    logits: [R, B, 10] of the R stacked runs on images idx with true digits [B]. Only the model's own
    samples (rl, rl-kl, reinforce) depend on the run; every other target is shared.
    """
    runs, batch = logits.shape[:2]
    if cfg.method in ("rl", "rl-kl", "reinforce"):
        labels = gumbel_sample(logits.detach(), cfg.group_size, gen)  # on-policy: G labels per image
        rewards = parity_reward(labels, digits.unsqueeze(-1))  # [R, B, G]
        if cfg.method == "reinforce":  # 1-0 REINFORCE: positives only (§5.1)
            advantages = kl.reinforce_advantages(rewards)
        else:  # GRPO: group-normalised advantages, one update per batch (PAPER.md §3.4)
            advantages = kl.group_advantages(rewards)
        logprobs = F.log_softmax(logits, -1).gather(-1, labels)
        loss = kl.policy_gradient_loss(logprobs.flatten(), advantages.flatten())
        if cfg.method == "rl-kl":  # exact 10-way KL to pi0 on the batch images
            base_logits = fixed["base_logits"][idx].expand_as(logits)
            loss = loss + cfg.kl_coef * kl.kl_penalty(base_logits, logits, direction=cfg.kl_direction)
        return loss
    if cfg.method == "sft1":  # SFT dist. 1: even -> 0, odd -> 1
        targets = digits % 2
    elif cfg.method == "sft2":  # SFT dist. 2: even -> {0, 4}, odd -> {1, 5}, drawn once per image
        targets = digits % 2 + 4 * fixed["sft2_coin"][idx]
    elif cfg.method == "sft-oracle":  # pi0 restricted to the correct parity, renormalised (§3.5)
        oracle_logprobs = kl.restrict_to_correct(fixed["base_logits"][idx], correct_labels(digits))
        if cfg.oracle_targets == "soft":
            return kl.sft_loss(logits, oracle_logprobs.exp().expand_as(logits))
        targets = gumbel_sample(oracle_logprobs, 1, gen).squeeze(-1)
    elif cfg.method == "sft-distill":  # labels sampled from an RL-trained teacher (Fig. 9)
        targets = gumbel_sample(fixed["teacher_logits"][idx], 1, gen).squeeze(-1)
    elif cfg.method == "simpo":  # offline positives (SFT dist. 1) vs uniform wrong-parity negatives (§5.1)
        chosen = digits % 2
        rejected = (1 - digits % 2) + 2 * torch.randint(0, 5, (batch,), generator=gen)
        logprobs = F.log_softmax(logits, -1)
        pick = lambda labels: logprobs.gather(-1, labels.expand(runs, batch).unsqueeze(-1)).squeeze(-1)  # noqa: E731
        return kl.simpo_loss(pick(chosen), pick(rejected))
    else:
        raise ValueError(f"unknown method {cfg.method!r}")
    return kl.sft_loss(logits, targets.expand(runs, batch))


def train_runs(configs, data, ref, teacher=None, eval_every=0.2, progress=True):
    """Train R configurations at once as one batched model; return (rows per run, final params per run).

    The R models' weights are stacked ([R, in, out]) so each layer is one batched matmul. All runs share
    the data order and the random noise, so each run computes exactly what it would compute alone
    (up to float rounding of the batched matmuls); each has its own lr and schedule through an AdamW
    parameter group. The loss is the sum of the runs' own mean losses, so gradients do not mix.
    """
    cfg = configs[0]
    assert all(c.batch_key() == cfg.batch_key() for c in configs), "only lr and scheduler may differ"
    runs = len(configs)
    gen = torch.Generator().manual_seed(cfg.seed)
    fixed = {"sft2_coin": torch.randint(0, 2, (len(data.mnist_train_x),), generator=gen)}
    with torch.no_grad():
        if cfg.method in ("rl-kl", "sft-oracle"):
            fixed["base_logits"] = mlp(ref.base, data.mnist_train_x)
        if cfg.method == "sft-distill":
            fixed["teacher_logits"] = mlp(teacher, data.mnist_train_x)
    per_run = [{k: v.clone().requires_grad_() for k, v in ref.base.items()} for _ in range(runs)]
    optimizer = torch.optim.AdamW([{"params": list(p.values()), "lr": c.lr} for p, c in zip(per_run, configs)],
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    steps_per_epoch = len(data.mnist_train_x) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lr_multiplier(c.scheduler, warmup_steps, total_steps) for c in configs])
    eval_steps = set()  # eval_every = 0: no evaluation at all (the benchmark times training alone)
    if eval_every > 0:
        eval_steps = {min(total_steps, round(k * eval_every * steps_per_epoch))
                      for k in range(1, math.floor(cfg.epochs / eval_every + 1e-9) + 1)} | {total_steps}

    def stacked():  # [R, ...] weights for the batched forward pass (a view, not a copy, for one run)
        if runs == 1:
            return {k: v.unsqueeze(0) for k, v in per_run[0].items()}
        return {k: torch.stack([p[k] for p in per_run]) for k in PARAM_SHAPES}
    rows = [[] for _ in configs]
    if eval_steps:
        base_metrics = evaluate(ref.base, data, ref)
        rows = [[row_for(c, 0, 0.0, 0.0, base_metrics)] for c in configs]
    step_probe = StepProbe(data, ref) if cfg.log_steps else None
    start, step = time.perf_counter(), 0
    bar = tqdm(total=total_steps, desc=f"{cfg.method} x{runs}", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(data.mnist_train_x), generator=gen)
        for idx in order[:steps_per_epoch * cfg.batch_size].view(steps_per_epoch, cfg.batch_size):
            params = stacked()
            logged = step_probe is not None and step % cfg.log_steps == 0
            if logged:
                step_probe.before(params)
            loss = runs * method_loss(cfg, mlp(params, data.mnist_train_x[idx]), data.mnist_train_y[idx],
                                      idx, ref, fixed, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update()
            if logged:
                for r, stats in enumerate(step_probe.after(stacked())):
                    rows[r].append(row_for(configs[r], step, step / steps_per_epoch, 0.0, stats, kind="step"))
            if step in eval_steps:
                wall = time.perf_counter() - start
                for r, c in enumerate(configs):
                    metrics = evaluate({k: v.detach() for k, v in per_run[r].items()}, data, ref)
                    rows[r].append(row_for(c, step, step / steps_per_epoch, wall, metrics))
    bar.close()
    for run_rows in filter(None, rows):
        run_rows[-1]["last"] = True  # marks the run complete in the results file
    return rows, [{k: v.detach() for k, v in p.items()} for p in per_run]


class StepProbe:
    """Fig. 10 (App. C.3): per step, cos(update, grad of the FashionMNIST loss at the pre-step weights) and
    the change of forward KL(pi0 || pi) on a fixed MNIST-test subset caused by the step.

    Sign: positive cosine = the update points up the FashionMNIST loss (to first order it increases it).
    """

    def __init__(self, data, ref):
        self.fashion_x, self.fashion_y = data.fashion_test_x[:FIG10_FASHION], data.fashion_test_y[:FIG10_FASHION]
        self.mnist_x, self.base_logits = data.mnist_test_x[:FIG10_MNIST], ref.mnist_test_logits[:FIG10_MNIST]

    def forward_kl(self, params):
        with torch.no_grad():
            return kl.forward_kl(self.base_logits, mlp(params, self.mnist_x)).mean(-1)  # [R]

    def before(self, params):
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        runs = params["w1"].shape[0]
        fashion_loss = runs * kl.sft_loss(mlp(params, self.fashion_x), self.fashion_y.expand(runs, -1))
        self.grad = dict(zip(params, torch.autograd.grad(fashion_loss, list(params.values()))))
        self.params = {k: v.detach().clone() for k, v in params.items()}  # the optimizer updates in place
        self.kl_before = self.forward_kl(self.params)

    def after(self, params):
        flat = lambda d: torch.cat([d[k].detach().flatten(1) for k in PARAM_SHAPES], 1)  # noqa: E731
        update, grad = flat(params) - flat(self.params), flat(self.grad)
        cosine = F.cosine_similarity(update.double(), grad.double(), dim=1)
        delta_kl = self.forward_kl(params) - self.kl_before
        return [{"cos_update_prior_grad": float(c), "delta_forward_kl": float(d)}
                for c, d in zip(cosine, delta_kl)]


# --------------------------------------------------------------------------------------------------
# 7. Evaluation: every metric of §3.7 / Table 1 at one checkpoint
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(params, data, ref):
    """Metrics of one model. Divergences and activations on the new task's inputs (MNIST test, +1)."""
    logits, hidden = mlp(params, data.mnist_test_x, return_hidden=True)
    fashion_logits, fashion_hidden = mlp(params, data.fashion_test_x, return_hidden=True)
    correct = correct_labels(data.mnist_test_y)
    metrics = {
        "parity_acc": correct.gather(-1, logits.argmax(-1, keepdim=True)).float().mean().item(),
        "expected_reward": (logits.softmax(-1) * correct).sum(-1).mean().item(),
        "fashion_acc": (fashion_logits.argmax(-1) == data.fashion_test_y).float().mean().item(),
    }
    metrics["forgetting"] = ref.fashion_acc - metrics["fashion_acc"]
    for name, values in kl.divergences(ref.mnist_test_logits, logits).items():
        metrics[name] = values.double().mean().item()
    delta = {k: params[k] - ref.base[k] for k in PARAM_SHAPES}
    metrics["weight_l1"] = sum(d.abs().sum() for d in delta.values()).item()  # sum over all parameters
    metrics["fisher_l2"] = math.sqrt(sum((ref.fisher[k] * d.double()**2).sum() for k, d in delta.items()))
    metrics["spectral_norm"] = sum(torch.linalg.matrix_norm(delta[k], 2) for k in WEIGHTS).item()
    change = hidden - ref.mnist_test_hidden  # last hidden layer (256), MNIST test images
    metrics["act_l1"] = change.abs().sum(-1).mean().item()
    metrics["act_l2"] = torch.linalg.vector_norm(change, dim=-1).mean().item()
    metrics["cka"] = kl.linear_cka(fashion_hidden[:CKA_PROBES], ref.fashion_probe_hidden)
    return metrics


# --------------------------------------------------------------------------------------------------
# 8. Results file: JSON Lines, append-only. A run's rows are written together when it completes, its
#    last row marked "last": rows of a run without that mark (a kill mid-write) are dropped on load.
# --------------------------------------------------------------------------------------------------


def row_for(cfg, step, epoch, wall, metrics, kind="eval"):
    row = {"kind": kind, "run_id": cfg.run_id, "method": cfg.method, "lr": cfg.lr, "scheduler": cfg.scheduler,
           "epochs": cfg.epochs, "batch_size": cfg.batch_size, "group_size": cfg.group_size, "seed": cfg.seed,
           "step": step, "epoch": round(epoch, 6), "study": cfg.study}
    if kind == "eval":
        row["wall_s"] = round(wall, 3)
    if cfg.method == "sft-oracle":
        row["oracle_targets"] = cfg.oracle_targets
    if cfg.method == "rl-kl":
        row.update(kl_coef=cfg.kl_coef, kl_direction=cfg.kl_direction)
    if cfg.method == "sft-distill":
        row["teacher"] = cfg.teacher
    if (cfg.method, cfg.lr, cfg.scheduler, cfg.epochs) in SEED_GRID_KEYS:
        row["in_seed_grid"] = True
    row.update(metrics)
    return row


def completed_runs(path):
    """run_ids complete in the results file; incomplete runs' rows (and a torn last line) are removed."""
    path = Path(path)
    if not path.exists():
        return set()
    rows, torn = [], False
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn = True
    done = {row["run_id"] for row in rows if row.get("last")}
    kept = [row for row in rows if row["run_id"] in done]
    if torn or len(kept) < len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, path)
    return done


def append_rows(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def read_rows(path, run_id):
    with open(path) as f:
        return [row for row in map(json.loads, f) if row["run_id"] == run_id]


# --------------------------------------------------------------------------------------------------
# 9. Sweeps: grids, resumable execution, the paper's studies
# --------------------------------------------------------------------------------------------------

SEED_GRID_LRS = PAPER_LRS[2::3]  # 5 of the 15 learning rates, 6.9e-6 .. 1e-3
SEED_GRID_KEYS = {(m, float(lr), "cosine", 1) for m in FIG3_METHODS for lr in SEED_GRID_LRS}
QUICK_LRS = PAPER_LRS[[6, 9, 12]]  # 3.6e-5, 1.3e-4, 4.4e-4
TEACHER = dict(method="rl", lr=float(PAPER_LRS[11]), scheduler="cosine", epochs=1)  # lr 2.9e-4
FIG10_LR = float(PAPER_LRS[9])  # 1.3e-4, cosine, 1 epoch: every method learns, none collapses


def paper_grid(seed=0):
    """Fig. 3: 5 methods x 15 lrs x {constant, cosine} x {1, 2} epochs = 300 runs (App. B.3)."""
    return [RunConfig(m, float(lr), sch, ep, seed=seed, study="paper-grid")
            for m in FIG3_METHODS for ep in (1, 2) for sch in ("constant", "cosine") for lr in PAPER_LRS]


def extra_grid(teacher_path, seed=0, lrs=PAPER_LRS, schedulers=("cosine",)):
    """The 2x2 (reinforce, simpo; sft1 and rl come from the paper grid) and distillation (Fig. 9):
    15 lrs x cosine x 1 epoch each (our choice; the paper gives no MNIST grid for them)."""
    grid = [RunConfig(m, float(lr), sch, 1, seed=seed, study="2x2")
            for m in ("reinforce", "simpo") for sch in schedulers for lr in lrs]
    grid += [RunConfig("sft-distill", float(lr), sch, 1, seed=seed, teacher=str(teacher_path), study="distill")
             for sch in schedulers for lr in lrs]
    return grid


def fig10_grid(seed=0, every=1):
    """Fig. 10: one run per Fig. 3 method (lr 1.3e-4, cosine, 1 epoch) with a step row every `every` steps."""
    return [RunConfig(m, FIG10_LR, "cosine", 1, seed=seed, study="fig10", log_steps=every) for m in FIG3_METHODS]


def seeds_grid(seeds=(0, 1, 2)):
    """Reduced grid for confidence intervals: 5 methods x 5 lrs x cosine x 1 epoch per seed. Seed 0's runs
    are the paper grid's own (same run_id, trained once); every row of this grid has "in_seed_grid"."""
    return [RunConfig(m, float(lr), "cosine", 1, seed=s, study="paper-grid" if s == 0 else "seeds")
            for s in seeds for m in FIG3_METHODS for lr in SEED_GRID_LRS]


def quick_grid(teacher_path, seed=0):
    """Labs: 5 methods x 3 lrs (the Fig. 10 lr logging every 10th step), reinforce/simpo/distill at that lr."""
    grid = [RunConfig(m, float(lr), "cosine", 1, seed=seed, study="quick", log_steps=10 if lr == FIG10_LR else 0)
            for m in FIG3_METHODS for lr in QUICK_LRS]
    return grid + [dataclasses.replace(c, study="quick") for c in extra_grid(teacher_path, seed, lrs=[FIG10_LR])]


_DATA, _REFERENCES = {}, {}  # loaded once per process


def get_data(data_dir):
    if data_dir not in _DATA:
        _DATA[data_dir] = load_data(data_dir)
    return _DATA[data_dir]


def reference_for(data, seed, progress=True):
    if seed not in _REFERENCES:
        _REFERENCES[seed] = build_reference(base_model(data, seed, progress), data)
    return _REFERENCES[seed]


def teacher_for(data, seed, progress=True):
    """Fig. 9's RL teacher: the paper grid's rl run TEACHER (same config, so the same model), saved once."""
    path = RUNS_DIR / f"teacher_rl_seed{seed}.pt"
    if not path.exists():
        ref = reference_for(data, seed, progress)
        _, (params,) = train_runs([RunConfig(**TEACHER, seed=seed, study="teacher")], data, ref, progress=progress)
        save_params(params, path)
    return path


def run_sweep(configs, out, data, eval_every=0.2, max_batch=10, desc="sweep"):
    """Train every configuration not yet complete in `out`, batching those that may share a model."""
    done = completed_runs(out)
    todo = [c for c in dict.fromkeys(configs) if c.run_id not in done]
    groups = {}
    for c in todo:
        groups.setdefault(c.batch_key(), []).append(c)
    total = len({c.run_id for c in configs})
    with tqdm(total=total, initial=total - len(todo), desc=desc, unit="run") as bar:
        for key, group in groups.items():
            ref = reference_for(data, key.seed)
            teacher = load_params(key.teacher) if key.method == "sft-distill" else None
            for start in range(0, len(group), max_batch):
                chunk = group[start:start + max_batch]
                rows, _ = train_runs(chunk, data, ref, teacher, eval_every)
                append_rows(out, [row for run_rows in rows for row in run_rows])
                bar.update(len(chunk))


def make_figures(out, plots_dir):
    import parity_figures  # the analysis script, imported only when a sweep has finished
    parity_figures.make_all(str(out), str(plots_dir))


def reproduce(args, quick=False, seeds_only=False):
    data = get_data(args.data_dir)
    out = Path(args.out or RUNS_DIR / ("quick.jsonl" if quick else "results.jsonl"))
    start = time.perf_counter()
    if seeds_only:
        run_sweep(seeds_grid(), out, data, args.eval_every, args.max_batch, "seeds study")
    elif quick:
        run_sweep(quick_grid(teacher_for(data, args.seed), args.seed), out, data, args.eval_every,
                  args.max_batch, "quick sweep")
    else:
        # Ordered so that an interrupted run has data for every study; rerunning continues where it stopped.
        grid = paper_grid(args.seed)
        sweep = lambda configs, desc: run_sweep(configs, out, data, args.eval_every, args.max_batch, desc)  # noqa: E731
        sweep([c for c in grid if c.epochs == 1], "paper grid (Fig. 3), 1 epoch")
        sweep(extra_grid(teacher_for(data, args.seed), args.seed), "2x2 + distillation")
        sweep(fig10_grid(args.seed), "Fig. 10 step logs")
        sweep(seeds_grid(), "seeds study")
        sweep([c for c in grid if c.epochs == 2], "paper grid (Fig. 3), 2 epochs")
    print(f"results: {out} ({time.perf_counter() - start:.0f} s)")
    if not args.no_figures:
        make_figures(out, Path("runs/parity/quick-plots") if quick else Path("plots"))


# --------------------------------------------------------------------------------------------------
# 10. Benchmark: matmul peak, training throughput, wall times; rewrites the README block
# --------------------------------------------------------------------------------------------------

README_MARKERS = ("<!-- bench:parity:start -->", "<!-- bench:parity:end -->")


def training_flops_per_sample():
    """Forward 2*in*out per layer, backward 4*in*out except the first layer (no input gradient): 2*in*out."""
    sizes = list(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]))
    return sum((4 if i == 0 else 6) * a * b for i, (a, b) in enumerate(sizes))


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(args):
    data = get_data(args.data_dir)
    ref = reference_for(data, args.seed)
    lines = [f"Machine: {os.cpu_count()} CPU cores ({args.threads} torch threads), shared with other users "
             f"while measured, so figures are noisy; torch {torch.__version__}, fp32.", ""]
    # Peak: the batched matmuls of one training step (30 stacked runs, batch 64) and of evaluation.
    runs, batch = args.max_batch, 64
    shapes = [(runs, batch, a, b) for a, b in zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])] + [(1, 10000, 785, 512)]
    lines += ["| matmul [R x (M x K) @ (K x N)] | GFLOP/s |", "|---|---|"]
    peak = 0.0
    for r, m, k, n in shapes:
        a, b = torch.randn(r, m, k), torch.randn(r, k, n)
        gflops = 2 * r * m * k * n / timed(lambda: torch.bmm(a, b), 20) / 1e9
        peak = max(peak, gflops)
        lines.append(f"| {r} x ({m} x {k}) @ ({k} x {n}) | {gflops:.1f} |")
    # Throughput: a batch of rl runs for 150 steps without evaluation, on a 150-batch slice of MNIST.
    steps = 150
    sub = dataclasses.replace(data, mnist_train_x=data.mnist_train_x[:steps * batch],
                              mnist_train_y=data.mnist_train_y[:steps * batch])
    configs = [RunConfig("rl", float(lr), "constant", seed=args.seed) for lr in np.geomspace(3e-6, 1e-3, runs)]
    wall = timed(lambda: train_runs(configs, sub, ref, eval_every=0, progress=False), 1)
    samples = runs * steps * batch
    achieved = samples * training_flops_per_sample() / wall / 1e9
    lines += ["", f"Fine-tuning throughput ({runs} rl runs trained as one batched model, batch {batch}, "
              f"G = 8): {samples / wall:,.0f} samples/s, {achieved:.1f} GFLOP/s = "
              f"{100 * achieved / peak:.0f} % of the measured matmul peak ({peak:.1f} GFLOP/s)."]
    single = [RunConfig("rl", 3e-4, seed=args.seed)]
    wall_single = timed(lambda: train_runs(single, sub, ref, eval_every=0, progress=False), 1)
    lines.append(f"One run alone: {steps * batch / wall_single:,.0f} samples/s.")
    # Wall times of the two commands a lab runs.
    for label, cmd in (("`python parity_mnist.py --method rl` (cached base)",
                        ["--method", "rl", "--out", str(RUNS_DIR / "bench_single.jsonl")]),
                       ("`python parity_mnist.py --quick`",
                        ["--quick", "--no-figures", "--out", str(RUNS_DIR / "bench_quick.jsonl")])):
        out_file = Path(cmd[-1])
        out_file.unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, *cmd, "--data-dir", args.data_dir, "--threads",
                        str(args.threads)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines.append(f"Wall time of {label}: {time.perf_counter() - start:.1f} s.")
    block = "\n".join(lines)
    print(block)
    readme = Path("README.md")
    if readme.exists():
        text = readme.read_text()
        start_marker, end_marker = README_MARKERS
        if start_marker in text and end_marker in text:
            head, rest = text.split(start_marker, 1)
            tail = rest.split(end_marker, 1)[1]
            readme.write_text(f"{head}{start_marker}\n{block}\n{end_marker}{tail}")
            print("README.md: benchmark block updated")


# --------------------------------------------------------------------------------------------------
# 11. Main
# --------------------------------------------------------------------------------------------------


def single_run(args):
    # Fail early and clearly on a bad checkpoint, before the data is loaded.
    if args.teacher:
        load_params(args.teacher)
    if (RUNS_DIR / f"base_seed{args.seed}.pt").exists():
        load_params(RUNS_DIR / f"base_seed{args.seed}.pt")
    data = get_data(args.data_dir)
    cfg = RunConfig(args.method, args.lr, args.scheduler, args.epochs, args.batch_size, args.group_size,
                    args.seed, args.warmup, args.kl_coef, args.kl_direction, args.oracle_targets, args.teacher)
    out = Path(args.out or RUNS_DIR / "single.jsonl")
    start = time.perf_counter()
    if cfg.run_id not in completed_runs(out):
        ref = reference_for(data, cfg.seed)
        teacher = load_params(cfg.teacher) if cfg.teacher else None
        rows, _ = train_runs([cfg], data, ref, teacher, args.eval_every)
        append_rows(out, rows[0])
    rows = [row for row in read_rows(out, cfg.run_id) if row["kind"] == "eval"]
    before, after = rows[0], rows[-1]
    print(f"ParityMNIST, {cfg.run_id} ({after['step']} steps, {time.perf_counter() - start:.1f} s)")
    print(f"{'':22}{'base':>8}  ->  fine-tuned")
    for label, key, fmt in (("parity accuracy", "parity_acc", "{:8.1%}"), ("FashionMNIST accuracy", "fashion_acc",
                                                                        "{:8.1%}"),
                            ("forward KL (nats)", "forward_kl", "{:8.3f}")):
        print(f"{label:22}{fmt.format(before[key])}  ->  {fmt.format(after[key]).strip()}")
    print(f"results: {out}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.bench:
        bench(args)
    elif args.reproduce or args.quick or args.seeds:
        reproduce(args, quick=args.quick, seeds_only=args.seeds)
    else:
        single_run(args)


if __name__ == "__main__":
    main()
