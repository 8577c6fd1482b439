"""The paper-scale ParityMNIST sweep of "RL's Razor" (arXiv 2509.04259, §3, App. B.3), beside the lesson.

parity_mnist.py trains one configuration with a plain loop. This script trains the paper's grid (5 methods
x 15 learning rates x 2 schedulers x 1 or 2 epochs, evaluated every 0.2 epoch) and the studies around it
(the 2x2 of §5.1, distillation from RL of Fig. 9, the per-step dynamics of Fig. 10, three seeds), records
every metric of Table 1 at every evaluation point in a resumable results file, and draws the figures with
parity_figures.py. It takes the lesson's data, model, pretraining and method losses as they are; what it
adds is speed: configurations that differ only in learning rate and schedule are trained together as one
batched model (weights stacked [R, in, out]), which gives the same numbers as the plain loop (a test).

    python parity_sweep.py --quick          # every figure on a reduced grid, a few minutes
    python parity_sweep.py --reproduce      # the paper's grid and every study, about 25 minutes on 2 cores
    python parity_sweep.py --seeds          # only the 3-seed study on a reduced grid
    python parity_sweep.py --bench          # speed: matmul peak, training and evaluation throughput

A rerun continues where an interrupted one stopped. Sections: 1. settings and grids; 2. quantities of the
base model; 3. the batched trainer; 4. every metric of Table 1; 5. the results file; 6. sweeps; 7. the
benchmark; 8. main.
"""
import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import kl
import parity_mnist as pm

# --------------------------------------------------------------------------------------------------
# 1. Settings and grids
# --------------------------------------------------------------------------------------------------

