"""train.py (and sample.py) under torchrun: 2 CPU processes with the gloo backend.

What is checked, and why it proves it:
- A 2-process `torchrun train.py` run writes one set of checkpoints, one
  TensorBoard run and one sample grid (rank 0 alone writes), and prints the
  meaning of batch_size once.
- Same seed and global batch: 2 ranks, 1 rank, 1 rank x accum_steps=2 and
  2 ranks x accum_steps=2 end with the same weights, EMA and Adam moments, to
  float rounding. grad_clip=0 keeps the gradient's scale in Adam's first moment
  (exp_avg is linear in the gradient), so a summed (2x) or unreduced (per-rank)
  gradient would show there even where Adam's scale-free update would hide it.
- Resume under DDP (2 ranks: 2 steps, then on to 4) and across a change of
  world size (1 -> 2 and 2 -> 1) equals a straight 4-step run.
- Every rank ends with bitwise the same weights and EMA (per-rank digests).
- Ranks that would resume from different steps (a checkpoint only one node
  sees) refuse to start instead of silently diverging.
- The logged train/loss under 2 ranks is the global batch's, as with 1 rank.
- Sharded sampling (sample.py) with 2 ranks returns the same images as 1 rank.

All equality runs use dropout=0: dropout masks are seeded per (seed, step,
rank) and legitimately differ between layouts; everything else (data order,
flips, t and eps) is drawn for the global batch and sliced, so it does not.

To keep CI fast (2 cores) there are only two torchrun launches: the train.py
command line itself, and this file run as a driver (`__main__` below) that does
several train_ddpm / sampling jobs in one launch.
"""

import glob
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load

# amp='fp32': bf16 autocast (the default on CPUs with native bf16) rounds differently
# for different per-rank batch shapes, which would hide the float-rounding comparison.
TINY = dict(dataset='synthetic', channels=(16, 32), num_res_blocks=1, attn_resolutions=(8,), image_size=16,
            batch_size=8, dropout=0.0, device='cpu', seed=3, warmup_steps=0, grad_clip=0.0, log_every=1,
            num_samples=0, sample_steps=2, amp='fp32')
# Observed on 2 CPU cores: max |difference| ~1e-7 for weights after 4 Adam steps at lr 2e-4.
ATOL, RTOL = 2e-6, 1e-4


# ----- helpers --------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(args, cwd, nproc=2, timeout=300):
    """Run `python -m torch.distributed.run --nproc_per_node=nproc args...`; return its output."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
           '--master_addr=127.0.0.1', f'--master_port={free_port()}'] + args
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'torchrun failed ({proc.returncode}):\n{out[-6000:]}'
    return out


def cli_args(kwargs):
    args = []
    for k, v in kwargs.items():
        if v is None:
            continue
        args.append(f'--{k}')
        args += [str(x) for x in v] if isinstance(v, (tuple, list)) else [str(v)]
    return args


def digest(tensors):
    """sha256 over the bytes of a list of tensors: equal digests mean bitwise-equal tensors."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def max_diffs(a, b):
    """{'model'|'ema'|'exp_avg'|'exp_avg_sq': max |a - b|} between two checkpoints; asserts they match."""
    out = {}
    for key in ('model_state_dict', 'ema_state_dict'):
        assert a[key].keys() == b[key].keys()
        diffs = []
        for name in a[key]:
            x, y = a[key][name].float(), b[key][name].float()
            torch.testing.assert_close(x, y, atol=ATOL, rtol=RTOL, msg=lambda m: f'{key}[{name}]: {m}')
            diffs.append((x - y).abs().max().item())
        out[key.split('_')[0]] = max(diffs)
    for moment in ('exp_avg', 'exp_avg_sq'):
        diffs = []
        sa, sb = a['optimizer_state_dict']['state'], b['optimizer_state_dict']['state']
        assert sa.keys() == sb.keys()
        for i in sa:
            x, y = sa[i][moment], sb[i][moment]
            scale = x.abs().max().item() + 1e-12  # moments are tiny for some tensors: compare relative to each
            torch.testing.assert_close(x / scale, y / scale, atol=1e-4, rtol=1e-4, msg=lambda m: f'{moment}[{i}]: {m}')
            diffs.append(((x - y).abs().max() / scale).item())
        out[moment + ' (rel)'] = max(diffs)
    assert a['step'] == b['step']
    return out


def train_here(tmp, name, **kwargs):
    """A 1-process run in this process; returns its checkpoint dir."""
    from train import train_ddpm
    ck = str(tmp / name / 'ck')
    train_ddpm(**{**TINY, **kwargs}, checkpoint_dir=ck, log_dir=str(tmp / name / 'runs'), run_name=name)
    return ck


