"""RL vs SFT on a vision-language-action policy: the robotics experiment of "RL's Razor".

Shenfeld, Pari, Agrawal (2025), https://arxiv.org/abs/2509.04259, App. B.2 and Fig. 2: fine-tune OpenVLA-7B on
a new pick task with SFT on another policy's successful demonstrations and with on-policy REINFORCE on a
binary success reward, and measure forgetting as success on earlier manipulation tasks. This script runs
that loop on two model paths, loaded by the same `load_policy` (transformers' Auto classes):

  --model openvla/openvla-7b   the real model: a GPU, the HuggingFace hub and OpenVLA's own pins in a
                               separate environment (pip install -r requirements-openvla.txt). Its defaults
                               (REAL_DEFAULTS) fit one 80 GB GPU: bf16 weights, fp32 LoRA adapters (r=32,
                               all linear layers) under bf16 autocast, micro-batches of 8, gradient
                               checkpointing, adapter-only checkpoints; it acts in ManiSkill3's Bridge
                               digital twins (BRIDGE_TASKS, the WidowX robot of its training data) with
                               bridge_orig statistics, 16 episodes at a time, KV-cached generation.
  --model PATH                 a tiny stand-in VLA this script builds (`--method bc` creates one under
                               OUT_DIR/base): a 2-layer Llama backbone, a small conv image encoder whose patch
                               embeddings follow <s> and precede the prompt, OpenVLA's 32000-token id layout
                               (the last 256 ids are the action bins), OpenVLA's prompt and `predict_action`.

The simulator is ManiSkill3 (for the stand-in: CPU physics, RGB camera, the Panda's `pd_ee_delta_pose`,
7-D actions in [-1, 1]); its renderer needs a Vulkan device (docs/vla_finetune.md). The CPU analogue (new
task PickCube, prior tasks PlaceSphere and LiftPegUpright), every arm of the comparison:

  python vla_finetune.py --method bc                        # pi0: behaviour-clone a stand-in on scripted demos
  python vla_finetune.py --method grpo --seeds 0            # one arm, one run per seed (and per --lr)
  python vla_finetune.py --method study --seeds 0 1 2       # every arm and seed; resumes where it stopped
  python vla_finetune.py --method plot                      # summary table, plots/vla_*.png

Arms (ARMS): grpo, reinforce (1-0), grpo-kl (+ KL penalty), sft-demonstrator (SFT on a different, competent
demonstrator: the paper's SFT), sft-pi0 (SFT on pi0's own successes: the oracle analogue), sft-rl (SFT on
the GRPO policy's successes, Fig. 9). Every evaluation point appends one JSON line to OUT_DIR/results.jsonl;
an interrupted run resumes from its last evaluation point without losing or duplicating a line. All losses
and divergences come from kl.py.
"""
import argparse
import contextlib
import functools
import hashlib
import importlib.util
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
from transformers.modeling_outputs import CausalLMOutputWithPast
from tqdm import tqdm

import kl

# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------

NEW_TASK, PRIOR_TASKS = "PickCube-v1", ["PlaceSphere-v1", "LiftPegUpright-v1"]
METHODS = ["bc", "grpo", "reinforce", "grpo-kl", "sft-demonstrator", "sft-pi0", "sft-rl", "study", "demonstrators",
           "plot"]


# What the two paths default to where an argument is not given. OpenVLA-7B's are estimated to need ~50 GB of
# one 80 GB GPU (the arithmetic, not yet a measurement: docs/vla_finetune.md, "Memory and time").
BRIDGE_NEW_TASK = "GraspCarrotInScene"
BRIDGE_PRIOR_TASKS = ["PutSpoonOnTableClothInScene-v1", "StackGreenCubeOnYellowCubeBakedTexInScene-v1",
                      "PutEggplantInBasketScene-v1"]
# The stand-in starts from a 4.6M-parameter clone, not a pretrained VLA: its arms need more episodes per group
# and more SFT passes to move its picking at all (docs/vla_finetune.md, "Results"); OpenVLA keeps the paper's
# single SFT epoch.
STAND_IN_DEFAULTS = dict(lora=False, micro_batch=64, gradient_checkpointing=False, image_size=64, env=NEW_TASK,
                         prior_envs=PRIOR_TASKS, horizon=20, num_envs=1, unnorm_key=None,
                         group_size=8, iterations=24, sft_epochs=16)
REAL_DEFAULTS = dict(lora=True, micro_batch=8, gradient_checkpointing=True, image_size=224, env=BRIDGE_NEW_TASK,
                     prior_envs=BRIDGE_PRIOR_TASKS, horizon=60, num_envs=16, unnorm_key="bridge_orig",
                     group_size=4, iterations=16, sft_epochs=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True,
                   help="bc: build pi0; an arm's name: fine-tune pi0 with it; study: every arm for every seed; "
                        "demonstrators: print the two pick demonstrators' comparison; plot: summary table and "
                        "plots/vla_*.png from the results file")
    p.add_argument("--model", default=None, help="policy to start from (default: OUT_DIR/base, built by bc) or a "
                                                 "hub id such as openvla/openvla-7b")
    p.add_argument("--env", default=None, help=f"new task (a ManiSkill3 env id or a BRIDGE_TASKS name; default: "
                                               f"{NEW_TASK}, OpenVLA {BRIDGE_NEW_TASK})")
    p.add_argument("--prior-envs", nargs="+", default=None, help="prior tasks: forgetting = their success")
    p.add_argument("--out-dir", default="runs/vla", help="cache, checkpoints, results.jsonl")
    p.add_argument("--plots-dir", default="plots")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (one run each)")
    p.add_argument("--lr", type=float, nargs="+", default=None,
                   help="learning rates of a single arm (one run each; default: the arm's, ARMS); not with study")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA r=32 on all linear layers (OpenVLA's recipe; default: on for OpenVLA, off for the "
                        "stand-in)")
    p.add_argument("--demos", default=None,
                   help="sft-demonstrator: a folder of another policy's episodes (.npz, format: load_demonstrations) "
                        "instead of the scripted demonstrator; needed for the Bridge scenes")
    p.add_argument("--norm-stats", default=None,
                   help="action statistics to add to the model's (OpenVLA's dataset_statistics.json format); pick "
                        "one with --unnorm-key")
    p.add_argument("--unnorm-key", default=None,
                   help="action statistics key (default: the stand-in's only key, OpenVLA bridge_orig)")
    # simulator
    p.add_argument("--image-size", type=int, default=None, help="camera resolution (default: 64, OpenVLA 224)")
    p.add_argument("--horizon", type=int, default=None,
                   help="steps per episode (default: 20, the demonstrators need <= 19; PlaceSphere's episodes get at "
                        "least 30; OpenVLA 60, the Bridge scenes' own limit, 120 for the eggplant)")
    p.add_argument("--num-envs", type=int, default=None,
                   help="episodes simulated at once (ManiSkill's GPU simulation when > 1; default: 1, OpenVLA 16)")
    # the base policy pi0
    p.add_argument("--prior-demos", type=int, default=600, help="expert episodes per prior task for pi0")
    p.add_argument("--new-demos-in-base", type=int, default=300, help="new-task demos mixed into pi0's data")
    p.add_argument("--bc-steps", type=int, default=16000)
    p.add_argument("--bc-lr", type=float, default=1e-3, help="peak; cosine decay to 0 over --bc-steps")
    # fine-tuning (paper App. B.2: a 10 x 10 grid, 5 trajectories per grid point per iteration)
    p.add_argument("--grid", type=int, default=8, help="training positions: an N x N grid of cube positions")
    p.add_argument("--samples-per-position", type=int, default=4,
                   help="sft-pi0 / sft-rl: sampled episodes per grid position, the successful ones kept")
    p.add_argument("--demos-per-position", type=int, default=10,
                   help="sft-demonstrator: the other demonstrator's episodes per grid cell, at random positions in "
                        "the cell, the successful ones kept (paper: 10 per grid point)")
    p.add_argument("--sft-epochs", type=int, default=None,
                   help="passes over SFT's data (default: 16, OpenVLA 1 as in the paper)")
    p.add_argument("--batch-size", type=int, default=32, help="SFT and behaviour-cloning batch (frames)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="frames per forward/backward pass; gradients accumulate to the whole batch's (default: "
                        "64, OpenVLA 8)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute the decoder layers in the backward pass (default: on for OpenVLA)")
    p.add_argument("--iterations", type=int, default=None,
                   help="RL iterations, one update each (default: 24, OpenVLA 16)")
    p.add_argument("--states-per-iter", type=int, default=16, help="grid positions per RL iteration")
    p.add_argument("--group-size", type=int, default=None,
                   help="episodes per position, one GRPO group (default: 8, OpenVLA 4)")
    p.add_argument("--kl-coef", type=float, default=0.1, help="grpo-kl: weight of the KL(pi || pi0) penalty")
    p.add_argument("--grpo-lr", type=float, default=ARMS["grpo"][2], help="sft-rl: the GRPO run it imitates")
    p.add_argument("--warmup-steps", type=int, default=3)
    # evaluation
    p.add_argument("--eval-points", type=int, default=4, help="points per run, evenly spaced, pi0's step 0 included")
    p.add_argument("--eval-episodes", type=int, default=100, help="per task and point (paper: 100 positions)")
    p.add_argument("--kl-episodes", type=int, default=4, help="pi0 rollouts whose frames measure the KL")
    p.add_argument("--match-at", type=float, nargs="+", default=None,
                   help="plot: new-task success levels to compare arms at (default: pi0's + 0.1 and + 0.2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the stand-in is small: 1 is fastest "
                                                          "per core)")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = str(Path(args.out_dir) / "base")
    for name, value in (REAL_DEFAULTS if is_openvla(args.model) else STAND_IN_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("micro_batch", "num_envs", "horizon", "prior_demos", "bc_steps", "grid", "samples_per_position",
                 "demos_per_position", "sft_epochs", "batch_size", "iterations", "states_per_iter", "group_size",
                 "eval_episodes", "kl_episodes", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_points < 2:
        p.error("--eval-points must be >= 2 (pi0 and the end of a run)")
    if args.lr is not None and (args.method == "study" or any(lr <= 0 for lr in args.lr)):
        p.error("--lr must be positive, and is for a single arm (study uses each arm's default, ARMS)")
    if args.kl_coef < 0:
        p.error("--kl-coef must be >= 0")
    if args.states_per_iter > len(training_starts(args.grid, args.env)):
        p.error("--states-per-iter must be <= --grid squared, or a Bridge scene's layouts (positions are drawn "
                "without replacement)")
    return args


# --------------------------------------------------------------------------------------------------
# 1. OpenVLA's action tokenisation (constants of the public OpenVLA code)
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
                       "q99": np.quantile(actions, 0.99, axis=0).tolist(),
                       "min": actions.min(0).tolist(), "max": actions.max(0).tolist(), "mask": mask}}


