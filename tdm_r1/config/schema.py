"""The config schema: a tree of dataclasses with their defaults (`tdm_r1.config.load` reads YAML into it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the dotted key."""


@dataclass
class WorldConfig:
    # A registered world (tdm_r1.worlds.BUILTIN_WORLDS) or an import path "module:factory" of one built from this
    # section; the fields below are the OCR world's, `options` holds another world's own settings.
    name: str = "ocr"
    height: int = 16
    width: int = 64
    channels: Literal[1, 3] = 1
    # Word lists, one uppercase word per line; relative paths resolve against the working directory.
    train_words: str = "configs/words/ocr_train.txt"
    heldout_words: str = "configs/words/ocr_heldout.txt"
    alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    max_word_len: int = 8
    prompt_template: str = 'a sign that says "{word}"'
    # Difficulty knobs. Levels are in [0, 1] (0 black, 1 white).
    font_sizes: list[int] = field(default_factory=lambda: [12])
    background_level: list[float] = field(default_factory=lambda: [0.85, 0.85])
    text_level: list[float] = field(default_factory=lambda: [0.1, 0.1])
    random_rgb: bool = False  # random text/background colours (needs channels: 3)
    invert_prob: float = 0.0  # probability of light text on a dark background
    left_margin: int = 2
    jitter_x: int = 0  # uniform horizontal offset in [0, jitter_x] pixels
    jitter_y: int = 0  # uniform vertical offset in [-jitter_y, jitter_y] pixels
    noise_std: float = 0.0  # Gaussian pixel noise, in [0, 1] units
    # Smudged renders: with probability blot_prob a block in the text colour covers blot_frac of the word's width
    # (all its ink rows, at a uniform position inside the word), as unreadable text in web-scale training data.
    blot_prob: float = 0.0
    blot_frac: float = 0.5
    options: dict[str, Any] = field(default_factory=dict)  # a world other than ocr: its own settings


@dataclass
class ModelConfig:
    # tiny_dit: the embedded pixel-space model (the fields below). sd3 / zimage: a diffusers folder, configured
    # in the `diffusers:` section (the tiny_dit fields are then unused).
    kind: Literal["tiny_dit", "sd3", "zimage"] = "tiny_dit"
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    patch: int = 4
    text_len: int = 32  # characters of the prompt kept (longer prompts are an error)
    text_layers: int = 2


@dataclass
class PretrainConfig:
    steps: int = 2500
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    # None: the rate stays at `lr` after warmup; a number: it falls from `lr` to `final_lr` on a half cosine over the
    # steps after warmup (step `steps` at exactly final_lr)
    final_lr: float | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    cond_drop_prob: float = 0.1  # prompt dropout, enables CFG
    logit_normal_std: float = 1.0  # s ~ sigmoid(N(0, std)), as in SD3
    log_every: int = 50
    save_every: int = 250  # intermediate checkpoints (EMA weights) under <run_dir>/checkpoints
    # A teacher checkpoint to continue from (its weights start both the model and the EMA; fresh optimizer, warmup
    # again). Its model config must equal `model:`; its world may differ (continue on another world).
    init: str | None = None


@dataclass
class SampleConfig:
    """The teacher's many-step sampler: the teacher baseline row of a train run (`teacher_32nfe_cfg`) and the defaults
    of `tdm-r1 sample` / `tdm-r1 eval`. The few-step generator's schedule is `tdm.steps` / `tdm.shift`."""

    shift: float = 3.0  # shift(u) = k u / (1 + (k - 1) u)
    nfe: int = 32
    cfg: float = 3.0
    solver: Literal["euler", "dpmpp2m"] = "euler"


@dataclass
class EvalConfig:
    train_subset: int = 256  # train-split items evaluated (a fixed subset, seeded by eval.seed); held-out: all
    batch_size: int = 128
    seed: int = 1234
    # Eval seeds (seed, seed + 1, ...) of each row of a train run's summary. One seed's 256 samples move a mean by
    # about +-0.01, the size of the gains compared; > 1 adds each seed's mean, their standard error and the paired
    # per-seed gain of TDM-R1 over its starting generator (summary "gain_4nfe"). The periodic evaluations of
    # train.eval_every stay at one seed (eval.seed).
    seeds: int = 1
    # Seeds of the teacher's many-step CFG row (2 x sample.nfe forwards per sample: 8-16x the cost of a 4-NFE row,
    # and 0.04+ away from the rows compared); None = seeds.
    reference_seeds: int | None = None
    # Also evaluate the starting and the final generator on the eval.train_subset train-split items (summary rows
    # tdm_4nfe_train / tdm_r1_4nfe_train and gain_4nfe_train): what the run did on the prompts it trains on, beside
    # what carried over to held-out ones.
    train_rows: bool = False
    # Seeds of those train-split rows; None = seeds. A run on a small prompt set (world.train_words) affords many:
    # 8 seeds of 32 words cost one seed of the 256 held-out words.
    train_seeds: int | None = None
    grid_rows: int = 8
    grid_cols: int = 8
    # Baseline rows (teacher 40 NFE + CFG and 4 NFE, the starting generator) shared between runs, each keyed by the
    # content of the model it sampled, the items, sampler, seeds and reward: "auto" = .baseline_cache beside run_dir,
    # a folder, or "" (only the run's own baselines.json).
    baseline_cache: str = "auto"


