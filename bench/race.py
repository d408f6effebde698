"""The race: sample quality against images seen and against CPU minutes, our quick start against the peers'.

Quality is measured against *images seen* (optimizer steps x batch), which no
other process on the machine can change; throughput is measured separately, in
one interleaved run on idle cores (`speed`); `report` combines them into FID
against CPU minutes. So the training and scoring steps may share the cores with
other work without spoiling the comparison; only `speed` needs them idle.

Contenders, each with its own project's published recipe and a network of the quick start's size:
  ours        the README's earlier CPU quick start, trained by train.py itself (tiny U-Net, 2.74M parameters)
  ours-fast   the second: ours with lr 1e-3, warmup 100 and Min-SNR-5 weighting
  ours-quick  the README's quick start now: ours-fast with batch 32 and v-prediction (`try-*`: the
              candidates screened for it, one change each on ours-fast)
  diffusers   UNet2DModel in the tiny arch's shape (2.74M) with examples/unconditional_image_generation/
              train_unconditional.py's defaults
  lucidrains  denoising-diffusion-pytorch's Unet(dim=32, dim_mults=(1, 2, 4)) (2.61M) with its Trainer's defaults
The peers' networks sit inside our DDPM (L_simple, linear betas, T = 1000), so the
loss, the sampler and bits/dim are computed identically for all; what differs is
the network and the recipe (batch, learning rate and warmup, Adam's settings,
EMA). lucidrains' own objective (v) and sigmoid schedule are not used.

Scores: FID of 2,000 DPM-Solver++(2M) samples (20 steps, x_0 clipped; image i from
seed (s, i)) against 5,000 training images of the offline CIFAR-10 copy, for each
--seeds s; the real-data floor (2,000 test images against the same reference);
bits/dim (the variational bound, estimated) on 500 test images.

    python bench/race.py reference --floor                           # reference statistics and the floor, once
    python bench/race.py train ours --images 25600 51200 96000       # checkpoints at those images seen
    python bench/race.py train diffusers --images 25600 51200 76800
    python bench/race.py score ours --images 25600 51200 96000 --seeds 0 1
    python bench/race.py score try-v --images 51200 --samples 1000   # a screening score, kept apart
    python bench/race.py speed                                       # on idle cores: img/s of every recipe
    python bench/race.py report                                      # the table and docs/images/race.png

Checkpoints go to --work (default /tmp/ddpm-race); scores and speeds to bench/results/race/*.json.
"""

import argparse
import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import ROOT  # noqa: E402

from data.process_cifar import to_model_range  # noqa: E402
from diffusion import DDPM, create_cifar10_ddpm, model_from_checkpoint  # noqa: E402
from metrics.bpd import bits_per_dim  # noqa: E402
from metrics.fid import cached_statistics, extract_features, feature_statistics, frechet_distance  # noqa: E402
from metrics.fid import load_feature_extractor  # noqa: E402
from model.presets import model_kwargs  # noqa: E402
from runtime import amp_dtype, autocast, keep_freed_memory  # noqa: E402
from sampling.generate import SampleRun, generate  # noqa: E402
from sampling.options import SampleOptions  # noqa: E402
from weights.checkpoint import load_checkpoint  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
RESULTS = os.path.join(common.RESULTS_DIR, 'race')
SAMPLER = SampleOptions('dpm-solver', 20, clip_denoised=True)
FID_SAMPLES, REF_IMAGES, BPD_IMAGES = 2000, 5000, 500

# Our recipes as train.py flags (the race runs train.py itself for them): 'ours' is the README's CPU
# quick start; 'ours-fast' the candidate for a better one (bench/RESULTS.md says what it changes and why).
QUICK_START = ['--arch', 'tiny', '--device', 'cpu', '--batch_size', '64', '--lr', '5e-4', '--warmup_steps', '200',
               '--ema_decay', '0.999', '--num_samples', '64']
