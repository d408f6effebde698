"""DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095), Algorithm 2: a second-order multistep solver of the
probability-flow ODE in its data-prediction form."""

import math

import torch

from sampling.timesteps import half_log_snr


def dpm_solver_coefficients(model, seq):
    """The schedule of DPM-Solver++(2M) along `seq` (T-1 down to 0) as Python floats, one (c_x, c_d, w) per step.

    Step i goes from s = seq[i] to t = seq[i + 1], or to a-bar = 1 (alpha = 1, sigma = 0, lambda = +inf)
    after the last: x_t = c_x x_s + c_d D with c_x = sigma_t / sigma_s, c_d = -alpha_t (e^{-h} - 1),
    h = lambda_t - lambda_s, and D = (1 + w) x_0_pred(s) - w x_0_pred(previous s), w = 1 / (2 r),
    r = h_previous / h. w = 0 (first order, D = x_0_pred) at the first step, which has no previous
    prediction, and at the last, where h is infinite; there the step is DDIM's last step, x_0 = x_0_pred.
    """
    lam = half_log_snr(model)[seq].tolist() + [math.inf]
    alpha = model.sqrt_alphas_cumprod.double().cpu()[seq].tolist() + [1.0]
    sigma = model.sqrt_one_minus_alphas_cumprod.double().cpu()[seq].tolist() + [0.0]
    h = [lam[i + 1] - lam[i] for i in range(len(seq))]
    coefs = []
    for i in range(len(seq)):
        last = i == len(seq) - 1
        c_d = 1.0 if last else -alpha[i + 1] * math.expm1(-h[i])
        w = 0.0 if i == 0 or last else h[i] / (2 * h[i - 1])
        coefs.append((sigma[i + 1] / sigma[i], c_d, w))
    return coefs


def sample_dpm_solver(model, x_T, timesteps, cond, generator, clip_denoised):
    """Algorithm 2: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D from s = timesteps[i] to
    t = timesteps[i + 1], with D = (1 + 1/(2r)) x_theta(x_s, s) - 1/(2r) x_theta(x_{s'}, s') from the previous
    step s' (dpm_solver_coefficients). x_theta is the data prediction x_0_pred, clipped to [-1, 1] only if
    asked. Deterministic: `generator` is unused. Yields (s, x_t, x_0_pred).
    """
    coefs = dpm_solver_coefficients(model, timesteps)   # before the loop: no device syncs in it
    x, x_0_prev = x_T, None
    for step, (c_x, c_d, w) in zip(timesteps, coefs):
        s = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        eps = model.predict_eps(x, s, **(cond or {}))
        x_0_pred = model.predict_x0_from_eps(x, s, eps)
        if clip_denoised:
            x_0_pred = x_0_pred.clamp(-1.0, 1.0)
        d = (1.0 + w) * x_0_pred - w * x_0_prev if w else x_0_pred
        x, x_0_prev = c_x * x + c_d * d, x_0_pred
        yield step, x, x_0_pred
