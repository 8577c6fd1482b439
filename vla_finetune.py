"""RL vs SFT on a vision-language-action policy: the robotics experiment of "RL's Razor" (App. B.2).

Shenfeld, Pari, Agrawal (2025), arXiv 2509.04259, fine-tune OpenVLA-7B on a new pick task with SFT on
demonstrations and with on-policy REINFORCE on a binary success reward, and measure forgetting as
success on earlier manipulation tasks. This script runs the same loop on two model paths, loaded by the
same `load_policy` (transformers' Auto classes):

  --model openvla/openvla-7b   the real model: a GPU, the HuggingFace hub and OpenVLA's own pins in a
                               separate environment (pip install -r requirements-openvla.txt: transformers
                               4.40.1, timm 0.9.10, ...); bf16, optional --lora (r=32, all linear layers),
                               --unnorm-key bridge_orig (or another key of its norm_stats), --image-size 224.
  --model PATH                 a tiny stand-in VLA this script builds (`--method bc` creates one under
                               OUT_DIR/base): a 2-layer Llama backbone, a small conv image encoder whose patch
                               embeddings follow <s> and precede the prompt, OpenVLA's 32000-token id layout
                               (the last 256 ids are the action bins), OpenVLA's prompt and `predict_action`.
                               It is what the tests and the CPU experiment use (requirements.txt).

The simulator is ManiSkill3 (CPU physics, RGB camera, `pd_ee_delta_pose`: 7-D actions in [-1, 1], the
same format as OpenVLA's end-effector deltas); its renderer needs a Vulkan device (on a CPU-only Debian 12
machine: mesa-vulkan-drivers 25.x from bookworm-backports, i.e. lavapipe). The CPU experiment, an
analogue of the paper's and not a reproduction (new task PickCube, prior tasks PushCube and PullCube):

  python vla_finetune.py --method bc                        # expert demos, behaviour-clone the base pi0
  python vla_finetune.py --method rl  --lr 1e-4 3e-4 1e-3   # fine-tune pi0 on the new task, GRPO (sweep)
  python vla_finetune.py --method sft --lr 1e-4 3e-4 1e-3   # ... or SFT on the expert's demonstrations
  python vla_finetune.py --method sft --lr 1e-4 3e-4 1e-3 --sft-demos one-axis   # ... or another demonstrator's
  python vla_finetune.py --method plot                      # plots/vla_pareto.png, vla_forgetting_vs_kl.png

Every evaluation point appends one JSON line to OUT_DIR/results.jsonl (new-task success, prior-task
success per task, forward KL(pi0 || pi) over the 7 action tokens on new-task observations); an
interrupted run resumes from its last evaluation point without losing or duplicating a line. All losses
and divergences come from kl.py.
"""
import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import transformers
from PIL import Image
from transformers.modeling_outputs import CausalLMOutput
from tqdm import tqdm

import kl

# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------

