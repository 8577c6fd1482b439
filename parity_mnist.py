"""ParityMNIST, the controlled experiment of "RL's Razor" (Shenfeld, Pari, Agrawal, 2025, arXiv 2509.04259, §3).

A small MLP is pretrained on a little MNIST (the parity task: any digit label with the image's parity is
correct) and a little FashionMNIST (the prior task). That model is the base policy pi0. We fine-tune it on
ParityMNIST alone, with RL or with SFT, and watch two numbers: how much FashionMNIST it forgets, and how
far its outputs move from pi0 in forward KL(pi0 || pi) on the new task's inputs, the quantity the paper
finds predicts forgetting (§3, Eq. 1).

    python parity_mnist.py --method rl       # GRPO: about 10 s on a laptop CPU
    python parity_mnist.py --method sft1     # SFT to fixed labels: similar parity accuracy, more forgetting
    python parity_mnist.py --help            # every method and setting

Read it in order: 1. settings, 2. data, 3. model, 4. pretraining pi0, 5. fine-tuning: the loop and the
loss of each method, 6. evaluation, 7. loading data and models, 8. main. Divergences and losses come from
kl.py. parity_sweep.py trains the paper's grid of these runs, many at once, and parity_figures.py draws it.
"""
import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kl

# --------------------------------------------------------------------------------------------------
# 1. Settings
# --------------------------------------------------------------------------------------------------

METHODS = {
    "rl": "GRPO: sample G labels per image from the model, reward 1 for the right parity",
    "rl-kl": "GRPO plus a KL penalty to pi0 (Fig. 3's 'RL + KL reg.')",
    "reinforce": "1-0 REINFORCE: on-policy, only correct samples are pushed up (§5.1)",
    "sft1": "SFT dist. 1: every even digit -> label 0, every odd digit -> label 1",
    "sft2": "SFT dist. 2: even -> 0 or 4, odd -> 1 or 5, one label drawn per image",
    "sft-oracle": "SFT on the optimal distribution: pi0 restricted to the right parity (Fig. 3)",
    "sft-distill": "SFT on labels sampled from an RL-trained model, --teacher (Fig. 9)",
    "simpo": "SimPO: offline, SFT dist. 1 labels preferred over wrong-parity labels (§5.1)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="rl", choices=METHODS, help="fine-tuning method: "
                   + "; ".join(f"{name}: {what}" for name, what in METHODS.items()))
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the 60,000 MNIST training images")
    p.add_argument("--scheduler", default="cosine", choices=["constant", "cosine"],
                   help="learning-rate schedule after a linear warmup (the paper sweeps both)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup, as a fraction of all steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per optimizer step")
    p.add_argument("--group-size", type=int, default=8, help="labels sampled per image (rl, rl-kl, reinforce)")
    p.add_argument("--kl-coef", type=float, default=0.1, help="rl-kl: penalty coefficient (paper: 0.1)")
    p.add_argument("--kl-direction", default="reverse", choices=["reverse", "forward"],
                   help="rl-kl: penalise reverse KL(pi || pi0), GRPO's usual choice, or forward KL(pi0 || pi)")
    p.add_argument("--oracle-targets", default="sampled", choices=["sampled", "soft"],
                   help="sft-oracle: one label sampled per image (the paper) or the whole distribution")
    p.add_argument("--teacher", default="", help="sft-distill: a model saved with --save after --method rl")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="epochs of pretraining pi0 (section 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining, data order and sampling")
    p.add_argument("--eval-every", type=float, default=0.2, help="evaluate every this many epochs")
    p.add_argument("--save", default="", help="save the fine-tuned model here (e.g. a teacher for sft-distill)")
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/ and FashionMNIST/")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = p.parse_args(argv)
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    for name in ("epochs", "batch_size", "group_size", "pretrain_epochs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not args.eval_every > 0:
        p.error(f"--eval-every must be > 0 epochs, got {args.eval_every}")
    if not 0 <= args.warmup < 1:
        p.error(f"--warmup is a fraction of all steps in [0, 1), got {args.warmup}")
    if args.method == "sft-distill" and not args.teacher:
        p.error("--method sft-distill needs --teacher PATH: first train and save an RL model, e.g. "
                "`python parity_mnist.py --method rl --save runs/parity/rl.pt`")
    return args


# --------------------------------------------------------------------------------------------------
# 2. Data: both datasets as in-memory tensors, flattened, with the task indicator appended (App. B.3)
# --------------------------------------------------------------------------------------------------

NORMALISATION = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530)}  # per-dataset mean, std
INDICATOR = {"MNIST": 1.0, "FashionMNIST": -1.0}  # the 785th input: +1 = ParityMNIST, -1 = FashionMNIST


