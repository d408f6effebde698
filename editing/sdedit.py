"""Image-to-image with SDEdit (Meng et al. 2021, arXiv:2108.01073).

A guide image (a sketch, a photo of another domain, a crude edit) is noised to x_t ~ q(x_t | guide)
at t = strength * T and the reverse process maps it back to the data: small strengths keep the
guide's detail, strength 1 starts from (almost) pure noise and keeps only its colours' faint trace.
"""

import torch

from editing.reverse import denoise_from, encode, strength_step
from sampling.options import SampleOptions


@torch.inference_mode()
def sdedit(model, guide, strength, generator=None, labels=None, options=SampleOptions(), progress=False):
    """Images [B, C, H, W] in [-1, 1] from guides [B, C, H, W] in [-1, 1] at `strength` in (0, 1].

    The noise of x_t is drawn from `generator` first, then the reverse walk's; so strength 1 is
    `model.sample` started from that x_T. options (SampleOptions), progress: see editing.reverse.denoise_from.
    """
    t = strength_step(model, strength)
    return denoise_from(model, encode(model, guide, t, generator), t, generator, labels, options, progress)
