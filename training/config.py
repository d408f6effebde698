"""A training run's options: one frozen `TrainConfig`, each field with its default and one line of help.

train.py builds it from `train_ddpm(**kwargs)` or from the command line (the flags are generated
from these fields and their help), validates it once, here, and hands it to training.loop.TrainLoop,
which only reads it. Settings resolved later (the resumed run's model options, the run name)
make a new config with `dataclasses.replace`; nothing changes one in place.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

from diffusion import BETA_SCHEDULES, LOSSES, PREDICTIONS, VARIANCES, check_model_options
from runtime import AMP_CHOICES, DEFAULT_AMP, plain
from sampling.options import DEFAULT_DPM_SOLVER_STEPS, SAMPLERS, fast_steps

DATASETS = ('cifar10', 'folder', 'synthetic')


def option(default, help):
    """A config field: its default and the one line of help that --help shows."""
    return field(default=default, metadata={'help': help})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run (`python train.py --help` lists them with these lines)."""
    num_epochs: int = option(100, 'passes over the training set')
    batch_size: int = option(128, 'global batch: split across DDP ranks and accum_steps micro-batches')
    lr: float = option(2e-4, "Adam learning rate after warmup (the paper's CIFAR-10 value)")
    device: str = option(None, 'None: CUDA, then MPS, then CPU')
    dataset: str = option('cifar10', "'cifar10' | 'folder' | 'synthetic'")
    data_dir: str = option('data', "CIFAR-10 download folder, or the image folder for dataset='folder'")
    checkpoint_dir: str = option('checkpoints', 'ddpm_epoch_{N}.pth and ddpm_latest.pth go here')
    log_dir: str = option('runs', 'TensorBoard runs: log_dir/<run_name>')
    run_name: str = option(None, "None: a timestamp (or the resumed run's name)")
    save_every: int = option(10, 'epochs between numbered checkpoints')
    sample_every: int = option(20, 'epochs between sample grids (also written at the end)')
    num_samples: int = option(64, 'images in each sample grid')
    sample_sampler: str = option('dpm-solver', "sampler for the grids: 'dpm-solver', 'ddim' or 'ddpm' (the "
                                               "paper's T)")
    sample_steps: int = option(DEFAULT_DPM_SOLVER_STEPS, 'network evaluations of a ddim / dpm-solver grid '
                                                         '(FID: docs/sampling.md)')
    fid_every: int = option(0, 'epochs between FID evaluations of the EMA model (0: off); see docs/training.md')
    fid_samples: int = option(10000, 'samples per FID evaluation, scored against the training images')
    fid_sampler: str = option('ddim', "sampler for the FID samples: 'ddim', 'dpm-solver' or 'ddpm' (all T steps)")
    fid_steps: int = option(50, 'network evaluations of a ddim / dpm-solver FID sample')
    fid_weights: str = option(None, "Inception weights (torch-fidelity's or NVIDIA's TorchScript port); None: "
                                    "torch.hub's")
    ema_decay: float = option(0.9999, "EMA of the weights (the paper's value); used for grids and sampling")
    warmup_steps: int = option(5000, "linear learning-rate warmup (the paper's value)")
    grad_clip: float = option(1.0, "max gradient norm (the paper's value); 0 disables clipping")
    seed: int = option(0, 'seeds the weights, data order, t and eps of every step')
    resume: str = option(None, "a checkpoint path, or 'latest' (starts fresh when there is none)")
    max_steps: int = option(None, 'stop after this many optimizer steps (saves ddpm_latest.pth)')
    accum_steps: int = option(1, 'gradient accumulation: micro-batches per optimizer step')
    amp: str = option(DEFAULT_AMP, "'auto' (bf16 where native, fp16 + GradScaler on older GPUs, else fp32) | "
                                   "'bf16' | 'fp16' | 'fp32'")
    channels_last: bool = option(None, 'NHWC layout; None: on, except CPU bf16 where NCHW measured faster')
    compile: bool = option(False, 'torch.compile the training step (checkpoints stay loadable without it)')
    log_every: int = option(10, 'steps between TensorBoard scalar writes')
    arch: str = option('base', "'base' (15.6M params) | 'ddpm-paper' (the paper's 35.7M) | 'tiny' (CPU demos)")
    channels: tuple = option(None, "U-Net channels per level; None: the arch's")
    num_res_blocks: int = option(None, "ResNet blocks per level; None: the arch's")
    time_emb_dim: int = option(None, "time-embedding width; None: the arch's")
    attn_resolutions: tuple = option(None, "resolutions with self-attention; None: the arch's")
    num_heads: int = option(None, "attention heads; None: the arch's")
    dropout: float = option(None, "dropout in ResNet blocks; None: the arch's (0.1)")
    image_size: int = option(32, "training resolution (images are resized for dataset='folder')")
    downsample_padding: str = option('same', "'same': TF padding, bottom/right (the paper's) | 'symmetric': "
                                             "older checkpoints")
    timesteps: int = option(1000, 'T')
    beta_start: float = option(1e-4, 'beta_1 of the linear schedule')
    beta_end: float = option(0.02, 'beta_T of the linear schedule')
    variance: str = option('beta', "'beta' (the paper's) | 'posterior' (beta-tilde) | 'learned' (log sigma^2, "
                                   "Table 2) | 'learned_range' (= learn_sigma)")
    beta_schedule: str = option('linear', "'linear' (the paper's) | 'cosine' (Improved DDPM; ignores "
                                          "beta_start/end)")
    learn_sigma: bool = option(False, 'the U-Net also outputs the reverse variance (Improved DDPM); needs a loss '
                                      'below')
    loss: str = option('simple', "'simple' (the paper's L_simple) | 'hybrid' (+ 0.001 L_vlb) | 'vlb'")
    prediction: str = option('eps', "what the U-Net predicts: 'eps' (the paper's) | 'x0' | 'mu' (mu-tilde) | 'v'")
    min_snr_gamma: float = option(None, 'Min-SNR-gamma weighting of the MSE (Hang et al. 2023; they use 5); '
                                        'None: off')
    importance_sampling: bool = option(False, "loss='vlb' only: draw t with p_t ~ sqrt(E[L_t^2]) (Improved DDPM "
                                              "3.3)")
    class_cond: bool = option(False, 'class-conditional model for classifier-free guidance, labels from the '
                                     'dataset')
    p_uncond: float = option(0.1, 'with class_cond: probability that a label is dropped to the null class')

    def __post_init__(self):
        for key in ('channels', 'attn_resolutions'):   # lists (JSON, argparse) hold the same values as tuples
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        validate(self)

    @classmethod
    def from_kwargs(cls, kwargs):
        """TrainConfig(**kwargs), but an unknown key is a ValueError naming the closest option and listing all."""
        unknown = [k for k in kwargs if k not in OPTIONS]
        if unknown:
            match = suggestion(unknown[0])
            hint = f" (did you mean {match!r}?)" if match else ''
            raise ValueError(f'unknown option {unknown[0]!r}{hint}; valid options: {list(OPTIONS)}')
        return cls(**kwargs)

    def to_dict(self):
        """The options as plain types (tuples become lists): what config.json and checkpoints store."""
        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}


