"""Drawing images from a model: in seeded batches, resumable, across ranks; and the denoising chain.

The library under sample.py and evaluate.py (and FID during training): `load_model` rebuilds a
checkpoint's model, `generate` draws N images, `sample_checkpoint` does both with a resumable
store, `trajectory` keeps the intermediate x_t of a few images.
"""

import os
import sys
import time

import numpy as np
import torch

from data.image_folder import save_npz
from data.process_cifar import to_uint8   # [-1, 1] -> uint8, the inverse of the data's u / 127.5 - 1
from diffusion import model_from_checkpoint
from runtime import DEFAULT_AMP, Distributed, amp_dtype, autocast, file_sha256, use_channels_last, write_json
from sampling.guidance import resolve_class_label, run_labels
from sampling.samplers import (DEFAULT_DDIM_STEPS, DEFAULT_DPM_SOLVER_STEPS, SAMPLERS, resolve_clip, resolve_spacing,
                               timestep_sequence)
from sampling.store import PartialRun, reuse_complete_npz, run_meta
from weights.checkpoint import load_checkpoint
from weights.torch_file import CheckpointError

TRAJECTORY_COLUMNS = 11   # x_T, 9 intermediate x_t, x_0


def load_model(checkpoint, ema=None, device='cpu'):
    """Rebuild the model from a checkpoint's own config.

    ema: None uses the EMA weights when the checkpoint has them; True requires
    them; False uses the raw (training) weights.
    Returns (model in eval mode, info dict for run metadata).
    """
    ckpt = load_checkpoint(checkpoint, map_location='cpu')
    has_ema = ckpt.get('ema_state_dict') is not None
    if ema and not has_ema:
        raise CheckpointError(f'{checkpoint} has no EMA weights (ema_state_dict is empty); '
                              f'drop --ema, or pass --no-ema to sample with the raw weights')
    use_ema = has_ema if ema is None else bool(ema)
    info = {'checkpoint': os.path.abspath(checkpoint), 'ema': use_ema, 'step': ckpt.get('step'),
            'epoch': ckpt.get('epoch'), 'class_names': (ckpt.get('config') or {}).get('class_names')}
    model = model_from_checkpoint(ckpt, ema=use_ema, device=device, source=checkpoint).eval()
    if use_channels_last(None, torch.device(device), None):
        model.to(memory_format=torch.channels_last)   # faster convolutions (bench/)
    return model, info


# ----- small helpers -------------------------------------------------------------------------

def batch_seed(seed, index):
    """The seed of batch `index`'s generator: distinct for every (seed, index) pair in practice."""
    return (int(seed) * 1_000_003 + int(index)) % (2 ** 63)


