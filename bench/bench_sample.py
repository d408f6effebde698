"""Sampling speed: time per network evaluation (NFE) and per image, ours vs diffusers' equal-size UNet2DModel.

Each variant's network runs in eval mode under torch.inference_mode on a batch
of x_t at a random step; the variants are interleaved and each reports the
median over rounds. Per-image times for ddpm-1000 and ddim-50 (and ddim-100 on
CUDA, with the time for 50,000 samples) are EXTRAPOLATED: median NFE time x
steps / batch. As a check that the sampler adds little on top of the network,
`ddim_step_ms` times a few real steps of DDPM.sample_progressive (one sample,
so noisy).

    python bench/bench_sample.py                      # CPU, batch 32
    python bench/bench_sample.py --device cuda --batch 1000 --cuda-graphs
"""

import argparse
import time
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import autocast, median, pick_device  # noqa: E402

VARIANTS = {
    'diffusers': dict(impl='diffusers', dtype='fp32', channels_last=False),
    'ours-fp32': dict(impl='ours', dtype='fp32', channels_last=False),
    'ours-fp32-cl': dict(impl='ours', dtype='fp32', channels_last=True),
    'ours-bf16': dict(impl='ours', dtype='bf16', channels_last=False),
    'ours-bf16-cl': dict(impl='ours', dtype='bf16', channels_last=True),
}


class Sampler:
    """One variant: a model in eval mode and a network call under inference_mode (optionally a CUDA graph)."""

    def __init__(self, name, opts, arch, device, batch, cuda_graph=False):
        self.name, self.opts, self.device = name, opts, device
        model = common.build_model(opts['impl'], arch).to(device).eval()
        if opts['channels_last']:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
        if opts['channels_last']:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.t = torch.full((batch,), 500, dtype=torch.long, device=device)
        self.graph = None
        if cuda_graph and device.type == 'cuda':
            self._capture()

    def _net(self):
        with autocast(self.device, self.opts['dtype']):
            return self.model.network(self.x, self.t)

    def _capture(self):
        """Record one network call in a CUDA graph; replaying it skips the per-kernel launch cost."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm up cuDNN autotuning outside the graph
                self._net()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.out = self._net()

    @torch.inference_mode()
    def nfe(self):
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self._net()

    @torch.inference_mode()
    def sampler_steps(self, sampler, steps_to_run, total_steps):
        """Seconds per step of the real sampler loop (network + sampler arithmetic), over a few steps."""
        n = self.x.shape[0]
        gen = torch.Generator().manual_seed(0)
        it = self.model.sample_progressive(n, device=self.device, sampler=sampler,
                                           steps=None if sampler == 'ddpm' else total_steps,
                                           generator=gen, progress=False)
        with autocast(self.device, self.opts['dtype']):
            next(it)  # first step: warm-up
            common.sync(self.device)
            t0 = time.perf_counter()
            for _ in range(steps_to_run):
                next(it)
            common.sync(self.device)
            return (time.perf_counter() - t0) / steps_to_run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto')
    p.add_argument('--arch', default='base', choices=['base', 'ddpm-paper'])
    p.add_argument('--batch', type=int, default=None, help='default 32 on CPU, 1000 on CUDA')
    p.add_argument('--rounds', type=int, default=None, help='default 8 on CPU, 50 on CUDA')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=sorted(VARIANTS))
    p.add_argument('--cuda-graphs', action='store_true', help='replay each network call from a CUDA graph')
    p.add_argument('--sampler-steps', type=int, default=3, help='real sampler steps timed per variant (0: skip)')
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == 'cuda'
    batch = args.batch or (1000 if cuda else 32)
    rounds = args.rounds or (50 if cuda else 8)
    info = common.env_info(device)
    print(f"# sampling, {args.arch}, batch {batch}; {info.get('gpu') or info.get('cpu')}, torch {info['torch']}")

    samplers = [Sampler(n, VARIANTS[n], args.arch, device, batch, args.cuda_graphs) for n in args.variants]
    for s in samplers:
        for _ in range(3 if cuda else 1):
            s.nfe()
    times = {s.name: [] for s in samplers}
    for r in range(rounds):
        for s in common.rotated(samplers, r):
            dt, _ = common.timed(s.nfe, device)
            times[s.name].append(dt)
    baseline = 'diffusers' if 'diffusers' in times else args.variants[0]
    ratios = common.interleaved_ratios(times, baseline)

    rows = []
    for s in samplers:
        nfe = median(times[s.name])
        row = dict(variant=s.name, batch=batch, nfe_ms=1e3 * nfe, nfe_min_ms=1e3 * min(times[s.name]),
                   speedup=median(ratios[s.name]), nfe_per_img_ms=1e3 * nfe / batch)
        if args.sampler_steps and s.graph is None:
            row['ddim_step_ms'] = 1e3 * s.sampler_steps('ddim', args.sampler_steps, 50)
        row['ddpm1000_s_per_img'] = 1000 * nfe / batch
        row['ddim50_s_per_img'] = 50 * nfe / batch
        if cuda:
            row['ddim100_50k_s'] = 50_000 * 100 * nfe / batch
        rows.append(row)
    cols = ['variant', 'batch', 'nfe_ms', 'nfe_min_ms', 'speedup', 'nfe_per_img_ms', 'ddim_step_ms',
            'ddpm1000_s_per_img', 'ddim50_s_per_img'] + (['ddim100_50k_s'] if cuda else [])
    common.print_table(rows, cols, title=f'sampling ({device.type}); speedup = median over rounds of '
                                         f't_nfe(diffusers) / t_nfe(variant); per-image times extrapolated '
                                         f'from the median NFE time')
    path = common.write_json(f'sample_{device.type}_{args.arch}', dict(env=info, batch=batch, rounds=rounds,
                                                                       cuda_graphs=args.cuda_graphs, rows=rows,
                                                                       times=times))
    print(f'wrote {path}')
    return rows


if __name__ == '__main__':
    main()