def normalize_actions(actions, stats):
    """a_n = clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) on masked dims, others unchanged; then every
    unused dimension (min == max in the statistics) becomes 0, as OpenVLA's data pipeline maps it
    (prismatic/vla/datasets/rlds/utils/data_utils.py, "Map unused action dimensions ... to all 0s")."""
    q01, q99, mask, low, high = (np.asarray(stats["action"][k]) for k in ("q01", "q99", "mask", "min", "max"))
    actions = np.asarray(actions, np.float64)
    scaled = np.clip(2 * (actions - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    return np.where(low == high, 0.0, np.where(mask, scaled, actions))


def unnormalize_actions(normalized, stats):
    """Inverse on masked dims: 0.5 (a_n + 1)(q99 - q01) + q01 (OpenVLA's predict_action); an unused
    dimension (q01 == q99) decodes to its constant value whatever its token."""
    q01, q99, mask = (np.asarray(stats["action"][k]) for k in ("q01", "q99", "mask"))
    normalized = np.asarray(normalized, np.float64)
    return np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)


# --------------------------------------------------------------------------------------------------
# 2. The tiny stand-in VLA: OpenVLA's interface at CPU size, registered with transformers' Auto classes
# --------------------------------------------------------------------------------------------------

# transformers 4.40 (OpenVLA's pin) calls the Auto class AutoModelForVision2Seq; 5.x renamed it.
AutoVLA = getattr(transformers, "AutoModelForVision2Seq", None) or transformers.AutoModelForImageTextToText
WORDS = ("in what action should the robot take to pick up push pull lift move place stack poke open close "
         "the a cube sphere peg bin drawer can to onto into on target goal upright out").split()


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

    def forward(self, input_ids, pixel_values=None, attention_mask=None, logits_to_keep=0, action_ids_only=False,
                past_key_values=None, use_cache=False, **kwargs):
        """OpenVLA's two cases: image + text (with use_cache, the keys and values are returned), or, given
        past_key_values, only the new token(s) after them."""
        text = self.get_input_embeddings()(input_ids)
        if past_key_values is None:
            patches = self.vision(with_coordinates(pixel_values)).flatten(2).transpose(1, 2) + self.patch_position
            patches = self.projector(patches)
            embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
            if attention_mask is not None:
                ones = attention_mask.new_ones(attention_mask.shape[0], patches.shape[1])
                attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        else:
            embeds = text
        cache = dict(past_key_values=past_key_values, use_cache=True) if use_cache else {}
        output = self.language_model.model(inputs_embeds=embeds, attention_mask=attention_mask, **cache)
        hidden = output.last_hidden_state
        if logits_to_keep:  # only the last positions' logits: the action tokens are all a step needs
            hidden = hidden[:, -logits_to_keep:]
        if action_ids_only:  # only the 256 action ids' logits: 1/125 of the output layer's work
            logits = hidden @ self.language_model.lm_head.weight[ACTION_TOKEN_BEGIN:].T
        else:
            logits = self.language_model.lm_head(hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=output.past_key_values if use_cache else None)

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


def is_openvla(name):
    """The real path: a local copy of OpenVLA (its config's model_type) or a hub id that names it."""
    config = Path(name) / "config.json"
    if config.exists():
        return json.loads(config.read_text()).get("model_type") == "openvla"
    return "openvla" in name.lower()


def load_policy(name, lora=False, dtype=None, gradient_checkpointing=False):
    """Both paths load the same way: the Auto classes (OpenVLA's remote code, or the registered stand-in).

    Default dtype: bf16 on a GPU (OpenVLA's recipe), float32 on CPU. transformers 5 renamed `torch_dtype` to
    `dtype`; OpenVLA's pinned 4.40.1 only knows the old name. OpenVLA gets FlashAttention-2 where flash-attn
    is installed, else PyTorch's fused SDPA; gradient checkpointing recomputes each decoder layer in the
    backward pass instead of storing its activations (docs/vla_finetune.md, "Memory and time")."""
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    kwargs = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}
    if is_openvla(name):
        has_flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
        kwargs["attn_implementation"] = "flash_attention_2" if has_flash else "sdpa"
    try:
        processor = transformers.AutoProcessor.from_pretrained(name, trust_remote_code=True)
        model = AutoVLA.from_pretrained(name, trust_remote_code=True, **kwargs)
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot load a policy from {name!r} ({str(error).splitlines()[0]}); build the "
                 f"stand-in base with `python vla_finetune.py --method bc`, or pass a hub id such as "
                 f"openvla/openvla-7b (online, pip install -r requirements-openvla.txt)")
    except (ImportError, NotImplementedError) as error:  # OpenVLA's remote code checks its packages and pins
        sys.exit(f"error: {str(error).splitlines()[0]} OpenVLA's code needs its own environment: "
                 f"pip install -r requirements-openvla.txt (docs/vla_finetune.md)")
    if torch.cuda.is_available():
        model = model.to("cuda")
    if lora:  # OpenVLA's fine-tuning recipe: rank 32, alpha 16, every linear layer
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules="all-linear", init_lora_weights="gaussian"))
        keep_trainable_in_fp32(model)
    if gradient_checkpointing:  # the decoder layers of the language model (OpenVLA's and the stand-in's)
        _unwrap(model).language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def keep_trainable_in_fp32(model):
    """The adapter's weights in float32 beside a bf16 base. bf16 keeps 8 significant bits: an AdamW step of
    1e-6 to 3e-5 (the paper's learning rates) on a LoRA weight of size ~0.03 is below half its spacing
    (~1e-4) and rounds away. The forward runs under bf16 autocast (`autocast`), so the matmuls stay bf16."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def autocast(model):
    """bf16 autocast when the (frozen) weights are bf16, so fp32 adapters and bf16 weights compute together;
    nothing otherwise (the float32 stand-in runs exactly as without it)."""
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return torch.autocast(device_of(model).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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

    Restricting and renormalising makes the policy the 256-way distribution it samples from."""
    ids = torch.cat([input_ids, action_tokens[:, :-1].to(input_ids.device)], dim=1)
    with autocast(model):
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
    """Autoregressively draw 7 action ids from the restricted distribution (temperature 1): the policy's
    distribution written plainly, recomputing the whole prefix for every token. Rollouts use the cached
    generate_action_tokens, tested equal to this."""
    ids = input_ids
    for _ in range(ACTION_DIM):
        with autocast(model):
            logits = model(input_ids=ids, pixel_values=pixel_values, **_last(model, 1)).logits
        logits = _action_ids(logits[:, -1])
        if greedy:
            choice = logits.argmax(-1)
        else:
            choice = torch.multinomial(torch.softmax(logits.float(), -1).cpu(), 1, generator=generator)[:, 0]
        ids = torch.cat([ids, (choice.to(ids.device) + ACTION_TOKEN_BEGIN)[:, None]], dim=1)
    return ids[:, -ACTION_DIM:].cpu()


@torch.no_grad()
def generate_action_tokens(model, input_ids, pixel_values, generators=None, greedy=False):
    """The 7 action ids of a batch of observations with a KV cache: one pass over image and prompt, then one
    pass per token over that token alone (OpenVLA's cached-generation branch), never recomputing the vision
    towers. Row i draws from generators[i] (one per episode), so a batch draws exactly what its rows would
    draw one at a time. Same distribution as sample_action_tokens: temperature 1 over the 256 action ids."""
    with autocast(model):
        out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, **_last(model, 1))
    chosen = []
    for position in range(ACTION_DIM):
        logits = _action_ids(out.logits[:, -1]).float()
        if greedy:
            choice = logits.argmax(-1)
        else:
            probs = torch.softmax(logits, -1).cpu()
            choice = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])
        next_ids = (choice.to(input_ids.device) + ACTION_TOKEN_BEGIN)[:, None]
        chosen.append(next_ids.cpu())
        if position < ACTION_DIM - 1:
            with autocast(model):
                out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True,
                            **_last(model, 1))
    return torch.cat(chosen, dim=1)


def step_logprobs(model, input_ids, pixel_values, action_tokens):
    """log pi(a|o) of a step = sum of the 7 action tokens' log-probs (kl.token_logprobs)."""
    logits = action_logits(model, input_ids, pixel_values, action_tokens)
    return kl.token_logprobs(logits, (action_tokens - ACTION_TOKEN_BEGIN).to(logits.device)).sum(-1)


# --------------------------------------------------------------------------------------------------
# 4. Simulator, tasks and the two pick demonstrators (ManiSkill3, CPU physics, RGB camera)
# --------------------------------------------------------------------------------------------------

LIFT_HEIGHT = 0.06  # cube centre (rest height 0.02) lifted by 4 cm while grasped


def _xyz(actor):
    return actor.pose.p[0].cpu().numpy()


def _tcp(env):
    return env.unwrapped.agent.tcp_pose.p[0].cpu().numpy()


def _toward(tcp, target, gain=1.0):
    """pd_ee_delta_pose maps [-1, 1] to +-0.1 m: move gain x the error in one step, clipped per axis (the arm
    covers about half of a commanded move within the step, so gain 1.5 closes the error in fewer steps)."""
    return np.clip(gain * (target - tcp) / 0.1, -1, 1)


def _along_line(tcp, target, speed=0.06):
    """A straight-line move toward the target at a constant speed (m per step), the last step shorter."""
    error = target - tcp
    distance = np.linalg.norm(error)
    return error / max(distance, 1e-9) * min(distance, speed) / 0.1


def lift_expert(env):
    """pi0's expert (its behaviour-cloning data): proportional moves clipped per axis, pre-grasp 8 cm above
    the cube, xy corrected during the descent, close within 5 mm, lift 3 cm a step."""
    u = env.unwrapped
    cube, tcp = _xyz(u.cube), _tcp(env)
    if bool(u.agent.is_grasping(u.cube)[0]):  # lift 3 cm a step: a policy that closes and lifts in one step
        target, grip = np.r_[cube[:2], cube[2] + 0.03], -1.0  # (an easy confusion) still holds the cube
    elif np.linalg.norm(cube[:2] - tcp[:2]) > 0.02:  # the open fingers tolerate ~2 cm; the descent corrects xy
        target, grip = np.r_[cube[:2], cube[2] + 0.08], 1.0
    elif tcp[2] - cube[2] > 0.005:
        target, grip = cube, 1.0
    else:
        target, grip = cube, -1.0
    return np.r_[_toward(tcp, target), 0, 0, 0, grip]