NEW_TASK, PRIOR_TASKS = "PickCube-v1", ["PushCube-v1", "PullCube-v1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["bc", "rl", "sft", "plot"], required=True,
                   help="bc: collect expert demos and behaviour-clone the base pi0; rl / sft: fine-tune "
                        "on the new task; plot: draw plots/vla_*.png from the results file")
    p.add_argument("--model", default=None,
                   help="policy to start from: a stand-in directory (default for rl/sft: OUT_DIR/base; "
                        "for bc: a fresh stand-in) or a hub id such as openvla/openvla-7b")
    p.add_argument("--env", default=NEW_TASK, help="new task (ManiSkill3 env id)")
    p.add_argument("--prior-envs", nargs="*", default=PRIOR_TASKS, help="prior tasks: forgetting = their success")
    p.add_argument("--out-dir", default="runs/vla", help="demos, checkpoints, results.jsonl")
    p.add_argument("--plots-dir", default="plots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, nargs="+", default=[3e-4], help="one run per learning rate (sweep)")
    p.add_argument("--lora", action="store_true", help="LoRA r=32 on all linear layers (OpenVLA's recipe)")
    p.add_argument("--unnorm-key", default=None, help="action statistics key (default: the model's only key)")
    # simulator
    p.add_argument("--image-size", type=int, default=64, help="camera resolution (OpenVLA: 224)")
    p.add_argument("--horizon", type=int, default=20, help="steps per episode (experts need <= 15)")
    # demonstrations and the base policy
    p.add_argument("--prior-demos", type=int, default=300, help="expert episodes per prior task for pi0")
    p.add_argument("--new-demos-in-base", type=int, default=150, help="new-task demos mixed into pi0's data")
    p.add_argument("--bc-steps", type=int, default=6000)
    p.add_argument("--bc-lr", type=float, default=1e-3)
    p.add_argument("--demo-noise", type=float, default=0.0,
                   help="std of noise on the expert's executed xyz moves in pi0's demos, recorded clean (DART)")
    p.add_argument("--bc-shift", type=int, default=0,
                   help="random-shift augmentation in pixels for behaviour cloning (DrQ; 0: none)")
    # fine-tuning
    p.add_argument("--train-states", type=int, default=32,
                   help="initial states (env seeds) of the new task used by both RL and SFT (paper: 10x10 grid)")
    p.add_argument("--sft-epochs", type=int, default=3, help="epochs over one expert demo per training state")
    p.add_argument("--sft-demos", choices=list(SFT_DEMONSTRATORS), default="expert",
                   help="expert: demos of the expert pi0 was cloned from; one-axis: another demonstrator "
                        "(the same moves, one axis per step)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=48, help="RL iterations (one update each)")
    p.add_argument("--states-per-iter", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4, help="rollouts per initial state (GRPO group)")
    p.add_argument("--advantage", choices=["grpo", "reinforce"], default="grpo",
                   help="grpo: group-normalised reward; reinforce: 1-0 REINFORCE (advantage = reward)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--eval-points", type=int, default=5, help="evaluations per run, evenly spaced")
    p.add_argument("--eval-episodes", type=int, default=32, help="per task and evaluation point (paper: 100)")
    p.add_argument("--kl-episodes", type=int, default=4, help="base rollouts whose frames measure the KL")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the stand-in is small: 1 is fastest "
                                                          "per core; run two jobs side by side rather than 2 threads)")
    args = p.parse_args(argv)
    if args.method in ("rl", "sft") and args.model is None:
        args.model = str(Path(args.out_dir) / "base")
    if args.bc_shift < 0 or args.demo_noise < 0:
        p.error("--bc-shift and --demo-noise must be >= 0")
    for name in ("horizon", "prior_demos", "bc_steps", "train_states", "sft_epochs", "batch_size", "iterations",
                 "states_per_iter", "group_size", "eval_points", "eval_episodes", "kl_episodes", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_points < 2:
        p.error("--eval-points must be >= 2 (the start and the end of a run)")
    if any(lr <= 0 for lr in args.lr):
        p.error("--lr must be positive")
    if args.states_per_iter > args.train_states:
        p.error("--states-per-iter must be <= --train-states (initial states are drawn without replacement)")
    return args


# --------------------------------------------------------------------------------------------------
# 1. OpenVLA's action tokenisation (PAPER.md §7.2; constants of the public OpenVLA code)
# --------------------------------------------------------------------------------------------------

VOCAB_SIZE = 32000            # Llama-2 vocabulary; OpenVLA pads its embedding matrix, not this number
N_BINS = 256
ACTION_DIM = 7                # six end-effector deltas + gripper
ACTION_TOKEN_BEGIN = VOCAB_SIZE - N_BINS   # 31744: action ids are 31744..31999
SPIECE_UNDERLINE_ID = 29871   # "▁", appended after "Out:" at inference
BINS = np.linspace(-1.0, 1.0, N_BINS)
BIN_CENTERS = (BINS[:-1] + BINS[1:]) / 2.0   # 255 centres


def prompt_for(instruction):
    """OpenVLA's prompt; the instruction is lower-cased."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


def actions_to_tokens(normalized_actions):
    """token = 32000 - digitize(clip(a, -1, 1), bins): a = -1 -> 31999, 0 -> 31872, +1 -> 31744."""
    a = np.clip(np.asarray(normalized_actions, np.float64), -1.0, 1.0)
    return VOCAB_SIZE - np.digitize(a, BINS)


def tokens_to_actions(token_ids):
    """Bin centre of each action id: bin_centres[clip(32000 - id - 1, 0, 254)], e.g. 31744 -> 0.99608."""
    index = np.clip(VOCAB_SIZE - np.asarray(token_ids) - 1, 0, N_BINS - 2)
    return BIN_CENTERS[index]


def action_stats(actions):
    """OpenVLA-style statistics of a dataset's actions [N, 7]; the gripper (last dim) is not normalised."""
    actions = np.asarray(actions, np.float64)
    mask = [True] * (ACTION_DIM - 1) + [False]
    return {"action": {"q01": np.quantile(actions, 0.01, axis=0).tolist(),
                       "q99": np.quantile(actions, 0.99, axis=0).tolist(), "mask": mask}}


def normalize_actions(actions, stats):
    """a_n = clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) on masked dims; others unchanged."""
    q01, q99, mask = (np.asarray(stats["action"][k]) for k in ("q01", "q99", "mask"))
    actions = np.asarray(actions, np.float64)
    scaled = np.clip(2 * (actions - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    return np.where(mask, scaled, actions)


def unnormalize_actions(normalized, stats):
    """Inverse on masked dims: 0.5 (a_n + 1)(q99 - q01) + q01 (OpenVLA's predict_action)."""
    q01, q99, mask = (np.asarray(stats["action"][k]) for k in ("q01", "q99", "mask"))
    normalized = np.asarray(normalized, np.float64)
    return np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)


# --------------------------------------------------------------------------------------------------
# 2. The tiny stand-in VLA: OpenVLA's interface at CPU size, registered with transformers' Auto classes
# --------------------------------------------------------------------------------------------------

# transformers 4.40 (OpenVLA's pin) calls the Auto class AutoModelForVision2Seq; 5.x renamed it.
AutoVLA = getattr(transformers, "AutoModelForVision2Seq", None) or transformers.AutoModelForImageTextToText
WORDS = ("in what action should the robot take to pick up push pull lift move place stack poke open close "
         "the a cube sphere peg drawer can to onto into on target goal upright out").split()


class TinyVLAConfig(transformers.PretrainedConfig):
    model_type = "tiny_vla"

    def __init__(self, image_size=64, hidden_size=128, num_layers=2, num_heads=4, norm_stats=None, **kwargs):
        self.image_size, self.hidden_size = image_size, hidden_size
        self.num_layers, self.num_heads = num_layers, num_heads
        self.norm_stats = norm_stats or {}
        super().__init__(**kwargs)

    def llama_config(self):
        return transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2)


def with_coordinates(images):
    """CoordConv (Liu et al., 2018): append each pixel's (row, column) in [-1, 1] as two channels, so that
    convolutions can report *where* a small object is. Without them the cloned stand-in ignored the 5-pixel
    cube and acted the same at every cube position."""
    b, _, height, width = images.shape
    rows = torch.linspace(-1, 1, height, dtype=images.dtype, device=images.device).view(1, 1, height, 1)
    cols = torch.linspace(-1, 1, width, dtype=images.dtype, device=images.device).view(1, 1, 1, width)
    return torch.cat([images, rows.expand(b, 1, height, width), cols.expand(b, 1, height, width)], dim=1)


class TinyVLAForActionPrediction(transformers.PreTrainedModel):
    """Image patches are inserted right after <s>, as in OpenVLA; logits cover patches + text."""
    config_class = TinyVLAConfig
    base_model_prefix = "tiny_vla"
    _tied_weights_keys = {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        h = config.hidden_size
        self.vision = nn.Sequential(  # (RGB + 2 coordinates) x S x S -> h x S/8 x S/8 patch embeddings
            nn.Conv2d(5, 32, 4, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 4, 2, 1), nn.GELU(),
            nn.Conv2d(64, h, 4, 2, 1))
        self.patch_position = nn.Parameter(torch.zeros(1, (config.image_size // 8) ** 2, h))
        self.projector = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))
        self.language_model = transformers.LlamaForCausalLM(config.llama_config())
        self.norm_stats = config.norm_stats
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):  # lets peft's "all-linear" skip the (tied) output layer
        return self.language_model.get_output_embeddings()

    def forward(self, input_ids, pixel_values, attention_mask=None, logits_to_keep=0, action_ids_only=False,
                **kwargs):
        patches = self.vision(with_coordinates(pixel_values)).flatten(2).transpose(1, 2) + self.patch_position
        patches = self.projector(patches)
        text = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], patches.shape[1])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        hidden = self.language_model.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        if logits_to_keep:  # only the last positions' logits: the action tokens are all a step needs
            hidden = hidden[:, -logits_to_keep:]
        if action_ids_only:  # only the 256 action ids' logits: 1/125 of the output layer's work
            return CausalLMOutput(logits=hidden @ self.language_model.lm_head.weight[ACTION_TOKEN_BEGIN:].T)
        return CausalLMOutput(logits=self.language_model.lm_head(hidden))

    @torch.no_grad()
    def predict_action(self, input_ids, unnorm_key=None, pixel_values=None, attention_mask=None, **kwargs):
        """OpenVLA's semantics: append "▁" if missing, greedily decode 7 tokens over the full vocabulary,
        map ids to bin centres, un-normalise with norm_stats[unnorm_key]. Batch size 1."""
        if input_ids[0, -1] != SPIECE_UNDERLINE_ID:
            input_ids = torch.cat([input_ids, input_ids.new_full((1, 1), SPIECE_UNDERLINE_ID)], dim=1)
        for _ in range(ACTION_DIM):
            next_id = self(input_ids, pixel_values).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        normalized = tokens_to_actions(input_ids[0, -ACTION_DIM:].cpu().numpy())
        key = unnorm_key or next(iter(self.norm_stats))
        return unnormalize_actions(normalized, self.norm_stats[key])


class TinyVLAProcessor(transformers.ProcessorMixin):
    """processor(text, images) -> input_ids (with <s>), attention_mask, pixel_values in [-1, 1]."""
    attributes = ["tokenizer"]                    # transformers 4.40 (OpenVLA's pin) needs both names spelt out
    tokenizer_class = "PreTrainedTokenizerFast"

    def __init__(self, tokenizer=None, **kwargs):
        super().__init__(tokenizer, **kwargs)

    def __call__(self, text, images, **kwargs):
        text = [text] if isinstance(text, str) else list(text)
        images = images if isinstance(images, (list, tuple)) else [images]
        encoded = self.tokenizer(text, return_tensors="pt")
        pixels = torch.stack([torch.as_tensor(np.array(im)).permute(2, 0, 1) for im in images])
        pixel_values = pixels.float() / 127.5 - 1.0
        return transformers.BatchFeature({**encoded, "pixel_values": pixel_values})


transformers.AutoConfig.register("tiny_vla", TinyVLAConfig, exist_ok=True)
AutoVLA.register(TinyVLAConfig, TinyVLAForActionPrediction, exist_ok=True)
transformers.AutoProcessor.register(TinyVLAConfig, TinyVLAProcessor, exist_ok=True)


def build_tokenizer():
    """A word-level tokenizer with Llama's special ids (<unk> 0, <s> 1, </s> 2, "▁" 29871) and 32000 ids;
    the last 256 are action tokens. Words outside the small task vocabulary map to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    pieces = {piece for w in WORDS + ["In:", "\nOut:", "?"] for piece, _ in pre.pre_tokenize_str(w)}
    pieces |= {piece for piece, _ in pre.pre_tokenize_str(prompt_for(" ".join(WORDS)))}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": SPIECE_UNDERLINE_ID}
    for piece in sorted(pieces - set(vocab)):
        vocab[piece] = len(vocab) - 1 if len(vocab) - 1 < SPIECE_UNDERLINE_ID else len(vocab)
    used = set(vocab.values())
    for i in range(VOCAB_SIZE):
        if i not in used:
            name = f"<action_{i - ACTION_TOKEN_BEGIN}>" if i >= ACTION_TOKEN_BEGIN else f"<unused_{i}>"
            vocab[name] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def build_stand_in(path, image_size=64, norm_stats=None, seed=0):
    """Create and save an untrained stand-in (model + processor) at `path`."""
    torch.manual_seed(seed)
    model = TinyVLAForActionPrediction(TinyVLAConfig(image_size=image_size, norm_stats=norm_stats))
    model.save_pretrained(path)
    TinyVLAProcessor(build_tokenizer()).save_pretrained(path)
    return path


def load_policy(name, lora=False):
    """Both paths load the same way: the Auto classes (OpenVLA's remote code, or the registered stand-in).

    bf16 on a GPU (OpenVLA's recipe), float32 on CPU. transformers 5 renamed `torch_dtype` to `dtype`;
    OpenVLA's pinned 4.40.1 only knows the old name."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        processor = transformers.AutoProcessor.from_pretrained(name, trust_remote_code=True)
        model = AutoVLA.from_pretrained(name, trust_remote_code=True, **{dtype_kwarg: dtype})
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot load a policy from {name!r} ({str(error).splitlines()[0]}); build the "
                 f"stand-in base with `python vla_finetune.py --method bc`, or pass a hub id such as "
                 f"openvla/openvla-7b (online, pip install -r requirements-openvla.txt)")
    if torch.cuda.is_available():
        model = model.to("cuda")
    if lora:  # OpenVLA's fine-tuning recipe: rank 32, alpha 16, every linear layer
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules="all-linear", init_lora_weights="gaussian"))
    return model, processor