FIELDS = dataclasses.fields(TrainConfig)
OPTIONS = tuple(f.name for f in FIELDS)
DEFAULTS = {f.name: f.default for f in FIELDS}

# The names other training scripts use for our options, so that a user bringing one gets pointed here.
ALIASES = {
    'learning_rate': 'lr', 'epochs': 'num_epochs', 'n_epochs': 'num_epochs', 'num_train_epochs': 'num_epochs',
    'bs': 'batch_size', 'train_batch_size': 'batch_size', 'lr_warmup_steps': 'warmup_steps', 'warmup': 'warmup_steps',
    'ema': 'ema_decay', 'ema_rate': 'ema_decay', 'ema_max_decay': 'ema_decay', 'max_grad_norm': 'grad_clip',
    'clip_grad': 'grad_clip', 'gradient_accumulation_steps': 'accum_steps', 'mixed_precision': 'amp',
    'use_fp16': 'amp', 'resolution': 'image_size', 'img_size': 'image_size', 'output_dir': 'checkpoint_dir',
    'logging_dir': 'log_dir', 'train_data_dir': 'data_dir', 'dataset_name': 'dataset',
    'resume_from_checkpoint': 'resume', 'resume_checkpoint': 'resume', 'max_train_steps': 'max_steps',
    'iterations': 'max_steps', 'num_train_timesteps': 'timesteps', 'diffusion_steps': 'timesteps',
    'noise_schedule': 'beta_schedule', 'num_channels': 'channels', 'block_out_channels': 'channels',
    'attention_resolutions': 'attn_resolutions', 'layers_per_block': 'num_res_blocks',
    'class_conditional': 'class_cond', 'save_model_epochs': 'save_every', 'save_image_epochs': 'sample_every',
}