OURS = {'ours': QUICK_START,
        'ours-fast': QUICK_START + ['--lr', '1e-3', '--warmup_steps', '100', '--min_snr_gamma', '5']}
# Candidates for the quick start, each one change on top of ours-fast (the later flag wins in train.py),
# screened at 51,200 images with FID-1k (`score --samples 1000`); bench/RESULTS.md has what they gave.
TRIALS = {'lr2e-3': ['--lr', '2e-3'], 'batch32': ['--batch_size', '32'], 'v': ['--prediction', 'v']}
OURS.update({f'try-{name}': OURS['ours-fast'] + flags for name, flags in TRIALS.items()})
# The two that helped, together: the README's quick start now.
OURS['ours-quick'] = OURS['ours-fast'] + ['--batch_size', '32', '--prediction', 'v']

# The peers' recipes, from their own defaults. diffusers: train_unconditional.py (AdamW, EMA decay
# 1 - (1 + step)^-3/4 up to 0.9999; its cosine learning-rate decay is left out so that every checkpoint
# of one run is a point of the same recipe). lucidrains: Trainer's defaults (EMA 0.995, updated every
# 10 steps after step 100, ema-pytorch's warmup 1 - (1 + step)^-2/3). Both clip gradients at norm 1.
RECIPES = {
    'diffusers': dict(batch_size=16, lr=1e-4, warmup=500, betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6,
                      ema=dict(max_decay=0.9999, warmup=0.75, every=1, after=0)),
    'lucidrains': dict(batch_size=16, lr=1e-4, warmup=0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                       ema=dict(max_decay=0.995, warmup=2 / 3, every=10, after=100)),
}


def train_config(name):
    """The TrainConfig that train.py makes from one of our recipes' flags."""
    from train import config_from_argv
    return config_from_argv(OURS[name])


def our_recipe(name):
    """RecipeTrainer's view of one of our recipes (for `speed`): train.py's Adam, warmup and EMA ramp."""
    c = train_config(name)
    return dict(batch_size=c.batch_size, lr=c.lr, warmup=c.warmup_steps, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=0.0, ema=dict(max_decay=c.ema_decay, warmup='ramp', every=1, after=0))


RECIPES.update({name: our_recipe(name) for name in OURS})


class EpsNet(nn.Module):
    """Another project's U-Net as our `network(x_t, t) -> eps`."""

    def __init__(self, net, output=lambda out: out):
        super().__init__()
        self.net, self.output, self.in_channels, self.image_size = net, output, 3, 32

    def forward(self, x_t, t):
        return self.output(self.net(x_t, t))


def build(name):
    """A contender's network inside our DDPM."""
    if name in OURS:   # the network and DDPM options train.py builds from the recipe's flags
        return create_cifar10_ddpm(**model_kwargs(train_config(name).to_dict()))
    if name == 'diffusers':   # the tiny arch in diffusers' blocks: 2,736,099 parameters, as ours
        from diffusers import UNet2DModel
        unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(32, 64, 128), norm_num_groups=16, norm_eps=1e-6, dropout=0.0,
                           time_embedding_dim=128, attention_head_dim=32,
                           down_block_types=('DownBlock2D', 'DownBlock2D', 'AttnDownBlock2D'),
                           up_block_types=('AttnUpBlock2D', 'UpBlock2D', 'UpBlock2D'))
        return DDPM(EpsNet(unet, lambda out: out.sample))
    if name == 'lucidrains':
        from denoising_diffusion_pytorch import Unet
        return DDPM(EpsNet(Unet(dim=32, dim_mults=(1, 2, 4))))
    raise SystemExit(f'error: unknown contender {name!r}; choose from {", ".join(RECIPES)}')


def ema_decay(ema, step):
    if ema['warmup'] == 'ramp':    # train.py's: min(max, (1 + n) / (10 + n))
        return min(ema['max_decay'], (1.0 + step) / (10.0 + step))
    return min(ema['max_decay'], max(0.0, 1.0 - (1.0 + step) ** -ema['warmup']))