@dataclass
class RolesConfig:
    """How the model roles are held (DESIGN section 4)."""

    # lora: one frozen base (the teacher) carries peft adapters generator / fake / surrogate, plus frozen
    # copies generator_ema / slow_surrogate; the reference is the base with adapters disabled.
    # full: every trainable role is its own copy of the teacher (the generator of generator_init).
    mode: Literal["lora", "full"] = "lora"
    teacher: str = "checkpoints/toy_ocr_teacher.safetensors"  # model checkpoint; frozen reference
    # Few-step generator to start from: full mode takes a model checkpoint (weights), lora mode an adapter
    # file written by `tdm-r1 distill` in lora mode (student_adapter.safetensors). None = the teacher.
    generator_init: str | None = None
    # The fake score to start from (same formats as generator_init; `tdm-r1 distill` writes
    # student_fake_adapter.safetensors / student_fake.safetensors next to the student). None = the teacher. Starting
    # TDM-R1 from the distillation run's fake keeps the KL term consistent with the student from the first epoch
    # instead of re-learning the student's distribution while the other terms already push.
    fake_init: str | None = None
    lora_rank: int = 32
    lora_alpha: float = 64.0
    # The surrogate's (and its slow copy's) own adapter rank; None = lora_rank. Its alpha keeps the same
    # alpha / rank scale, so a smaller rank changes capacity, not the step size.
    surrogate_lora_rank: int | None = None
    # Regex (full match on module names) of the linear layers that get adapters: the DiT blocks'
    # attention qkv/proj and MLP fc1/fc2 (the prompt encoder's blocks are "text_blocks.*" and stay frozen).
    lora_targets: str = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


@dataclass
class TDMConfig:
    """Constants of the TDM / TDM-R1 update (DESIGN section 5)."""

    steps: int = 4  # K: student sampler steps
    shift: float = 3.0  # schedule shift k of the student's timesteps
    steps_per_batch: int = 2  # M: step indices j drawn per stored batch
    tau_margin: float = 0.02  # tau drawn uniform in pre-shift time over (u_{j+1} + margin, 1], then shifted
    fake_reg: float = 0.02  # weight of mean(v_real - v_fake)^2 in the fake-score loss
    cfg: float = 4.5  # CFG scale of the CFG-as-reward target
    w_tdm: float = 0.3
    trunc_steps: int = 4  # steps j >= trunc_steps use w_tdm * (L_cfg + L_kl)
    rl_cfg: float = 4.5  # CFG scale of the surrogate in the learned-reward target
    normaliser_eps: float = 1e-6  # added to the per-sample normaliser mean|x0_hat - x0_ref|


@dataclass
class OptimConfig:
    """AdamW per role (DESIGN section 5.5)."""

    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    generator_lr: float = 7.5e-5
    generator_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    fake_lr: float = 3e-4
    fake_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    surrogate_lr: float = 3e-4
    surrogate_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    generator_ema_decay: float = 0.9  # per generator optimizer step


@dataclass
class DistillConfig:
    """`tdm-r1 distill`: the TDM loop (reward term off, generator from the teacher, rollouts from noise)."""

    steps: int = 600  # generator optimizer steps
    batch_size: int = 32  # prompts (one rollout each) per step
    fake_updates: int = 1  # fake-score optimizer steps per generator step, each on a fresh rollout
    log_every: int = 1
    eval_every: int = 200  # held-out OCR of the EMA generator at K steps; 0 = only at the end
    eval_at_end: bool = True
    checkpoint_every: int = 200  # training-state checkpoints under <run_dir>/checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # newest training-state checkpoints kept