# --------------------------------------------------------------------------------------------------
# 3. Action-token distributions: sampling, log-probs, KL (restricted to the 256 action ids)
# --------------------------------------------------------------------------------------------------


def device_of(model):
    return next(model.parameters()).device


def encode(processor, model, instruction, images):
    """Batch of observations of one task (same prompt) -> model inputs ending with "▁"."""
    inputs = processor([prompt_for(instruction)] * len(images), [Image.fromarray(im) for im in images])
    ids = inputs["input_ids"]
    if ids[0, -1] != SPIECE_UNDERLINE_ID:
        ids = torch.cat([ids, ids.new_full((len(ids), 1), SPIECE_UNDERLINE_ID)], dim=1)
    dtype = next(model.parameters()).dtype
    return ids.to(device_of(model)), inputs["pixel_values"].to(device_of(model), dtype)


def action_logits(model, input_ids, pixel_values, action_tokens):
    """Teacher-forced logits of the 7 action positions, restricted to the 256 action ids: [B, 7, 256].

    Restricting and renormalising makes the policy the 256-way distribution it samples from (§7.2)."""
    ids = torch.cat([input_ids, action_tokens[:, :-1].to(input_ids.device)], dim=1)
    logits = model(input_ids=ids, pixel_values=pixel_values, **_last(model, ACTION_DIM)).logits
    return _action_ids(logits[:, -ACTION_DIM:]).float()


