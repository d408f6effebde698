"""Bits/dim: the variational bound, Eq. (5) of Ho et al. 2020, of real images under a model.

`bits_per_dim` adds L_T, the KL terms L_{t-1} and the decoder L_0 (DDPM.prior_bpd and
DDPM.vb_term_bpd) per image, exactly (all T terms) or as an unbiased estimate over sampled t.
"""

import math

import numpy as np
import torch

from data.process_cifar import to_model_range
from metrics.fid import EvalError
from sampling.generate import batch_seed


@torch.inference_mode()
def bits_per_dim(model, images, mode='exact', t_samples=1, batch_size=100, device='cpu', seed=0, progress=True,
                 clip_denoised=True):
    """NLL upper bound in bits/dim of uint8 [N, H, W, C] images by the variational bound, Eq. (5).

    mode 'exact': per image, L_T + sum over all T terms (the T-1 KL terms and
        the decoder L_0), each at one x_t ~ q(x_t | x_0).
    mode 'estimate': per image, L_T + L_0 + (T-1) * the mean of `t_samples`
        KL terms at t uniform over the T-1 KL steps: unbiased for the same bound.
    clip_denoised: p_theta's mean from the x_0 prediction clipped to [-1, 1], as the
        paper's code computes the published 3.70-3.75 (see DDPM.vb_term_bpd).
    Returns mean and standard error over images (they include the Monte Carlo
    noise of x_t and of t), and the mean prior / KL / decoder parts. The network
    runs in fp32: the small-t KL terms are differences of nearly equal numbers.
    """
    if mode not in ('exact', 'estimate'):
        raise EvalError(f"bpd mode must be 'exact' or 'estimate', got {mode!r}")
    if t_samples < 1:
        raise EvalError(f't_samples must be at least 1, got {t_samples}')
    if tuple(images.shape[1:]) != (model.image_shape[1], model.image_shape[2], model.image_shape[0]):
        raise EvalError(f'images are {list(images.shape[1:])} (H, W, C) but the model makes '
                        f'{list(model.image_shape)} (C, H, W)')
    model.to(device).eval()
    T = model.timesteps
    passes = T if mode == 'exact' else 1 + (t_samples if T > 1 else 0)
    starts = list(range(0, len(images), batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(starts) * passes, desc=f'bits/dim ({mode})', unit='pass', leave=False)
    totals, priors, kls, decoders, term_sums = [], [], [], [], torch.zeros(T, dtype=torch.float64)
    tick = bar.update if bar is not None else (lambda k: None)
    for b, start in enumerate(starts):
        x_0 = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        x_0 = to_model_range(x_0).to(device)
        generator = torch.Generator().manual_seed(batch_seed(seed, b))
        prior, kl, decoder = image_terms(model, x_0, generator, mode, t_samples, clip_denoised, term_sums, tick)
        totals.append(prior + kl + decoder)
        priors.append(prior)
        kls.append(kl)
        decoders.append(decoder)
    if bar is not None:
        bar.close()
    total = torch.cat(totals).numpy()
    count = len(total)
    result = {
        'bpd': float(total.mean()),
        'bpd_stderr': float(total.std(ddof=1) / math.sqrt(count)) if count > 1 else float('nan'),
        'prior_bpd': float(torch.cat(priors).mean()),
        'kl_terms_bpd': float(torch.cat(kls).mean()),
        'decoder_bpd': float(torch.cat(decoders).mean()),
        'num_images': count,
        'mode': mode,
        'timesteps': T,
        'clip_denoised': bool(clip_denoised),
    }
    if mode == 'exact':
        result['terms_bpd'] = (term_sums / count).tolist()   # mean L_{t-1} at code t = 0..T-1 (t = 0: decoder)
    else:
        result['t_samples'] = t_samples
    return result


def image_terms(model, x_0, generator, mode, t_samples, clip_denoised, term_sums, tick):
    """(L_T, sum of the KL terms, L_0) in bits/dim per image of one batch; see bits_per_dim.

    Every x_t draws its noise from `generator`, in a fixed order (the decoder, then the KL steps),
    so a batch's value depends only on its seed. Exact mode adds each step's sum into term_sums.
    """
    n, device, T = x_0.shape[0], x_0.device, model.timesteps

    def term(t):
        noise = torch.randn(x_0.shape, generator=generator).to(device)
        return model.vb_term_bpd(x_0, model.q_sample(x_0, t, noise), t, clip_denoised).double().cpu()

    prior = model.prior_bpd(x_0).double().cpu()
    decoder = term(torch.zeros(n, dtype=torch.long, device=device))
    tick(1)
    kl = torch.zeros(n, dtype=torch.float64)
    if mode == 'exact':
        term_sums[0] += decoder.sum()
        for step in range(1, T):
            value = term(torch.full((n,), step, dtype=torch.long, device=device))
            kl += value
            term_sums[step] += value.sum()
            tick(1)
        return prior, kl, decoder
    for _ in range(t_samples if T > 1 else 0):
        kl += term(torch.randint(1, T, (n,), generator=generator).to(device))
        tick(1)
    return prior, kl * (T - 1) / t_samples, decoder
