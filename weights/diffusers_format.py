"""diffusers folders in and out: the paper's released weights as our model, and our checkpoints for diffusers.

The authors' models are published in diffusers' format (google/ddpm-cifar10-32, google/ddpm-celebahq-256, ...):
a UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors or .bin), or a DDPMPipeline folder
holding one as unet/ beside scheduler/scheduler_config.json. Our `arch='ddpm-paper'` U-Net computes the same
function (tests/test_diffusers.py proves it against diffusers), so only names and shapes are translated:

    diffusers UNet2DModel                ours (DDPM.network)
    time_embedding.linear_1 / linear_2   time_embedding.mlp.0 / mlp.2
    down_blocks.i.resnets.j              down.i.res.j       (time_emb_proj -> time_proj, conv_shortcut -> skip)
    down_blocks.i.attentions.j           down.i.attn.j      (to_q, to_k, to_v -> one 1x1 conv qkv; to_out.0 -> proj)
    down_blocks.i.downsamplers.0         down.i.down
    mid_block.resnets.0 / 1, attentions.0  middle.res1 / res2, attn
    up_blocks.i.*, upsamplers.0          up.i.*, up.i.up
    conv_norm_out                        norm_out

Reading needs no diffusers: config.json is read as JSON and weights with safetensors, or a .bin with
torch.load(weights_only=True). Configs our U-Net cannot represent are refused with one line naming the key.
"""

import json
import os
import re

import torch
import torch.nn as nn

from model.Blocks import UNet
from runtime import atomic_write, write_json
from weights.torch_file import CheckpointError, read_torch_file

WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
# The diffusers release the export format was checked against (tests/test_diffusers.py).
DIFFUSERS_VERSION = '0.42.1'

# UNet2DModel's defaults, for keys an older config.json leaves out.
UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type='positional',
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=['DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'],
    mid_block_type='UNetMidBlock2D', up_block_types=['AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
    block_out_channels=[224, 448, 672, 896], layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type='conv', upsample_type='conv', dropout=0.0, act_fn='silu', attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift='default',
    add_attention=True, class_embed_type=None, num_class_embeds=None)
# The values our U-Net has built in: the paper's Transformer embedding, SiLU, GroupNorm(32, eps 1e-6), ...
UNET_FIXED = dict(
    center_input_sample=False, time_embedding_type='positional', freq_shift=1, flip_sin_to_cos=False,
    mid_block_type='UNetMidBlock2D', mid_block_scale_factor=1, downsample_type='conv', upsample_type='conv',
    act_fn='silu', norm_num_groups=32, norm_eps=1e-6, resnet_time_scale_shift='default', add_attention=True,
    class_embed_type=None, num_class_embeds=None)
PADDINGS = {0: 'same', 1: 'symmetric'}   # diffusers' downsample_padding -> ours (0 pads bottom/right, like TF)

# DDPMScheduler's defaults, and the variance names: fixed_large is sigma_t^2 = beta_t, fixed_small beta-tilde_t.
SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear', trained_betas=None,
    variance_type='fixed_small', clip_sample=True, prediction_type='epsilon', thresholding=False,
    clip_sample_range=1.0, rescale_betas_zero_snr=False)
SCHEDULER_FIXED = dict(beta_schedule='linear', trained_betas=None, thresholding=False,
                       clip_sample=True, clip_sample_range=1.0, rescale_betas_zero_snr=False)
VARIANCES = {'fixed_large': 'beta', 'fixed_small': 'posterior'}
# diffusers' prediction_type -> our DDPM's prediction; mu-tilde ('mu') has no diffusers name.
PREDICTION_TYPES = {'epsilon': 'eps', 'sample': 'x0', 'v_prediction': 'v'}
SCHEDULERS = ('DDPMScheduler', 'DDIMScheduler')


# ----- configs -------------------------------------------------------------------------------