def batch_counts(num_samples, batch_size):
    """The number of images in each batch: full batches, then the remainder."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f'num_samples and batch_size must be positive, got {num_samples} and {batch_size}')
    return [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]


def resolve_steps(model, sampler, steps):
    """The number of network evaluations: for 'ddpm' T, or `steps` (a respaced chain, iDDPM section 4);
    otherwise `steps` (default DEFAULT_DDIM_STEPS for 'ddim', DEFAULT_DPM_SOLVER_STEPS for 'dpm-solver')."""
    if sampler not in SAMPLERS:
        raise ValueError(f'sampler must be one of {SAMPLERS}, got {sampler!r}')
    if sampler == 'ddpm' and steps is None:
        return model.timesteps
    if steps is None:
        steps = min(DEFAULT_DPM_SOLVER_STEPS if sampler == 'dpm-solver' else DEFAULT_DDIM_STEPS, model.timesteps)
    if not 1 <= steps <= model.timesteps:
        raise ValueError(f'--steps must be between 1 and the checkpoint\'s timesteps={model.timesteps}, got {steps}')
    return steps


# ----- sampling -------------------------------------------------------------------------------

@torch.inference_mode()
def sample_batch(model, index, count, sampler='ddpm', steps=None, eta=0.0, seed=0, device=None, progress=False,
                 amp=DEFAULT_AMP, spacing=None, labels=None, guidance_scale=0.0, clip_denoised=None):
    """Batch `index` of a run: `count` images as uint8 [count, H, W, C] (numpy, on the CPU).

    Its noise comes from a CPU generator seeded from (seed, index), so the batch
    is the same whichever process draws it and whatever ran before. amp='auto'
    runs the network in bf16 where that is fast (CUDA, CPUs with native bf16);
    the sampler's arithmetic stays fp32. labels: this batch's classes (None: unconditional).
    clip_denoised: clip the predicted x_0 to [-1, 1] at every step (None: the sampler's default).
    """
    generator = torch.Generator().manual_seed(batch_seed(seed, index))
    model.eval()
    device = torch.device(device) if device is not None else model.betas.device
    dtype = amp_dtype(amp, device)
    with autocast(device, dtype):
        x = model.sample(count, device=device, sampler=sampler, steps=steps, eta=eta, generator=generator,
                         progress=progress, spacing=spacing, labels=labels, guidance_scale=guidance_scale,
                         clip_denoised=clip_denoised)
    return to_uint8(x).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def generate(model, num_samples, batch_size=256, sampler='ddpm', steps=None, eta=0.0, seed=0, device=None,
             parts_dir=None, meta=None, out_dir=None, dist=None, progress=True, stats=None, amp=DEFAULT_AMP,
             spacing=None, labels=None, guidance_scale=0.0, clip_denoised=None):
    """Sample `num_samples` images in batches; returns uint8 [N, H, W, C] on rank 0 (None on other ranks).

    parts_dir: a folder where every finished batch is saved at once, so that an
        interrupted run continues where it stopped; `meta` (the options) must
        then be given and must match the folder's. Parts are not removed here.
    out_dir: also write each image as out_dir/NNNNNN.png as its batch finishes.
    dist: a `Distributed`; batch i is drawn by rank i % world_size.
    stats: a dict that receives 'sampled', the number of images this process drew.
    labels: the class of every image (run_labels), or None; guidance_scale: classifier-free guidance's w.
    """
    counts = batch_counts(num_samples, batch_size)
    steps, spacing = resolve_steps(model, sampler, steps), resolve_spacing(sampler, spacing, eta)
    world_size, rank = (dist.world_size, dist.rank) if dist is not None else (1, 0)
    device = device if device is not None else next(model.parameters()).device
    model.to(device).eval()
    store = open_parts(parts_dir, meta, dist, rank) if parts_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    mine = [i for i in range(len(counts)) if i % world_size == rank]
    done = {}
    todo = []
    for i in mine:
        images = store.load(i, counts[i]) if store is not None else None
        if images is None:
            todo.append(i)
        elif store is None or rank == 0:
            done[i] = images
    if stats is not None:
        stats['sampled'] = sum(counts[i] for i in todo)
    if store is not None and rank == 0 and len(todo) < len(mine) and progress:
        print(f'resuming: {len(mine) - len(todo)} of {len(mine)} batches already in {store.folder}', file=sys.stderr)

    bar = todo
    if progress and rank == 0 and len(todo) > 1:
        from tqdm.auto import tqdm
        bar = tqdm(todo, desc=f'sampling {num_samples} images ({sampler}, {steps} steps)', unit='batch')
    for i in bar:
        start = i * batch_size
        images = sample_batch(model, i, counts[i], sampler, steps, eta, seed, device,
                              progress=progress and rank == 0 and len(todo) == 1, amp=amp, spacing=spacing,
                              labels=labels[start:start + counts[i]] if labels is not None else None,
                              guidance_scale=guidance_scale, clip_denoised=clip_denoised)
        if out_dir:
            save_pngs(images, out_dir, first_index=start)
        if store is not None:
            store.save(i, images)
        if store is None or rank == 0:
            done[i] = images
    return assemble(done, counts, store, dist, rank)


def open_parts(parts_dir, meta, dist, rank):
    """The PartialRun of parts_dir, started or checked against `meta` by rank 0; its verdict is every rank's."""
    store, error = PartialRun(parts_dir), None
    if rank == 0:
        try:
            store.check_or_start(meta)
        except ValueError as e:
            error = str(e)
    error = dist.broadcast(error) if dist is not None else error
    if error:
        raise ValueError(error)
    return store


def save_pngs(images, out_dir, first_index):
    """uint8 [N, H, W, C] as out_dir/NNNNNN.png, numbered from first_index."""
    from PIL import Image
    for j, image in enumerate(images):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
            os.path.join(out_dir, f'{first_index + j:06d}.png'))


def assemble(done, counts, store, dist, rank):
    """All batches in order on rank 0 (None elsewhere): gathered from the ranks, or read from the parts."""
    if dist is not None and dist.world_size > 1:
        if store is None:   # nothing on disk: send the images to rank 0
            gathered = dist.gather(done)
            done = {i: images for part in gathered for i, images in part.items()} if rank == 0 else done
        else:
            dist.barrier()
    if rank != 0:
        return None
    if store is not None:
        for i in range(len(counts)):
            if i not in done:
                images = store.load(i, counts[i])
                if images is None:
                    raise ValueError(f'batch {i} is missing from {store.folder}; did a process fail? '
                                       f'Run the same command again to sample it')
                done[i] = images
    return np.concatenate([done[i] for i in range(len(counts))])