@dataclass
class DiffusersConfig:
    """Diffusers models (model.kind sd3 / zimage): where the weights are and how they run (tdm_r1/models/sd3.py,
    zimage.py)."""

    # Local diffusers folder (model_index.json + component subfolders), e.g. a `huggingface-cli download
    # stabilityai/stable-diffusion-3.5-medium --local-dir ...` copy. Loading never touches the network.
    path: str = ""
    # Random weights from the configs (diffusers.path's, else the published architecture) and stub text encoders:
    # for throughput benchmarks (`tdm-r1 bench --random-init`), never for training (tdm_r1/models/random_init.py).
    random_init: bool = False
    height: int = 512  # image size trained and sampled; latents are height / 8 x width / 8
    width: int = 512
    # Compute dtype of every forward pass; the frozen text encoders and VAE are stored in it.
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Keep the transformer's parameters (and so LoRA / full-mode trainable weights) in fp32 and run the forward
    # under autocast(dtype). Off: parameters stored in `dtype`. Under DeepSpeed bf16 the engine keeps its own fp32
    # master copy in the optimizer, so leave this off there.
    master_weights_fp32: bool = False
    # flash (flash-attn package) / xformers / sdpa (PyTorch). A missing package or no CUDA device falls back to
    # sdpa with a logged warning, decided once at load time.
    attention_backend: Literal["sdpa", "flash", "xformers"] = "sdpa"
    gradient_checkpointing: bool = True  # transformer blocks recompute activations in the backward
    # Text-encoder tokens per prompt; 0 = the pipeline's default (SD3: 256 T5 tokens, Z-Image: 512).
    max_sequence_length: int = 0
    # Encoded prompts kept in host memory (least recently used evicted; 0 = unbounded). One SD3 prompt is
    # 333 x 4096 bf16 values (2.7 MB), one Z-Image prompt 512 x 2560 (2.6 MB).
    prompt_cache_size: int = 1024
    encode_batch_size: int = 32  # prompts per text-encoder forward
    # Move the text encoders to the CPU after each encode_prompts call that ran them (and back on the next).
    offload_text_encoders: bool = True
    vae_decode_chunk: int = 8  # latents per VAE decode call


@dataclass
class RewardTermConfig:
    name: str = "ocr"  # a registered reward (tdm_r1.rewards)
    weight: float = 1.0
    # Local weights of a model-based reward (pickscore: a CLIP folder; geneval: a folder with the detector and CLIP
    # files, see tdm_r1/rewards/geneval.py). Loaded offline; a missing path is an error naming it.
    path: str = ""
    device: str = "auto"  # where a model-based reward runs: auto (this rank's CUDA device, else CPU), cpu, cuda
    batch_size: int = 32  # images per forward of a model-based reward
    # The reward's own settings, checked by its module (e.g. ocr: upscale, pad, tile_columns, tile_rows, threads).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptsConfig:
    """Prompt files of diffusers models (model.kind sd3 / zimage; the toy world has its own word lists).

    A `.txt` file holds one prompt per line (UTF-8, no empty lines). A `.jsonl` file holds one JSON object per line
    with a "prompt" string; the object is passed to the rewards as that prompt's metadata (e.g. GenEval's `include`
    / `exclude` clauses). Relative paths resolve against the working directory."""

    train: str = ""
    heldout: str = ""
    heldout_limit: int = 0  # held-out prompts evaluated (the file's first N); 0 = all of them


@dataclass
class TrainConfig:
    """`tdm-r1 train`: the TDM-R1 epoch (DESIGN section 5); TDM constants live in `tdm:`."""

    epochs: int = 100
    prompts_per_epoch: int = 16  # P
    group_size: int = 8  # G samples per prompt
    micro_batch_groups: int = 4  # whole prompt groups per stored micro-batch
    optimizer_steps_per_epoch: int = 1  # gradients accumulate over the epoch by default
    rewards: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig()])
    # A guard against reward hacking: one reward the run never trains on (any registered or remote one), scored on the
    # held-out samples of every evaluation. The EMA generator with the best gold score is kept beside the last
    # (generator_best_gold.safetensors, or pipeline_best_gold/), and a warning is logged and reported when the
    # training reward rises while gold falls for two evaluations in a row. Empty: off.
    gold: list[RewardTermConfig] = field(default_factory=list)
    # How several rewards make one advantage: `sum` weights the scores, then normalises per group (DESIGN 5.3);
    # `per_reward` normalises each reward per group, then weights the advantages, so a reward with a larger scale or
    # spread does not drown the others.
    reward_combine: Literal["sum", "per_reward"] = "sum"
    max_reward_failure: float = 0.2  # fraction of NaN rewards in an epoch that stops the run (after a checkpoint)
    adv_eps: float = 1e-4  # A = (r - group mean) / (epoch std + adv_eps)
    adv_clip: float = 5.0
    beta_dpo: float = 10.0  # group score S_g = sum A_i beta_dpo (l_i - l_ref_i) / G
    ppo_clip: float = 1e-3  # c of the PPO-style gate on exp(l_old - l)
    ref_gate_threshold: float = 0.05  # reference gate: batch mean (v_sur - v_ref)^2 above this
    surrogate_beta: float = 1e-3  # weight of mean (v_sur - v_ref)^2 in the surrogate loss
    t_min_surrogate: float = 0.3  # surrogate training: tau above max(s_{k+1}, t_min)
    t_min_generator: float = 0.3  # learned-reward target: tau' above max(s_{j+1}, t_min)
    # Reference of the surrogate's likelihood ratio: the frozen teacher (reference release) or the
    # surrogate's own slow EMA (paper variant).
    surrogate_reference: Literal["teacher", "ema"] = "teacher"
    # Ablation: direct_rl trains the generator with an advantage-weighted denoising loss instead of the
    # learned reward (what the paper shows failing).
    generator_loss: Literal["tdm_r1", "direct_rl"] = "tdm_r1"
    eta: float = 0.0  # ablation: stochastic rollouts (eta = 1 re-noises fully at every step)
    slow_decay_base: float = 0.001  # slow surrogate EMA decay = min(max, base + rate * epoch)
    slow_decay_rate: float = 0.001
    slow_decay_max: float = 0.3
    eval_every: int = 10  # held-out OCR of the EMA generator (4 NFE); 0 = only at the end
    eval_baselines: bool = True  # teacher (32 NFE + CFG, 4 NFE) and starting generator, cached per run
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    tensorboard: bool = True


