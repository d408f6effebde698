"""Drawing images from a model: in seeded batches, resumable, across ranks; and the denoising chain.

The library under sample.py and evaluate.py (and FID during training): `load_model` rebuilds a
checkpoint's model, `generate` draws N images, `sample_checkpoint` does both with a resumable
store, `trajectory` keeps the intermediate x_t of a few images; `save_grid` / `save_trajectory`
write them as one PNG.
"""

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from data.image_folder import save_npz
from data.process_cifar import to_uint8   # [-1, 1] -> uint8, the inverse of the data's u / 127.5 - 1
from diffusion import model_from_checkpoint
from runtime import DEFAULT_AMP, Distributed, amp_dtype, autocast, file_sha256, use_channels_last, write_json
from sampling.guidance import check_labels, resolve_class_label, run_labels
from sampling.noise import draw_noise
from sampling.options import SampleOptions, timesteps_of
from sampling.store import PartialRun, reuse_complete_npz, run_meta
from weights.checkpoint import load_checkpoint, resolve_checkpoint, say_when_ema_is_missing
from weights.torch_file import CheckpointError

TRAJECTORY_COLUMNS = 11   # x_T, 9 intermediate x_t, x_0


@dataclass(frozen=True)
class SampleRun:
    """What a run draws besides the sampler's options (SampleOptions): how many images, their seed, their
    classes and the network's precision, and the batches they are drawn in. The images depend on all of these
    but batch_size (seeds are per image)."""
    num_samples: int = 64
    batch_size: int = 256
    seed: int = 0
    class_label: object = None   # a class index, 'all' (image i: class i % num_classes) or None (unconditional)
    amp: str = DEFAULT_AMP


def load_model(checkpoint, ema=None, device='cpu', image_size=None):
    """Rebuild the model from a checkpoint's own config.

    ema: None uses the EMA weights when the checkpoint has them; True requires
    them; False uses the raw (training) weights.
    image_size: for weights that do not fix it (the DDIM format; default 32).
    Returns (model in eval mode, info dict for run metadata).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(checkpoint, map_location='cpu')
    has_ema = ckpt.get('ema_state_dict') is not None
    if ema and not has_ema:
        raise CheckpointError(f'{checkpoint} has no EMA weights (ema_state_dict is empty); '
                              f'drop --ema, or pass --no-ema to sample with the raw weights')
    use_ema = has_ema if ema is None else bool(ema)
    if ema is None:
        say_when_ema_is_missing(ckpt)
    info = {'checkpoint': os.path.abspath(checkpoint), 'ema': use_ema, 'step': ckpt.get('step'),
            'epoch': ckpt.get('epoch'), 'class_names': (ckpt.get('config') or {}).get('class_names')}
    options = {'image_size': image_size} if image_size else {}
    model = model_from_checkpoint(ckpt, ema=use_ema, device=device, source=checkpoint, **options).eval()
    if use_channels_last(None, torch.device(device), None):
        model.to(memory_format=torch.channels_last)   # faster convolutions (bench/)
    return model, info


# ----- small helpers -------------------------------------------------------------------------

def batch_seed(seed, index):
    """The seed of stream `index` of a run (image `index` when sampling, a batch in bits/dim): distinct for
    every (seed, index) pair in practice."""
    return (int(seed) * 1_000_003 + int(index)) % (2 ** 63)


def batch_counts(num_samples, batch_size):
    """The number of images in each batch: full batches, then the remainder."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f'num_samples and batch_size must be positive, got {num_samples} and {batch_size}')
    return [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]


def image_generators(seed, first, count):
    """One CPU generator per image, images first .. first + count - 1, each seeded from (seed, image index): an
    image's noise (x_T and every step's) depends only on (seed, index), not on the batch size or the ranks."""
    return [torch.Generator().manual_seed(batch_seed(seed, first + j)) for j in range(count)]


