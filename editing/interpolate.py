"""Interpolation (Ho et al. 2020, section 4.3 and Fig. 8), and between two seeds' noise.

Through x_t: encode both images, x_t, x'_t ~ q(x_t | x_0), mix x-bar_t = (1 - lambda) x_t + lambda x'_t
and decode x-bar_t with the reverse process, the reverse noise the same for every lambda, so lambda
alone changes the picture; lambda = 0 and 1 are the two reconstructions. Between two seeds' x_T:
x_T and x'_T are mixed spherically (slerp), which keeps the mix's norm that of N(0, I) noise (a
straight mix would shrink it by up to sqrt(2) at lambda = 1/2).
"""

import torch

from editing.reverse import denoise_from, encode
from sampling.guidance import check_labels
from sampling.noise import draw_noise
from sampling.options import SampleOptions

FIG8_LAMBDAS = tuple(i / 10 for i in range(11))   # 0, 0.1, ..., 1
FIG8_T = 500   # the paper's t for CIFAR-10 / CelebA-HQ interpolation (of T = 1000)


def check_lambdas(lambdas):
    lambdas = [float(v) for v in lambdas]
    if not lambdas or not all(0 <= v <= 1 for v in lambdas):
        raise ValueError(f'lambdas must be numbers in [0, 1], got {lambdas}')
    return lambdas


@torch.inference_mode()
def interpolate(model, x_a, x_b, t=FIG8_T, lambdas=FIG8_LAMBDAS, generator=None, labels=None,
                options=SampleOptions(), progress=False):
    """[len(lambdas), B, C, H, W]: the pairs x_a[i], x_b[i] mixed through x_t at the paper's t.

    The encoding noise of x_a, then x_b, comes first from `generator`; every lambda then decodes from the
    same generator state. options (SampleOptions), progress: see editing.reverse.denoise_from.
    """
    lambdas = check_lambdas(lambdas)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x_t_a, x_t_b = encode(model, x_a, t, generator), encode(model, x_b, t, generator)
    return decode_each(lambdas, lambda v: denoise_from(model, (1 - v) * x_t_a + v * x_t_b, t, generator,
                                                       labels, options, progress), generator)


def slerp(z_a, z_b, v):
    """Spherical interpolation per image: sin((1-v) theta)/sin theta z_a + sin(v theta)/sin theta z_b,
    theta the angle between z_a and z_b (a straight mix where they are parallel)."""
    a, b = z_a.flatten(1), z_b.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).reshape(-1, *[1] * (z_a.dim() - 1))
    sin = torch.sin(theta)
    curved = sin.abs() > 1e-6
    sin = sin.where(curved, torch.ones_like(sin))
    wa = torch.where(curved, torch.sin((1 - v) * theta) / sin, torch.full_like(sin, 1 - v))
    wb = torch.where(curved, torch.sin(v * theta) / sin, torch.full_like(sin, v))
    return wa * z_a + wb * z_b


@torch.inference_mode()
def interpolate_noise(model, seed_a, seed_b, n=1, lambdas=FIG8_LAMBDAS, device='cpu', labels=None,
                      options=SampleOptions(), progress=False):
    """[len(lambdas), n, C, H, W]: samples from slerp(x_T of seed_a, x_T of seed_b, lambda).

    x_T of a seed is the first draw of torch.Generator().manual_seed(seed); the reverse noise continues
    seed_a's generator, the same for every lambda, so lambda = 0 is model.sample from seed_a.
    options: the sampler's (SampleOptions).
    """
    lambdas = check_lambdas(lambdas)
    gen_a, gen_b = torch.Generator().manual_seed(seed_a), torch.Generator().manual_seed(seed_b)
    shape = (n, *model.image_shape)
    z_a, z_b = draw_noise(shape, gen_a, device), draw_noise(shape, gen_b, device)
    resolved = options.resolve(model)
    labels = check_labels(labels, n, model.num_classes, device)

    def sample_from(v):
        for _, x, _ in model.run_sampler(resolved, n, device, gen_a, progress, x_T=slerp(z_a, z_b, v), labels=labels):
            pass
        return x
    return decode_each(lambdas, sample_from, gen_a)


def decode_each(lambdas, decode, generator):
    """decode(lambda) for each lambda, each from the generator's state now (fixed noise across lambda)."""
    state, out = generator.get_state(), []
    for v in lambdas:
        generator.set_state(state)
        out.append(decode(v))
    return torch.stack(out)