@dataclass
class DistributedConfig:
    """DeepSpeed across ranks (DESIGN section 7). Used when the process was started by `deepspeed` or `torchrun`
    (their environment names RANK and WORLD_SIZE); a plain `tdm-r1 train` runs in one process without DeepSpeed
    and ignores this section. Every trainable role becomes a DeepSpeed engine (tdm_r1/distributed/engines.py)."""

    zero_stage: Literal[0, 1, 2, 3] = 3  # 3 partitions parameters, gradients and optimizer states of every role
    # bf16 weights and activations with fp32 master weights in the optimizer; false = fp32 throughout (CPU tests).
    bf16: bool = True
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and fp32 master weights in CPU memory
    offload_params: bool = False  # stage 3: parameters in CPU memory between uses
    # Stage 3: parameters with fewer elements are kept whole on every rank after their first use (fewer small
    # all-gathers); 0 partitions every tensor.
    param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduce-scatter bucket
    prefetch_bucket_size: int = 50_000_000  # stage 3: elements of parameters fetched ahead of use
    # Stage 3: gathered parameters kept whole at most (elements), and not released when they are used again within
    # this many elements of other parameters (DeepSpeed's defaults; lower both to trade speed for memory).
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    # A DeepSpeed JSON used instead of the fields above (see configs/ds/). The trainer still sets the batch keys,
    # gradient_clipping (optim.grad_clip) and its own per-role AdamW (optim:), so the JSON has no optimizer section.
    ds_config: str | None = None
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, gloo on CPU
    timeout_minutes: int = 30  # a collective that waits longer fails instead of hanging
    # Samples per rank per micro-batch this recipe was tuned for (train.micro_batch_groups * train.group_size /
    # world size); a launch with another GPU count is then an error rather than a silent change. 0 = not checked.
    micro_batch_per_gpu: int = 0


@dataclass
class PerfConfig:
    """How the trainer computes, not what: every setting trains the same model up to float rounding. The defaults are
    the fast loop; `tdm-r1 bench` times them against the reference loop structure (its `reference` path)."""

    kernels: Literal["auto", "reference", "native", "triton"] = "auto"  # auto: triton on CUDA, native on CPU if built
    cfg_batching: Literal["batched", "separate"] = "batched"  # a CFG pair as one batched forward, or two forwards
    # The fake score takes the generator output stored by the rollout while the generator has not moved since;
    # False recomputes it at every drawn step (the reference loop).
    reuse_rollout_output: bool = True
    encode_once: bool = True  # prompts encoded once per epoch; False: per rollout and per update micro-batch
    # lora mode, one process: no-grad forwards (rollout, reference, frozen and EMA roles, the fake / surrogate inside
    # the generator's loss) with the adapter merged into the weights for the call instead of peft's wrappers
    # (`merged`, ~27% less time per forward of the toy at rank 32); `peft`: peft's own forward.
    lora_forward: Literal["peft", "merged"] = "merged"
    # The first micro-batch's fake-score update (it needs no advantages) runs while the scorer finishes the last
    # rollout chunk; False waits for every reward first.
    overlap_reward: bool = True


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    tdm: TDMConfig = field(default_factory=TDMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusers: DiffusersConfig = field(default_factory=DiffusersConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


DIFFUSERS_KINDS = ("sd3", "zimage")


def is_diffusers(cfg: Config) -> bool:
    """model.kind names a diffusers model (prompt files, a diffusers folder) rather than the toy model."""
    return cfg.model.kind in DIFFUSERS_KINDS