def suggestion(name):
    """The option a misspelled or borrowed name most likely means, or None."""
    name = name.lstrip('-').replace('-', '_')
    if name in ALIASES:
        return ALIASES[name]
    match = difflib.get_close_matches(name, OPTIONS, n=1)
    return match[0] if match else None


def validate(c):
    """One clear ValueError for each impossible setting, before any work is done."""
    for key in ('num_epochs', 'batch_size', 'save_every', 'sample_every', 'accum_steps', 'log_every', 'image_size',
                'timesteps', 'sample_steps'):
        value = getattr(c, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{key} must be a positive integer, got {value!r}')
    if not (c.lr > 0 and math.isfinite(c.lr)):  # lr=inf would turn the first update into NaN weights
        raise ValueError(f'lr must be positive and finite, got {c.lr!r}')
    if (fast_steps(c.sample_sampler, c.sample_steps) or 0) > c.timesteps:  # else it fails at the first grid
        raise ValueError(f'sample_steps={c.sample_steps} must not exceed timesteps={c.timesteps}')
    if c.max_steps is not None and c.max_steps < 1:
        raise ValueError(f'max_steps must be a positive integer or None, got {c.max_steps!r}')
    if not 0 <= c.p_uncond <= 1:
        raise ValueError(f'p_uncond must be in [0, 1], got {c.p_uncond!r}')
    if not 0 <= c.ema_decay < 1:
        raise ValueError(f'ema_decay must be in [0, 1), got {c.ema_decay!r}')
    if c.warmup_steps < 0 or c.grad_clip < 0 or c.num_samples < 0:
        raise ValueError('warmup_steps, grad_clip and num_samples must not be negative')
    _validate_fid(c)
    choices = {'dataset': DATASETS, 'amp': AMP_CHOICES, 'sample_sampler': SAMPLERS, 'fid_sampler': SAMPLERS,
               'variance': VARIANCES, 'beta_schedule': BETA_SCHEDULES, 'loss': LOSSES, 'prediction': PREDICTIONS}
    for key, valid in choices.items():
        if getattr(c, key) not in valid:
            raise ValueError(f'{key} must be one of {valid}, got {getattr(c, key)!r}')
    check_model_options(c.timesteps, c.beta_start, c.beta_end, c.variance, c.beta_schedule, c.learn_sigma, c.loss,
                        c.prediction, c.min_snr_gamma)
    if c.importance_sampling and c.loss != 'vlb':
        raise ValueError(f"importance_sampling=True needs loss='vlb' (it samples t for the bound), got "
                         f"loss={c.loss!r}")


def _validate_fid(c):
    if not isinstance(c.fid_every, int) or c.fid_every < 0:
        raise ValueError(f'fid_every must be 0 (off) or a positive number of epochs, got {c.fid_every!r}')
    if c.fid_every and not (isinstance(c.fid_samples, int) and c.fid_samples >= 2):
        raise ValueError(f'fid_samples must be an integer of at least 2, got {c.fid_samples!r}')
    if c.fid_every and fast_steps(c.fid_sampler, c.fid_steps) is not None and not 1 <= c.fid_steps <= c.timesteps:
        raise ValueError(f'fid_steps must be between 1 and timesteps={c.timesteps}, got {c.fid_steps!r}')


def batch_split(c, world_size):
    """(images per rank, images per micro-batch): the one place batch_size is divided up."""
    if c.batch_size % (world_size * c.accum_steps):
        raise ValueError(f'batch_size={c.batch_size} must be divisible by world_size x accum_steps = '
                         f'{world_size} x {c.accum_steps}; pick a multiple of {world_size * c.accum_steps}')
    per_rank = c.batch_size // world_size
    return per_rank, per_rank // c.accum_steps
