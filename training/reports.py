"""What a training run shows of its model as it trains: the fixed-seed sample grid and FID.

Both read the TrainLoop they are given (its EMA model, config, writer, step) and write
nothing back but the grid's step (`loop.grid_made_at`) and the FID shown on the progress line.
"""

import math
import os

import torch

from runtime import autocast
from sampling.guidance import class_grid_order, cycled_labels
from sampling.options import SampleOptions, fast_steps
from weights.checkpoint import save_checkpoint


def sample_grid(loop, epoch):
    """A grid from the EMA weights with a fixed seed, so grids are comparable across epochs.
    A class-conditional model's grid has one row per class (num_samples // num_classes images each)."""
    import torchvision
    c = loop.c
    if not loop.is_main or c.num_samples == 0:
        return
    loop.grid_made_at = loop.step
    g = torch.Generator().manual_seed(c.seed)
    n, labels, nrow = c.num_samples, None, int(math.ceil(math.sqrt(c.num_samples)))
    if c.class_cond:
        n = max(1, n // loop.num_classes) * loop.num_classes
        labels = cycled_labels(n, loop.num_classes)
        order, nrow = class_grid_order(labels, loop.num_classes)
    with autocast(loop.device, loop.autocast_dtype):
        options = SampleOptions(c.sample_sampler, fast_steps(c.sample_sampler, c.sample_steps),
                                clip_denoised=True)   # dpm-solver too: FID-1k 120 at 20 NFE, 235 unclipped
        x = loop.ema_model.sample_with(options, n, loop.device, g, progress=True, labels=labels)
    x = x[order.to(x.device)] if labels is not None else x
    grid = torchvision.utils.make_grid((x.float() + 1) / 2, nrow=nrow)
    path = os.path.join(loop.run_dir, 'samples', f'epoch_{epoch:04d}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image(grid, path)
    loop.writer.add_image('samples', grid, loop.step)
    loop.say(f'sample grid: {path}')


def evaluate_fid(loop, epoch):
    """FID of the EMA model (every rank samples its share): eval/fid, the progress line, ddpm_best_fid.pth."""
    record = loop.fid.evaluate(loop.ema_model, epoch, loop.step)
    if record is None:   # not rank 0
        return
    loop.writer.add_scalar('eval/fid', record['fid'], loop.step)
    loop.fid_postfix['fid'] = f'{record["fid"]:.2f}'
    if record['is_best']:
        save_checkpoint({**loop.state(), 'fid': record}, loop.fid.best_path)
    steps = '' if record['steps'] is None else f' {record["steps"]} steps'
    loop.say(f'epoch {epoch}: FID {record["fid"]:.2f} ({record["num_samples"]} samples, {record["sampler"]}{steps}, '
             f'{record["seconds"]:.0f} s; best {loop.fid.best:.2f}'
             f'{", saved " + loop.fid.best_path if record["is_best"] else ""})')