def _last(model, n):
    """The stand-in computes only the last n positions' logits, and only over the action ids (memory, time);
    OpenVLA's code has no such options."""
    return {"logits_to_keep": n, "action_ids_only": True} if model.config.model_type == "tiny_vla" else {}


def _action_ids(logits):
    """The 256 action ids' logits, whether the model returned the full vocabulary or only those."""
    return logits if logits.shape[-1] == N_BINS else logits[..., ACTION_TOKEN_BEGIN:VOCAB_SIZE]


@torch.no_grad()
def sample_action_tokens(model, input_ids, pixel_values, generator=None, greedy=False):
    """Autoregressively draw 7 action ids from the restricted distribution (temperature 1)."""
    ids = input_ids
    for _ in range(ACTION_DIM):
        logits = model(input_ids=ids, pixel_values=pixel_values, **_last(model, 1)).logits
        logits = _action_ids(logits[:, -1])
        if greedy:
            choice = logits.argmax(-1)
        else:
            choice = torch.multinomial(torch.softmax(logits.float(), -1).cpu(), 1, generator=generator)[:, 0]
        ids = torch.cat([ids, (choice.to(ids.device) + ACTION_TOKEN_BEGIN)[:, None]], dim=1)
    return ids[:, -ACTION_DIM:].cpu()


def step_logprobs(model, input_ids, pixel_values, action_tokens):
    """log pi(a|o) of a step = sum of the 7 action tokens' log-probs (kl.token_logprobs)."""
    logits = action_logits(model, input_ids, pixel_values, action_tokens)
    return kl.token_logprobs(logits, (action_tokens - ACTION_TOKEN_BEGIN).to(logits.device)).sum(-1)


# --------------------------------------------------------------------------------------------------
# 4. Simulator, tasks and scripted experts (ManiSkill3, CPU physics, RGB camera)
# --------------------------------------------------------------------------------------------------

LIFT_HEIGHT = 0.06  # cube centre (rest height 0.02) lifted by 4 cm while grasped


def _xyz(actor):
    return actor.pose.p[0].cpu().numpy()


def _toward(tcp, target):
    """pd_ee_delta_pose maps [-1, 1] to +-0.1 m: move the whole error in one step, clipped."""
    return np.clip((target - tcp) / 0.1, -1, 1)


def lift_expert(env):
    u = env.unwrapped
    cube, tcp = _xyz(u.cube), u.agent.tcp_pose.p[0].cpu().numpy()
    if bool(u.agent.is_grasping(u.cube)[0]):  # lift 3 cm a step: a policy that closes and lifts in one step
        target, grip = np.r_[cube[:2], cube[2] + 0.03], -1.0  # (an easy confusion) still holds the cube
    elif np.linalg.norm(cube[:2] - tcp[:2]) > 0.02:  # the open fingers tolerate ~2 cm; the descent corrects xy
        target, grip = np.r_[cube[:2], cube[2] + 0.08], 1.0
    elif tcp[2] - cube[2] > 0.005:
        target, grip = cube, 1.0
    else:
        target, grip = cube, -1.0
    return np.r_[_toward(tcp, target), 0, 0, 0, grip]


def one_axis_lift_expert(env):
    """Another demonstrator for the new task: the lift expert's moves, one axis per step (the largest error).
    It solves the task too, with actions pi0 was never shown. SFT on its demos is the analogue of ParityMNIST's
    SFT on fixed labels, and SFT on the lift expert's (whose demos pi0 was cloned from) of its oracle SFT:
    the paper's claim is that the labels' distance from pi0, not the loss, decides forgetting (§3, §5)."""
    action = lift_expert(env)
    largest = np.argmax(np.abs(action[:3]))
    action[:3] = np.where(np.arange(3) == largest, action[:3], 0.0)
    return action


# --sft-demos: name -> (tag in run and demo-file names, demonstrator; None = the task's own expert)
SFT_DEMONSTRATORS = {"expert": ("demos", None), "one-axis": ("oneaxis", one_axis_lift_expert)}


def push_expert(env, direction):
    """Go over to the far side of the cube from the goal, descend, sweep along x (closed gripper)."""
    u = env.unwrapped
    cube, goal, tcp = _xyz(u.obj), _xyz(u.goal_region), u.agent.tcp_pose.p[0].cpu().numpy()
    behind = np.r_[cube[0] - direction * 0.045, cube[1], 0.02]
    if (tcp[0] - cube[0]) * direction > -0.035 or abs(tcp[1] - cube[1]) > 0.01:
        far = np.linalg.norm(tcp[:2] - behind[:2]) > 0.01
        target = np.r_[behind[:2], 0.08] if far else behind
    elif tcp[2] > 0.03:
        target = behind
    else:
        target = np.r_[goal[0] - direction * 0.045, goal[1], 0.02]
    return np.r_[_toward(tcp, target), 0, 0, 0, -1.0]


def lift_success(env, info):
    u = env.unwrapped
    return bool(u.agent.is_grasping(u.cube)[0]) and float(u.cube.pose.p[0, 2]) > LIFT_HEIGHT


# PickCube's own success needs an invisible goal point; the paper's new task is grasp-and-lift (SimplerEnv
# "pick coke can"), so the new task here is PickCube's scene with a lift success.
TASKS = {
    "PickCube-v1": dict(instruction="pick up the cube", expert=lift_expert, success=lift_success),
    "PushCube-v1": dict(instruction="push the cube to the target", expert=lambda e: push_expert(e, 1.0)),
    "PullCube-v1": dict(instruction="pull the cube to the target", expert=lambda e: push_expert(e, -1.0)),
}