class RecipeTrainer:
    """One recipe's training step: Adam(W), linear warmup, gradient clipping at 1, its EMA; bf16 where native.

    The peers train in this loop; ours trains in train.py and uses this loop only for `speed`."""

    def __init__(self, name, device, seed=0):
        torch.manual_seed(seed)
        self.recipe, self.device = RECIPES[name], device
        self.model = build(name).to(device).train()
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        r = self.recipe
        if name in OURS:   # train.py's optimizer (only `speed` trains ours here)
            self.opt = torch.optim.Adam(self.params, lr=r['lr'], fused=True)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=r['lr'], betas=r['betas'], eps=r['eps'],
                                         weight_decay=r['weight_decay'])
        self.dtype, self.rng, self.step_count = amp_dtype('auto', device), np.random.default_rng(seed), 0

    def step(self, images):
        r = self.recipe
        x = images[torch.from_numpy(self.rng.integers(0, len(images), r['batch_size']))]
        flip = torch.from_numpy(self.rng.random(len(x)) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        for group in self.opt.param_groups:
            group['lr'] = r['lr'] * min(1.0, (self.step_count + 1) / max(1, r['warmup']))
        with autocast(self.device, self.dtype):
            loss = self.model.loss(to_model_range(x).to(self.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        ema = r['ema']
        if self.step_count % ema['every'] == 0:
            with torch.no_grad():
                ema_params = list(self.ema_model.parameters())
                if self.step_count <= ema['after']:
                    torch._foreach_copy_(ema_params, self.params)
                else:
                    torch._foreach_lerp_(ema_params, self.params, 1.0 - ema_decay(ema, self.step_count))
        return loss.detach()


def checkpoint_path(args, name, images):
    return os.path.join(args.work, f'{name}-{images}.pth')


def train_ours(args, name):
    """train.py with one of our recipes' flags, stopped and resumed exactly at every budget."""
    run_dir = os.path.join(args.work, f'{name}-run')
    batch = RECIPES[name]['batch_size']   # from the recipe's flags, as train.py reads them
    for images in sorted(args.images):
        steps, left = divmod(images, batch)
        if left:
            raise SystemExit(f'error: {images} images is not a whole number of batches of {batch}')
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *OURS[name], '--max_steps', str(steps),
               '--dataset', 'folder', '--data_dir', args.data_dir, '--checkpoint_dir', run_dir,
               '--log_dir', os.path.join(run_dir, 'runs'), '--run_name', 'race', '--resume', 'latest']
        print(' '.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        shutil.copy(os.path.join(run_dir, 'ddpm_latest.pth'), checkpoint_path(args, name, images))


def train_peer(args, name):
    device = torch.device('cpu')
    data = common.read_cifar_jpeg(args.data)['train']
    trainer = RecipeTrainer(name, device)
    batch, start = trainer.recipe['batch_size'], time.perf_counter()
    for images in sorted(args.images):
        if images % batch:
            raise SystemExit(f'error: {images} images is not a whole number of batches of {batch}')
        while trainer.step_count * batch < images:
            loss = trainer.step(data)
            if trainer.step_count % 200 == 0:
                print(f'{name} step {trainer.step_count} loss {loss.item():.4f} '
                      f'{time.perf_counter() - start:.0f} s', flush=True)
        torch.save(dict(contender=name, images=images, steps=trainer.step_count,
                        ema=trainer.ema_model.state_dict()), checkpoint_path(args, name, images))


def load_contender(args, name, images):
    path = checkpoint_path(args, name, images)
    if name in OURS:
        return model_from_checkpoint(load_checkpoint(path), ema=True)
    model = build(name)
    model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True)['ema'])
    return model.eval()


def reference(args):
    """FID statistics of REF_IMAGES training images (cached) and the floor: FID of FID_SAMPLES test images."""
    extractor, layer, _ = load_feature_extractor(weights=args.inception_weights, device='cpu')
    data = common.read_cifar_jpeg(args.data)
    keep = np.sort(np.random.default_rng(0).permutation(len(data['train']))[:REF_IMAGES])
    pixels = data['train'][torch.from_numpy(keep)].permute(0, 2, 3, 1).numpy()
    mu, sigma, *_ = cached_statistics(f'cifar10-jpeg-train{REF_IMAGES}-seed0', pixels, extractor, layer,
                                      batch_size=50, device='cpu')
    if args.floor:
        pick = np.random.default_rng(1).permutation(len(data['test']))[:FID_SAMPLES]   # files are in class order
        test = data['test'][torch.from_numpy(pick)].permute(0, 2, 3, 1).numpy()
        features = extract_features(test, extractor, 50, 'cpu', progress=False)[layer]
        floor = frechet_distance(*feature_statistics(features), mu, sigma)
        save_result('floor', dict(fid=floor, images=FID_SAMPLES, source='2,000 random test images'))
        print(f'real-data floor: FID {floor:.2f}')
    return data, extractor, layer, (mu, sigma)


def save_result(name, row):
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f'{name}.json'), 'w') as f:
        json.dump(dict(row, env=common.env_info(torch.device('cpu'))), f, indent=1, default=str)