def motion_planning_demonstrator(env):
    """SFT's demonstrator, a different competent policy (the paper's SFT data: another policy's successful
    trajectories, App. B.2). It follows the waypoints of ManiSkill's motion-planning solution for PickCube
    (mani_skill/examples/motionplanning/panda/solutions/pick_cube.py: a reach pose 5 cm above the grasp,
    straight screw moves to it and down to the grasp, close, carry to PickCube's goal point; here at least
    10 cm above the table, so that the cube is lifted), executed as end-effector deltas at a constant 6 cm per
    step. mplib's joint-space plans are not used: the policy emits end-effector deltas. The goal point is
    not in the camera image, so the carry's direction is something the images cannot predict."""
    u = env.unwrapped
    cube, tcp = _xyz(u.cube), _tcp(env)
    if bool(u.agent.is_grasping(u.cube)[0]):
        goal = _xyz(u.goal_site)
        return np.r_[_along_line(tcp, np.r_[goal[:2], max(goal[2], cube[2] + 0.1)]), 0, 0, 0, -1.0]
    if np.linalg.norm(cube[:2] - tcp[:2]) > 0.01:
        return np.r_[_along_line(tcp, cube + [0, 0, 0.05]), 0, 0, 0, 1.0]
    if tcp[2] - cube[2] > 0.005:
        return np.r_[_along_line(tcp, cube), 0, 0, 0, 1.0]
    return np.r_[0, 0, 0, 0, 0, 0, -1.0]


def push_expert(env, direction):
    """Go over to the far side of the cube from the goal, descend, sweep along x (closed gripper)."""
    u = env.unwrapped
    cube, goal, tcp = _xyz(u.obj), _xyz(u.goal_region), _tcp(env)
    behind = np.r_[cube[0] - direction * 0.045, cube[1], 0.02]
    if (tcp[0] - cube[0]) * direction > -0.035 or abs(tcp[1] - cube[1]) > 0.01:
        far = np.linalg.norm(tcp[:2] - behind[:2]) > 0.01
        target = np.r_[behind[:2], 0.08] if far else behind
    elif tcp[2] > 0.03:
        target = behind
    else:
        target = np.r_[goal[0] - direction * 0.045, goal[1], 0.02]
    return np.r_[_toward(tcp, target), 0, 0, 0, -1.0]


def place_expert(env):
    """PlaceSphere-v1 (a 2 cm ball into a 4 cm bin): over the ball, descend and close, lift it off the table
    (a ball carried along the table rolls, and spins on in the fingers), carry it 1.5 cm above its rest in
    the bin, open, and once free move up and away (an open finger left touching the ball keeps it moving, and
    success needs it still)."""
    u = env.unwrapped
    ball, bin_, tcp = _xyz(u.obj), _xyz(u.bin), _tcp(env)
    rest = np.r_[bin_[:2], bin_[2] + u.block_half_size[0] + u.radius]  # the ball's centre resting in the bin
    grasped = bool(u.agent.is_grasping(u.obj)[0])
    if np.linalg.norm(rest[:2] - ball[:2]) < 0.005 and ball[2] < rest[2] + 0.02:
        return np.r_[0, 0, 0 if grasped else 1, 0, 0, 0, 1.0]
    if grasped and ball[2] < 0.03:
        return np.r_[0, 0, 1, 0, 0, 0, -1.0]
    if grasped:
        return np.r_[_toward(ball, rest + [0, 0, 0.015], gain=1.5), 0, 0, 0, -1.0]
    if np.linalg.norm(ball[:2] - tcp[:2]) > 0.01:
        return np.r_[_toward(tcp, ball + [0, 0, 0.02], gain=1.5), 0, 0, 0, 1.0]
    grip = -1.0 if tcp[2] - ball[2] < 0.012 else 1.0  # close on the way down, the last few mm
    return np.r_[_toward(tcp, ball, gain=1.5), 0, 0, 0, grip]


def upright_expert(env):
    """LiftPegUpright-v1 (a 24 cm peg lying along x, to stand on its end): grasp 3 cm from the +x end, then
    swing that end up and over the other end, aiming 15 degrees ahead of the peg's angle on a circle about
    its lower end, with a loose grip (gripper 0.2, where -1 closes and 1 opens) so that the peg turns in the
    fingers: the controller turns the hand at most 0.1 rad a step, 16 steps for the quarter turn."""
    from transforms3d.quaternions import quat2mat
    u = env.unwrapped
    peg, tcp, half = _xyz(u.peg), _tcp(env), u.peg_half_length
    axis = quat2mat(u.peg.pose.q[0].cpu().numpy())[:, 0]  # the peg's long axis
    if bool(u.agent.is_grasping(u.peg)[0]):
        axis = axis if axis @ (tcp - peg) >= 0 else -axis  # toward the held end
        foot = peg - axis * half  # the lower end, the pivot
        outward = np.r_[axis[:2] / max(np.linalg.norm(axis[:2]), 1e-9), 0]
        angle = np.arctan2(axis[2], np.linalg.norm(axis[:2])) + np.radians(15)
        target = foot + (2 * half - 0.03) * (np.cos(angle) * outward + np.r_[0, 0, np.sin(angle)])
        return np.r_[_toward(tcp, target, gain=1.5), 0, 0, 0, 0.2]
    grasp = peg + (axis if axis[0] >= 0 else -axis) * (half - 0.03)
    if np.linalg.norm(grasp[:2] - tcp[:2]) > 0.015:
        return np.r_[_toward(tcp, grasp + [0, 0, 0.04], gain=1.5), 0, 0, 0, 1.0]
    if tcp[2] - grasp[2] > 0.01:
        return np.r_[_toward(tcp, grasp, gain=1.5), 0, 0, 0, 1.0]
    return np.r_[_toward(tcp, grasp), 0, 0, 0, -1.0]


def lift_success(env, info):
    u = env.unwrapped
    return bool(u.agent.is_grasping(u.cube)[0]) and float(u.cube.pose.p[0, 2]) > LIFT_HEIGHT


# PickCube's own success needs an invisible goal point; the paper's new task is grasp-and-lift (SimplerEnv
# "pick coke can"), so the new task here is PickCube's scene with a lift success.
TASKS = {
    "PickCube-v1": dict(instruction="pick up the cube", expert=lift_expert, success=lift_success),
    "PushCube-v1": dict(instruction="push the cube to the target", expert=lambda e: push_expert(e, 1.0)),
    "PullCube-v1": dict(instruction="pull the cube to the target", expert=lambda e: push_expert(e, -1.0)),
    # The default prior tasks: another skill on other objects (the paper's prior tasks are drawer opening and
    # closing, App. B.2). The ball's expert needs up to 28 steps: its episodes get 30 whatever --horizon.
    "PlaceSphere-v1": dict(instruction="place the sphere into the bin", expert=place_expert, min_horizon=30),
    "LiftPegUpright-v1": dict(instruction="lift the peg upright", expert=upright_expert),
}


def task_info(env_id):
    """Registered tasks have an expert (or are Bridge scenes); any other ManiSkill env works for RL and
    evaluation."""
    return TASKS.get(env_id) or BRIDGE_TASKS.get(env_id) or dict(instruction=env_id.split("-")[0].lower(),
                                                                  expert=None)


# --------------------------------------------------------------------------------------------------
# 4b. OpenVLA's own domain: ManiSkill3's digital twins of BridgeData V2 (the WidowX 250 S robot)
# --------------------------------------------------------------------------------------------------

# OpenVLA-7B was trained on BridgeData V2 among others; its `bridge_orig` statistics un-normalise to Bridge's
# units. ManiSkill3 ships SimplerEnv's Bridge scenes (mani_skill/envs/tasks/digital_twins/bridge_dataset_eval/
# put_on_in_scene.py): the real Bridge camera (640 x 480), a green-screened photo of the real table, the WidowX
# and its controller. Their assets are downloads (BRIDGE_ASSETS). The instructions are the envs' own
# (get_language_instruction). The new task is a grasp in the carrot scene, the paper's kind of new task
# (grasp and lift, App. B.2), scored by the env's own `consecutive_grasp` (held for 5 control steps); the
# prior tasks are the other scenes' put-on tasks with their own success. Each scene has fixed layouts of its
# two objects (reset option episode_id): 24, or 64 for the eggplant.
BRIDGE_ASSETS = ["bridge_v2_real2sim", "widowx250s"]   # the scenes' meshes and photo; the robot
BRIDGE_CONTROL = "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"
BRIDGE_TASKS = {
    "GraspCarrotInScene": dict(scene="PutCarrotOnPlateInScene-v1", instruction="pick up the carrot",
                               success_key="consecutive_grasp", layouts=24),
    "PutCarrotOnPlateInScene-v1": dict(instruction="put carrot on plate", layouts=24),
    "PutSpoonOnTableClothInScene-v1": dict(instruction="put the spoon on the towel", layouts=24),
    "StackGreenCubeOnYellowCubeBakedTexInScene-v1": dict(instruction="stack the green block on the yellow block",
                                                        layouts=24),
    "PutEggplantInBasketScene-v1": dict(instruction="put eggplant into yellow basket", layouts=64),
}
for _task in BRIDGE_TASKS.values():
    _task.update(expert=None, robot="widowx")


def bridge_to_widowx_action(action):
    """OpenVLA's un-normalised `bridge_orig` action -> the WidowX twin's controller action.

    Bridge: xyz deltas in metres, roll/pitch/yaw deltas in radians read as static-axis Euler angles, R =
    Rz(yaw) Ry(pitch) Rx(roll) (SimplerEnv feeds OpenVLA's output to its controller through transforms3d's
    euler2axangle(roll, pitch, yaw), axes "sxyz"), gripper 1 = open, 0 = closed.
    The twin (digital_twins/bridge_dataset_eval/base_env.py, WidowX250SBridgeDatasetFlatTable): its arm
    controller has normalize_action=False, so xyz are metres as they are; it turns a[3:6] into the delta
    rotation euler_angles_to_matrix(a[3:6], "XYZ") = Rx Ry Rz (agents/controllers/pd_ee_pose.py,
    PDEEPoseController.compute_target_pose), so the same rotation is re-expressed in that convention. Its
    gripper target is normalised, -1 closed, +1 open: SimplerEnv's widowx_bridge rule, open if > 0.5."""
    from transforms3d.euler import euler2mat, mat2euler
    rotation = mat2euler(euler2mat(*action[3:6], axes="sxyz"), axes="rxyz")
    return np.r_[action[:3], rotation, 1.0 if action[6] > 0.5 else -1.0].astype(np.float32)


def widowx_to_bridge_action(env_action):
    """The inverse: a WidowX twin action in Bridge's units (a demonstration recorded in the twin)."""
    from transforms3d.euler import euler2mat, mat2euler
    rotation = mat2euler(euler2mat(*env_action[3:6], axes="rxyz"), axes="sxyz")
    return np.r_[env_action[:3], rotation, 1.0 if env_action[6] > 0 else 0.0]


# One fixed third-person camera for every task (eye, target, field of view), as OpenVLA sees its datasets'
# single main view. ManiSkill's defaults differ per task and show the 4 cm cube as ~2 pixels at 64 px. This one
# looks at the workspace from the front and low (22 cm up), so the cube is ~7 pixels wide and the gripper's
# height above it is visible: from higher up (eye (0.35, 0, 0.4)) the clone could not tell when to close.
CAMERA = ((0.3, 0.0, 0.22), (-0.05, 0.0, 0.02), 0.9)