WEIGHTS = ["w1", "w2", "w3"]
FIG3_METHODS = ["sft1", "sft2", "sft-oracle", "rl", "rl-kl"]  # the legend of the paper's Fig. 3
PAPER_LRS = np.geomspace(3e-6, 1e-3, 15)  # App. B.3: 15 learning rates, log-spaced
RUNS_DIR = Path("runs/parity")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="reduced grid, every figure (a few minutes)")
    mode.add_argument("--reproduce", action="store_true", help="the paper's grid and every study, then figures")
    mode.add_argument("--seeds", action="store_true", help="only the 3-seed study on a reduced grid")
    mode.add_argument("--bench", action="store_true", help="speed benchmark (prints a table)")
    p.add_argument("--seed", type=int, default=0, help="seed of pi0, data order and sampling")
    p.add_argument("--eval-every", type=float, default=0.2, help="evaluation interval in epochs")
    p.add_argument("--max-batch", type=int, default=10, help="at most this many configurations trained at once")
    p.add_argument("--out", default="", help="results file (JSON Lines); default runs/parity/{quick,results}.jsonl")
    p.add_argument("--no-figures", action="store_true", help="skip parity_figures.make_all after the sweep")
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/ and FashionMNIST/")
    p.add_argument("--workers", type=int, default=torch.get_num_threads(),
                   help="processes training batches of runs side by side (default: one per physical core)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per worker (default: the physical cores shared among the workers)")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.workers < 1 or args.threads < 0:
        p.error("--max-batch and --workers must be positive integers, --threads one that is not negative")
    args.threads = args.threads or max(1, torch.get_num_threads() // args.workers)
    if not args.eval_every > 0:
        p.error(f"--eval-every must be > 0 epochs, got {args.eval_every}")
    return args


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run: the lesson's settings (same names, so pm.method_loss reads them) plus the study
    it belongs to. Runs that differ only in lr and scheduler can be trained together."""
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


# --------------------------------------------------------------------------------------------------
# 2. Quantities of the base model that every evaluation compares against (computed once per seed)
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
    mnist_logits, mnist_hidden = pm.mlp(base, data.mnist_test_x, return_hidden=True)
    fashion_logits, fashion_hidden = pm.mlp(base, data.fashion_test_x, return_hidden=True)
    with torch.enable_grad():
        fisher = diagonal_fisher(base, data.fashion_train_x[:FISHER_INPUTS])
    return Reference(
        base=base, mnist_test_logits=mnist_logits, mnist_test_hidden=mnist_hidden,
        fashion_probe_hidden=fashion_hidden[:CKA_PROBES],
        fashion_acc=pm.accuracy(fashion_logits, data.fashion_test_y), fisher=fisher)


# --------------------------------------------------------------------------------------------------
# 3. The batched trainer: R configurations as one model, the lesson's loss and loop otherwise
# --------------------------------------------------------------------------------------------------


def train_runs(configs, data, ref, teacher=None, eval_every=0.2, progress=True):
    """Train R configurations at once as one batched model; return (rows per run, final params per run).

    The lesson's loop (parity_mnist.finetune), with the R models' weights stacked ([R, in, out]) so that
    each layer is one batched matmul. All runs share the data order and the random draws, so each run
    computes what the plain loop computes for it alone (up to float rounding, a test); each has its own
    lr and schedule through an AdamW parameter group. The loss is the sum of the runs' own mean losses
    (pm.method_loss averages over runs too, hence the factor R), so gradients do not mix.
    """
    cfg = configs[0]
    assert all(c.batch_key() == cfg.batch_key() for c in configs), "only lr and scheduler may differ"
    runs = len(configs)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_x, train_digits = data.mnist_train_x, data.mnist_train_y
    sft2_labels = train_digits % 2 + 4 * torch.randint(0, 2, train_digits.shape, generator=gen)  # as the lesson
    base_logits = teacher_logits = None  # of every training image, computed once rather than per batch
    with torch.no_grad():
        if cfg.method in ("rl-kl", "sft-oracle"):
            base_logits = pm.mlp(ref.base, train_x)
        if cfg.method == "sft-distill":
            teacher_logits = pm.mlp(teacher, train_x)
    # The R models live stacked ([R, in, out]), the layout the batched forward pass reads, so they are never
    # copied together. Each run's weights are views into the stack (per_run[r]["w1"] is stacked["w1"][r]): the
    # optimizer updates the runs in place through them, each view with its own lr and schedule.
    stacked = {k: v.unsqueeze(0).repeat(runs, *[1] * v.dim()).requires_grad_() for k, v in ref.base.items()}
    per_run = [{k: v.detach()[r] for k, v in stacked.items()} for r in range(runs)]
    optimizer = torch.optim.AdamW([{"params": list(p.values()), "lr": c.lr} for p, c in zip(per_run, configs)],
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    steps_per_epoch = len(train_x) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [pm.lr_multiplier(c.scheduler, warmup_steps, total_steps) for c in configs])
    # eval_every = 0: no evaluation at all (the benchmark times training alone)
    eval_steps = pm.evaluation_steps(cfg.epochs, steps_per_epoch, eval_every) if eval_every > 0 else set()

    rows = [[] for _ in configs]
    if eval_steps:
        base_metrics = evaluate(ref.base, data, ref)
        rows = [[row_for(c, 0, 0.0, 0.0, base_metrics)] for c in configs]
    step_probe = StepProbe(data, ref) if cfg.log_steps else None
    start, step = time.perf_counter(), 0
    bar = tqdm(total=total_steps, desc=f"{cfg.method} x{runs}", disable=not progress, leave=False)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for idx in order[:steps_per_epoch * cfg.batch_size].view(steps_per_epoch, cfg.batch_size):
            logged = step_probe is not None and step % cfg.log_steps == 0
            if logged:
                step_probe.before(stacked)
            loss = runs * pm.method_loss(cfg, pm.mlp(stacked, train_x[idx]), train_digits[idx], sft2_labels[idx],
                                         None if base_logits is None else base_logits[idx],
                                         None if teacher_logits is None else teacher_logits[idx], gen)
            for weights in stacked.values():
                weights.grad = None
            loss.backward()
            for k, weights in stacked.items():  # each run's gradient, as a view, for the optimizer
                for r in range(runs):
                    per_run[r][k].grad = weights.grad[r]
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update()
            if logged:
                for r, stats in enumerate(step_probe.after(stacked)):
                    rows[r].append(row_for(configs[r], step, step / steps_per_epoch, 0.0, stats, kind="step"))
            if step in eval_steps:
                wall = time.perf_counter() - start
                for r, c in enumerate(configs):
                    metrics = evaluate(per_run[r], data, ref)
                    rows[r].append(row_for(c, step, step / steps_per_epoch, wall, metrics))
    bar.close()
    for run_rows in filter(None, rows):
        run_rows[-1]["last"] = True  # marks the run complete in the results file
    return rows, per_run


def flatten(params):
    """[R, number of parameters]: each stacked run's weights as one vector."""
    return torch.cat([params[k].detach().flatten(1) for k in pm.PARAM_SHAPES], 1)


class StepProbe:
    """Fig. 10 (App. C.3): per step, cos(update, grad of the FashionMNIST loss at the pre-step weights) and
    the change of forward KL(pi0 || pi) on a fixed MNIST-test subset caused by the step.

    Sign: positive cosine = the update points up the FashionMNIST loss (to first order it increases it).
    """

    def __init__(self, data, ref):
        self.fashion_x, self.fashion_y = data.fashion_test_x[:FIG10_FASHION], data.fashion_test_y[:FIG10_FASHION]
        self.mnist_x, self.base_logits = data.mnist_test_x[:FIG10_MNIST], ref.mnist_test_logits[:FIG10_MNIST]

    def mean_forward_kl(self, params):
        """KL(pi0 || pi) averaged over the probe images, one value per stacked run [R]."""
        with torch.no_grad():
            return kl.forward_kl(self.base_logits, pm.mlp(params, self.mnist_x)).mean(-1)  # [R]

    def before(self, params):
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        runs = params["w1"].shape[0]
        fashion_loss = runs * kl.sft_loss(pm.mlp(params, self.fashion_x), self.fashion_y.expand(runs, -1))
        self.grad = dict(zip(params, torch.autograd.grad(fashion_loss, list(params.values()))))
        self.params = {k: v.detach().clone() for k, v in params.items()}  # the optimizer updates in place
        self.kl_before = self.mean_forward_kl(self.params)

    def after(self, params):
        update, grad = flatten(params) - flatten(self.params), flatten(self.grad)
        cosine = F.cosine_similarity(update.double(), grad.double(), dim=1)
        delta_kl = self.mean_forward_kl(params) - self.kl_before
        return [{"cos_update_prior_grad": float(c), "delta_forward_kl": float(d)}
                for c, d in zip(cosine, delta_kl)]


# --------------------------------------------------------------------------------------------------
# 4. Every metric of Table 1 at one checkpoint
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(params, data, ref):
    """The lesson's scores (accuracies, forgetting, the divergences on MNIST test) and Table 1's other
    predictors: weight change, Fisher-weighted weight change, activation change (new-task inputs), and the
    CKA of the last hidden layer on FashionMNIST probes (a Fig. 7 analogue)."""
    logits, hidden = forward_in_place(params, data.mnist_test_x)
    fashion_logits, fashion_hidden = forward_in_place(params, data.fashion_test_x)
    metrics = pm.scores(logits, fashion_logits, data, ref.mnist_test_logits, ref.fashion_acc)
    delta = {k: params[k] - ref.base[k] for k in pm.PARAM_SHAPES}
    metrics["weight_l1"] = sum(d.abs().sum() for d in delta.values()).item()  # sum over all parameters
    metrics["fisher_l2"] = math.sqrt(sum((ref.fisher[k] * d.double()**2).sum() for k, d in delta.items()))
    metrics["spectral_norm"] = sum(largest_singular_value(delta[k]) for k in WEIGHTS).item()
    change = hidden - ref.mnist_test_hidden  # last hidden layer (256), MNIST test images
    metrics["act_l1"] = change.abs().sum(-1).mean().item()
    metrics["act_l2"] = torch.linalg.vector_norm(change, dim=-1).mean().item()
    metrics["cka"] = kl.linear_cka(fashion_hidden[:CKA_PROBES], ref.fashion_probe_hidden)
    return metrics


def forward_in_place(params, x):
    """pm.mlp(params, x, return_hidden=True) bit for bit (a test), for evaluation only: each bias add and ReLU
    writes into its product's memory instead of two new tensors (20 MB per layer for 10,000 images), about
    5 % of an evaluation."""
    hidden = (x @ params["w1"]).add_(params["b1"]).relu_()
    hidden = (hidden @ params["w2"]).add_(params["b2"]).relu_()
    return (hidden @ params["w3"]).add_(params["b3"]), hidden


def largest_singular_value(matrix):
    """sigma_max(M) = sqrt(lambda_max(M^T M)), from the Gram matrix of M's shorter side: torch.linalg.matrix_norm
    (M, 2) to float rounding (a test), at under half the cost of its SVD, a visible share of each evaluation."""
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    return torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt()


# --------------------------------------------------------------------------------------------------
# 5. Results file: JSON Lines, append-only. A run's rows are written together when it completes, its
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
# 6. Sweeps: resumable execution of the paper's studies
# --------------------------------------------------------------------------------------------------

_DATA, _REFERENCES = {}, {}  # loaded once per process


def base_model(data, seed):
    """The lesson's pi0 for this seed, pretrained once and saved, so that every run of a sweep (and a
    resumed sweep) starts from the same weights."""
    path = RUNS_DIR / f"base_seed{seed}.pt"
    if path.exists():
        return pm.load_params(path)
    params = pm.pretrain(data, seed)
    pm.save_params(params, path)
    return params


def get_data(data_dir):
    if data_dir not in _DATA:
        _DATA[data_dir] = pm.load_data(data_dir)
    return _DATA[data_dir]


def reference_for(data, seed):
    if seed not in _REFERENCES:
        _REFERENCES[seed] = build_reference(base_model(data, seed), data)
    return _REFERENCES[seed]


def teacher_for(data, seed):
    """Fig. 9's RL teacher: the paper grid's rl run TEACHER (same config, so the same model), saved once."""
    path = RUNS_DIR / f"teacher_rl_seed{seed}.pt"
    if not path.exists():
        ref = reference_for(data, seed)
        _, (params,) = train_runs([RunConfig(**TEACHER, seed=seed, study="teacher")], data, ref)
        pm.save_params(params, path)
    return path


def run_sweep(configs, out, data, eval_every=0.2, max_batch=10, workers=1, threads=1):
    """Train every configuration not yet complete in `out`, batching those that may share a model.

    The batches go, in order, to `workers` processes with `threads` torch threads each; their rows are
    appended in that order as they complete. On 2 cores two single-threaded workers train about a fifth
    faster than one process with 2 threads: a step's many small operations do not split well across threads.
    """
    done = completed_runs(out)
    todo = [c for c in dict.fromkeys(configs) if c.run_id not in done]
    groups = {}
    for c in todo:
        groups.setdefault(c.batch_key(), []).append(c)
    batches = [group[start:start + max_batch] for group in groups.values()
               for start in range(0, len(group), max_batch)]
    references = {seed: reference_for(data, seed) for seed in {c.seed for c in todo}}
    total = len({c.run_id for c in configs})
    with tqdm(total=total, initial=total - len(todo), desc="runs", unit="run") as bar:
        for rows in train_batches(batches, data, references, eval_every, workers, threads):
            append_rows(out, rows)
            bar.update(len({row["run_id"] for row in rows}))


def train_batches(batches, data, references, eval_every, workers, threads):
    """Each batch's rows, in the batches' order: in this process (one worker: no copy of the data) or in
    worker processes, where all batches are submitted at once and come back in order as they complete."""
    if workers == 1:  # the caller's torch threads
        init_worker(data, references, eval_every, progress=True)
        yield from map(train_batch, batches)
        return
    with worker_pool(workers, data, references, eval_every, threads) as pool:
        yield from pool.map(train_batch, batches)


def worker_pool(workers, data, references, eval_every, threads):
    """Spawned processes that each hold the data and the references (shared memory) and run train_batch."""
    return ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), init_worker,
                               (data, references, eval_every, threads))


