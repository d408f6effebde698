"""Samples that share a latent x_t (Ho et al. 2020, section 4.3 and Fig. 7).

Each image is encoded once per t, x_t ~ q(x_t | x_0), and k reverse runs start from that one x_t:
what they have in common is what x_t still holds of the image. The paper's t: 1000, 750, 500, 250.
"""

import torch

from editing.reverse import code_step, denoise_from, encode
from sampling.options import SampleOptions

FIG7_FRACTIONS = (1.0, 0.75, 0.5, 0.25)   # t / T of the paper's 1000, 750, 500, 250


def fig7_ts(model):
    """The paper's t of Fig. 7 scaled to this model's T."""
    return [max(1, round(f * model.timesteps)) for f in FIG7_FRACTIONS]


@torch.inference_mode()
def shared_latents(model, x_0, ts, k, generator=None, labels=None, options=SampleOptions(), progress=False):
    """For each paper t in `ts`: (x_t [B, C, H, W], samples [B, k, C, H, W]) from that one x_t per image.

    labels: the class of every image of a class-conditional model (B of them, or None).
    options (SampleOptions), progress: see editing.reverse.denoise_from.
    """
    if k < 1:
        raise ValueError(f'need at least one sample per latent, got k={k}')
    for t in ts:
        code_step(model, t)   # every t checked before any work
    b = x_0.shape[0]
    repeated = labels if labels is None else torch.as_tensor(labels).reshape(-1).expand(b).repeat_interleave(k)
    out = []
    for t in ts:
        x_t = encode(model, x_0, t, generator)
        x = denoise_from(model, x_t.repeat_interleave(k, dim=0), t, generator, repeated, options, progress)
        out.append((x_t, x.reshape(b, k, *x.shape[1:])))
    return out