def task_info(env_id):
    """Registered tasks have an expert; any other ManiSkill env works for RL and evaluation."""
    return TASKS.get(env_id, dict(instruction=env_id.split("-")[0].lower(), expert=None))


# One fixed third-person camera for every task, as OpenVLA sees its datasets' single main view. ManiSkill's
# defaults differ per task (PullCube looks from behind the robot) and show the 4 cm cube as ~2 pixels at 64 px.
# This one looks at the workspace from the front and low (22 cm up), so the cube is ~7 pixels wide and the
# gripper's height above it is visible: from higher up (eye (0.35, 0, 0.4)) the clone could not tell when to close.
CAMERA = dict(eye=[0.3, 0.0, 0.22], target=[-0.05, 0.0, 0.02], fov=0.9)


@functools.cache  # one simulator per task and process: starting ManiSkill's renderer takes seconds
def make_env(env_id, image_size, horizon):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the environments)
    from mani_skill.utils import assets, download_asset, sapien_utils
    from mani_skill.utils.registration import REGISTERED_ENVS

    def refuse(message):  # never prompt: missing assets are an error with a fix
        sys.exit(f"error: {message.splitlines()[-1]} Download them first: "
                 f"python -m mani_skill.utils.download_asset {env_id}")
    download_asset.prompt_yes_no = refuse
    if env_id not in REGISTERED_ENVS:
        sys.exit(f"error: unknown ManiSkill env {env_id!r}; bundled ones include {', '.join(TASKS)}")
    missing = [a for a in REGISTERED_ENVS[env_id].asset_download_ids
               if a in assets.DATA_SOURCES and not assets.is_data_source_downloaded(a)]
    if missing:
        refuse(f"{env_id} needs assets {missing} that are not on this machine.")
    try:
        return gym.make(env_id, obs_mode="rgb", control_mode="pd_ee_delta_pose", render_mode=None,
                        sensor_configs=dict(width=image_size, height=image_size, base_camera=dict(
                            pose=sapien_utils.look_at(CAMERA["eye"], CAMERA["target"]), fov=CAMERA["fov"])),
                        max_episode_steps=horizon)
    except RuntimeError as error:
        if "vulkan" in str(error).lower() or "render" in str(error).lower():
            sys.exit("error: ManiSkill's renderer found no Vulkan device; install a driver (README: Vulkan)")
        raise


def camera_image(obs):
    return obs["sensor_data"]["base_camera"]["rgb"][0].cpu().numpy()


def to_env_action(action):
    """Policy actions use OpenVLA's gripper convention (1 = open, 0 = close); the env wants +1 / -1."""
    return np.r_[action[:6], 2.0 * action[6] - 1.0].astype(np.float32)


def to_policy_action(env_action):
    return np.r_[env_action[:6], (env_action[6] + 1.0) / 2.0]


def run_episode(env, env_id, seed, horizon, act):
    """One episode from initial state `seed`; act(image) -> (env action, record). Stops at success."""
    success_fn = task_info(env_id).get("success") or (lambda e, info: bool(info["success"][0]))
    # reconfigure: rebuild the scene. A plain reset left ManiSkill's CPU physics with state from earlier episodes:
    # the same policy on the same seed could succeed on one pass and fail on the next (1 of 32 PushCube episodes).
    obs, _ = env.reset(seed=seed, options=dict(reconfigure=True))
    records, success = [], False
    for _ in range(horizon):
        image = camera_image(obs)
        action, record = act(image)
        records.append((image, record))
        obs, _, _, _, info = env.step(action)
        if success_fn(env, info):
            success = True
            break
    return records, success


# --------------------------------------------------------------------------------------------------
# 5. Policies acting in the simulator
# --------------------------------------------------------------------------------------------------


def expert_policy(env, env_id, noise=0.0, rng=None, expert=None):
    """The scripted expert. With noise > 0 the executed xyz move is perturbed while the recorded action stays
    the expert's (DART, Laskey et al. 2017): the demos then show how to recover from small errors, which a
    cloned policy makes and clean demos never visit."""
    expert = expert or task_info(env_id)["expert"]
    if expert is None:
        sys.exit(f"error: no scripted expert for {env_id}; demos exist for {', '.join(TASKS)}")

    def act(image):
        action = expert(env)
        executed = action.copy()
        if noise > 0:
            executed[:3] = np.clip(action[:3] + rng.normal(0.0, noise, 3), -1, 1)
        return executed, to_policy_action(action)
    return act


def model_policy(model, processor, instruction, stats, greedy, generator=None):
    """Greedy (evaluation) or sampled (RL) actions; records the 7 action tokens."""
    def act(image):
        ids, pixels = encode(processor, model, instruction, [image])
        tokens = sample_action_tokens(model, ids, pixels, generator, greedy)
        action = unnormalize_actions(tokens_to_actions(tokens[0].numpy()), stats)
        return to_env_action(action), tokens[0]
    return act


def evaluate_success(model, processor, envs, stats, seeds, horizon, desc):
    """Greedy success rate per task on fixed evaluation seeds."""
    model.eval()
    rates = {}
    for env_id, env in envs.items():
        act = model_policy(model, processor, task_info(env_id)["instruction"], stats, greedy=True)
        wins = [run_episode(env, env_id, s, horizon, act)[1] for s in tqdm(seeds, desc=f"{desc} {env_id}",
                                                                           leave=False)]
        rates[env_id] = float(np.mean(wins))
    return rates


@torch.no_grad()
def forward_kl_on_states(model, processor, kl_states, instruction, batch=64):
    """E_o [KL(pi0(.|o) || pi(.|o))] over the 7 action tokens (chain rule, prefixes sampled from pi0),
    exact over the 256 action ids, restricted and renormalised (kl.sequence_forward_kl)."""
    model.eval()
    sums, means = [], []
    for i in range(0, len(kl_states["images"]), batch):
        images = kl_states["images"][i:i + batch]
        ids, pixels = encode(processor, model, instruction, list(images))
        logits = action_logits(model, ids, pixels, kl_states["tokens"][i:i + batch])
        base = kl_states["base_logits"][i:i + batch].to(logits.device)
        out = kl.sequence_forward_kl(base, logits, torch.ones(logits.shape[:2]))
        sums.append(out["sum"].cpu()), means.append(out["mean"].cpu())
    return float(torch.cat(sums).mean()), float(torch.cat(means).mean())