def not_the_initial_pose_warning(record):
    """PlaceSphere's scene warns at every reset that its ball and bin have no initial pose (its reset places
    them): two log lines per episode that would bury the progress bars. Every other message passes."""
    return "No initial pose set" not in record.getMessage()


@functools.cache  # one simulator per task, resolution, horizon and camera: starting the renderer takes seconds
def make_env(env_id, image_size, horizon, camera=CAMERA, num_envs=1):
    """A ManiSkill3 env for a task. The stand-in's tasks: `pd_ee_delta_pose` and the fixed CAMERA. A Bridge
    scene: its own camera and controller. num_envs > 1: a vectorised env (ManiSkill's GPU simulation)."""
    try:
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401  (registers the environments)
    except ImportError as error:
        sys.exit(f"error: {error}; install the simulator: pip install -r requirements-vla.txt (the stand-in) or "
                 f"requirements-openvla.txt (OpenVLA)")
    from mani_skill.utils import assets, download_asset, sapien_utils
    from mani_skill.utils.logging_utils import logger
    from mani_skill.utils.registration import REGISTERED_ENVS

    logger.addFilter(not_the_initial_pose_warning)  # once: the same filter is not added twice

    task = task_info(env_id)
    scene = task.get("scene", env_id)
    horizon = max(horizon, task.get("min_horizon", 0))

    def refuse(message, missing=(scene,)):  # never prompt: missing assets are an error with a fix
        sys.exit(f"error: {message.splitlines()[-1]} Download them first: "
                 + " && ".join(f"python -m mani_skill.utils.download_asset {a}" for a in missing))
    download_asset.prompt_yes_no = refuse
    if scene not in REGISTERED_ENVS:
        sys.exit(f"error: unknown ManiSkill env {scene!r}; bundled ones include {', '.join(TASKS)}; OpenVLA's "
                 f"Bridge scenes: {', '.join(BRIDGE_TASKS)}")
    needed = list(REGISTERED_ENVS[scene].asset_download_ids) + (BRIDGE_ASSETS if task.get("robot") else [])
    missing = [a for a in dict.fromkeys(needed)
               if a in assets.DATA_SOURCES and not assets.is_data_source_downloaded(a)]
    if missing:
        refuse(f"{env_id} needs ManiSkill assets {missing} that are not on this machine.", missing)
    if task.get("robot") == "widowx":
        kwargs = dict(obs_mode="rgb+segmentation", control_mode=BRIDGE_CONTROL)
    else:
        eye, target, fov = camera
        kwargs = dict(obs_mode="rgb", control_mode="pd_ee_delta_pose", sensor_configs=dict(
            width=image_size, height=image_size,
            base_camera=dict(pose=sapien_utils.look_at(list(eye), list(target)), fov=fov)))
    if num_envs > 1:
        kwargs["num_envs"] = num_envs
    try:
        env = gym.make(scene, render_mode=None, max_episode_steps=horizon, **kwargs)
    except RuntimeError as error:
        if "vulkan" in str(error).lower() or "render" in str(error).lower():
            sys.exit("error: ManiSkill's renderer found no Vulkan device; install a driver (docs/vla_finetune.md)")
        raise
    env.settings = dict(env_id=env_id, image_size=image_size, horizon=horizon, camera=camera)  # cache keys
    return env


def camera_images(obs, image_size):
    """Every env's camera image [n, S, S, 3] uint8: the stand-in's base_camera as rendered; a Bridge scene's
    3rd_view_camera (640 x 480, the real Bridge camera) resized to S x S with Lanczos, as SimplerEnv resizes
    its images for OpenVLA."""
    sensors = obs["sensor_data"]
    images = (sensors["base_camera"] if "base_camera" in sensors else sensors["3rd_view_camera"])["rgb"]
    images = images.cpu().numpy()
    if images.shape[1:3] == (image_size, image_size):
        return images
    return np.stack([np.array(Image.fromarray(im).resize((image_size, image_size), Image.LANCZOS))
                     for im in images])


def to_env_action(action):
    """Policy actions use OpenVLA's gripper convention (1 = open, 0 = close); the env wants +1 / -1."""
    return np.r_[action[:6], 2.0 * action[6] - 1.0].astype(np.float32)


def to_policy_action(env_action):
    return np.r_[env_action[:6], (env_action[6] + 1.0) / 2.0]


def training_grid(n):
    """The new task's training positions: the cube's centre on an n x n grid over PickCube's [-0.1, 0.1]^2
    (cell centres), each with the yaw of its own env seed (paper, App. B.2: a 10 x 10 grid of positions).
    Evaluation uses other, random positions: env seeds from SEEDS["eval"] on."""
    cells = -0.1 + 0.2 * (np.arange(n) + 0.5) / n
    return [(SEEDS["train"] + i * n + j, (float(x), float(y))) for i, x in enumerate(cells)
            for j, y in enumerate(cells)]


def demonstration_starts(n, per_position):
    """Where SFT's demonstrator acts: per_position starts in each cell of the n x n training grid, the cube
    uniformly within the cell, each with its own env seed (the paper: 10 successful episodes of its other
    policy per grid point, App. B.2). One demonstration per position would be 64 in all, too few to learn
    another policy's style from pixels."""
    rng = np.random.default_rng(SEEDS["demos"])
    half_cell = 0.1 / n
    starts = []
    for _, (x, y) in training_grid(n):
        for _ in range(per_position):
            dx, dy = rng.uniform(-half_cell, half_cell, size=2)
            starts.append((SEEDS["demos"] + len(starts), (float(x + dx), float(y + dy))))
    return starts


def training_starts(n, env_id):
    """The new task's training starts: the n x n grid (training_grid), or every layout of a Bridge scene."""
    layouts = task_info(env_id).get("layouts")
    if layouts:
        return [(SEEDS["train"] + i, i) for i in range(layouts)]
    return training_grid(n)


def run_episode(env, env_id, start, horizon, act):
    """One episode from `start` = (env seed, cube xy or None); act(image) -> (env action, record). Stops at
    success. The scene is rebuilt at every reset (reconfigure): a plain reset left ManiSkill's CPU physics
    with state from earlier episodes, and the same policy on the same seed could succeed once and fail next."""
    from mani_skill.utils.structs import Pose
    task = task_info(env_id)
    success_fn = task.get("success") or (lambda e, info: bool(info[task.get("success_key", "success")][0]))
    seed, xy = start
    options = dict(reconfigure=True)
    if isinstance(xy, int):  # a Bridge scene's layout of its objects
        options["episode_id"] = xy
    obs, _ = env.reset(seed=seed, options=options)
    if isinstance(xy, (tuple, list)):  # a grid position: move the cube there, keep its height and yaw
        cube = env.unwrapped.cube
        position = cube.pose.p.clone()
        position[0, :2] = torch.tensor(xy)
        cube.set_pose(Pose.create_from_pq(p=position, q=cube.pose.q))
        obs = env.unwrapped.get_obs()
    records, success = [], False
    for _ in range(horizon):
        image = camera_images(obs, env.settings["image_size"])[0]
        action, record = act(image)
        records.append((image, record))
        obs, _, _, _, info = env.step(action)
        if success_fn(env, info):
            success = True
            break
    return records, success


def run_episodes(env, env_id, starts, horizon, act):
    """Up to env.num_envs episodes at once in a vectorised env (a GPU's): act(images [n, S, S, 3]) -> (env
    actions [n, 7], records [n]). As in run_episode, the scene is rebuilt at the reset and each episode ends
    at its own success; the env steps all episodes together until every one has ended or the horizon, and an
    ended episode records nothing more. Unused envs of a short last chunk repeat its last start."""
    task = task_info(env_id)
    if task.get("success"):
        sys.exit(f"error: {env_id}'s success is scored for one env only; run it with one env")
    n = env.unwrapped.num_envs
    padded = list(starts) + [starts[-1]] * (n - len(starts))
    options = dict(reconfigure=True)
    if isinstance(padded[0][1], int):  # Bridge layouts
        options["episode_id"] = torch.tensor([layout for _, layout in padded])
    obs, _ = env.reset(seed=[seed for seed, _ in padded], options=options)
    records, success = [[] for _ in starts], [False] * len(starts)
    for _ in range(horizon):
        images = camera_images(obs, env.settings["image_size"])
        actions, step_records = act(images)
        running = [i for i in range(len(starts)) if not success[i]]
        for i in running:
            records[i].append((images[i], step_records[i]))
        obs, _, _, _, info = env.step(torch.as_tensor(np.asarray(actions)))
        done = info[task.get("success_key", "success")]
        for i in running:
            success[i] = bool(done[i])
        if all(success):
            break
    return list(zip(records, success))


# --------------------------------------------------------------------------------------------------
# 5. Policies acting in the simulator, and what they are measured by
# --------------------------------------------------------------------------------------------------


def expert_policy(env, env_id, expert=None):
    """A scripted policy; records its action in the policy's format (gripper 1 = open, 0 = closed)."""
    expert = expert or task_info(env_id)["expert"]
    if expert is None:
        sys.exit(f"error: no scripted expert for {env_id}; demos exist for {', '.join(TASKS)}")

    def act(image):
        action = expert(env)
        return action, to_policy_action(action)
    return act


def model_policy(model, processor, instruction, stats, greedy, generator=None, to_env=to_env_action):
    """Greedy (evaluation) or sampled (RL) actions of one env; records the 7 action tokens."""
    act_batch = batch_policy(model, processor, instruction, stats, greedy, generator, to_env)

    def act(image):
        actions, tokens = act_batch([image])
        return actions[0], tokens[0]
    return act


def batch_policy(model, processor, instruction, stats, greedy, generator=None, to_env=to_env_action):
    """The same for a batch of images (one per env): their action tokens drawn together (draw_action_tokens),
    un-normalised with the policy's statistics and converted to the env's units (to_env)."""
    def act(images):
        ids, pixels = encode(processor, model, instruction, list(images))
        tokens = draw_action_tokens(model, ids, pixels, generator, greedy)
        actions = [to_env(unnormalize_actions(tokens_to_actions(row.numpy()), stats)) for row in tokens]
        return np.stack(actions), tokens
    return act


def draw_action_tokens(model, input_ids, pixel_values, generator=None, greedy=False):
    """KV-cached batched generation (generate_action_tokens, tested equal to sample_action_tokens row by row),
    each row from its own generator seeded in turn from `generator`: a resumed run continues the same streams.
    For the stand-in on one CPU core the cache makes a step 2.4x faster (14 against 33 ms)."""
    generators = None
    if not greedy:
        seeds = torch.randint(2 ** 62, (len(input_ids),), generator=generator)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    return generate_action_tokens(model, input_ids, pixel_values, generators, greedy)