@dataclasses.dataclass
class Data:
    mnist_train_x: torch.Tensor  # [60000, 785], last column +1
    mnist_train_y: torch.Tensor  # [60000] digits
    mnist_test_x: torch.Tensor
    mnist_test_y: torch.Tensor
    fashion_train_x: torch.Tensor  # [60000, 785], last column -1
    fashion_train_y: torch.Tensor
    fashion_test_x: torch.Tensor
    fashion_test_y: torch.Tensor


def correct_labels(digits):
    """Boolean [..., 10]: the labels with the digit's parity, the correct set S(x) of §3."""
    return torch.arange(10) % 2 == (digits % 2).unsqueeze(-1)


def parity_reward(labels, digits):
    """The binary reward R(x, y) = 1[y mod 2 == digit(x) mod 2]."""
    return (labels % 2 == digits % 2).float()


# --------------------------------------------------------------------------------------------------
# 3. Model: the MLP 785 -> 512 -> 256 -> 10 with ReLUs (App. B.3), as a plain dict of weights
# --------------------------------------------------------------------------------------------------

PARAM_SHAPES = {"w1": (785, 512), "b1": (512,), "w2": (512, 256), "b2": (256,), "w3": (256, 10), "b3": (10,)}


def init_params(seed):
    """PyTorch's nn.Linear initialisation, each weight stored as [in, out] so that a layer is x @ w + b."""
    torch.manual_seed(seed)
    params = {}
    for layer in (1, 2, 3):
        fan_in, fan_out = PARAM_SHAPES[f"w{layer}"]
        linear = torch.nn.Linear(fan_in, fan_out)
        params[f"w{layer}"] = linear.weight.detach().T.contiguous()
        params[f"b{layer}"] = linear.bias.detach().clone()
    return params


def mlp(params, x, return_hidden=False):
    """Logits [..., B, 10] of inputs x [B, 785]; with return_hidden, also the last hidden layer [..., B, 256].
    The leading dimensions are parity_sweep.py's: it stacks many models' weights as [R, in, out]."""
    hidden = torch.relu(x @ params["w1"] + params["b1"].unsqueeze(-2))
    hidden = torch.relu(hidden @ params["w2"] + params["b2"].unsqueeze(-2))
    logits = hidden @ params["w3"] + params["b3"].unsqueeze(-2)
    return (logits, hidden) if return_hidden else logits


# --------------------------------------------------------------------------------------------------
# 4. Pretraining the base model pi0 (App. B.3): 500 MNIST and 500 FashionMNIST images, jointly
# --------------------------------------------------------------------------------------------------

PRETRAIN_IMAGES, PRETRAIN_LR, PRETRAIN_BATCH = 500, 1e-3, 50  # per task; not given by the paper


