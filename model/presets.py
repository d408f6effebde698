"""The architecture tables: named U-Net configurations and the options a checkpoint's config carries.

`create_cifar10_ddpm(arch=...)` (diffusion.py) builds from these; weights/ reads a stored
config back into the same keywords. Only tables and plain functions: no DDPM here, so both
diffusion.py and the weight readers can import it.
"""

import inspect

from model.Blocks import UNet

# Named configurations for `UNet(arch=...)` / `create_cifar10_ddpm(arch=...)`.
ARCHS = {
    # A compact default that trains in hours on one GPU.
    'base': dict(channels=(64, 128, 256), num_res_blocks=2, time_emb_dim=128,
                 attn_resolutions=(16, 8), num_heads=4, dropout=0.1),
    # A small net for CPU demos and smoke runs: trains in minutes on a laptop.
    'tiny': dict(channels=(32, 64, 128), num_res_blocks=1, time_emb_dim=128,
                 attn_resolutions=(8,), num_heads=4, dropout=0.0),
    # The paper's CIFAR-10 network: ch=128, ch_mult=(1, 2, 2, 2), attention at
    # 16x16, dropout 0.1, time embedding 4 * ch; 35.7M parameters.
    'ddpm-paper': dict(channels=(128, 256, 256, 256), num_res_blocks=2, time_emb_dim=512,
                       attn_resolutions=(16,), num_heads=1, dropout=0.1),
}


# The DDPM options a checkpoint's config carries; a config without one of them (an older
# checkpoint) gets the default, which is the model it was trained as (linear, fixed variance, L_simple).
DDPM_OPTIONS = ('timesteps', 'beta_start', 'beta_end', 'variance', 'beta_schedule', 'learn_sigma', 'loss',
                'prediction', 'min_snr_gamma')
UNET_OPTIONS = tuple(p for p in inspect.signature(UNet).parameters)
MODEL_OPTIONS = ('arch',) + DDPM_OPTIONS + UNET_OPTIONS   # every keyword create_cifar10_ddpm takes
# Options added after checkpoints had been written: a stored config without the key
# was trained with this value, not with the new default.
LEGACY_DEFAULTS = {'downsample_padding': 'symmetric'}


def build_unet(arch='base', **overrides):
    """A UNet from a named configuration in ARCHS, with any keyword overridden."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    return UNet(**{**ARCHS[arch], **overrides})


def model_kwargs(config):
    """The subset of a run's config that `create_cifar10_ddpm` takes (None means: the arch's default)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
            if k in MODEL_OPTIONS and v is not None}
