"""paper.py table2 and fig5 (training/ablations.py, metrics/rate_distortion.py): the rate sums, the
distortion scale, divergence reporting and the command lines' one-line errors."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import paper
from conftest import TINY_TRAIN, make_image_folder
from diffusion import DDPM
from metrics.rate_distortion import cumulative_rate, rate_distortion, step_grid
from training.ablations import (ROW_NAMES, TABLE2_ROWS, format_table2, row_key, run_table2, select_rows,
                                table2_subcommand)


def test_cumulative_rate_sums_the_kl_terms_above_each_step():
    prior, kl = 0.5, torch.tensor([9.0, 1.0, 2.0, 4.0], dtype=torch.float64)   # kl[0]: the decoder, not sent
    rate = cumulative_rate(torch.arange(4), kl, prior, 4)
    np.testing.assert_allclose(rate, [prior + 7.0, prior + 6.0, prior + 4.0, prior])
    # stride 2 over T = 5: grid 0, 2, 4; steps 1 and 2 take grid step 2's KL, 3 and 4 grid step 4's
    rate = cumulative_rate(step_grid(5, 2), torch.tensor([9.0, 1.0, 3.0], dtype=torch.float64), prior, 5)
    np.testing.assert_allclose(rate, [prior + 1 + 1 + 3 + 3, prior + 3 + 3, prior])
    assert step_grid(10, 4).tolist() == [0, 4, 8, 9]


class ZeroEps(nn.Module):
    in_channels, image_size = 3, 4

    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


def test_distortion_is_the_rmse_of_x0_pred_on_0_255_and_the_rate_ends_at_prior_plus_kl():
    """eps_pred = 0 makes x_0_pred = x_t / sqrt(a-bar_t) = x_0 + sqrt(1 / a-bar_t - 1) eps: its RMSE on 0-255
    is 127.5 sqrt(1 / a-bar_t - 1) (mid-grey images, so the clip to [-1, 1] never acts)."""
    model = DDPM(ZeroEps(), timesteps=20, image_shape=(3, 4, 4))
    images = np.full((200, 4, 4, 3), 128, dtype=np.uint8)
    result = rate_distortion(model, images, stride=1, batch_size=50, progress=False)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 20))
    expected = 127.5 * np.sqrt(1 / abar - 1)
    np.testing.assert_allclose(result['rmse_0_255'][:3], expected[:3], rtol=0.03)
    assert result['rate_bpd'][0] == pytest.approx(result['prior_bpd'] + result['kl_bpd'][1:].sum(), rel=1e-9)
    assert result['rate_bpd'][-1] == pytest.approx(result['prior_bpd'], rel=1e-9)


def test_table2_rows_are_the_papers_and_a_diverging_row_is_reported():
    assert len(TABLE2_ROWS) == 6 and [p is None for _, _, p in TABLE2_ROWS] == [False, False, True, True, False, False]
    assert select_rows(['eps_L_simple'])[0][0] == 'eps, L_simple'
    with pytest.raises(ValueError, match='unknown Table 2 row'):
        select_rows(['eps_l2'])

    class Stub(nn.Module):
        train_stats = {'step': 3, 'nan_skipped': 0}

    def train_fn(**kw):
        if kw['prediction'] == 'mu':
            raise FloatingPointError('training stopped: 10 non-finite losses in a row')
        return Stub()
    results = run_table2(train_fn, lambda m: ({'bpd': 4.5, 'bpd_stderr': 0.1, 'num_images': 8}, 99.0, True), {},
                         'unused', rows=['mu_MSE', 'eps_L_simple'], say=lambda s: None)
    assert [r['diverged'] for r in results] == [True, False]
    table = format_table2(results, 200)
    assert 'diverged' in table.splitlines()[2] and '4.500' in table and '99.0' in table and 'unstable' in table


def test_table2_and_fig5_command_lines(tmp_path, capsys):
    data = tmp_path / 'img'
    make_image_folder(data / 'train' / 'a', 8)
    make_image_folder(data / 'test' / 'a', 4, seed=1)
    out = tmp_path / 'table2'
    argv = ['table2', '--dataset', 'folder', '--data_dir', str(data), '--steps', '2', '--batch_size', '4',
            '--num_images', '4', '--fid_samples', '0', '--rows', 'eps_L_simple', 'eps_L_fixed_isotropic',
            '--out_dir', str(out), '--device', 'cpu', '--arch', 'tiny']
    from train import train_ddpm
    small = {**{k: TINY_TRAIN[k] for k in ('channels', 'num_res_blocks', 'time_emb_dim')}, 'attn_resolutions': (16,)}
    real = paper.SUBCOMMANDS['table2']
    paper.SUBCOMMANDS['table2'] = table2_subcommand(lambda **kw: train_ddpm(**{**kw, **small, 'timesteps': 20}))
    try:
        assert paper.main(argv) == 0
    finally:
        paper.SUBCOMMANDS['table2'] = real
    record = json.load(open(out / 'table2.json'))
    assert [r['row'] for r in record['results']] == ['eps, L_simple', 'eps, L, fixed isotropic']
    assert all(math.isfinite(r['bpd']) and r['steps'] == 2 for r in record['results'])
    ckpt = out / row_key('eps, L_simple') / 'ddpm_latest.pth'
    fig = tmp_path / 'fig' / 'f5'
    assert paper.main(['fig5', '--checkpoint', str(ckpt), '--dataset', 'folder', '--data_dir', str(data),
                       '--num_images', '4', '--stride', '5', '--out', str(fig), '--device', 'cpu', '--quiet']) == 0
    rows = open(str(fig) + '.csv').read().splitlines()
    assert rows[0] == 't,reverse_steps,rate_bpd,rmse_0_255,kl_bpd' and len(rows) == 1 + 5   # steps 0, 5, 10, 15, 19
    assert os.path.getsize(str(fig) + '.png') > 1000
    capsys.readouterr()
    for bad, named in ((['fig5', '--checkpoint', str(tmp_path / 'nope.pth')], 'not found'),
                       (['fig5', '--checkpoint', str(ckpt), '--stride', '0'], '--stride'),
                       (['table2', '--rows', 'eps_l2', '--out_dir', str(tmp_path / 'x')], 'unknown Table 2 row'),
                       (['table2', '--fid_samples', '10', '--out_dir', str(tmp_path / 'x')], '--fid_weights')):
        assert paper.main(bad) == 2
        err = capsys.readouterr().err
        assert named in err and err.count('\n') == 1
    assert not (tmp_path / 'x').exists()


def test_row_names_are_unique_folder_names():
    assert len({row_key(n) for n in ROW_NAMES}) == len(ROW_NAMES)


def test_fig5_without_matplotlib_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'matplotlib' else find_spec(name, *a))
    ckpt = tmp_path / 'c.pth'
    ckpt.write_bytes(b'not read: the missing plotter is found first')
    out = tmp_path / 'fig' / 'f5'
    assert paper.main(['fig5', '--checkpoint', str(ckpt), '--out', str(out), '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert 'matplotlib' in err and 'bench/requirements.txt' in err and err.count('\n') == 1
    assert not (tmp_path / 'fig').exists()