# ----- the runs, shared by the tests below ------------------------------------------------------

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    assert 'WORLD_SIZE' not in os.environ or os.environ['WORLD_SIZE'] == '1'
    r = {'tmp': tmp}
    # 1 process, in this process.
    r['one4'] = train_here(tmp, 'one4', max_steps=4)
    r['one2'] = train_here(tmp, 'one2', max_steps=2)
    r['acc4'] = train_here(tmp, 'acc4', max_steps=4, accum_steps=2)

    # Launch 1: the real command line, 2 processes, 2 steps (with a sample grid from rank 0).
    cli = {**TINY, 'max_steps': 2, 'num_samples': 4, 'checkpoint_dir': 'ck', 'log_dir': 'runs',
           'run_name': 'ddp2'}
    (tmp / 'cli').mkdir()
    r['cli_out'] = torchrun([os.path.join(ROOT, 'train.py')] + cli_args(cli), cwd=tmp / 'cli')
    r['ddp2'] = str(tmp / 'cli' / 'ck')

    # Launch 2: this file as a driver, 2 processes, several jobs in one launch.
    jobs = [
        ('resume_ddp', dict(max_steps=4, resume=os.path.join(r['ddp2'], 'ddpm_latest.pth'))),
        ('resume_1to2', dict(max_steps=4, resume=os.path.join(r['one2'], 'ddpm_latest.pth'))),
        ('ddp_acc4', dict(max_steps=4, accum_steps=2)),
    ]
    spec = [{'kind': 'train', 'name': name,
             'kwargs': {**TINY, **kw, 'checkpoint_dir': str(tmp / name / 'ck'), 'log_dir': str(tmp / name / 'runs'),
                        'run_name': name}} for name, kw in jobs]
    # Only rank 0 finds the checkpoint (a checkpoint_dir on one node's local disk): both must refuse.
    spec.append({'kind': 'train', 'name': 'disagree', 'rank0_only': ['resume'], 'kwargs': {
        **TINY, 'max_steps': 4, 'resume': os.path.join(r['one2'], 'ddpm_latest.pth'),
        'checkpoint_dir': str(tmp / 'disagree' / 'ck'), 'log_dir': str(tmp / 'disagree' / 'runs')}})
    have_sampler = os.path.exists(os.path.join(ROOT, 'sample.py'))
    if have_sampler:
        spec.append({'kind': 'sample', 'name': 'sample', 'kwargs': dict(
            checkpoint=os.path.join(r['one4'], 'ddpm_latest.pth'), options=dict(sampler='ddim', steps=2),
            run=dict(num_samples=5, batch_size=2, seed=7), device='cpu', progress=False)})
    with open(tmp / 'jobs.json', 'w') as f:
        json.dump({'out': str(tmp / 'driver'), 'jobs': spec}, f)
    r['driver_out'] = torchrun([os.path.abspath(__file__), str(tmp / 'jobs.json')], cwd=tmp)
    r['driver'] = tmp / 'driver'
    for name, _ in jobs:
        r[name] = str(tmp / name / 'ck')
    r['have_sampler'] = have_sampler

    # 2 -> 1: continue the 2-process checkpoint in this process.
    r['resume_2to1'] = train_here(tmp, 'resume_2to1', max_steps=4,
                                  resume=os.path.join(r['ddp2'], 'ddpm_latest.pth'))
    return r


def latest(ck):
    return load(os.path.join(ck, 'ddpm_latest.pth'))


# ----- the tests ------------------------------------------------------------------------------

def test_torchrun_cli_writes_one_set_of_outputs(runs):
    cli = runs['tmp'] / 'cli'
    files = sorted(os.path.relpath(p, cli) for p in glob.glob(str(cli / '**'), recursive=True)
                   if os.path.isfile(p))
    events = [f for f in files if 'tfevents' in f]
    assert [f for f in files if f.startswith('ck')] == [os.path.join('ck', 'ddpm_latest.pth')], files
    assert len(events) == 1 and events[0].startswith(os.path.join('runs', 'ddp2') + os.sep), files
    assert sorted(os.listdir(cli / 'runs')) == ['ddp2'], files
    assert os.path.join('runs', 'ddp2', 'config.json') in files
    assert len([f for f in files if f.endswith('.png')]) == 1, files  # the end-of-training grid, from rank 0
    out = runs['cli_out']
    # Printed once (rank 0 only), with the meaning of batch_size.
    assert out.count('global batch 8 = 2 rank(s) x 1 micro-batch(es) x 4 images') == 1, out[-3000:]
    assert out.count('done: 2 steps') == 1, out[-3000:]
    assert json.load(open(cli / 'runs' / 'ddp2' / 'config.json'))['world_size'] == 2


def test_two_ranks_equal_one_rank(runs, capsys):
    d = max_diffs(latest(runs['ddp2']), latest(runs['one2']))
    with capsys.disabled():
        print(f'\n2 ranks vs 1 rank, 2 steps: max diff {d}')