def sample_checkpoint(checkpoint, num_samples=64, batch_size=256, sampler='ddpm', steps=None, eta=0.0, seed=0,
                      ema=None, device=None, npz=None, out_dir=None, progress=True, amp=DEFAULT_AMP, spacing=None,
                      class_label=None, guidance_scale=0.0, with_labels=False, clip_denoised=None):
    """Checkpoint -> uint8 [N, H, W, C] images (None on ranks other than 0 under torchrun).

    With `npz` the run is resumable (parts in <npz>.parts/) and reused when the
    .npz is already complete with the same options (its <npz>.json says which).
    class_label (an index, a class name or 'all') and guidance_scale: see resolve_class_label;
    with_labels=True returns (images, labels as int64 numpy, or None when unconditional).
    clip_denoised: see sample_batch; part of the run's identity.
    """
    dist = Distributed(device)
    device = dist.device
    try:
        model, info = load_model(checkpoint, ema=ema, device=device)
        steps, spacing = resolve_steps(model, sampler, steps), resolve_spacing(sampler, spacing, eta)
        clip_denoised = resolve_clip(sampler, clip_denoised)
        class_label = resolve_class_label(model.num_classes, info.get('class_names'), class_label, guidance_scale)
        labels = run_labels(class_label, num_samples, model.num_classes)
        info['sha256'] = file_sha256(checkpoint) if (npz or out_dir) and dist.is_main else None
        meta = run_meta(model, info, sampler, steps, eta, seed, batch_size, amp, spacing, class_label,
                        guidance_scale, clip_denoised)
        label_array = labels.numpy() if labels is not None else None

        # An .npz finished earlier with the same options is reused (rank 0 decides for all ranks).
        reused = reuse_complete_npz(npz, meta, num_samples) if npz and not out_dir and dist.is_main else None
        if dist.broadcast(reused is not None):
            if reused is not None and progress:
                print(f'{npz} already holds these {num_samples} samples; reusing it', file=sys.stderr)
            if reused is None:   # not rank 0
                return None
            return (reused, label_array) if with_labels else reused

        parts_dir = f'{npz}.parts' if npz else (os.path.join(out_dir, '.parts') if out_dir else None)
        start, stats = time.time(), {}
        images = generate(model, num_samples, batch_size, sampler, steps, eta, seed, device,
                          parts_dir=parts_dir, meta=meta, out_dir=out_dir, dist=dist, progress=progress, stats=stats,
                          amp=amp, spacing=spacing, labels=labels, guidance_scale=guidance_scale,
                          clip_denoised=clip_denoised)
        if images is None:
            return None
        seconds = time.time() - start
        if npz:
            save_npz(npz, images, labels)
            write_json(f'{npz}.json', {**meta, 'num_samples': int(num_samples),
                                       'shape': list(images.shape), 'dtype': 'uint8'})
        if parts_dir:
            PartialRun(parts_dir).remove()
        if progress and stats['sampled']:
            where = f' on rank 0 of {dist.world_size}' if dist.world_size > 1 else ''
            per_image = 1000 * seconds / stats['sampled']
            spaced = f', {spacing} spacing' if spacing else ''
            print(f'sampled {stats["sampled"]} images{where} in {seconds:.1f} s ({per_image:.1f} ms/image; '
                  f'{sampler}, {steps} steps{spaced}, {"EMA" if info["ema"] else "raw"} weights)', file=sys.stderr)
        return (images, label_array) if with_labels else images
    finally:
        dist.close()


@torch.inference_mode()
def trajectory(model, n, sampler='ddpm', steps=None, eta=0.0, seed=0, device=None, columns=TRAJECTORY_COLUMNS,
               progress=True, amp=DEFAULT_AMP, spacing=None, labels=None, guidance_scale=0.0, clip_denoised=None):
    """The denoising chain of n images: (ts, frames) with frames uint8 [n, columns, H, W, C].

    Columns show x_t at `columns` evenly spaced t from T (pure noise) down to 0
    (the sample, in the paper's 1-based t); the noise comes from batch 0's
    generator, so the last column equals a --batch_size n run's first batch.
    """
    steps, spacing = resolve_steps(model, sampler, steps), resolve_spacing(sampler, spacing, eta)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    generator = torch.Generator().manual_seed(batch_seed(seed, 0))
    x_T = torch.randn((n, *model.image_shape), generator=generator)
    T = model.timesteps
    seq = timestep_sequence(model, sampler, steps, spacing)
    # The state after the i-th step is x at the paper's t = (next step in seq) + 1, or t = 0 at the end.
    visited = [T] + [int(seq[i + 1]) + 1 if i + 1 < len(seq) else 0 for i in range(len(seq))]
    wanted = sorted({min(visited, key=lambda v: abs(v - target))
                     for target in np.linspace(T, 0, columns)}, reverse=True)
    frames = {T: x_T.to(device)} if T in wanted else {}
    chain = model.sample_progressive(n, device, sampler, steps, eta, generator, progress, x_T=x_T, spacing=spacing,
                                     labels=labels, guidance_scale=guidance_scale, clip_denoised=clip_denoised)
    with autocast(device, amp_dtype(amp, device)):
        for i, (step, x, _) in enumerate(chain):
            t = visited[i + 1] if step >= 0 else 0
            if t in wanted:
                frames[t] = x
    stacked = torch.stack([to_uint8(frames[t].clamp(-1, 1)) for t in wanted], dim=1)   # [n, cols, C, H, W]
    return wanted, stacked.permute(0, 1, 3, 4, 2).cpu().numpy()