def policy_rollouts(model, processor, env, env_id, starts, stats, greedy, generator=None, desc=None):
    """A model's episodes from `starts`, [(records, success)]: one after another in a single env, in order
    (the stand-in's CPU path), or env.num_envs at a time in a vectorised env (OpenVLA on a GPU)."""
    task = task_info(env_id)
    to_env = bridge_to_widowx_action if task.get("robot") == "widowx" else to_env_action
    horizon = env.settings["horizon"]
    model.eval()
    n = env.unwrapped.num_envs
    if n == 1:
        act = model_policy(model, processor, task["instruction"], stats, greedy, generator, to_env)
        return [run_episode(env, env_id, start, horizon, act) for start in tqdm(starts, desc=desc, leave=False)]
    act = batch_policy(model, processor, task["instruction"], stats, greedy, generator, to_env)
    return [episode for first in tqdm(range(0, len(starts), n), desc=desc, leave=False)
            for episode in run_episodes(env, env_id, starts[first:first + n], horizon, act)]


def evaluate_success(model, processor, envs, stats, episodes_per_task):
    """Greedy success of every episode on fixed evaluation starts, per task: {env_id: [0/1, ...]}."""
    outcomes = {}
    for env_id, env in envs.items():
        starts = held_out_starts(episodes_per_task, env_id, SEEDS["eval"])
        episodes = policy_rollouts(model, processor, env, env_id, starts, stats, greedy=True,
                                   desc=f"eval {env_id}")
        outcomes[env_id] = [int(success) for _, success in episodes]
    return outcomes


@torch.no_grad()
def forward_kl_on_states(model, processor, kl_states, instruction, batch=64):
    """E_o [KL(pi0(.|o) || pi(.|o))] per action dimension (chain rule, prefixes sampled from pi0), exact over
    the 256 action ids, restricted and renormalised: a tensor [7]; its sum is the KL of the whole action."""
    model.eval()
    per_dim = []
    for i in range(0, len(kl_states["images"]), batch):
        images = kl_states["images"][i:i + batch]
        ids, pixels = encode(processor, model, instruction, list(images))
        logits = action_logits(model, ids, pixels, kl_states["tokens"][i:i + batch])
        base = kl_states["base_logits"][i:i + batch].to(logits.device)
        per_dim.append(kl.forward_kl(base, logits).cpu())
    return torch.cat(per_dim).mean(0)


# --------------------------------------------------------------------------------------------------
# 6. Updates: SFT (cross-entropy on action tokens) and RL (REINFORCE on episode success)
# --------------------------------------------------------------------------------------------------


def sft_step(model, processor, optimizer, scheduler, instruction, images, tokens, micro_batch=None):
    """One cross-entropy update on a batch of frames, in micro-batches of `micro_batch` frames whose gradients
    add up to the whole batch's (each chunk's mean loss weighted by its share of the frames)."""
    model.train()
    optimizer.zero_grad()
    micro_batch = micro_batch or len(tokens)
    total = 0.0
    for i in range(0, len(tokens), micro_batch):
        chunk = tokens[i:i + micro_batch]
        ids, pixels = encode(processor, model, instruction, images[i:i + micro_batch])
        logits = action_logits(model, ids, pixels, chunk)
        loss = kl.sft_loss(logits, (chunk - ACTION_TOKEN_BEGIN).to(logits.device)) * (len(chunk) / len(tokens))
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # max grad norm 1 (App. B.2)
    optimizer.step()
    scheduler.step()
    return total


def rl_step(model, processor, optimizer, scheduler, instruction, episodes, advantages, base_model=None,
            kl_coef=0.0, minibatch=64):
    """One REINFORCE update: loss = (1/B) sum_episodes sum_steps [-A_e log pi(a_t|o_t)], log pi of a step =
    its 7 action tokens' log-probs summed (kl.policy_gradient_loss, aggregation "constant" with one "token"
    per step: every step of an episode weighs the same, as in REINFORCE, whatever the episode's length).
    With base_model and kl_coef > 0 ("RL + KL reg.", paper Fig. 3) the loss adds kl_coef times the exact
    reverse KL(pi || pi0) over the 256 action ids, summed over the 7 tokens and the steps, over B.
    Both terms are sums over steps, so minibatches of steps accumulate the exact full-batch gradient."""
    model.train()
    mask = torch.zeros(len(episodes), max(len(ep) for ep in episodes))
    for e, ep in enumerate(episodes):
        mask[e, :len(ep)] = 1
    steps = [(e, t, image, tokens) for e, ep in enumerate(episodes) for t, (image, tokens) in enumerate(ep)]
    optimizer.zero_grad()
    for i in range(0, len(steps), minibatch):
        chunk = steps[i:i + minibatch]
        where = (torch.tensor([s[0] for s in chunk]), torch.tensor([s[1] for s in chunk]))
        ids, pixels = encode(processor, model, instruction, [s[2] for s in chunk])
        tokens = torch.stack([s[3] for s in chunk])
        logits = action_logits(model, ids, pixels, tokens)
        logprobs = kl.token_logprobs(logits, (tokens - ACTION_TOKEN_BEGIN).to(logits.device)).sum(-1).cpu()
        placed = torch.zeros_like(mask).index_put(where, logprobs)
        loss = kl.policy_gradient_loss(placed, advantages, mask, aggregation="constant", max_tokens=1)
        if kl_coef > 0:
            with torch.no_grad():
                base_logits = action_logits(base_model, ids, pixels, tokens)
            penalty = kl.reverse_kl(base_logits, logits).sum(-1).cpu()
            loss = loss + kl_coef * torch.zeros_like(mask).index_put(where, penalty).sum() / len(episodes)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # max grad norm 1 (App. B.2)
    optimizer.step()
    scheduler.step()


def make_optimizer(model, lr, warmup, cosine_steps=None):
    """AdamW, weight decay 0, constant learning rate after a linear warm-up (App. B.2); with cosine_steps, the
    rate decays to 0 over them instead (pi0's behaviour cloning: the final loss without the noise of a high
    constant rate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if cosine_steps:
        return optimizer, transformers.get_cosine_schedule_with_warmup(optimizer, warmup, cosine_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return optimizer, scheduler


# --------------------------------------------------------------------------------------------------
# 7. Data: demonstrations, the base policy pi0, successful rollouts, KL observations (cached, keyed)
# --------------------------------------------------------------------------------------------------

SEEDS = dict(train=0, eval=10_000, prior_demos=20_000, base_new_demos=30_000, kl=40_000, samples=50_000,
             demos=60_000)


def cached(folder, kind, settings, build):
    """Load folder/{kind}_{hash of settings}.pt, or build it and save it there with its settings. Every setting
    that shapes the data is in the key (env, camera, image size, horizon, starts, policy, seed), so changing
    one never reuses stale data."""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(folder) / f"{kind}_{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)["data"]
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(settings=settings, data=data), path)
    return data


def model_fingerprint(name):
    """A stand-in directory: its weight files' names, sizes and times (a rebuilt pi0 is a new key); a hub id:
    the id."""
    files = sorted(Path(name).glob("*.safetensors")) if Path(name).is_dir() else []
    return [name] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def collect_demos(env, env_id, starts, folder, expert=None):
    """Successful episodes of a scripted policy (policy-format actions), one per start, cached."""
    def build():
        demos = []
        for start in tqdm(starts, desc=f"demos {env_id}", leave=False):
            records, success = run_episode(env, env_id, start, env.settings["horizon"],
                                           expert_policy(env, env_id, expert))
            if success:
                demos.append(dict(start=start, images=np.stack([r[0] for r in records]),
                                  actions=np.stack([r[1] for r in records])))
        if not demos:
            sys.exit(f"error: the {env_id} demonstrator succeeded in none of {len(starts)} episodes within "
                     f"--horizon {env.settings['horizon']}; raise --horizon (the demonstrators need about 15 steps)")
        return demos
    name = getattr(expert or task_info(env_id)["expert"], "__name__", None)
    return cached(folder, "demos", dict(env.settings, demonstrator=name, starts=starts), build)


def successful_rollouts(model, processor, env, env_id, starts, stats, seed, folder, policy_key):
    """Sampled (temperature 1) episodes of a model from each start, kept when they succeed: the data of SFT
    on pi0's own successes (the oracle analogue: pi0 conditioned on success, by rejection sampling, the
    optimal distribution of Fig. 3 and Lemma A.1) and on the RL policy's (Fig. 9). Cached."""
    def build():
        generator = torch.Generator().manual_seed(seed)
        episodes = policy_rollouts(model, processor, env, env_id, starts, stats, False, generator,
                                   desc=f"samples {env_id}")
        kept = []
        for start, (records, success) in zip(starts, episodes):
            if success:
                kept.append(dict(start=start, images=np.stack([r[0] for r in records]),
                                 tokens=torch.stack([r[1] for r in records])))
        if not kept:
            sys.exit(f"error: the policy succeeded in none of {len(starts)} sampled episodes, so there is nothing "
                     f"to imitate; raise --samples-per-position")
        return kept
    kept = cached(folder, "samples", dict(env.settings, policy=policy_key, starts=starts, seed=seed), build)
    # the per-episode sampled success rate, from which the docs (Results) derive how often an RL group of
    # episodes from one position is all failures and so carries no gradient
    print(f"{env_id}: {len(kept)} of {len(starts)} sampled episodes succeeded ({len(kept) / len(starts):.2f}), kept")
    return kept


def load_demonstrations(folder, instruction, image_size, stats):
    """Another policy's episodes for SFT (the paper's SFT data: success-filtered trajectories of another
    policy, App. B.2), one .npz file per episode:

        images       uint8 [T, H, W, 3]  the main camera (resized to --image-size here, Lanczos)
        actions      float [T, 7]        in the units of the statistics (bridge_orig: metres, radians, gripper
                                         1 = open / 0 = closed), the action taken at each image
        instruction  str                 must be the new task's
        success      bool                only successful episodes are kept

    Returns the successful episodes in file-name order, in collect_demos' format."""
    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        sys.exit(f"error: no .npz episodes in {folder}; the format is in load_demonstrations / docs/vla_finetune.md")
    episodes = []
    for path in files:
        with np.load(path) as data:
            missing = {"images", "actions", "instruction", "success"} - set(data.files)
            if missing:
                sys.exit(f"error: {path} lacks {sorted(missing)}; an episode holds images, actions, instruction, "
                         f"success (docs/vla_finetune.md)")
            images, actions = data["images"], data["actions"].astype(np.float64)
            if images.ndim != 4 or images.shape[-1] != 3 or actions.shape != (len(images), ACTION_DIM):
                sys.exit(f"error: {path}: images must be [T, H, W, 3] and actions [T, 7], got {images.shape} and "
                         f"{actions.shape}")
            if str(data["instruction"]).lower() != instruction.lower():
                sys.exit(f"error: {path} demonstrates {str(data['instruction'])!r}, not the new task's {instruction!r}")
            if bool(data["success"]):
                resized = [np.array(Image.fromarray(im).resize((image_size, image_size), Image.LANCZOS))
                           if im.shape[:2] != (image_size, image_size) else im for im in images.astype(np.uint8)]
                episodes.append(dict(start=path.name, images=np.stack(resized), actions=actions))
    if not episodes:
        sys.exit(f"error: none of the {len(files)} episodes in {folder} succeeded; SFT imitates successful ones")
    warn_if_saturated(np.concatenate([e["actions"] for e in episodes]), stats, folder)
    return episodes


