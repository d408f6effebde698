"""Sample quality against network evaluations (NFE) for the deterministic samplers, on one trained model.

Proxy for FID (no offline FID in this repository yet): every deterministic
sampler solves the same probability-flow ODE from the same x_T, so its error is
the RMS distance of its x_0 to the ODE's solution from that x_T, which a long
run of a second-order solver gives (the reference, DPM-Solver++ at --ref_nfe
NFE; its own error is estimated by its distance to a run at half that NFE and
printed). The distance is in [-1, 1] pixel units, over all pixels of
--num_images images; the network runs in fp32, since bf16's rounding (~1e-2
relative) would be a floor under the solvers' errors. It measures solver error
only, not how good the model's samples are: the ancestral DDPM sampler is
stochastic and has no such distance, so it gets a time per image only.

Seconds per image are measured here (wall time of the batch / images) with the
network in fp32; sample.py's default (--amp auto) runs it in bf16 where that is
faster.

    python bench/sampler_quality.py --checkpoint checkpoints/ddpm_latest.pth
    python bench/sampler_quality.py --checkpoint ckpt.pth --nfe 10 20 --num_images 4   # a quick look
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import pick_device, print_table  # noqa: E402

from sampling.generate import load_model  # noqa: E402

# (name, sampler, spacing): the DDIM paper's two step sequences and DPM-Solver++(2M) on its default one
# (uniform in log-SNR) and on DDIM's quadratic one.
CONFIGS = [('ddim', 'ddim', 'uniform'), ('ddim-quadratic', 'ddim', 'quadratic'),
           ('dpm-solver', 'dpm-solver', 'logsnr'), ('dpm-solver-quadratic', 'dpm-solver', 'quadratic')]


def run(model, x_T, sampler, steps, spacing, device):
    """(x_0 before the final clamp to [-1, 1], seconds) of one deterministic sampler run from x_T."""
    start = time.perf_counter()
    with torch.inference_mode():
        chain = model.sample_progressive(len(x_T), device, sampler, steps, x_T=x_T, progress=False,
                                         clip_denoised=False, spacing=spacing)
        *_, (_, x_0, _), _ = chain
    common.sync(device)
    return x_0.double().cpu(), time.perf_counter() - start


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--nfe', type=int, nargs='+', default=[5, 10, 20, 50, 100])
    p.add_argument('--num_images', type=int, default=16)
    p.add_argument('--ref_nfe', type=int, default=250, help='NFE of the reference run (DPM-Solver++, logsnr)')
    p.add_argument('--ddpm_steps_timed', type=int, default=50,
                   help='time this many of the ancestral sampler\'s T steps and scale to T (0: skip it)')
    p.add_argument('--device', default='auto')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, info = load_model(args.checkpoint, device=device)
    model.eval()
    x_T = torch.randn(args.num_images, *model.image_shape, generator=torch.Generator().manual_seed(args.seed))

    ref, ref_s = run(model, x_T, 'dpm-solver', args.ref_nfe, 'logsnr', device)
    half, _ = run(model, x_T, 'dpm-solver', args.ref_nfe // 2, 'logsnr', device)
    print(f'reference: dpm-solver, {args.ref_nfe} NFE, logsnr ({ref_s / args.num_images:.2f} s/image); its '
          f'distance to the {args.ref_nfe // 2}-NFE run: {rms(half, ref):.2e}', flush=True)

    rows = []
    for nfe in args.nfe:
        for name, sampler, spacing in CONFIGS:
            x_0, seconds = run(model, x_T, sampler, nfe, spacing, device)
            rows.append(dict(sampler=name, nfe=nfe, rms_to_ref=rms(x_0, ref), s_per_image=seconds / args.num_images))
            print(f'  {name:22s} {nfe:4d} NFE: RMS to reference {rows[-1]["rms_to_ref"]:.4f}, '
                  f'{rows[-1]["s_per_image"]:.3f} s/image', flush=True)
    if args.ddpm_steps_timed:   # EXTRAPOLATED: its steps all cost the same (one network call, one noise draw)
        k = min(args.ddpm_steps_timed, model.timesteps)
        chain = model.sample_progressive(args.num_images, device, 'ddpm', x_T=x_T, progress=False,
                                         generator=torch.Generator().manual_seed(args.seed))
        start = time.perf_counter()
        for _ in range(k):
            next(chain)
        common.sync(device)
        rows.append(dict(sampler=f'ddpm (ancestral; {k} of {model.timesteps} steps timed, scaled)',
                         nfe=model.timesteps, rms_to_ref=None,
                         s_per_image=(time.perf_counter() - start) / args.num_images * model.timesteps / k))

    table = [dict(sampler=name, **{f'{n} NFE': next(r['rms_to_ref'] for r in rows
                                                    if r['sampler'] == name and r['nfe'] == n) for n in args.nfe})
             for name, _, _ in CONFIGS]
    print_table(table, ['sampler'] + [f'{n} NFE' for n in args.nfe],
                f'RMS distance of x_0 to the reference ({args.num_images} images, [-1, 1] units, fp32)')
    print_table(rows, ['sampler', 'nfe', 's_per_image'], 'seconds per image (fp32, batch of '
                f'{args.num_images}, {torch.get_num_threads()} threads)')
    path = common.write_json('sampler_quality', dict(
        env=common.env_info(device), checkpoint=os.path.abspath(args.checkpoint), checkpoint_step=info.get('step'),
        args=vars(args), reference=dict(nfe=args.ref_nfe, seconds_per_image=ref_s / args.num_images,
                                        rms_to_half_nfe=rms(half, ref)), rows=rows))
    print(f'\nwrote {path}')


if __name__ == '__main__':
    main()