def read_config(path, what):
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f'{what}: {path} is missing; a diffusers folder holds it beside the weights') from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{what}: cannot read {path} as JSON ({e})') from None
    if not isinstance(config, dict):
        raise CheckpointError(f'{what}: {path} holds a {type(config).__name__}, not a JSON object')
    return config


def refuse_differences(config, fixed, source, ours):
    for key, want in fixed.items():
        if config[key] != want:
            raise CheckpointError(f'{source}: {key}={config[key]!r} is not supported ({ours} has {key}={want!r})')


def unet_options(config, source='config.json'):
    """A UNet2DModel config.json -> our UNet keyword arguments; CheckpointError for what ours cannot compute."""
    c = {**UNET_DEFAULTS, **config}
    if c.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
        raise CheckpointError(f"{source}: a {c['_class_name']} is not supported; only UNet2DModel converts")
    refuse_differences(c, UNET_FIXED, source, 'our U-Net')
    channels, down, up = list(c['block_out_channels']), list(c['down_block_types']), list(c['up_block_types'])
    for block in down + up:
        if block not in ('DownBlock2D', 'AttnDownBlock2D', 'UpBlock2D', 'AttnUpBlock2D'):
            raise CheckpointError(f'{source}: block type {block} is not supported (only DownBlock2D, '
                                  f'AttnDownBlock2D, UpBlock2D and AttnUpBlock2D)')
    attention = [block.startswith('Attn') for block in down]
    if len(down) != len(channels) or [block.startswith('Attn') for block in reversed(up)] != attention:
        raise CheckpointError(f'{source}: up_block_types must mirror down_block_types, one per block_out_channels')
    if c['in_channels'] != c['out_channels']:
        raise CheckpointError(f'{source}: in_channels != out_channels; our U-Net predicts eps shaped like x_t')
    if c['attn_norm_num_groups'] not in (None, c['norm_num_groups']):
        raise CheckpointError(f'{source}: attn_norm_num_groups={c["attn_norm_num_groups"]} is not supported')
    if c['downsample_padding'] not in PADDINGS:
        raise CheckpointError(f'{source}: downsample_padding={c["downsample_padding"]} is not supported (0 or 1)')
    size = c['sample_size']
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        raise CheckpointError(f'{source}: sample_size={c["sample_size"]!r}; a square image size is needed')
    # diffusers' head count is channels // attention_head_dim at each level (one head when null); ours is one
    # number for every attention layer, the middle block's included.
    attn_channels = [ch for ch, a in zip(channels, attention) if a] + channels[-1:]
    head_dim = c['attention_head_dim']
    heads = {1} if head_dim is None else {ch // head_dim if ch % head_dim == 0 else None for ch in attn_channels}
    if len(heads) != 1 or None in heads:
        raise CheckpointError(f'{source}: attention_head_dim={head_dim} gives a different number of heads per '
                              f'level for channels {attn_channels}; our U-Net has one head count')
    return dict(in_channels=c['in_channels'], channels=tuple(channels), num_res_blocks=c['layers_per_block'],
                time_emb_dim=c['time_embedding_dim'] or 4 * channels[0],
                attn_resolutions=tuple(size // 2 ** i for i, a in enumerate(attention) if a),
                num_heads=heads.pop(), dropout=c['dropout'], image_size=size,
                downsample_padding=PADDINGS[c['downsample_padding']])


def ddpm_options(config, source='scheduler_config.json'):
    """A DDPMScheduler / DDIMScheduler config -> our DDPM keyword arguments (the paper's linear betas only)."""
    c = {**SCHEDULER_DEFAULTS, **config}
    if c.get('_class_name', 'DDPMScheduler') not in SCHEDULERS:
        raise CheckpointError(f"{source}: a {c['_class_name']} is not supported (only {', '.join(SCHEDULERS)})")
    refuse_differences(c, SCHEDULER_FIXED, source, 'our DDPM')
    if c['variance_type'] not in VARIANCES:
        raise CheckpointError(f"{source}: variance_type={c['variance_type']!r} is not supported "
                              f"(only {' or '.join(VARIANCES)})")
    if c['prediction_type'] not in PREDICTION_TYPES:
        raise CheckpointError(f"{source}: prediction_type={c['prediction_type']!r} is not supported "
                              f"(only {', '.join(PREDICTION_TYPES)})")
    return dict(timesteps=c['num_train_timesteps'], beta_start=c['beta_start'], beta_end=c['beta_end'],
                variance=VARIANCES[c['variance_type']], prediction=PREDICTION_TYPES[c['prediction_type']])


def unet_config(network):
    """Our UNet -> a UNet2DModel config; CheckpointError for what diffusers cannot express."""
    if not isinstance(network, UNet):
        raise CheckpointError(f'only our UNet converts to diffusers, not a {type(network).__name__}')
    o = network.config
    if o.get('num_classes') is not None:
        raise CheckpointError(f"this U-Net is class-conditional (num_classes={o['num_classes']}); exporting it to "
                              f"diffusers is not supported, sample it with sample.py --class_label instead")
    channels, size = list(o['channels']), o['image_size']
    attention = [size // 2 ** i in o['attn_resolutions'] for i in range(len(channels))]
    groups = {m.num_groups for m in network.modules() if isinstance(m, nn.GroupNorm)}
    if groups != {32}:
        raise CheckpointError(f'diffusers has one GroupNorm group count, 32 here; this U-Net has {sorted(groups)} '
                              f'(channels {channels}: every level needs a multiple of 32, at least 64)')
    attn_channels = {ch for ch, a in zip(channels, attention) if a} | {channels[-1]}
    if o['num_heads'] > 1 and len(attn_channels) > 1:
        raise CheckpointError(f"diffusers fixes the width of a head, not their number: num_heads={o['num_heads']} "
                              f"at channels {sorted(attn_channels)} cannot be expressed (num_heads=1 can)")
    return dict(
        _class_name='UNet2DModel', _diffusers_version=DIFFUSERS_VERSION, **UNET_FIXED,
        sample_size=size, in_channels=o['in_channels'], out_channels=o['in_channels'],
        time_embedding_dim=None if o['time_emb_dim'] == 4 * channels[0] else o['time_emb_dim'],
        down_block_types=['AttnDownBlock2D' if a else 'DownBlock2D' for a in attention],
        up_block_types=['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attention)],
        block_out_channels=channels, layers_per_block=o['num_res_blocks'],
        downsample_padding={v: k for k, v in PADDINGS.items()}[o['downsample_padding']], dropout=o['dropout'],
        attention_head_dim=None if o['num_heads'] == 1 else channels[-1] // o['num_heads'],
        attn_norm_num_groups=None)


def scheduler_config(model):
    """Our DDPM's schedule, sampler variance and prediction -> a DDPMScheduler config; CheckpointError for what
    diffusers cannot express."""
    if model.variance not in VARIANCES.values():
        raise CheckpointError(f"variance={model.variance!r}: exporting a learned variance to diffusers is not "
                              f"supported (its scheduler treats t = 1 differently); only fixed variances export")
    if model.prediction not in PREDICTION_TYPES.values():
        raise CheckpointError(f"prediction={model.prediction!r}: diffusers has no prediction_type for mu-tilde; "
                              f"only eps, x0 and v models export")
    variance_type = {v: k for k, v in VARIANCES.items()}[model.variance]
    prediction_type = {v: k for k, v in PREDICTION_TYPES.items()}[model.prediction]
    # The betas are stored as float32; 7 digits give back the value they were made from (1e-4, not 9.99999975e-05).
    beta_start, beta_end = (float(f'{b.item():.7g}') for b in (model.betas[0], model.betas[-1]))
    return dict(_class_name='DDPMScheduler', _diffusers_version=DIFFUSERS_VERSION, **SCHEDULER_FIXED,
                num_train_timesteps=model.timesteps, beta_start=beta_start, beta_end=beta_end,
                variance_type=variance_type, prediction_type=prediction_type)


# ----- weights -------------------------------------------------------------------------------

# Our parameter names -> diffusers', applied in order to the dotted name of every one of our parameters.
RENAMES = [
    (r'^time_embedding\.mlp\.0\.', 'time_embedding.linear_1.'),
    (r'^time_embedding\.mlp\.2\.', 'time_embedding.linear_2.'),
    (r'^norm_out\.', 'conv_norm_out.'),
    (r'^down\.(\d+)\.down\.', r'down_blocks.\1.downsamplers.0.'),
    (r'^up\.(\d+)\.up\.', r'up_blocks.\1.upsamplers.0.'),
    (r'^down\.(\d+)\.', r'down_blocks.\1.'),
    (r'^up\.(\d+)\.', r'up_blocks.\1.'),
    (r'^middle\.res1\.', 'mid_block.resnets.0.'),
    (r'^middle\.res2\.', 'mid_block.resnets.1.'),
    (r'^middle\.attn\.', 'mid_block.attentions.0.'),
    (r'\.res\.(\d+)\.', r'.resnets.\1.'),
    (r'\.time_proj\.', '.time_emb_proj.'),
    (r'\.skip\.', '.conv_shortcut.'),
    (r'\.attn\.(\d+)\.', r'.attentions.\1.'),
    (r'(\.attentions\.\d+)\.norm\.', r'\1.group_norm.'),
    (r'(\.attentions\.\d+)\.proj\.', r'\1.to_out.0.'),
]
# Attention weights as diffusers releases before 0.15 named them (google/ddpm-* were saved then).
OLD_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def diffusers_names(name):
    """Our UNet parameter name -> the diffusers name(s) holding it (three for an attention's fused qkv)."""
    for pattern, replacement in RENAMES:
        name = re.sub(pattern, replacement, name)
    if '.attentions.' in name and '.qkv.' in name:
        return [name.replace('.qkv.', f'.{part}.') for part in ('to_q', 'to_k', 'to_v')]
    return [name]


def to_diffusers_state_dict(network):
    """Our UNet's weights under UNet2DModel's names and shapes (attention 1x1 convs become Linear layers)."""
    out = {}
    for name, value in network.state_dict().items():
        names = diffusers_names(name)
        for their_name, part in zip(names, value.chunk(len(names))):
            out[their_name] = (part.flatten(1) if part.dim() == 4 and '.attentions.' in their_name else part)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def from_diffusers_state_dict(theirs, network, source):
    """UNet2DModel weights -> our `network.*` state_dict (shaped like `network`, a meta-device UNet will do)."""
    theirs = {re.sub(r'(\.attentions\.\d+)\.(query|key|value|proj_attn)\.',
                     lambda m: f'{m.group(1)}.{OLD_ATTENTION_NAMES[m.group(2)]}.', k): v for k, v in theirs.items()}
    ours, used = {}, set()
    for name, param in network.state_dict().items():
        names = diffusers_names(name)
        missing = [n for n in names if n not in theirs]
        if missing:
            raise CheckpointError(f'{source}: weight {missing[0]} is missing ({len(theirs)} tensors in the file); '
                                  f'the file does not belong to this config.json or is incomplete')
        value = torch.cat([theirs[n] for n in names])
        linear = param.dim() == 4 and '.attentions.' in names[0]   # diffusers' Linear for our 1x1 conv
        if value.shape != (param.shape[:2] if linear else param.shape):
            raise CheckpointError(f'{source}: {names[0]} has shape {tuple(theirs[names[0]].shape)}, which does '
                                  f'not fit config.json (expected {len(names)} x {tuple(param.shape)} in total)')
        ours[f'network.{name}'] = value.reshape(param.shape)
        used.update(names)
    unexpected = sorted(set(theirs) - used)
    if unexpected:
        raise CheckpointError(f'{source}: {len(unexpected)} weights that config.json does not describe '
                              f'(e.g. {unexpected[0]})')
    return ours


def read_weights(folder):
    """The UNet2DModel weights in `folder`: safetensors when present, else a .bin read with weights_only=True."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        if name.endswith('.bin'):
            theirs = read_torch_file(path)   # its one-line errors for unsafe/bad pickles
            if not all(torch.is_tensor(v) for v in theirs.values()):
                raise CheckpointError(f'{path} is not a UNet2DModel state_dict (it holds more than tensors)')
            return theirs, path
        from safetensors.torch import load_file
        try:
            return load_file(path), path
        except Exception as e:   # safetensors raises its own error types for cut-off or corrupted files
            raise CheckpointError(f'cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} '
                                  f'(truncated or corrupted? download it again)') from None
    raise CheckpointError(f'{folder} holds no weights: expected {" or ".join(WEIGHT_FILES)}')


# ----- folders -------------------------------------------------------------------------------

def find_unet_folder(path):
    """(the UNet2DModel folder, the scheduler config or None) for a UNet2DModel or DDPMPipeline folder.

    A pipeline keeps its parts in unet/ and scheduler/, or (google/ddpm-*) all in one folder.
    """
    unet = os.path.join(path, 'unet') if os.path.exists(os.path.join(path, 'unet')) else path
    for scheduler in (os.path.join(path, 'scheduler', 'scheduler_config.json'),
                      os.path.join(path, 'scheduler_config.json')):
        if os.path.exists(scheduler):
            break
    else:
        scheduler = None
    if unet != path or os.path.exists(os.path.join(path, 'config.json')):
        return unet, scheduler
    raise CheckpointError(f'{path} is a folder but not a diffusers model: it has neither config.json '
                          f'(a UNet2DModel) nor unet/config.json (a DDPMPipeline); pass a .pth checkpoint or '
                          f'such a folder')


def load_diffusers(path):
    """A diffusers UNet2DModel or DDPMPipeline folder -> one of our checkpoint dicts (weights + config).

    Without a scheduler config (a bare UNet2DModel folder) the DDPM gets our defaults: the paper's schedule.
    """
    unet_dir, scheduler_path = find_unet_folder(os.fspath(path))
    config_path = os.path.join(unet_dir, 'config.json')
    unet = unet_options(read_config(config_path, 'UNet2DModel'), source=config_path)
    ddpm = ddpm_options(read_config(scheduler_path, 'scheduler'), scheduler_path) if scheduler_path else {}
    with torch.device('meta'):   # only the names and shapes are needed here
        network = UNet(**unet)
    theirs, weights_path = read_weights(unet_dir)
    state_dict = from_diffusers_state_dict(theirs, network, weights_path)
    return {'model_state_dict': state_dict, 'ema_state_dict': None, 'config': {'arch': 'ddpm-paper', **unet, **ddpm},
            'source': os.path.abspath(path)}


def save_diffusers(model, folder):
    """Write `model` (a DDPM around our UNet) as a DDPMPipeline folder that diffusers loads as it is."""
    if not (hasattr(model, 'network') and hasattr(model, 'betas')):   # duck-typed: no import of diffusion.py
        raise CheckpointError(f'save_diffusers takes a DDPM, not a {type(model).__name__}')
    config, scheduler = unet_config(model.network), scheduler_config(model)   # refuse before writing anything
    from safetensors.torch import save
    unet_dir = os.path.join(folder, 'unet')
    os.makedirs(unet_dir, exist_ok=True)
    tensors = to_diffusers_state_dict(model.network)
    atomic_write(os.path.join(unet_dir, WEIGHT_FILES[0]),
                 lambda f: f.write(save(tensors, metadata={'format': 'pt'})))
    write_json(os.path.join(unet_dir, 'config.json'), config)
    write_json(os.path.join(folder, 'scheduler', 'scheduler_config.json'), scheduler)
    write_json(os.path.join(folder, 'model_index.json'),
               {'_class_name': 'DDPMPipeline', '_diffusers_version': DIFFUSERS_VERSION,
                'scheduler': ['diffusers', 'DDPMScheduler'], 'unet': ['diffusers', 'UNet2DModel']})
    return folder
