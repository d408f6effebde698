"""Quality per CPU-hour: our tiny U-Net against diffusers' UNet2DModel of the same size (and lucidrains'
denoising-diffusion-pytorch Unet when it is installed), each trained for the same wall-clock budget on the
offline CIFAR-10 JPEG copy with its own project's recommended recipe, then FID and bits/dim.

    python bench/quality.py                                  # 20 minutes each, FID from 2,000 samples
    python bench/quality.py --minutes 5 --fid_samples 500 --ref_images 1000   # a short run

All networks sit inside our DDPM (L_simple, the paper's linear schedule, T = 1000),
so the loss, the sampler (DDIM, same steps, same seeds: batch i from seed i as in
sample.py) and bits/dim are computed identically; what differs is the network and
the recipe: batch size, learning rate and warmup, Adam's betas / eps / weight decay,
the EMA and gradient clipping, as each project recommends (RECIPES). lucidrains'
own objective (pred_v) and sigmoid schedule are not used: the comparison is of
networks and optimiser recipes under one diffusion. Every variant trains in the
same precision (bf16 autocast on CPUs with native bf16, as our train.py does) with
random horizontal flips.

FID: the 2048-d Inception features (metrics/fid.py; --inception_weights, by default the
TorchScript port in ../shared/data) of the samples against those of --ref_images
training images. With a few hundred or thousand samples FID is biased upwards
(by about 20 at 2.5k vs 2.5k on this data, more with fewer): compare rows of one
table, not with published numbers. bits/dim: the variational bound estimated
(evaluate.py's 'estimate' mode) on --bpd_images test images.
Results: bench/results/quality.json and the printed table.
"""

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import ROOT  # noqa: E402

from data.process_cifar import to_model_range  # noqa: E402
from diffusion import DDPM, create_cifar10_ddpm  # noqa: E402
from metrics.bpd import bits_per_dim  # noqa: E402
from metrics.fid import cached_statistics, extract_features, feature_statistics, frechet_distance  # noqa: E402
from metrics.fid import load_feature_extractor  # noqa: E402
from runtime import amp_dtype, autocast, keep_freed_memory  # noqa: E402
from sampling.generate import SampleRun, generate  # noqa: E402
from sampling.options import SampleOptions  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')

# Each project's recommended training recipe, from its own defaults:
# ours: the README's CPU run; diffusers: examples/unconditional_image_generation/train_unconditional.py
# (AdamW, its EMA warmup 1 - (1 + step)^-3/4 up to 0.9999; its cosine decay is left out because a
# time budget has no known total step count); lucidrains: Trainer's defaults (EMA 0.995, updated every
# 10 steps after step 100 with ema-pytorch's warmup 1 - (1 + step)^-2/3).
RECIPES = {
    'ours': dict(batch_size=64, lr=5e-4, warmup=200, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip=1.0,
                 ema=dict(max_decay=0.999, warmup='ramp', every=1, after=0)),
    'diffusers': dict(batch_size=16, lr=1e-4, warmup=500, betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6,
                      clip=1.0, ema=dict(max_decay=0.9999, warmup=0.75, every=1, after=0)),
    'lucidrains': dict(batch_size=16, lr=1e-4, warmup=0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, clip=1.0,
                       ema=dict(max_decay=0.995, warmup=2 / 3, every=10, after=100)),
}


class EpsNet(nn.Module):
    """Another project's U-Net as our `network(x_t, t) -> eps`."""

    def __init__(self, net, output=lambda out: out):
        super().__init__()
        self.net, self.output, self.in_channels, self.image_size = net, output, 3, 32

    def forward(self, x_t, t):
        return self.output(self.net(x_t, t))


def build(name):
    """Our tiny DDPM, or the other projects' networks of about its size inside the same DDPM."""
    if name == 'ours':
        return create_cifar10_ddpm('tiny')
    if name == 'diffusers':   # the tiny arch in diffusers' blocks: 2,736,099 parameters, as ours
        from diffusers import UNet2DModel
        unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(32, 64, 128), norm_num_groups=16, norm_eps=1e-6, dropout=0.0,
                           time_embedding_dim=128, attention_head_dim=32,
                           down_block_types=('DownBlock2D', 'DownBlock2D', 'AttnDownBlock2D'),
                           up_block_types=('AttnUpBlock2D', 'UpBlock2D', 'UpBlock2D'))
        return DDPM(EpsNet(unet, lambda out: out.sample))
    if name == 'lucidrains':   # dim 32, mults (1, 2, 4): 2.61M parameters
        from denoising_diffusion_pytorch import Unet
        return DDPM(EpsNet(Unet(dim=32, dim_mults=(1, 2, 4))))
    raise ValueError(name)


def ema_decay(ema, step):
    if ema['warmup'] == 'ramp':    # train.py's ema_decay_at
        return min(ema['max_decay'], (1.0 + step) / (10.0 + step))
    return min(ema['max_decay'], max(0.0, 1.0 - (1.0 + step) ** -ema['warmup']))