_WORKER = {}  # what each worker process holds: the data, pi0's reference quantities per seed, its settings


def init_worker(data, references, eval_every, threads=None, progress=False):
    if threads:
        torch.set_num_threads(threads)
    _WORKER.update(data=data, references=references, eval_every=eval_every, progress=progress)


def train_batch(configs):
    """One batch of a sweep, in a worker: the rows of all its runs, in order."""
    cfg = configs[0]
    teacher = pm.load_params(cfg.teacher) if cfg.method == "sft-distill" else None
    rows, _ = train_runs(configs, _WORKER["data"], _WORKER["references"][cfg.seed], teacher,
                         _WORKER["eval_every"], progress=_WORKER["progress"])
    return [row for run_rows in rows for row in run_rows]


def make_figures(out, plots_dir):
    import parity_figures  # the analysis script, imported only when a sweep has finished
    parity_figures.make_all(str(out), str(plots_dir))


def studies(args, data, teacher=None):
    """[(configurations, description)] of the chosen mode, in the order they run. --reproduce runs the 1-epoch
    half of Fig. 3's grid and the studies built on it first, so that an interrupted sweep already has their
    points, and the 3-seed study last: its batches (5 runs of 1 epoch) are the smallest, so the workers finish
    together instead of one core idling while the other trains a 2-epoch batch (1.5 min). Fig. 9's teacher is
    trained if not given."""
    if args.seeds:
        return [(seeds_grid(), "seeds study")]
    teacher = teacher or teacher_for(data, args.seed)
    if args.quick:
        return [(quick_grid(teacher, args.seed), "quick sweep")]
    grid = paper_grid(args.seed)
    return [([c for c in grid if c.epochs == 1], "paper grid (Fig. 3), 1 epoch"),
            (extra_grid(teacher, args.seed), "2x2 + distillation"),
            (fig10_grid(args.seed), "Fig. 10 step logs"),
            ([c for c in grid if c.epochs == 2], "paper grid (Fig. 3), 2 epochs"),
            (seeds_grid(), "seeds study")]