def pretrain(data, seed, epochs=2):
    """Adam on cross-entropy. Every epoch each MNIST image gets a label drawn uniformly from the five digits
    of its parity, so pi0 spreads its mass over the correct labels: it is not a digit classifier (App. B.3)."""
    gen = torch.Generator().manual_seed(seed)
    mnist_idx = torch.randperm(len(data.mnist_train_x), generator=gen)[:PRETRAIN_IMAGES]
    fashion_idx = torch.randperm(len(data.fashion_train_x), generator=gen)[:PRETRAIN_IMAGES]
    x = torch.cat([data.mnist_train_x[mnist_idx], data.fashion_train_x[fashion_idx]])
    digits, fashion_labels = data.mnist_train_y[mnist_idx], data.fashion_train_y[fashion_idx]
    params = {k: v.requires_grad_() for k, v in init_params(seed).items()}
    optimizer = torch.optim.Adam(params.values(), lr=PRETRAIN_LR)
    for _ in range(epochs):
        parity_labels = digits % 2 + 2 * torch.randint(0, 5, (PRETRAIN_IMAGES,), generator=gen)
        labels = torch.cat([parity_labels, fashion_labels])
        for idx in torch.randperm(2 * PRETRAIN_IMAGES, generator=gen).split(PRETRAIN_BATCH):
            loss = kl.sft_loss(mlp(params, x[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.detach() for k, v in params.items()}


# --------------------------------------------------------------------------------------------------
# 5. Fine-tuning: the loop, then the loss of each method (§3, §5.1). Edit a branch, rerun, compare.
# --------------------------------------------------------------------------------------------------


def finetune(args, data, base, teacher=None, on_eval=None):
    """Fine-tune a copy of pi0 on ParityMNIST with args.method. Returns the model and one row of scores
    per evaluation point, step 0 (pi0 itself) first; on_eval(row) is called as each row is measured."""
    gen = torch.Generator().manual_seed(args.seed)  # data order and every label the method samples
    train_x, train_digits = data.mnist_train_x, data.mnist_train_y
    sft2_labels = train_digits % 2 + 4 * torch.randint(0, 2, train_digits.shape, generator=gen)  # once per image
    with torch.no_grad():
        base_test_logits = mlp(base, data.mnist_test_x)
        base_fashion_acc = accuracy(mlp(base, data.fashion_test_x), data.fashion_test_y)
    params = {k: v.clone().requires_grad_() for k, v in base.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps_per_epoch = len(train_x) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    schedule = lr_multiplier(args.scheduler, round(args.warmup * total_steps), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    eval_steps = evaluation_steps(args.epochs, steps_per_epoch, args.eval_every)
    rows = []
    for step in range(total_steps + 1):
        if step == 0 or step in eval_steps:  # pi0 itself first, then every --eval-every epochs
            with torch.no_grad():
                metrics = scores(mlp(params, data.mnist_test_x), mlp(params, data.fashion_test_x), data,
                                 base_test_logits, base_fashion_acc)
            rows.append({"step": step, "epoch": step / steps_per_epoch, **metrics})
            if on_eval is not None:
                on_eval(rows[-1])
        if step == total_steps:
            break
        if step % steps_per_epoch == 0:  # a new epoch, a new order of the training images
            order = torch.randperm(len(train_x), generator=gen)
        idx = order[step % steps_per_epoch * args.batch_size:][:args.batch_size]
        x, digits = train_x[idx], train_digits[idx]
        with torch.no_grad():  # the fixed models some methods take their targets from
            base_logits = mlp(base, x) if args.method in ("rl-kl", "sft-oracle") else None
            teacher_logits = mlp(teacher, x) if teacher is not None else None
        loss = method_loss(args, mlp(params, x), digits, sft2_labels[idx], base_logits, teacher_logits, gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {k: v.detach() for k, v in params.items()}, rows


def gumbel_sample(logits, num_samples, gen):
    """Labels [..., B, num_samples] sampled from softmax(logits [..., B, 10]) by the Gumbel-max trick.
    The noise [B, num_samples, 10] does not depend on leading dimensions: stacked models share it."""
    noise = -torch.empty(logits.shape[-2], num_samples, logits.shape[-1]).exponential_(generator=gen).log()
    return (logits.unsqueeze(-2) + noise).argmax(-1)


def method_loss(cfg, logits, digits, sft2_labels, base_logits, teacher_logits, gen):
    """The loss of method cfg.method on one batch, averaged over its images (and samples).

    logits [B, 10]: the model being trained, on images whose true digits are digits [B]. sft2_labels [B]:
    SFT dist. 2's label of each image. base_logits, teacher_logits [B, 10]: pi0 and the RL teacher on the
    same images, for the methods that need them (else None). parity_sweep.py passes [R, B, 10] logits of R
    stacked models; every line below works on them unchanged.
    """
    if cfg.method in ("rl", "rl-kl", "reinforce"):
        labels = gumbel_sample(logits.detach(), cfg.group_size, gen)  # on-policy: G labels per image
        rewards = parity_reward(labels, digits.unsqueeze(-1))  # [B, G]
        if cfg.method == "reinforce":  # 1-0 REINFORCE: advantage = reward, positives only (§5.1)
            advantages = kl.reinforce_advantages(rewards)
        else:  # GRPO: (r - group mean) / group std, one update per batch: REINFORCE with a group baseline
            advantages = kl.group_advantages(rewards)
        logprobs = F.log_softmax(logits, -1).gather(-1, labels)
        loss = kl.policy_gradient_loss(logprobs.flatten(), advantages.flatten())
        if cfg.method == "rl-kl":  # "RL + KL reg." (Fig. 3): exact 10-way KL to pi0 on the batch
            base_logits = base_logits.expand_as(logits)
            loss = loss + cfg.kl_coef * kl.kl_penalty(base_logits, logits, direction=cfg.kl_direction)
        return loss
    if cfg.method == "sft1":  # SFT dist. 1: even -> 0, odd -> 1
        targets = digits % 2
    elif cfg.method == "sft2":  # SFT dist. 2: even -> {0, 4}, odd -> {1, 5}
        targets = sft2_labels
    elif cfg.method == "sft-oracle":  # pi0 restricted to the correct parity and renormalised (Fig. 3, Lemma A.1)
        oracle_logprobs = kl.restrict_to_correct(base_logits, correct_labels(digits))
        if cfg.oracle_targets == "soft":
            return kl.sft_loss(logits, oracle_logprobs.exp().expand_as(logits))
        targets = gumbel_sample(oracle_logprobs, 1, gen).squeeze(-1)
    elif cfg.method == "sft-distill":  # labels sampled from an RL-trained teacher (Fig. 9)
        targets = gumbel_sample(teacher_logits, 1, gen).squeeze(-1)
    elif cfg.method == "simpo":  # offline positives (SFT dist. 1) against wrong-parity negatives (§5.1)
        chosen = digits % 2
        rejected = (1 - digits % 2) + 2 * torch.randint(0, 5, digits.shape, generator=gen)
        logprobs = F.log_softmax(logits, -1)
        chosen_logprobs = logprobs.gather(-1, chosen.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        rejected_logprobs = logprobs.gather(-1, rejected.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return kl.simpo_loss(chosen_logprobs, rejected_logprobs)
    else:
        raise ValueError(f"unknown method {cfg.method!r}")
    return kl.sft_loss(logits, targets.expand(logits.shape[:-1]))


# --------------------------------------------------------------------------------------------------
# 6. Evaluation: Fig. 3's numbers at one checkpoint; the schedule
# --------------------------------------------------------------------------------------------------


def accuracy(logits, labels):
    return (logits.argmax(-1) == labels).float().mean().item()


def scores(logits, fashion_logits, data, base_logits, base_fashion_acc):
    """The new task's accuracy, the prior task's accuracy and the divergences from pi0, for one model.

    logits, base_logits: the model and pi0 on the MNIST test images (indicator +1, the new task's inputs:
    every divergence is measured there, §3); fashion_logits: the model on FashionMNIST test (indicator -1).
    """
    correct = correct_labels(data.mnist_test_y)
    metrics = {
        "parity_acc": correct.gather(-1, logits.argmax(-1, keepdim=True)).float().mean().item(),
        "expected_reward": (logits.softmax(-1) * correct).sum(-1).mean().item(),
        "fashion_acc": accuracy(fashion_logits, data.fashion_test_y),
    }
    metrics["forgetting"] = base_fashion_acc - metrics["fashion_acc"]  # prior-task accuracy lost
    for name, per_image in kl.divergences(base_logits, logits).items():  # forward_kl = KL(pi0 || pi), Eq. 1
        metrics[name] = per_image.double().mean().item()
    return metrics


def evaluation_steps(epochs, steps_per_epoch, every):
    """The steps after which a run is evaluated: every `every` epochs, and the last step."""
    total = epochs * steps_per_epoch
    count = math.floor(epochs / every + 1e-9)
    return {min(total, round(k * every * steps_per_epoch)) for k in range(1, count + 1)} | {total}


def lr_multiplier(scheduler, warmup_steps, total_steps):
    """Linear warmup, then constant or cosine decay to 0: transformers' get_{constant,cosine}_schedule_with_warmup."""
    def multiplier(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return multiplier


# --------------------------------------------------------------------------------------------------
# 7. Loading the datasets, saving and loading models
# --------------------------------------------------------------------------------------------------


def load_split(name, train, data_dir):
    """One torchvision split as (inputs [N, 785], labels [N]); one clear line if it is missing offline."""
    from torchvision import datasets
    dataset_class = getattr(datasets, name)
    try:
        dataset = dataset_class(data_dir, train=train, download=False)
    except RuntimeError:
        try:
            dataset = dataset_class(data_dir, train=train, download=True)
        except Exception:
            sys.exit(f"error: {name} not found in {data_dir}/{name}/raw and it could not be downloaded; "
                     f"run `make data` or pass --data-dir pointing at a folder with MNIST/ and FashionMNIST/")
    mean, std = NORMALISATION[name]
    inputs = torch.empty(len(dataset.data), 785)
    inputs[:, :784] = dataset.data.reshape(len(dataset.data), -1)
    inputs[:, :784].div_(255).sub_(mean).div_(std)  # (pixel / 255 - mean) / std, in place
    inputs[:, 784] = INDICATOR[name]
    return inputs, dataset.targets.clone()


def load_data(data_dir, train_size=None, test_size=None):
    """MNIST and FashionMNIST, train and test; optionally only the first images of each (the tests do)."""
    splits = {}
    for name, key in (("MNIST", "mnist"), ("FashionMNIST", "fashion")):
        for train, split, size in ((True, "train", train_size), (False, "test", test_size)):
            inputs, labels = load_split(name, train, data_dir)
            splits[f"{key}_{split}_x"], splits[f"{key}_{split}_y"] = inputs[:size], labels[:size]
    return Data(**splits)


def save_params(params, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(f"{path}.tmp")
    torch.save({k: v.detach().clone() for k, v in params.items()}, temporary)
    temporary.replace(path)  # atomic: a killed run never leaves half a file


def load_params(path):
    """A model saved by save_params (loaded with weights_only=True); one clear line if it is not one."""
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
# 8. Main: pretrain pi0, fine-tune it, print how it moved
# --------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_params(args.teacher) if args.teacher else None  # a bad checkpoint fails before any work
    data = load_data(args.data_dir)
    start = time.perf_counter()
    base = pretrain(data, args.seed, args.pretrain_epochs)
    print(f"ParityMNIST, --method {args.method} ({METHODS[args.method]})")
    print(f"lr {args.lr:g} {args.scheduler}, {args.epochs} epoch(s) of batch {args.batch_size}; "
          f"pi0 pretrained for {args.pretrain_epochs} epoch(s), seed {args.seed}")
    print(f"{'step':>6} {'epoch':>6} {'parity acc':>11} {'FashionMNIST acc':>17} {'forward KL':>11}")

    def show(row):
        print(f"{row['step']:6d} {row['epoch']:6.2f} {row['parity_acc']:11.1%} {row['fashion_acc']:17.1%} "
              f"{row['forward_kl']:11.3f}", flush=True)

    params, rows = finetune(args, data, base, teacher, on_eval=show)
    before, after = rows[0], rows[-1]
    print(f"trained {after['step']} steps in {time.perf_counter() - start:.1f} s: parity "
          f"{before['parity_acc']:.1%} -> {after['parity_acc']:.1%}, FashionMNIST {before['fashion_acc']:.1%} -> "
          f"{after['fashion_acc']:.1%} (forgetting {after['forgetting']:.1%}), forward KL(pi0 || pi) "
          f"{after['forward_kl']:.3f} nats, reverse KL(pi || pi0) {after['reverse_kl']:.3f}")
    if args.save:
        save_params(params, args.save)
        print(f"saved: {args.save}")


if __name__ == "__main__":
    main()