def train_for(model, recipe, images, seconds, device, seed=0):
    """Train for `seconds` of wall clock; returns (EMA model, steps, images/s)."""
    torch.manual_seed(seed)
    model.to(device).train()
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe['lr'], betas=recipe['betas'], eps=recipe['eps'],
                            weight_decay=recipe['weight_decay'])
    dtype = amp_dtype('auto', device)
    rng = np.random.default_rng(seed)
    step, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = images[torch.from_numpy(rng.integers(0, len(images), recipe['batch_size']))]
        flip = torch.from_numpy(rng.random(len(x)) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        for group in opt.param_groups:
            group['lr'] = recipe['lr'] * min(1.0, (step + 1) / max(1, recipe['warmup']))
        with autocast(device, dtype):
            loss = model.loss(to_model_range(x).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe['clip'])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = recipe['ema']
        if step % ema['every'] == 0:
            with torch.no_grad():
                if step <= ema['after']:
                    torch._foreach_copy_(list(ema_model.parameters()), params)
                else:
                    torch._foreach_lerp_(list(ema_model.parameters()), params, 1.0 - ema_decay(ema, step))
    elapsed = time.perf_counter() - start
    return ema_model, step, step * recipe['batch_size'] / elapsed


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--minutes', type=float, default=20, help='training wall clock for each model')
    p.add_argument('--models', default='ours,diffusers,lucidrains')
    p.add_argument('--data', default=os.path.join(SHARED, 'cifar10-jpeg.tar.gz'))
    p.add_argument('--inception_weights', default=os.path.join(SHARED, 'inception-2015-12-05-nv.pt'))
    p.add_argument('--fid_samples', type=int, default=2000)
    p.add_argument('--ref_images', type=int, default=5000, help='training images for the FID reference')
    p.add_argument('--steps', type=int, default=50, help='DDIM steps, the same for every model')
    p.add_argument('--bpd_images', type=int, default=500)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='quality')
    return p.parse_args()


def score(name, model, args, data, extractor, ref, device):
    """FID (same sampler, steps and seeds for every model) and bits/dim of the EMA model."""
    start = time.perf_counter()
    samples = generate(model, SampleOptions('ddim', args.steps), SampleRun(args.fid_samples, 250, args.seed, amp='auto'),
                       device, progress=False)
    sample_s = time.perf_counter() - start
    features = extract_features(samples, extractor, 50, device, progress=False)['2048']
    fid = frechet_distance(*feature_statistics(features), *ref)
    test = data['test'][torch.from_numpy(np.random.default_rng(args.seed).permutation(10000)[:args.bpd_images])]
    bpd = bits_per_dim(model, test.permute(0, 2, 3, 1).numpy(), 'estimate', t_samples=4, batch_size=250,
                       device=device, seed=args.seed, progress=False)
    return dict(fid=fid, bpd=bpd['bpd'], bpd_stderr=bpd['bpd_stderr'], sample_s=sample_s)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = common.pick_device('auto')
    if device.type == 'cpu':
        keep_freed_memory()   # as train.py does: else glibc re-faults every large activation (bench_malloc.py)
    models = [m for m in args.models.split(',') if m]
    if 'lucidrains' in models:
        try:
            import denoising_diffusion_pytorch  # noqa: F401
        except ImportError as e:
            print(f'skipping lucidrains: {e} (pip install denoising-diffusion-pytorch)', file=sys.stderr)
            models.remove('lucidrains')
    t0 = time.perf_counter()
    data = common.read_cifar_jpeg(args.data)
    print(f'read {len(data["train"])} + {len(data["test"])} images in {time.perf_counter() - t0:.0f} s', flush=True)
    extractor, fid_layer, _ = load_feature_extractor(weights=args.inception_weights, device=device)
    keep = np.sort(np.random.default_rng(args.seed).permutation(len(data['train']))[:args.ref_images])
    ref_pixels = data['train'][torch.from_numpy(keep)].permute(0, 2, 3, 1).numpy()
    mu, sigma, *_ = cached_statistics(f'cifar10-jpeg-train{args.ref_images}-seed{args.seed}', ref_pixels, extractor,
                                      fid_layer, batch_size=50, device=device)
    rows = []
    for name in models:
        model = build(name)
        ema_model, steps, ips = train_for(model, RECIPES[name], data['train'], 60 * args.minutes, device, args.seed)
        row = dict(model=name, params_M=round(common.num_params(model) / 1e6, 3), steps=steps,
                   batch=RECIPES[name]['batch_size'], lr=RECIPES[name]['lr'], images_per_s=ips,
                   **score(name, ema_model, args, data, extractor, (mu, sigma), device))
        rows.append(row)
        print(row, flush=True)
    title = (f'{args.minutes:g} min of training each, FID of {args.fid_samples} DDIM-{args.steps} samples vs '
             f'{args.ref_images} training images, bits/dim (estimate) on {args.bpd_images} test images')
    common.print_table(rows, ['model', 'params_M', 'batch', 'lr', 'steps', 'images_per_s', 'fid', 'bpd',
                              'bpd_stderr', 'sample_s'], title)
    path = common.write_json(args.out, dict(args=vars(args), title=title, rows=rows, recipes=RECIPES,
                                            env=common.env_info(device)))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