def warn_if_saturated(actions, stats, source):
    """Normalisation clips to [q01, q99], so about 2 % of a dataset's values sit at +-1. Many more mean the
    actions are in other units than the statistics (Panda's normalised deltas against Bridge's metres)."""
    mask = np.asarray(stats["action"]["mask"], bool)
    at_bound = np.abs(normalize_actions(actions, stats)[:, mask]) >= 1.0
    if at_bound.mean() > 0.05:
        print(f"warning: {at_bound.mean():.0%} of the action values in {source} fall outside the statistics' "
              f"[q01, q99] (2 % expected); are they in the units of --unnorm-key's dataset? (--norm-stats)")


def load_norm_stats(path):
    """Action statistics in OpenVLA's dataset_statistics.json format, {key: {"action": {"q01": [7], "q99": [7],
    "mask": [7], ...}}} (what action_stats computes for a dataset); checked, then merged with the model's."""
    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot read statistics from {path} ({error})")
    for key, entry in stats.items():
        action = entry.get("action", {}) if isinstance(entry, dict) else {}
        if not all(len(action.get(field, [])) == ACTION_DIM for field in ("q01", "q99", "mask")):
            sys.exit(f"error: {path}: {key!r} needs action q01, q99 and mask with 7 values each "
                     f"(OpenVLA's dataset_statistics.json format)")
        action.setdefault("min", action["q01"])
        action.setdefault("max", action["q99"])
    return stats


def episodes_to_batch(episodes, stats):
    """Flatten episodes into (images [N, S, S, 3], action tokens [N, 7]); demonstrations' actions are
    normalised with pi0's statistics and tokenised, sampled episodes carry their own tokens."""
    images = np.concatenate([e["images"] for e in episodes])
    if "tokens" in episodes[0]:
        return images, torch.cat([e["tokens"] for e in episodes])
    actions = np.concatenate([e["actions"] for e in episodes])
    return images, torch.as_tensor(actions_to_tokens(normalize_actions(actions, stats)))