@torch.inference_mode()
def sample_batch(model, first, count, options=SampleOptions(), run=SampleRun(), labels=None, device=None,
                 progress=False):
    """Images first .. first + count - 1 of a run: uint8 [count, H, W, C] (numpy, on the CPU).

    Each image draws its noise from its own CPU generator seeded from (run.seed, its index)
    (image_generators), so an image is the same whatever the batch size, whichever process draws it and
    whatever ran before. run.amp='auto' runs the network in bf16 where that is fast (CUDA, CPUs with native
    bf16); the sampler's arithmetic stays fp32. labels: these images' classes (None: unconditional).
    """
    generator = image_generators(run.seed, first, count)
    device = torch.device(device) if device is not None else model.betas.device
    with autocast(device, amp_dtype(run.amp, device)):
        x = model.sample_with(options, count, device, generator, progress, labels=labels)
    return to_uint8(x).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def generate(model, options=SampleOptions(), run=SampleRun(), device=None, dist=None, progress=True,
             parts_dir=None, meta=None, out_dir=None, stats=None):
    """Sample run.num_samples images in batches; returns uint8 [N, H, W, C] on rank 0 (None on other ranks).

    options: the sampler's (resolved here against the model, once); run: what to draw (a class index or 'all').
    parts_dir: a folder where every finished batch is saved at once, so that an
        interrupted run continues where it stopped; `meta` (run_meta) must
        then be given and must match the folder's. Parts are not removed here.
    out_dir: also write each image as out_dir/NNNNNN.png as its batch finishes.
    dist: a `Distributed`; batch i is drawn by rank i % world_size.
    stats: a dict that receives 'sampled', the number of images this process drew.
    """
    options = options.resolve(model)
    counts = batch_counts(run.num_samples, run.batch_size)
    labels = run_labels(run.class_label, run.num_samples, model.num_classes)
    world_size, rank = (dist.world_size, dist.rank) if dist is not None else (1, 0)
    device = device if device is not None else next(model.parameters()).device
    model.to(device).eval()
    store = open_parts(parts_dir, meta, dist, rank) if parts_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    done, todo = finished_batches(store, counts, run.batch_size, world_size, rank, progress)
    if stats is not None:
        stats['sampled'] = sum(counts[i] for i in todo)
    bar = todo
    if progress and rank == 0 and len(todo) > 1:
        from tqdm.auto import tqdm
        bar = tqdm(todo, desc=f'sampling {run.num_samples} images ({options.sampler}, {options.steps} steps)',
                   unit='batch')
    for i in bar:
        start = i * run.batch_size
        images = sample_batch(model, start, counts[i], options, run,
                              labels[start:start + counts[i]] if labels is not None else None, device,
                              progress=progress and rank == 0 and len(todo) == 1)
        if out_dir:
            save_pngs(images, out_dir, first_index=start)
        if store is not None:
            store.save(start, images)
        if store is None or rank == 0:
            done[i] = images
    return assemble(done, counts, run.batch_size, store, dist, rank)


def finished_batches(store, counts, batch_size, world_size, rank, progress):
    """(done, todo): this rank's batches already in the store (kept on rank 0) and those still to draw."""
    mine = [i for i in range(len(counts)) if i % world_size == rank]
    done, todo = {}, []
    for i in mine:
        images = store.load(i * batch_size, counts[i]) if store is not None else None
        if images is None:
            todo.append(i)
        elif store is None or rank == 0:
            done[i] = images
    if store is not None and rank == 0 and len(todo) < len(mine) and progress:
        print(f'resuming: {len(mine) - len(todo)} of {len(mine)} batches already in {store.folder}', file=sys.stderr)
    return done, todo


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


def assemble(done, counts, batch_size, store, dist, rank):
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
                images = store.load(i * batch_size, counts[i])
                if images is None:
                    raise ValueError(f'batch {i} is missing from {store.folder}; did a process fail? '
                                       f'Run the same command again to sample it')
                done[i] = images
    return np.concatenate([done[i] for i in range(len(counts))])


