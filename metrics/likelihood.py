"""The Gaussian terms of the variational bound (Ho et al. 2020, Eqs. (5) and (13)): the KL divergence
between two diagonal Gaussians, and the discretised Gaussian likelihood of 8-bit pixels. Plain tensor
functions, used by DDPM.vb_term_bpd, DDPM.prior_bpd and the Improved-DDPM losses.
"""

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The standard normal CDF through the tanh approximation the paper's code uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of 8-bit data x in [-1, 1] under N(mean, exp(log_scale)^2), Eq. (13).

    Each pixel value owns a bin of width 2/255 centred on it; the edge bins
    extend to -inf and +inf, so the 256 probabilities sum to one.
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