def has_bpd(name, images):
    return any('bpd' in row for key, row in read_results().items() if key.startswith(f'{name}-{images}-seed'))


def score(args, name):
    """FID-n (n = --samples; 2,000 for the race, fewer to screen a trial) per seed; bits/dim with FID-2k."""
    data, extractor, layer, ref = reference(args)
    test = data['test'][torch.from_numpy(np.random.default_rng(0).permutation(len(data['test']))[:BPD_IMAGES])]
    screen = args.samples != FID_SAMPLES
    for images in args.images:
        model = load_contender(args, name, images)
        for seed in args.seeds:
            start = time.perf_counter()
            samples = generate(model, SAMPLER, SampleRun(args.samples, 250, seed, amp='auto'), 'cpu', progress=False)
            features = extract_features(samples, extractor, 50, 'cpu', progress=False)[layer]
            fid = frechet_distance(*feature_statistics(features), *ref)
            row = dict(contender=name, images=images, seed=seed, fid=fid, samples=args.samples,
                       seconds=time.perf_counter() - start)
            if not screen and not has_bpd(name, images):   # bits/dim depends on the checkpoint, not the seed
                bpd = bits_per_dim(model, test.permute(0, 2, 3, 1).numpy(), 'estimate', t_samples=4, batch_size=250,
                                   device='cpu', seed=0, progress=False)
                row.update(bpd=bpd['bpd'], bpd_stderr=bpd['bpd_stderr'])
            save_result(f'{name}-{images}-seed{seed}' + (f'-fid{args.samples}' if screen else ''), row)
            print({k: v for k, v in row.items()}, flush=True)


def speed(args):
    """Images/s of every recipe's training step, interleaved A B C A B C on the same cores."""
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = torch.device('cpu')
    images = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8)
    trainers = {name: RecipeTrainer(name, device) for name in args.contenders}
    for trainer in trainers.values():   # ours: the quick start's own recipe in the same loop as the peers'
        for _ in range(3):
            trainer.step(images)
    times = {name: [] for name in trainers}
    for r in range(args.rounds):
        for name in common.rotated(list(trainers), r):
            trainer, steps = trainers[name], max(1, 256 // trainers[name].recipe['batch_size'])
            start = time.perf_counter()
            for _ in range(steps):
                trainer.step(images)
            times[name].append((time.perf_counter() - start) / (steps * trainer.recipe['batch_size']))
    load = os.getloadavg()
    for name, ts in times.items():
        row = dict(contender=name, images_per_s=1.0 / common.median(ts), rounds=args.rounds, threads=args.threads,
                   per_round_images_per_s=[1.0 / t for t in ts], loadavg_after=load)
        save_result(f'speed-{name}', row)
        print(f'{name}: {row["images_per_s"]:.1f} images/s (median of {args.rounds} rounds); load {load}')


def read_results():
    rows = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, '*.json'))):
        with open(path) as f:
            rows[os.path.basename(path)[:-5]] = json.load(f)
    return rows