# --------------------------------------------------------------------------------------------------
# 6. Updates: SFT (cross-entropy on expert action tokens) and RL (policy gradient on episode success)
# --------------------------------------------------------------------------------------------------


def sft_step(model, processor, optimizer, scheduler, instruction, images, tokens):
    model.train()
    ids, pixels = encode(processor, model, instruction, images)
    logits = action_logits(model, ids, pixels, tokens)
    loss = kl.sft_loss(logits, (tokens - ACTION_TOKEN_BEGIN).to(logits.device))
    _apply(model, optimizer, scheduler, loss)
    return float(loss.detach())


def rl_step(model, processor, optimizer, scheduler, instruction, episodes, advantages, minibatch=64):
    """One policy-gradient update: each step's summed 7-token log-prob carries its episode's advantage;
    kl.policy_gradient_loss averages an episode's steps, then the episodes (GRPO's aggregation).
    The loss is linear in the log-probs, so minibatches of steps accumulate the exact full-batch gradient."""
    model.train()
    mask = torch.zeros(len(episodes), max(len(ep) for ep in episodes))
    for e, ep in enumerate(episodes):
        mask[e, :len(ep)] = 1
    steps = [(e, t, image, tokens) for e, ep in enumerate(episodes) for t, (image, tokens) in enumerate(ep)]
    optimizer.zero_grad()
    for i in range(0, len(steps), minibatch):
        chunk = steps[i:i + minibatch]
        ids, pixels = encode(processor, model, instruction, [s[2] for s in chunk])
        logprobs = step_logprobs(model, ids, pixels, torch.stack([s[3] for s in chunk])).cpu()
        placed = torch.zeros_like(mask).index_put(
            (torch.tensor([s[0] for s in chunk]), torch.tensor([s[1] for s in chunk])), logprobs)
        kl.policy_gradient_loss(placed, advantages, mask).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # max grad norm 1 (App. B.2)
    optimizer.step(), scheduler.step()


def _apply(model, optimizer, scheduler, loss):
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # max grad norm 1 (App. B.2)
    optimizer.step(), scheduler.step()


def make_optimizer(model, lr, warmup):
    """AdamW, weight decay 0, constant learning rate after a linear warm-up (App. B.2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return optimizer, scheduler


# --------------------------------------------------------------------------------------------------
# 7. Demonstrations, the base policy pi0, and the fixed observations for the KL
# --------------------------------------------------------------------------------------------------

SEEDS = dict(eval=10_000, prior_demos=20_000, base_new_demos=30_000, kl=40_000)  # + index; training: 0..N-1


def collect_demos(env, env_id, seeds, horizon, path, noise=0.0, expert=None):
    """Successful expert episodes (policy-format actions), saved once and reused."""
    if path.exists():
        return torch.load(path, weights_only=False)
    demos = []
    for seed in tqdm(seeds, desc=f"expert demos {env_id}", leave=False):
        act = expert_policy(env, env_id, noise, np.random.default_rng(seed), expert)
        records, success = run_episode(env, env_id, seed, horizon, act)
        if success:
            demos.append(dict(seed=seed, images=np.stack([r[0] for r in records]),
                              actions=np.stack([r[1] for r in records])))
    if not demos:
        sys.exit(f"error: the {env_id} expert succeeded in none of {len(seeds)} episodes within "
                 f"--horizon {horizon}; raise --horizon (the experts need about 15 steps)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(demos, path)
    return demos


def demo_batches(demos, stats):
    """Flatten episodes into (images [N, S, S, 3], action tokens [N, 7])."""
    images = np.concatenate([d["images"] for d in demos])
    actions = np.concatenate([d["actions"] for d in demos])
    return images, torch.as_tensor(actions_to_tokens(normalize_actions(actions, stats)))


def random_shift(images, pad, rng):
    """DrQ's augmentation (Kostrikov et al., 2020): pad each image by `pad` edge pixels and crop it back at a
    random offset. It keeps where the gripper is relative to the cube and blurs where both are in the frame,
    which a behaviour-cloned policy with few demos otherwise memorises."""
    if pad == 0:
        return images
    size = images.shape[1]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = rng.integers(0, 2 * pad + 1, size=(len(images), 2))
    return np.stack([p[dy:dy + size, dx:dx + size] for p, (dy, dx) in zip(padded, offsets)])


def behaviour_clone(args, out):
    """pi0: a fresh stand-in trained with kl.sft_loss on prior-task demos plus some new-task demos."""
    envs = {e: make_env(e, args.image_size, args.horizon) for e in [args.env] + args.prior_envs}
    noisy = f"_noise{args.demo_noise:g}" if args.demo_noise else ""
    demo_sets = {e: ([SEEDS["prior_demos"] + i for i in range(args.prior_demos)], f"prior{args.prior_demos}")
                 for e in args.prior_envs}
    demo_sets[args.env] = ([SEEDS["base_new_demos"] + i for i in range(args.new_demos_in_base)],
                           f"base{args.new_demos_in_base}")
    data = {e: collect_demos(envs[e], e, seeds, args.horizon, out / "demos" / f"{e}_{name}{noisy}.pt", args.demo_noise)
            for e, (seeds, name) in demo_sets.items()}
    actions = np.concatenate([d["actions"] for demos in data.values() for d in demos])
    stats = {"maniskill": action_stats(actions)}
    path = build_stand_in(out / "stand_in_init", args.image_size, stats, args.seed)
    model, processor = load_policy(str(path))
    batches = {e: demo_batches(d, stats["maniskill"]) for e, d in data.items() if d}
    sizes = np.array([len(b[1]) for b in batches.values()], np.float64)
    optimizer, scheduler = make_optimizer(model, args.bc_lr, warmup=50)
    rng = np.random.default_rng(args.seed)
    for step in (bar := tqdm(range(args.bc_steps), desc="behaviour cloning pi0")):
        env_id = list(batches)[rng.choice(len(batches), p=sizes / sizes.sum())]  # one task per batch
        images, tokens = batches[env_id]
        pick = rng.choice(len(tokens), size=min(args.batch_size, len(tokens)), replace=False)
        loss = sft_step(model, processor, optimizer, scheduler, task_info(env_id)["instruction"],
                        list(random_shift(images[pick], args.bc_shift, rng)), tokens[pick])
        bar.set_postfix(loss=f"{loss:.3f}")
    model.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")
    return model, processor, envs


def kl_states_for(model, processor, env, args, stats, path):
    """Observations from pi0's own (sampled) new-task episodes, one 7-token prefix per observation drawn
    from pi0 (temperature 1, action ids only), and pi0's restricted logits there: computed once."""
    if path.exists():
        return torch.load(path, weights_only=False)
    generator = torch.Generator().manual_seed(args.seed)
    act = model_policy(model, processor, task_info(args.env)["instruction"], stats, False, generator)
    images = []
    for i in range(args.kl_episodes):
        records, _ = run_episode(env, args.env, SEEDS["kl"] + i, args.horizon, act)
        images += [r[0] for r in records]
    instruction = task_info(args.env)["instruction"]
    tokens, logits = [], []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            ids, pixels = encode(processor, model, instruction, images[i:i + 64])
            sampled = sample_action_tokens(model, ids, pixels, generator)
            tokens.append(sampled), logits.append(action_logits(model, ids, pixels, sampled).cpu())
    states = dict(images=np.stack(images), tokens=torch.cat(tokens), base_logits=torch.cat(logits))
    torch.save(states, path)
    return states


