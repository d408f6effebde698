"""paper.py fig6 / fig7 / fig8: pictures from a checkpoint alone, deterministic, one line for bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

import paper
from diffusion import create_cifar10_ddpm
from sampling.generate import batch_seed, trajectory
from weights.checkpoint import save_checkpoint

from conftest import make_image_folder

T, SIZE = 10, 8
UNET = dict(channels=(16, 32), num_res_blocks=1, attn_resolutions=(), image_size=SIZE, time_emb_dim=32)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_cifar10_ddpm(timesteps=T, **UNET)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp('ckpt') / 'ckpt.pth'
    config = {'arch': 'base', 'timesteps': T, **{k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()}}
    save_checkpoint({'model_state_dict': model.state_dict(), 'ema_state_dict': None, 'config': config}, path)
    return str(path)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'), 4, size=SIZE)


def run(args, capsys):
    code = paper.main([*args, '--device', 'cpu', '--quiet'])
    return code, capsys.readouterr()


def grid_shape(path):
    return np.asarray(Image.open(path)).shape[:2]


def tiles(n_rows, n_cols):
    return (2 + n_rows * (SIZE + 2), 2 + n_cols * (SIZE + 2))


def test_fig6_columns_are_the_predicted_x0_and_end_with_the_sample(ckpt):
    from sampling.generate import load_model
    model, _ = load_model(ckpt, device='cpu')
    ts, pred = trajectory(model, 2, seed=4, columns=4, progress=False, amp='fp32', predicted_x0=True)
    _, chain = trajectory(model, 2, seed=4, columns=4, progress=False, amp='fp32')
    assert ts[0] == T and ts[-1] == 0
    assert np.array_equal(pred[:, -1], chain[:, -1])   # the last column: the sample itself
    # the first: x_0 predicted from x_T, Eq. (4) inverted: (x_T - sqrt(1 - a-bar_T) eps) / sqrt(a-bar_T), clipped
    # seeds per image: image i's x_T is the first draw of its own generator, seeded from (seed, i)
    x_T = torch.stack([torch.randn((3, SIZE, SIZE), generator=torch.Generator().manual_seed(batch_seed(4, i)))
                       for i in range(2)])
    abar = model.alphas_cumprod[-1]
    with torch.no_grad():
        eps = model.network(x_T, torch.full((2,), T - 1))
    x_0 = ((x_T - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    expected = ((x_0 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(pred[:, 0].astype(int) - expected).max() <= 1


def test_every_figure_runs_from_the_checkpoint_and_repeats_with_its_seed(ckpt, images, tmp_path, capsys):
    jobs = {'fig6': (['--num_samples', '2', '--columns', '5'], tiles(2, 5)),
            'fig7': (['--images', images, '--num_images', '2', '--t', '10', '5', '--k', '3'], tiles(4, 5)),
            'fig8': (['--images', images, '--num_pairs', '2', '--lambdas', '0', '0.5', '1'], tiles(2, 5)),
            'noise': (['--noise', '--num_pairs', '1', '--lambdas', '0', '0.5', '1', '--sampler', 'ddim',
                       '--steps', '5'], tiles(1, 3))}
    for name, (args, shape) in jobs.items():
        command = 'fig8' if name == 'noise' else name
        for copy in ('a', 'b'):
            code, out = run([command, '--checkpoint', ckpt, '--out', str(tmp_path / f'{name}{copy}.png'), *args],
                            capsys)
            assert code == 0 and out.out.startswith('wrote '), out.err
        assert grid_shape(tmp_path / f'{name}a.png') == shape, name
        assert (tmp_path / f'{name}a.png').read_bytes() == (tmp_path / f'{name}b.png').read_bytes(), name


@pytest.mark.parametrize('args, message', [
    (['fig7', '--images', 'IMAGES', '--t', '11'], r'1\.\.T=10'),
    (['fig8', '--images', 'IMAGES', '--t', '0'], r'1\.\.T=10'),
    (['fig8', '--images', 'TEXT'], 'is not an image file'),
    (['fig8'], 'give --images'),
    (['fig8', '--images', 'IMAGES', '--lambdas', '2'], r'lambdas must be numbers in \[0, 1\]'),
    (['fig7', '--images', 'IMAGES', '--k', '0'], 'at least one sample'),
])
def test_bad_input_is_one_line_and_writes_nothing(ckpt, images, tmp_path, capsys, args, message):
    import re
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image')
    out = tmp_path / 'out.png'
    argv = [{'IMAGES': images, 'TEXT': str(text)}.get(a, a) for a in args] + ['--checkpoint', ckpt, '--out', str(out)]
    code, captured = run(argv, capsys)
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), lines
    assert not out.exists()


def test_unknown_subcommand_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        paper.main(['fig9'])
    assert e.value.code == 2 and 'invalid choice' in capsys.readouterr().err