def points(results):
    """{contender: [(images, cpu_minutes, fid per seed {seed: fid}, bpd, bpd_stderr)]} from the saved results."""
    curves = {}
    for key, row in results.items():
        if 'images' not in row or 'contender' not in row or row.get('samples', FID_SAMPLES) != FID_SAMPLES:
            continue   # a speed row, or a screening score (FID of fewer samples; `report` lists those apart)
        speed_row = results.get(f'speed-{row["contender"]}')
        point = curves.setdefault(row['contender'], {}).setdefault(row['images'], dict(fid={}))
        point['fid'][row['seed']] = row['fid']
        point['cpu_min'] = row['images'] / speed_row['images_per_s'] / 60 if speed_row else float('nan')
        if 'bpd' in row:
            point.update(bpd=row['bpd'], bpd_stderr=row['bpd_stderr'])
    return {name: sorted(c.items()) for name, c in curves.items()}


def interpolate_fid(curve, cpu_min):
    """FID (mean over seeds) of a curve at cpu_min, linear in log CPU minutes; None outside the curve."""
    xs = [np.log(p['cpu_min']) for _, p in curve]
    ys = [np.mean(list(p['fid'].values())) for _, p in curve]
    x = np.log(cpu_min)
    return float(np.interp(x, xs, ys)) if xs[0] <= x <= xs[-1] else None


def compare(peer, curve, ours, ours_curve):
    """FID(peer) / FID(ours) at equal CPU minutes: at each point of either curve, the other one interpolated."""
    for label, at, other in ((peer, curve, ours_curve), (ours, ours_curve, curve)):
        for images, p in at:
            there = interpolate_fid(other, p['cpu_min'])
            if there is None:
                continue
            here = float(np.mean(list(p['fid'].values())))
            fid_peer, fid_ours = (here, there) if label == peer else (there, here)
            print(f'{peer} vs {ours} at {p["cpu_min"]:.1f} CPU min ({label} {images} images; the other '
                  f'interpolated): FID {fid_peer:.1f} vs {fid_ours:.1f}, ratio {fid_peer / fid_ours:.2f}')


def report(args):
    results = read_results()
    curves = points(results)
    floor = results.get('floor', {}).get('fid')
    rows = []
    for name, curve in curves.items():
        for images, p in curve:
            seeds = sorted(p['fid'])
            rows.append(dict(contender=name, images=images, cpu_min=p['cpu_min'],
                             **{f'fid_seed{s}': p['fid'][s] for s in seeds}, bpd=p.get('bpd'),
                             bpd_stderr=p.get('bpd_stderr')))
    seeds = sorted({k for r in rows for k in r if k.startswith('fid_seed')})
    common.print_table(rows, ['contender', 'images', 'cpu_min', *seeds, 'bpd', 'bpd_stderr'],
                       f'FID-{FID_SAMPLES} (DPM-Solver++ 20, clipped) vs {REF_IMAGES} training images; '
                       + (f"real-data floor {floor:.2f}" if floor else "real-data floor not measured"))
    for ours in [name for name in OURS if name in curves]:
        for peer in [name for name in curves if name not in OURS]:
            compare(peer, curves[peer], ours, curves[ours])
    screens = [dict(contender=r['contender'], images=r['images'], samples=r['samples'], seed=r['seed'], fid=r['fid'])
               for r in results.values() if r.get('samples', FID_SAMPLES) != FID_SAMPLES]
    if screens:
        common.print_table(sorted(screens, key=lambda r: (r['samples'], r['images'], r['fid'])),
                           ['contender', 'images', 'samples', 'seed', 'fid'], 'screening scores (not in the race)')
    plot(curves, floor, args.plot)