# --------------------------------------------------------------------------------------------------
# 8. Fine-tuning runs: one JSON line per evaluation point, resumable
# --------------------------------------------------------------------------------------------------


def read_results(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path, record):
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate_point(model, processor, envs, args, stats, kl_states):
    seeds = [SEEDS["eval"] + i for i in range(args.eval_episodes)]
    rates = evaluate_success(model, processor, envs, stats, seeds, args.horizon, "eval")
    kl_sum, kl_token = forward_kl_on_states(model, processor, kl_states, task_info(args.env)["instruction"])
    prior = {e: rates[e] for e in args.prior_envs}
    return dict(new_task=args.env, new_success=rates[args.env], prior_success=prior,
                prior_mean=float(np.mean(list(prior.values()))) if prior else float("nan"),
                forward_kl=kl_sum, forward_kl_per_token=kl_token, kl_over="256 action ids, renormalised",
                kl_states=len(kl_states["tokens"]), eval_episodes=args.eval_episodes)


def finetune(args, out, results_path, lr):
    """Fine-tune pi0 on the new task with --method rl or sft at one learning rate."""
    sft_tag, sft_expert = SFT_DEMONSTRATORS[args.sft_demos]
    run = f"{args.method}_{args.advantage if args.method == 'rl' else sft_tag}_lr{lr:g}_seed{args.seed}"
    done = {r["step"] for r in read_results(results_path) if r.get("run") == run}
    total = args.iterations if args.method == "rl" else None
    model, processor = load_policy(args.model, args.lora)
    norm_stats = _unwrap(model).norm_stats
    key = args.unnorm_key or next(iter(norm_stats))
    if key not in norm_stats:
        sys.exit(f"error: --unnorm-key {key!r} is not in the model's norm_stats ({', '.join(norm_stats)})")
    stats = norm_stats[key]
    envs = {e: make_env(e, args.image_size, args.horizon) for e in [args.env] + args.prior_envs}
    instruction = task_info(args.env)["instruction"]
    kl_states = kl_states_for(model, processor, envs[args.env], args, stats, out / f"kl_states_{args.env}.pt")
    train_seeds = list(range(args.train_states))
    if args.method == "sft":  # one successful expert demo per training initial state (paper: 10 per grid point)
        suffix = "" if sft_expert is None else f"_{sft_tag}"  # the expert's demos keep their original file name
        demos = collect_demos(envs[args.env], args.env, train_seeds, args.horizon,
                              out / "demos" / f"{args.env}_train{args.train_states}{suffix}.pt", expert=sft_expert)
        images, tokens = demo_batches(demos, stats)
        per_epoch = math.ceil(len(tokens) / args.batch_size)
        total = args.sft_epochs * per_epoch
        shuffle = np.random.default_rng(args.seed)  # a fresh order per epoch, fixed before any resume
        orders = [shuffle.permutation(len(tokens)) for _ in range(args.sft_epochs)]
    eval_at = sorted({round(k * total / (args.eval_points - 1)) for k in range(args.eval_points)})
    if done - set(eval_at):
        sys.exit(f"error: {run} in {results_path} was run with other --iterations / --sft-epochs / "
                 f"--batch-size / --eval-points; pass those again, or use another --out-dir")
    if total in done:
        print(f"{run}: already complete in {results_path}")
        return
    optimizer, scheduler = make_optimizer(model, lr, args.warmup_steps)
    generator, rng = torch.Generator().manual_seed(args.seed), np.random.default_rng(args.seed)
    step, episodes_seen, wall = 0, 0, 0.0
    ckpt = out / "ckpt" / f"{run}.pt"
    if ckpt.exists():  # resume: weights, optimizer, scheduler and both random streams
        state = torch.load(ckpt, weights_only=False)
        _unwrap(model).load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"]), scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        rng.bit_generator.state = state["rng"]
        step, episodes_seen, wall = state["step"], state["episodes_seen"], state["wall"]
        print(f"{run}: resuming at step {step}")
    start = time.time() - wall
    bar = tqdm(total=total, initial=step, desc=run)
    while True:
        if step in eval_at and step not in done:
            record = evaluate_point(model, processor, envs, args, stats, kl_states)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(model={k: v for k, v in _unwrap(model).state_dict().items()},
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            generator=generator.get_state(), rng=rng.bit_generator.state, step=step,
                            episodes_seen=episodes_seen, wall=time.time() - start), ckpt)
            append_result(results_path, dict(run=run, method=args.method, lr=lr, seed=args.seed, step=step,
                                             fraction=step / total, episodes_seen=episodes_seen,
                                             wall_s=round(time.time() - start, 1), **record))
            bar.write(f"{run} step {step}: new {record['new_success']:.2f} prior {record['prior_mean']:.2f} "
                      f"KL {record['forward_kl']:.3f}")
            done.add(step)
        if step >= total:
            break
        if args.method == "sft":
            epoch, batch = divmod(step, per_epoch)
            pick = orders[epoch][batch * args.batch_size:(batch + 1) * args.batch_size]
            sft_step(model, processor, optimizer, scheduler, instruction, list(images[pick]), tokens[pick])
        else:
            states = rng.choice(train_seeds, size=args.states_per_iter, replace=False)
            act = model_policy(model, processor, instruction, stats, greedy=False, generator=generator)
            model.eval()
            episodes, rewards = [], []
            for seed in states:  # a group shares its initial state (same env seed)
                for _ in range(args.group_size):
                    records, success = run_episode(envs[args.env], args.env, int(seed), args.horizon, act)
                    episodes.append(records), rewards.append(float(success))
            rewards = torch.tensor(rewards).view(args.states_per_iter, args.group_size)
            advantages = (kl.group_advantages(rewards) if args.advantage == "grpo"
                          else kl.reinforce_advantages(rewards)).flatten()
            episodes_seen += len(episodes)
            if advantages.abs().sum() > 0:  # all-equal groups carry no signal
                rl_step(model, processor, optimizer, scheduler, instruction, episodes, advantages)
            bar.set_postfix(reward=f"{rewards.mean():.2f}")
        step += 1
        bar.update(1)
    bar.close()