def behaviour_clone(args, out):
    """pi0: a fresh stand-in trained with kl.sft_loss on prior-task demos plus some new-task demos."""
    envs = {e: make_env(e, args.image_size, args.horizon, num_envs=args.num_envs)
            for e in [args.env] + args.prior_envs}
    starts = {e: [(SEEDS["prior_demos"] + i, None) for i in range(args.prior_demos)] for e in args.prior_envs}
    starts[args.env] = [(SEEDS["base_new_demos"] + i, None) for i in range(args.new_demos_in_base)]
    data = {e: collect_demos(envs[e], e, s, out / "cache") for e, s in starts.items()}
    stats = {"maniskill": action_stats(np.concatenate([d["actions"] for demos in data.values() for d in demos]))}
    model, processor = load_policy(str(build_stand_in(out / "stand_in_init", args.image_size, stats, seed=0)))
    batches = {e: episodes_to_batch(d, stats["maniskill"]) for e, d in data.items()}
    sizes = np.array([len(tokens) for _, tokens in batches.values()], np.float64)
    optimizer, scheduler = make_optimizer(model, args.bc_lr, min(50, args.bc_steps // 10), cosine_steps=args.bc_steps)
    rng = np.random.default_rng(0)  # one pi0 for every fine-tuning seed, as the paper has one OpenVLA
    bar = tqdm(range(args.bc_steps), desc="behaviour cloning pi0")
    for _ in bar:
        env_id = list(batches)[rng.choice(len(batches), p=sizes / sizes.sum())]  # one task per batch
        images, tokens = batches[env_id]
        pick = rng.choice(len(tokens), size=min(args.batch_size, len(tokens)), replace=False)
        loss = sft_step(model, processor, optimizer, scheduler, task_info(env_id)["instruction"],
                        list(images[pick]), tokens[pick])
        bar.set_postfix(loss=f"{loss:.3f}")
    model.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")


def kl_states_for(model, processor, env, env_id, stats, kl_episodes, folder, policy_key):
    """Observations from pi0's own sampled new-task episodes (held-out starts), one 7-token prefix per
    observation drawn from pi0 (temperature 1, action ids only), and pi0's restricted logits there. Cached."""
    def build():
        generator = torch.Generator().manual_seed(0)
        instruction = task_info(env_id)["instruction"]
        starts = held_out_starts(kl_episodes, env_id, SEEDS["kl"])
        episodes = policy_rollouts(model, processor, env, env_id, starts, stats, False, generator)
        images = [image for records, _ in episodes for image, _ in records]
        tokens, logits = [], []
        with torch.no_grad():
            for i in range(0, len(images), 64):
                ids, pixels = encode(processor, model, instruction, images[i:i + 64])
                sampled = draw_action_tokens(model, ids, pixels, generator)
                tokens.append(sampled)
                logits.append(action_logits(model, ids, pixels, sampled).cpu())
        return dict(images=np.stack(images), tokens=torch.cat(tokens), base_logits=torch.cat(logits))
    return cached(folder, "kl_states", dict(env.settings, policy=policy_key, episodes=kl_episodes), build)


# --------------------------------------------------------------------------------------------------
# 8. Fine-tuning runs: one JSON line per evaluation point, resumable
# --------------------------------------------------------------------------------------------------

# The arms of the comparison, name -> (kind, label, default lr). Paper: App. B.2 (RL, SFT on another policy);
# Fig. 3 (SFT on the optimal distribution, RL + KL reg. with coefficient 0.1); §5.1, Fig. 4 (1-0 REINFORCE); Fig. 9.
ARMS = {
    "grpo": ("rl", "RL, GRPO advantages", 3e-4),
    "reinforce": ("rl", "RL, 1-0 REINFORCE", 3e-4),
    "grpo-kl": ("rl", "RL, GRPO + KL(π‖π0) penalty", 3e-4),
    "sft-demonstrator": ("sft", "SFT, other demonstrator", 3e-4),
    "sft-pi0": ("sft", "SFT, π0's own successes (oracle)", 3e-4),
    "sft-rl": ("sft", "SFT, GRPO policy's successes (Fig. 9)", 3e-4),
}


def read_results(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path, record):
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def evaluation_starts(args, env_id=None):
    return held_out_starts(args.eval_episodes, env_id or args.env, SEEDS["eval"])


def held_out_starts(count, env_id, first_seed):
    """ManiSkill's own random positions (env seeds from first_seed on); a Bridge scene's fixed layouts in turn."""
    layouts = task_info(env_id).get("layouts")
    return [(first_seed + i, i % layouts if layouts else None) for i in range(count)]


def evaluate_point(model, processor, setup, args):
    """New- and prior-task success (every episode's outcome kept, for the bootstrap) and the forward KL."""
    outcomes = evaluate_success(model, processor, setup["envs"], setup["stats"], args.eval_episodes)
    per_dim = forward_kl_on_states(model, processor, setup["kl_states"], task_info(args.env)["instruction"],
                                   args.micro_batch)
    prior = {e: float(np.mean(outcomes[e])) for e in args.prior_envs}
    return dict(new_task=args.env, new_success=float(np.mean(outcomes[args.env])), prior_success=prior,
                prior_mean=float(np.mean(list(prior.values()))), outcomes=outcomes,
                forward_kl=float(per_dim.sum()), forward_kl_per_dim=per_dim.tolist(),
                kl_states=len(setup["kl_states"]["tokens"]), eval_episodes=args.eval_episodes)


def load_setup(args, out):
    """pi0, its action statistics, the simulators and the KL observations; pi0 is evaluated once per folder
    (the step-0 point that every run shares)."""
    model, processor = load_policy(args.model)  # pi0 is never trained: no adapter
    norm_stats = dict(_unwrap(model).norm_stats)
    if args.norm_stats:
        norm_stats.update(load_norm_stats(args.norm_stats))
    key = args.unnorm_key or next(iter(norm_stats))
    if key not in norm_stats:
        sys.exit(f"error: --unnorm-key {key!r} is not in the model's norm_stats ({', '.join(norm_stats)}); "
                 f"add statistics with --norm-stats")
    policy_key = model_fingerprint(args.model)
    if args.norm_stats or is_openvla(args.model):  # the statistics shape the actions (the stand-in has one set)
        policy_key += [key, norm_stats[key]]
    envs = {e: make_env(e, args.image_size, args.horizon, num_envs=args.num_envs)
            for e in [args.env] + args.prior_envs}
    setup = dict(model=model, processor=processor, stats=norm_stats[key], envs=envs, policy_key=policy_key)
    setup["kl_states"] = kl_states_for(model, processor, envs[args.env], args.env, setup["stats"],
                                       args.kl_episodes, out / "cache", setup["policy_key"])
    results = out / "results.jsonl"
    if not any(r["run"] == "base" for r in read_results(results)):
        record = evaluate_point(model, processor, setup, args)
        append_result(results, dict(run="base", arm="base", lr=0.0, seed=None, step=0, fraction=0.0,
                                    episodes_seen=0, **record))
        print(f"base pi0: new {record['new_success']:.2f}, prior {record['prior_success']}")
    return setup


def sft_dataset(args, arm, seed, setup, out):
    """The episodes SFT imitates on the training grid: the other demonstrator's, pi0's own successful samples,
    or the finished GRPO run's (same seed and lr) successful samples."""
    env, grid = setup["envs"][args.env], training_starts(args.grid, args.env)
    if arm == "sft-demonstrator" and args.demos:
        return load_demonstrations(args.demos, task_info(args.env)["instruction"], args.image_size, setup["stats"])
    if arm == "sft-demonstrator":
        if args.env != NEW_TASK:
            sys.exit(f"error: the scripted demonstrator acts in {NEW_TASK} only; for {args.env} pass another "
                     f"policy's episodes with --demos FOLDER (format: docs/vla_finetune.md)")
        starts = demonstration_starts(args.grid, args.demos_per_position)
        return collect_demos(env, args.env, starts, out / "cache", expert=motion_planning_demonstrator)
    starts = grid * args.samples_per_position
    if arm == "sft-pi0":
        return successful_rollouts(setup["model"], setup["processor"], env, args.env, starts, setup["stats"],
                                   SEEDS["samples"] + seed, out / "cache", setup["policy_key"])
    source = out / "ckpt" / f"{run_name('grpo', args.grpo_lr, seed)}.pt"
    state = torch.load(source, weights_only=False) if source.exists() else None
    if state is None or state["step"] < args.iterations:
        sys.exit(f"error: sft-rl imitates the finished GRPO run of seed {seed}; run it first: "
                 f"python vla_finetune.py --method grpo --lr {args.grpo_lr:g} --seeds {seed}")
    rl_model, processor = load_policy(args.model, args.lora)
    load_trainable(rl_model, state, source)
    return successful_rollouts(rl_model, processor, env, args.env, starts, setup["stats"], SEEDS["samples"] + seed,
                               out / "cache", [str(source), state["step"], state["wall"]])


def run_name(arm, lr, seed):
    return f"{arm}_lr{lr:g}_seed{seed}"


def finetune(args, arm, lr, seed, setup, out):
    """One run: fine-tune a fresh copy of pi0 with one arm, evaluating at evenly spaced points (the shared
    step-0 point is pi0's); resumes from its last checkpoint and never writes a line twice."""
    kind = ARMS[arm][0]
    run, results = run_name(arm, lr, seed), out / "results.jsonl"
    instruction = task_info(args.env)["instruction"]
    if kind == "sft":
        images, tokens = episodes_to_batch(sft_dataset(args, arm, seed, setup, out), setup["stats"])
        per_epoch = math.ceil(len(tokens) / args.batch_size)
        total = args.sft_epochs * per_epoch
    else:
        total = args.iterations
    eval_at = sorted({round(k * total / (args.eval_points - 1)) for k in range(1, args.eval_points)})
    done = {r["step"] for r in read_results(results) if r["run"] == run}
    if done - set(eval_at):
        sys.exit(f"error: {run} in {results} was run with other --iterations / --sft-epochs / --batch-size / "
                 f"--eval-points / --grid; pass those again, or use another --out-dir")
    if total in done:
        print(f"{run}: already complete in {results}")
        return
    torch.manual_seed(seed)  # LoRA's initialisation
    model, _ = load_policy(args.model, args.lora, gradient_checkpointing=args.gradient_checkpointing)
    optimizer, scheduler = make_optimizer(model, lr, args.warmup_steps)
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    state = dict(step=0, episodes_seen=0, wall=0.0)
    ckpt = out / "ckpt" / f"{run}.pt"
    if ckpt.exists():
        state = load_checkpoint(ckpt, model, optimizer, scheduler, generator, rng)
        print(f"{run}: resuming at step {state['step']}")
    if kind == "sft":  # a fresh order per epoch, all drawn up front so that a resumed run sees the same ones
        shuffle = np.random.default_rng(seed)
        orders = [shuffle.permutation(len(tokens)) for _ in range(args.sft_epochs)]
    start = time.time() - state["wall"]
    bar = tqdm(total=total, initial=state["step"], desc=run)
    while True:
        step = state["step"]
        if step in eval_at and step not in done:
            state["wall"] = time.time() - start
            save_checkpoint(ckpt, model, optimizer, scheduler, generator, rng, state)
            record = evaluate_point(model, setup["processor"], setup, args)
            append_result(results, dict(run=run, arm=arm, lr=lr, seed=seed, step=step, fraction=step / total,
                                        episodes_seen=state["episodes_seen"], wall_s=round(state["wall"], 1),
                                        **record))
            bar.write(f"{run} step {step}: new {record['new_success']:.2f} prior {record['prior_mean']:.2f} "
                      f"KL {record['forward_kl']:.3f}")
            done.add(step)
        if step >= total:
            break
        if kind == "sft":
            epoch, batch = divmod(step, per_epoch)
            pick = orders[epoch][batch * args.batch_size:(batch + 1) * args.batch_size]
            sft_step(model, setup["processor"], optimizer, scheduler, instruction, list(images[pick]), tokens[pick],
                     args.micro_batch)
        else:
            reward = rl_iteration(args, arm, model, setup, optimizer, scheduler, generator, rng)
            state["episodes_seen"] += args.states_per_iter * args.group_size
            bar.set_postfix(reward=f"{reward:.2f}")
        state["step"] += 1
        bar.update(1)
    bar.close()


def rl_iteration(args, arm, model, setup, optimizer, scheduler, generator, rng):
    """Sample a group of episodes from each of --states-per-iter training positions, score them 1/0, and take
    one policy-gradient step. Returns the mean reward."""
    grid = training_starts(args.grid, args.env)
    picked = rng.choice(len(grid), size=args.states_per_iter, replace=False)
    instruction = task_info(args.env)["instruction"]
    starts = [grid[index] for index in picked for _ in range(args.group_size)]  # a group shares its start
    rollouts = policy_rollouts(model, setup["processor"], setup["envs"][args.env], args.env, starts,
                               setup["stats"], greedy=False, generator=generator)
    episodes = [records for records, _ in rollouts]
    rewards = torch.tensor([float(success) for _, success in rollouts]).view(args.states_per_iter, args.group_size)
    if arm == "reinforce":  # 1-0 REINFORCE: advantage = reward (§5.1, Fig. 4)
        advantages = kl.reinforce_advantages(rewards).flatten()
    else:  # GRPO: reward normalised within its group (the paper's reward-normalisation baseline, App. B.2)
        advantages = kl.group_advantages(rewards).flatten()
    # No update when every group ties: there is no reward signal, and a penalty-only step at pi = pi0 would
    # have a zero gradient that Adam's normalisation turns into steps of size lr on rounding noise.
    if advantages.abs().sum() > 0:
        kl_coef = args.kl_coef if arm == "grpo-kl" else 0.0
        rl_step(model, setup["processor"], optimizer, scheduler, instruction, episodes, advantages,
                setup["model"], kl_coef, args.micro_batch)
    else:  # said, not silent: a policy that never succeeds (or always does) is never updated
        tqdm.write(f"every group tied (mean reward {float(rewards.mean()):.2f}): no update this iteration")
    return float(rewards.mean())


def save_checkpoint(path, model, optimizer, scheduler, generator, rng, state):
    """Trainable weights, optimizer, scheduler, both random streams and the counters: a resumed run continues
    exactly. With LoRA only the adapter is saved (OpenVLA-7B's frozen 15 GB come from the hub again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(**trainable_state(model), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    generator=generator.get_state(), rng=rng.bit_generator.state, **state), path)


def load_checkpoint(path, model, optimizer, scheduler, generator, rng):
    saved = torch.load(path, weights_only=False)
    load_trainable(model, saved, path)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    generator.set_state(saved["generator"])
    rng.bit_generator.state = saved["rng"]
    return dict(step=saved["step"], episodes_seen=saved["episodes_seen"], wall=saved["wall"])


def trainable_state(model):
    """{"adapter": the trainable (LoRA) weights} for a peft model, {"model": every weight} otherwise."""
    if hasattr(model, "peft_config"):
        return dict(adapter={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad})
    return dict(model=model.state_dict())


def load_trainable(model, saved, path):
    """Load what trainable_state saved, strictly: every name and shape must match, or one line says why."""
    if hasattr(model, "peft_config") != ("adapter" in saved):
        sys.exit(f"error: {path} was saved {'with' if 'adapter' in saved else 'without'} --lora; pass the same "
                 f"--lora as the run that wrote it, or use another --out-dir")
    if "model" in saved:
        model.load_state_dict(saved["model"], strict=True)
        return
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved["adapter"])), sorted(set(saved["adapter"]) - set(params))
    wrong = [n for n in set(params) & set(saved["adapter"]) if params[n].shape != saved["adapter"][n].shape]
    if missing or unexpected or wrong:
        sys.exit(f"error: the adapter in {path} does not match this model ({len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. "
                 f"{(missing + unexpected + wrong)[0]}); use the --model and LoRA settings it was trained with")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved["adapter"][name])


def _unwrap(model):
    """The model under a peft wrapper (norm_stats, state dict)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compare_demonstrators(args, env, out, setup=None):
    """How competent and how different SFT's demonstrator is next to pi0's expert: success within the horizon
    on the evaluation starts; on the training grid the action statistics and the mean |demonstrator - pi0's
    expert| per dimension in the demonstrator's own states (gripper: share of steps where the two disagree);
    given pi0 (setup), its negative log-likelihood of each one's actions (its SFT loss at step 0, nats per
    step, 7 tokens). Returns the record."""
    record = dict(run="demonstrators")
    for name, expert in (("pi0_expert", lift_expert), ("demonstrator", motion_planning_demonstrator)):
        held_out = [run_episode(env, args.env, start, args.horizon, expert_policy(env, args.env, expert))
                    for start in tqdm(evaluation_starts(args), desc=name, leave=False)]
        demos = collect_demos(env, args.env, training_grid(args.grid), out / "cache", expert=expert)
        actions = np.concatenate([d["actions"] for d in demos])
        record[name] = dict(
            success=float(np.mean([success for _, success in held_out])),
            steps=float(np.mean([len(records) for records, _ in held_out])),
            grid_success=len(demos) / args.grid ** 2, mean=actions.mean(0).tolist(), std=actions.std(0).tolist(),
            saturated_xyz=float((np.abs(actions[:, :3]) >= 0.99).mean()),
            step_length_m=float(np.linalg.norm(actions[:, :3], axis=1).mean() * 0.1))
        if setup is not None:
            images, tokens = episodes_to_batch(demos, setup["stats"])
            with torch.no_grad():
                ids, pixels = encode(setup["processor"], setup["model"], task_info(args.env)["instruction"],
                                     list(images))
                nll = -step_logprobs(setup["model"], ids, pixels, tokens)
            record[name]["pi0_nll_per_step"] = float(nll.mean())
    gaps = []

    def both(image):  # the demonstrator acts; pi0's expert is asked what it would do in the same state
        action = motion_planning_demonstrator(env)
        gaps.append(np.abs(to_policy_action(action) - to_policy_action(lift_expert(env))))
        return action, None
    for start in training_grid(args.grid):
        run_episode(env, args.env, start, args.horizon, both)
    record["demonstrator"]["gap_to_pi0_expert"] = np.mean(gaps, axis=0).tolist()
    return record


# --------------------------------------------------------------------------------------------------
# 9. The study, its summary (matched-success frontiers with bootstrap intervals, the law's R^2) and plots
# --------------------------------------------------------------------------------------------------

# The claim's two arms first, seed by seed, then the controls: a study stopped early has the main comparison.
STUDY_ORDER = [["sft-demonstrator", "grpo"], ["sft-pi0", "sft-rl", "reinforce", "grpo-kl"]]


def matched_success(points, runs, level, n_boot=1000, seed=0):
    """kl.frontier_at on an arm's points (base included), with a percentile 95 % interval from resampling whole
    runs (seeds) and, within each point, its evaluation episodes. Returns (prior, kl, prior interval, kl
    interval, share of resamples that reach the level)."""
    def read(rows, rng):
        new = [_resampled(r["outcomes"][r["new_task"]], rng) for r in rows]
        prior = [np.mean([_resampled(r["outcomes"][e], rng) for e in r["prior_success"]]) for r in rows]
        return kl.frontier_at(new, prior, [r["forward_kl"] for r in rows], level)
    base = [r for r in points if r["run"] == "base"]
    by_run = {run: [r for r in points if r["run"] == run] for run in runs}
    prior, kl_value = read(points, None)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        picked = rng.integers(len(runs), size=len(runs))
        samples.append(read(base + [r for i in picked for r in by_run[runs[i]]], rng))
    samples = np.array(samples)
    reached = samples[~np.isnan(samples[:, 0])]
    interval = (lambda column: np.quantile(column, [0.025, 0.975]).tolist() if len(column) else [np.nan] * 2)
    return prior, kl_value, interval(reached[:, 0]), interval(reached[:, 1]), len(reached) / n_boot


def _resampled(outcomes, rng):
    outcomes = np.asarray(outcomes)
    return outcomes.mean() if rng is None else outcomes[rng.integers(len(outcomes), size=len(outcomes))].mean()


def law_points(rows):
    """The forgetting law's points: pi0 once (every run's step 0 is pi0 itself), then every run's later
    points; the group of a point is its run, so that the bootstrap resamples whole runs."""
    points = [r for r in rows if r["run"] == "base"][:1] + [r for r in rows if r.get("arm") in ARMS]
    return (np.array([r["forward_kl"] for r in points]), np.array([r["prior_mean"] for r in points]),
            [r["run"] for r in points])


def forgetting_law(rows):
    """R^2 of the quadratic fit of prior-task success on forward KL with its run-bootstrap interval
    (kl.bootstrap_r2, groups = runs), and the numbers of points and runs; None with fewer than 2 runs beside
    pi0, or when prior-task success never varies (no variance to explain)."""
    kls, prior, groups = law_points(rows)
    if len(set(groups)) < 3 or np.ptp(prior) == 0:
        return None
    r2, low, high = kl.bootstrap_r2(kls, prior, groups=groups)
    return r2, low, high, len(kls), len(set(groups)) - 1


def summarize(rows, levels):
    """The study's numbers as Markdown: per arm, runs and seeds done, and prior-task success and forward KL at
    matched new-task success with intervals; the forgetting law's R^2 (kl.bootstrap_r2, grouped by run)."""
    base = [r for r in rows if r["run"] == "base"]
    points = [r for r in rows if r.get("arm") in ARMS]
    lines = [f"pi0: new-task success {base[0]['new_success']:.2f}, prior {base[0]['prior_success']} "
             f"({base[0]['eval_episodes']} episodes per task)", "",
             "| arm | runs (seeds) | " + " | ".join(f"prior at new ≥ {l:.2f} [95 % CI] | KL at new ≥ {l:.2f} [CI]"
                                                 for l in levels) + " |",
             "|---|---|" + "---|---|" * len(levels)]
    for arm, (_, label, _) in ARMS.items():
        mine = [r for r in points if r["arm"] == arm]
        if not mine:
            continue
        runs = sorted({r["run"] for r in mine})
        cells = []
        for level in levels:
            prior, kl_value, prior_ci, kl_ci, share = matched_success(base + mine, runs, level)
            if math.isnan(prior):
                cells += ["not reached", "–"]
            else:
                cells += [f"{prior:.2f} [{prior_ci[0]:.2f}, {prior_ci[1]:.2f}] ({share:.0%})",
                          f"{kl_value:.2f} [{kl_ci[0]:.2f}, {kl_ci[1]:.2f}]"]
        seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in mine}))
        lines.append(f"| {label} | {len(runs)} ({seeds}) | " + " | ".join(cells) + " |")
    lines += ["", "Forward KL per action dimension (x, y, z, roll, pitch, yaw, gripper) at the runs' last points, "
                  "mean over seeds:", ""]
    for arm, (_, label, _) in ARMS.items():
        last = [r for r in points if r["arm"] == arm and r["fraction"] == 1.0]
        if last:
            per_dim = np.mean([r["forward_kl_per_dim"] for r in last], axis=0)
            lines.append(f"- {label}: " + ", ".join(f"{v:.3f}" for v in per_dim) + f" (sum {per_dim.sum():.3f})")
    demonstrators = [r for r in rows if r["run"] == "demonstrators"]
    if demonstrators:
        lines += [""] + describe_demonstrators(demonstrators[0])
    law = forgetting_law(rows)
    if law is not None:
        r2, low, high, n_points, n_runs = law
        lines += ["", f"Forgetting law: prior-task mean vs forward KL, quadratic, R² = {r2:.2f} "
                      f"[{low:.2f}, {high:.2f}] (kl.bootstrap_r2 resampling whole runs; {n_points} points of "
                      f"{n_runs} runs, pi0 counted once)"]
    return "\n".join(lines)