COLOURS = {'ours': 'C0', 'ours-fast': 'C4', 'ours-quick': 'C3', 'diffusers': 'C1', 'lucidrains': 'C2'}


def plot(curves, floor, path):
    """FID against thousands of images seen and against CPU minutes; the first seed as a line, others as x."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for name, curve in curves.items():
        first = min(s for _, p in curve for s in p['fid'])
        for ax, xs in zip(axes, ([i / 1000 for i, _ in curve], [p['cpu_min'] for _, p in curve])):
            line = [(x, p['fid'][first]) for x, (_, p) in zip(xs, curve) if first in p['fid']]
            ax.plot(*zip(*line), 'o-', color=COLOURS.get(name), label=name)
            more = [(x, f) for x, (_, p) in zip(xs, curve) for s, f in p['fid'].items() if s != first]
            if more:
                ax.plot(*zip(*more), 'x', color=COLOURS.get(name))
    axes[0].plot([], [], 'x', color='black', label='another sampling seed')
    for ax, label in zip(axes, ('thousand images seen', 'CPU minutes (2 idle cores)')):
        if floor:
            ax.axhline(floor, color='grey', ls='--', lw=1, label='real test images')
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f'FID-{FID_SAMPLES // 1000}k (lower is better)')
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.tight_layout(rect=(0, 0.1, 1, 1))   # the legend goes below both panels, clear of the curves
    fig.legend(unique.values(), unique.keys(), fontsize=8, loc='lower center', ncol=len(unique), frameon=False)
    fig.savefig(path, dpi=80)
    print(f'wrote {path}')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('command', choices=['reference', 'train', 'score', 'speed', 'report'])
    p.add_argument('contender', nargs='?', choices=list(RECIPES))
    p.add_argument('--images', type=int, nargs='+', default=[], help='budgets in images seen')
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--samples', type=int, default=FID_SAMPLES, help='score: FID of this many samples (fewer: a '
                   'screening score, kept apart from the race)')
    p.add_argument('--contenders', nargs='+', default=list(RECIPES), help='speed: which recipes')
    p.add_argument('--rounds', type=int, default=6)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--work', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'ddpm-race'))
    p.add_argument('--data', default=os.path.join(SHARED, 'cifar10-jpeg.tar.gz'))
    p.add_argument('--data_dir', default=None, help="the copy's train/ folder for train.py (ours); "
                   'default: unpacked from --data into --work')
    p.add_argument('--inception_weights', default=os.path.join(SHARED, 'inception-2015-12-05-nv.pt'))
    p.add_argument('--floor', action='store_true', help='reference: also the real-data floor')
    p.add_argument('--plot', default=os.path.join(ROOT, 'docs', 'images', 'race.png'))
    args = p.parse_args()
    if args.command in ('train', 'score') and not (args.contender and args.images):
        p.error(f'{args.command} needs a contender and --images')
    return args


def unpacked_train_folder(args):
    folder = os.path.join(args.work, 'cifar10-jpeg', 'train')
    if not os.path.isdir(folder):
        subprocess.run(['tar', 'xzf', args.data, '-C', args.work], check=True)
    return folder


def main():
    args = parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.command == 'reference':
        reference(args)
    elif args.command == 'train' and args.contender in OURS:
        args.data_dir = args.data_dir or unpacked_train_folder(args)
        train_ours(args, args.contender)
    elif args.command == 'train':
        keep_freed_memory()
        train_peer(args, args.contender)
    elif args.command == 'score':
        score(args, args.contender)
    elif args.command == 'speed':
        speed(args)
    else:
        report(args)


if __name__ == '__main__':
    main()