def _unwrap(model):
    """The model under a peft wrapper (norm_stats, state dict)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --------------------------------------------------------------------------------------------------
# 9. Plots: trade-off (Pareto) and forgetting vs forward KL
# --------------------------------------------------------------------------------------------------


SERIES = {"grpo": ("RL (GRPO)", "tab:blue"), "reinforce": ("RL (REINFORCE)", "tab:cyan"),
          "demos": ("SFT, π0's expert", "tab:red"), "oneaxis": ("SFT, one-axis demonstrator", "tab:orange")}


def series_of(row):
    """Run names are {method}_{data}_lr..._seed...; data picks the series (GRPO, SFT on which demos, ...)."""
    return row["run"].split("_")[1]


def plot(results_path, plots_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_results(results_path)
    if not rows:
        sys.exit(f"error: no results in {results_path}; run --method bc, rl and sft first")
    plots_dir.mkdir(parents=True, exist_ok=True)
    base = [r for r in rows if r["method"] == "base"]
    by_series = {key: [r for r in rows if r["method"] != "base" and series_of(r) == key] for key in SERIES}
    by_series = {key: pts for key, pts in by_series.items() if pts}
    star = dict(color="black", marker="*", s=120, zorder=3, label="base π0")

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for key, pts in by_series.items():
        label, color = SERIES[key]
        pts = base + pts
        new, prior = [r["new_success"] for r in pts], [r["prior_mean"] for r in pts]
        ax.scatter(new, prior, color=color, alpha=0.4, s=15)
        front = kl.pareto_frontier(new, prior)
        ax.plot([new[i] for i in front], [prior[i] for i in front], "-o", color=color, label=f"{label} frontier")
    ax.scatter([r["new_success"] for r in base], [r["prior_mean"] for r in base], **star)
    ax.set(xlabel="new-task success", ylabel="prior-task success (mean)", title="VLA analogue: trade-off",
           xlim=(-0.03, 1.03))
    ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(plots_dir / "vla_pareto.png", dpi=120), plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for key, pts in by_series.items():
        label, color = SERIES[key]
        for ax, field in zip(axes, ("prior_mean", "new_success")):
            ax.scatter([r["forward_kl"] for r in pts], [r[field] for r in pts], color=color, s=20, alpha=0.7,
                       label=label)
    for ax, field in zip(axes, ("prior_mean", "new_success")):  # the base on top of the runs' step-0 points
        ax.scatter([r["forward_kl"] for r in base], [r[field] for r in base], **star)
    kls, prior = np.array([r["forward_kl"] for r in rows]), np.array([r["prior_mean"] for r in rows])
    if len(rows) > 3:
        coef, r2 = kl.fit_law(kls, prior)
        grid = np.linspace(0, kls.max(), 100)
        axes[0].plot(grid, np.polyval(coef, grid), "k--", label=f"quadratic fit, all points, R²={r2:.2f}")
    axes[0].set(xlabel="forward KL(π0‖π), new-task observations", ylabel="prior-task success (mean)",
                title="forgetting vs KL")
    axes[1].set(xlabel="forward KL(π0‖π), new-task observations", ylabel="new-task success", title="new task vs KL")
    axes[0].legend(fontsize=8)
    fig.tight_layout(), fig.savefig(plots_dir / "vla_forgetting_vs_kl.png", dpi=120), plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    results_path = out / "results.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    if args.method == "plot":
        return plot(results_path, Path(args.plots_dir))
    if args.method == "bc":
        if (out / "base").exists():
            model, processor = load_policy(str(out / "base"))
            envs = {e: make_env(e, args.image_size, args.horizon) for e in [args.env] + args.prior_envs}
        else:
            model, processor, envs = behaviour_clone(args, out)
        if not any(r["run"] == "base" for r in read_results(results_path)):
            stats = model.norm_stats[next(iter(model.norm_stats))]
            kl_states = kl_states_for(model, processor, envs[args.env], args, stats,
                                      out / f"kl_states_{args.env}.pt")
            record = evaluate_point(model, processor, envs, args, stats, kl_states)
            append_result(results_path, dict(run="base", method="base", lr=0.0, seed=args.seed, step=0,
                                             fraction=0.0, episodes_seen=0, **record))
            print(f"base pi0: new {record['new_success']:.2f}, prior {record['prior_success']}")
        return
    for lr in args.lr:
        finetune(args, out, results_path, lr)


if __name__ == "__main__":
    main()