def describe_demonstrators(record):
    """compare_demonstrators' record as a Markdown table and one line."""
    lines = ["| demonstrator | success (held out) | steps | success on the grid | mean action (x, y, z) | "
             "std (x, y, z) | xyz at the bound | step length | pi0's NLL per step |", "|---" * 9 + "|"]
    for name in ("pi0_expert", "demonstrator"):
        d = record[name]
        mean = ", ".join(f"{v:+.2f}" for v in d["mean"][:3])
        std = ", ".join(f"{v:.2f}" for v in d["std"][:3])
        nll = f"{d['pi0_nll_per_step']:.2f}" if "pi0_nll_per_step" in d else "–"
        lines.append(f"| {name} | {d['success']:.2f} | {d['steps']:.1f} | {d['grid_success']:.2f} | {mean} | {std} | "
                     f"{d['saturated_xyz']:.0%} | {100 * d['step_length_m']:.1f} cm | {nll} |")
    gap = record["demonstrator"]["gap_to_pi0_expert"]
    lines += ["", "Mean |demonstrator - pi0's expert| in the demonstrator's states, (x, y, z) in action units "
                  f"(0.1 m): {', '.join(f'{v:.2f}' for v in gap[:3])}; gripper commands differ in "
                  f"{gap[6]:.0%} of steps"]
    return lines


SERIES_COLORS = dict(zip(ARMS, ["tab:blue", "tab:cyan", "tab:purple", "tab:red", "tab:green", "tab:orange"]))


def plot(rows, plots_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plots_dir.mkdir(parents=True, exist_ok=True)
    base = [r for r in rows if r["run"] == "base"]
    arms = {arm: [r for r in rows if r.get("arm") == arm] for arm in ARMS}
    arms = {arm: pts for arm, pts in arms.items() if pts}
    star = dict(color="black", marker="*", s=120, zorder=3, label="base π0")

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for arm, pts in arms.items():
        pts = base + pts
        new, prior = [r["new_success"] for r in pts], [r["prior_mean"] for r in pts]
        ax.scatter(new, prior, color=SERIES_COLORS[arm], alpha=0.35, s=15)
        front = kl.pareto_frontier(new, prior)
        runs = len({r["run"] for r in pts}) - 1
        ax.plot([new[i] for i in front], [prior[i] for i in front], "-o", color=SERIES_COLORS[arm],
                label=f"{ARMS[arm][1]} ({runs} run{'s' if runs > 1 else ''})")
    ax.scatter([r["new_success"] for r in base], [r["prior_mean"] for r in base], **star)
    ax.set(xlabel="new-task success", ylabel="prior-task success (mean)", title="VLA analogue: trade-off",
           xlim=(-0.03, 1.03))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots_dir / "vla_pareto.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for arm, pts in arms.items():
        kls = [r["forward_kl"] for r in pts]
        axes[0].scatter(kls, [r["prior_mean"] for r in pts], color=SERIES_COLORS[arm], s=20, label=ARMS[arm][1])
        axes[1].scatter(kls, [r["new_success"] for r in pts], color=SERIES_COLORS[arm], s=20)
    axes[0].scatter([0.0], [base[0]["prior_mean"]], **star)
    axes[1].scatter([0.0], [base[0]["new_success"]], **star)
    law = forgetting_law(rows)
    if law is not None:
        kls, prior, _ = law_points(rows)
        grid = np.linspace(0, kls.max(), 100)
        axes[0].plot(grid, np.polyval(kl.fit_law(kls, prior)[0], grid), "k--",
                     label=f"quadratic fit, R²={law[0]:.2f} [{law[1]:.2f}, {law[2]:.2f}] (runs bootstrapped)")
    axes[0].set(xlabel="forward KL(π0‖π), new-task observations", ylabel="prior-task success (mean)",
                title="forgetting vs KL")
    axes[1].set(xlabel="forward KL(π0‖π), new-task observations", ylabel="new-task success", title="new task vs KL")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots_dir / "vla_forgetting_vs_kl.png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_results(out / "results.jsonl")
    if args.method == "plot":
        if not any(r["run"] == "base" for r in rows):
            sys.exit(f"error: no results in {out / 'results.jsonl'}; run --method study (or bc and an arm) first")
        base_new = next(r["new_success"] for r in rows if r["run"] == "base")
        levels = args.match_at or [round(base_new + 0.1, 2), round(base_new + 0.2, 2)]
        plot(rows, Path(args.plots_dir))
        summary = summarize(rows, levels)
        (out / "summary.md").write_text(summary + "\n")
        print(summary)
        return
    if args.method == "demonstrators":  # needs no pi0; with one, pi0's NLL of each one's actions is added
        setup = None
        if Path(args.model).exists():
            model, processor = load_policy(args.model)
            setup = dict(model=model, processor=processor, stats=next(iter(_unwrap(model).norm_stats.values())))
        record = compare_demonstrators(args, make_env(args.env, args.image_size, args.horizon), out, setup)
        print("\n".join(describe_demonstrators(record)))
        return
    if args.model == str(out / "base") and not (out / "base").exists():
        if args.method != "bc" and args.method != "study":
            sys.exit(f"error: no pi0 in {out / 'base'}; build it first: python vla_finetune.py --method bc")
        behaviour_clone(args, out)
    if args.method == "bc":
        return
    setup = load_setup(args, out)
    if args.method == "study":
        demonstrators_done = any(r["run"] == "demonstrators" for r in read_results(out / "results.jsonl"))
        if args.env == NEW_TASK and not demonstrators_done:  # the two scripted pick demonstrators' task
            append_result(out / "results.jsonl", compare_demonstrators(args, setup["envs"][args.env], out, setup))
        for arms in STUDY_ORDER:
            for seed in args.seeds:
                for arm in arms:
                    finetune(args, arm, ARMS[arm][2], seed, setup, out)
        return
    for lr in args.lr or [ARMS[args.method][2]]:
        for seed in args.seeds:
            finetune(args, args.method, lr, seed, setup, out)


if __name__ == "__main__":
    main()