def sample_checkpoint(checkpoint, options=SampleOptions(), run=SampleRun(), ema=None, device=None, npz=None,
                      out_dir=None, progress=True, with_labels=False, image_size=None):
    """Checkpoint -> uint8 [N, H, W, C] images (None on ranks other than 0 under torchrun).

    options: the sampler's (SampleOptions); run: what to draw (SampleRun; its class_label may also be a class
    name, see resolve_class_label). With `npz` the run is resumable (parts in <npz>.parts/) and reused when
    the .npz is already complete with the same options (its <npz>.json says which).
    with_labels=True returns (images, labels as int64 numpy, or None when unconditional).
    image_size: for weights that do not fix it (the DDIM format; default 32).
    """
    dist = Distributed(device)
    device = dist.device
    try:
        model, info = load_model(checkpoint, ema=ema, device=device, image_size=image_size)
        options = options.resolve(model)
        run = dataclasses.replace(run, class_label=resolve_class_label(
            model.num_classes, info.get('class_names'), run.class_label, options.guidance_scale))
        labels = run_labels(run.class_label, run.num_samples, model.num_classes)
        label_array = labels.numpy() if labels is not None else None
        info['sha256'] = file_sha256(checkpoint) if (npz or out_dir) and dist.is_main else None
        meta = run_meta(model, info, options, run)

        # An .npz finished earlier with the same options is reused (rank 0 decides for all ranks).
        reused = reuse_complete_npz(npz, meta, run.num_samples) if npz and not out_dir and dist.is_main else None
        if dist.broadcast(reused is not None):
            if reused is not None and progress:
                print(f'{npz} already holds these {run.num_samples} samples; reusing it', file=sys.stderr)
            if reused is None:   # not rank 0
                return None
            return (reused, label_array) if with_labels else reused

        parts_dir = f'{npz}.parts' if npz else (os.path.join(out_dir, '.parts') if out_dir else None)
        start, stats = time.time(), {}
        images = generate(model, options, run, device, dist, progress, parts_dir, meta, out_dir, stats)
        if images is None:
            return None
        if npz:
            save_npz(npz, images, labels)
            write_json(f'{npz}.json', {**meta, 'num_samples': int(run.num_samples),
                                       'shape': list(images.shape), 'dtype': 'uint8'})
        if parts_dir:
            PartialRun(parts_dir).remove()
        if progress and stats['sampled']:
            say_speed(stats['sampled'], time.time() - start, dist, options, info)
        return (images, label_array) if with_labels else images
    finally:
        dist.close()


def say_speed(sampled, seconds, dist, options, info):
    """The one line on stderr after a run: how many images, how fast, with which sampler and weights."""
    where = f' on rank 0 of {dist.world_size}' if dist.world_size > 1 else ''
    spaced = f', {options.spacing} spacing' if options.spacing else ''
    print(f'sampled {sampled} images{where} in {seconds:.1f} s ({1000 * seconds / sampled:.1f} ms/image; '
          f'{options.sampler}, {options.steps} steps{spaced}, {"EMA" if info["ema"] else "raw"} weights)',
          file=sys.stderr)


@torch.inference_mode()
def trajectory(model, n, options=SampleOptions(), seed=0, device=None, columns=TRAJECTORY_COLUMNS, progress=True,
               amp=DEFAULT_AMP, labels=None, predicted_x0=False):
    """The denoising chain of n images: (ts, frames) with frames uint8 [n, columns, H, W, C].

    Columns show x_t at `columns` evenly spaced t from T (pure noise) down to 0
    (the sample, in the paper's 1-based t); the noise comes from batch 0's
    generators (image_generators), so the last column equals a run's first n images.
    predicted_x0: show the x_0 predicted from x_t instead (the paper's Fig. 6); column 0 is the sample.
    """
    options = options.resolve(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    generator = image_generators(seed, 0, n)
    x_T = draw_noise((n, *model.image_shape), generator, 'cpu')
    T = model.timesteps
    seq = timesteps_of(model, options)
    # The state after the i-th step is x at the paper's t = (next step in seq) + 1, or t = 0 at the end.
    visited = [T] + [int(seq[i + 1]) + 1 if i + 1 < len(seq) else 0 for i in range(len(seq))]
    wanted = sorted({min(visited, key=lambda v: abs(v - target))
                     for target in np.linspace(T, 0, columns)}, reverse=True)
    frames = {T: x_T.to(device)} if T in wanted else {}
    labels = check_labels(labels, n, model.num_classes, device)
    chain = model.run_sampler(options, n, device, generator, progress, x_T=x_T, labels=labels)
    with autocast(device, amp_dtype(amp, device)):
        for i, (step, x, x_0_pred) in enumerate(chain):
            if predicted_x0 and step >= 0:   # predicted from the state before this step
                x, t = x_0_pred, visited[i]
            else:
                t = visited[i + 1] if step >= 0 else 0
            if t in wanted:
                frames[t] = x
    stacked = torch.stack([to_uint8(frames[t].clamp(-1, 1)) for t in wanted], dim=1)   # [n, cols, C, H, W]
    return wanted, stacked.permute(0, 1, 3, 4, 2).cpu().numpy()


# ----- pictures -------------------------------------------------------------------------------

def save_grid(images, path, nrow=None):
    """uint8 [N, H, W, C] -> one PNG grid (torchvision.utils.save_image), sqrt(N) images a row by default."""
    from torchvision.utils import save_image
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(x, path, nrow=nrow)
    return path


def save_trajectory(frames, path):
    """trajectory's frames as one PNG grid: a row per image, a column per t."""
    n, cols = frames.shape[:2]
    return save_grid(frames.reshape(n * cols, *frames.shape[2:]), path, nrow=cols)