def reproduce(args):
    data = get_data(args.data_dir)
    out = Path(args.out or RUNS_DIR / ("quick.jsonl" if args.quick else "results.jsonl"))
    start = time.perf_counter()
    planned = [c for configs, _ in studies(args, data) for c in configs]  # in the order they run
    run_ids = {c.run_id for c in planned}
    done = completed_runs(out) & run_ids
    if done:
        print(f"resuming: {len(done)} of {len(run_ids)} runs already in {out}")
    run_sweep(planned, out, data, args.eval_every, args.max_batch, args.workers, args.threads)
    wall = time.perf_counter() - start
    training, evaluation = plan_flops([c for c in planned if c.run_id not in done], data, args.eval_every)
    print(f"results: {out} ({wall:.0f} s; {(training + evaluation) / 1e12:.1f} TFLOP of arithmetic, "
          f"{(training + evaluation) / wall / 1e9:.1f} GFLOP/s on average: `--bench` measures the matmul peak)")
    if not args.no_figures:
        make_figures(out, RUNS_DIR / "quick-plots" if args.quick else Path("plots"))


# --------------------------------------------------------------------------------------------------
# 7. Benchmark: matmul peak, training and evaluation throughput as fractions of it, wall times
# --------------------------------------------------------------------------------------------------