def test_accumulation_equals_full_batch(runs, capsys):
    one4 = latest(runs['one4'])
    d1 = max_diffs(latest(runs['acc4']), one4)
    d2 = max_diffs(latest(runs['ddp_acc4']), one4)
    with capsys.disabled():
        print(f'\n1 rank x accum 2 vs 1 rank, 4 steps: max diff {d1}\n2 ranks x accum 2 vs 1 rank: max diff {d2}')


def test_resume_under_ddp_and_across_world_size(runs, capsys):
    one4 = latest(runs['one4'])
    lines = []
    for name in ('resume_ddp', 'resume_1to2', 'resume_2to1'):
        lines.append(f'{name} vs straight 1 rank, 4 steps: max diff {max_diffs(latest(runs[name]), one4)}')
    with capsys.disabled():
        print('\n' + '\n'.join(lines))


def test_every_rank_ends_with_the_same_weights_and_ema(runs):
    for name in ('resume_ddp', 'resume_1to2', 'ddp_acc4'):
        ranks = [json.load(open(runs['driver'] / f'{name}.rank{r}.json')) for r in range(2)]
        assert 'error' not in ranks[0] and 'error' not in ranks[1], ranks
        assert ranks[0]['step'] == ranks[1]['step'] == 4
        assert ranks[0]['model'] == ranks[1]['model'], name
        assert ranks[0]['ema'] == ranks[1]['ema'], name
        # ...and rank 0's are the ones its checkpoint holds.
        ck = latest(runs[name])
        assert ranks[0]['ema'] == digest(ck['ema_state_dict'].values())


def test_ranks_refuse_to_resume_from_different_steps(runs):
    for r in range(2):
        result = json.load(open(runs['driver'] / f'disagree.rank{r}.json'))
        assert 'ranks disagree on where to resume' in result.get('error', ''), result
    assert not os.path.exists(runs['tmp'] / 'disagree' / 'ck' / 'ddpm_latest.pth')


def test_logged_loss_is_the_global_batch_loss(runs):
    """TensorBoard's train/loss under 2 ranks is the whole global batch's loss, as with 1 rank."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(run_dir):
        events = EventAccumulator(str(run_dir))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars('train/loss')]
    two = losses(runs['tmp'] / 'cli' / 'runs' / 'ddp2')
    one = losses(runs['tmp'] / 'one2' / 'runs' / 'one2')
    assert [s for s, _ in two] == [s for s, _ in one] == [1, 2]
    for (_, a), (_, b) in zip(two, one):
        assert a == pytest.approx(b, rel=1e-5)


def test_sharded_sampling_equals_one_process(runs):
    if not runs['have_sampler']:
        pytest.skip('sample.py is not in this checkout')
    import numpy as np
    import sampling.generate as generation
    from sampling.options import SampleOptions
    one = generation.sample_checkpoint(os.path.join(runs['one4'], 'ddpm_latest.pth'), SampleOptions('ddim', 2),
                                       generation.SampleRun(5, batch_size=2, seed=7), device='cpu', progress=False)
    two = np.load(runs['driver'] / 'sample.npy')
    assert one.shape == two.shape == (5, 16, 16, 3)
    assert np.array_equal(one, two)


# ----- the driver: run by torchrun, one process per rank ---------------------------------------

def _driver(jobs_path):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import train
    with open(jobs_path) as f:
        spec = json.load(f)
    out_dir, rank = spec['out'], int(os.environ['RANK'])
    os.makedirs(out_dir, exist_ok=True)
    # One process group for all jobs: train_ddpm and sample.py use a group that is
    # already running and leave it running.
    import torch.distributed as dist
    dist.init_process_group('gloo')
    try:
        _run_jobs(spec['jobs'], out_dir, rank, train)
    finally:
        dist.destroy_process_group()


def _run_jobs(jobs, out_dir, rank, train):
    import training.loop as train_util
    for job in jobs:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in job['kwargs'].items()}
        if rank != 0:
            kw.update({key: None for key in job.get('rank0_only', ())})
        if job['kind'] == 'train':
            captured, real = {}, train_util.ema_update

            def spy(ema_params, params, decay):  # keep a handle on this rank's EMA tensors
                captured['ema'] = ema_params
                real(ema_params, params, decay)
            train_util.ema_update = spy
            try:
                model = train.train_ddpm(**kw)
                result = {'step': model.train_stats['step'], 'model': digest(model.parameters()),
                          'ema': digest(captured['ema'])}
            except ValueError as e:
                result = {'error': str(e)}
            finally:
                train_util.ema_update = real
            with open(os.path.join(out_dir, f'{job["name"]}.rank{rank}.json'), 'w') as f:
                json.dump(result, f)
        elif job['kind'] == 'sample':
            import numpy as np
            import sampling.generate as generation
            from sampling.options import SampleOptions
            kw.update(options=SampleOptions(**kw['options']), run=generation.SampleRun(**kw['run']))
            images = generation.sample_checkpoint(**kw)
            if rank == 0:
                np.save(os.path.join(out_dir, f'{job["name"]}.npy'), images)


if __name__ == '__main__':
    _driver(sys.argv[1])