def forward_flops_per_image():
    """2 * in * out multiply-adds per layer."""
    return sum(2 * pm.PARAM_SHAPES[w][0] * pm.PARAM_SHAPES[w][1] for w in WEIGHTS)


def training_flops_per_image():
    """Forward 2*in*out per layer; backward 4*in*out, except 2*in*out for the first (no input gradient)."""
    return sum((4 if w == "w1" else 6) * pm.PARAM_SHAPES[w][0] * pm.PARAM_SHAPES[w][1] for w in WEIGHTS)


def plan_flops(configs, data, eval_every):
    """(training, evaluation) floating-point operations of a sweep: every run's training images, every
    evaluation point's 20,000 test images (pi0's step 0 once per seed), Fig. 10's per-step probes."""
    eval_images = len(data.mnist_test_x) + len(data.fashion_test_x)
    training = evaluation = 0
    for c in set(configs):
        steps_per_epoch = len(data.mnist_train_x) // c.batch_size
        steps = c.epochs * steps_per_epoch
        training += steps * c.batch_size * training_flops_per_image()
        points = len(pm.evaluation_steps(c.epochs, steps_per_epoch, eval_every))
        evaluation += points * eval_images * forward_flops_per_image()
        if c.log_steps:  # the FashionMNIST gradient and the forward KL before and after each logged step
            probe = FIG10_FASHION * training_flops_per_image() + 2 * FIG10_MNIST * forward_flops_per_image()
            training += steps // c.log_steps * probe
    evaluation += len({c.seed for c in configs}) * eval_images * forward_flops_per_image()
    return training, evaluation


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(args):
    data = get_data(args.data_dir)
    ref = reference_for(data, args.seed)
    print(f"Machine: {os.cpu_count()} CPU cores; the sweep: {args.workers} worker(s) x {args.threads} torch thread(s); "
          f"torch {torch.__version__}, fp32.\n")
    # Peak: the batched matmuls of one training step (max-batch stacked runs, batch 64) and of evaluation.
    runs, batch = args.max_batch, 64
    layer_shapes = [pm.PARAM_SHAPES[w] for w in WEIGHTS]
    shapes = [(runs, batch, k, n) for k, n in layer_shapes] + [(1, 10000, k, n) for k, n in layer_shapes]
    print("| matmul R x (M x K) @ (K x N) | GFLOP/s |\n|---|---|")
    peak = 0.0
    for r, m, k, n in shapes:
        a, b = torch.randn(r, m, k), torch.randn(r, k, n)
        gflops = 2 * r * m * k * n / timed(lambda: torch.bmm(a, b), 20) / 1e9
        peak = max(peak, gflops)
        print(f"| {r} x ({m} x {k}) @ ({k} x {n}) | {gflops:.1f} |")
    # Training: a batch of rl runs for 150 steps without evaluation, on a 150-batch slice of MNIST.
    steps = 150
    sub = dataclasses.replace(data, mnist_train_x=data.mnist_train_x[:steps * batch],
                              mnist_train_y=data.mnist_train_y[:steps * batch])
    configs = [RunConfig("rl", float(lr), "constant", seed=args.seed) for lr in np.geomspace(3e-6, 1e-3, runs)]
    with worker_pool(args.workers, sub, {args.seed: ref}, 0, args.threads) as pool:  # as the sweep trains
        list(pool.map(train_batch, [configs] * args.workers))  # start the workers
        wall = timed(lambda: list(pool.map(train_batch, [configs] * args.workers)), 1)
    images = args.workers * runs * steps * batch
    achieved = images * training_flops_per_image() / wall / 1e9
    print(f"\nTraining ({runs} rl runs as one batched model, batch {batch}, G = 8, in each of {args.workers} "
          f"worker(s)): {images / wall:,.0f} images/s, {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f} % of the "
          f"matmul peak ({peak:.1f} GFLOP/s).")
    single = [RunConfig("rl", 3e-4, seed=args.seed)]
    wall_single = timed(lambda: train_runs(single, sub, ref, eval_every=0, progress=False), 1)
    print(f"One run alone ({torch.get_num_threads()} threads in one process): {steps * batch / wall_single:,.0f} "
          f"images/s.")
    # AdamW's update is memory traffic, not arithmetic: weight, gradient and two moments read, three written.
    stacked = [torch.randn(runs, *shape).requires_grad_() for shape in pm.PARAM_SHAPES.values()]
    for weights in stacked:
        weights.grad = torch.randn_like(weights)
    adamw = torch.optim.AdamW(stacked, fused=True)
    wall_adamw = timed(adamw.step, 20)
    weights_per_run = sum(math.prod(shape) for shape in pm.PARAM_SHAPES.values())
    print(f"AdamW step of {runs} runs: {1e3 * wall_adamw:.2f} ms, "
          f"{runs * weights_per_run * 28 / wall_adamw / 1e9:.1f} GB/s of memory traffic.")
    # Evaluation: every metric of Table 1 for one checkpoint (both test sets, 20,000 images).
    wall_eval = timed(lambda: evaluate(ref.base, data, ref), 3)
    eval_images = len(data.mnist_test_x) + len(data.fashion_test_x)
    achieved_eval = eval_images * forward_flops_per_image() / wall_eval / 1e9
    print(f"Evaluation of one checkpoint ({torch.get_num_threads()} threads in one process): {wall_eval:.3f} s, "
          f"{achieved_eval:.1f} GFLOP/s in its forward passes = {100 * achieved_eval / peak:.0f} % of the matmul peak.")
    # The arithmetic of --reproduce at that peak: the least time any implementation could take on this machine.
    plan = [c for configs, _ in studies(args, data, teacher=RUNS_DIR / f"teacher_rl_seed{args.seed}.pt")
            for c in configs]
    training, evaluation = plan_flops(plan, data, args.eval_every)
    at_peak = (training + evaluation) / peak / 1e9
    run_steps = sum(c.epochs * (len(data.mnist_train_x) // c.batch_size) for c in set(plan))
    print(f"--reproduce ({len(set(plan))} runs): {training / 1e12:.0f} TFLOP of training, {evaluation / 1e12:.0f} "
          f"TFLOP of evaluation; at the peak {at_peak / 60:.1f} min, the arithmetic lower bound for this machine "
          f"(--reproduce prints the rate it achieved). Its {run_steps:,} AdamW updates add "
          f"{run_steps * wall_adamw / runs / 60:.1f} min at the rate above.")
    # Wall times of the lab's two commands.
    for label, cmd in (("python parity_mnist.py --method rl", [pm.__file__, "--method", "rl"]),
                       ("python parity_sweep.py --quick --no-figures",
                        [__file__, "--quick", "--no-figures", "--out", str(RUNS_DIR / "bench_quick.jsonl")])):
        (RUNS_DIR / "bench_quick.jsonl").unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, *cmd, "--data-dir", args.data_dir], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # each command's own defaults
        print(f"Wall time of `{label}`: {time.perf_counter() - start:.1f} s.")


# --------------------------------------------------------------------------------------------------
# 8. Main
# --------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.workers * args.threads)  # this process's own work: pi0, the teacher, the bench
    if args.bench:
        bench(args)
    else:
        reproduce(args)


if __name__ == "__main__":
    main()
