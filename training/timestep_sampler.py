"""What each training step draws: its t and eps, and (optionally) importance sampling of t.

`step_noise` draws t and eps of a step from (seed, step) alone, through `stream_seed`,
so a resumed run draws exactly what an uninterrupted one would.

Importance sampling of the diffusion step t (Nichol & Dhariwal 2021, arXiv:2102.09672, section 3.3):

For loss='vlb', `ImportanceSampler` draws t with p_t proportional to sqrt(E[L_t^2]) over the last
10 losses at each t, uniformly until every t has 10; the loss is weighted by 1 / (T p_t), so it
stays an unbiased estimate of the bound's sum over t. step_noise asks it for t.
"""

import hashlib

import torch
import torch.distributed as torch_dist

HISTORY = 10          # losses remembered per t (the paper's value)
UNIFORM_MIX = 0.001   # share of uniform probability mixed in, as the paper's code does: no t is never drawn


def stream_seed(stream, seed, step, rank=0):
    """A 63-bit seed for one random stream ('noise', 'dropout') at (seed, step, rank).

    Hashing the stream's name with its coordinates keeps streams apart: no
    (step, rank) of one stream can land on another's seed, as sums of scaled
    integers can (seed * a + step * b + rank meets seed * a + step' at step' = b * step + rank).
    """
    digest = hashlib.sha256(f'{stream}/{seed}/{step}/{rank}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1


def step_noise(generator, seed, step, global_batch, shape, timesteps, t_sampler=None):
    """(t, eps, weights) for every image of the global batch at this step, drawn from (seed, step) alone.

    `generator` lives on the training device, so on a GPU the noise is drawn there
    (no host work or copy in the step); re-seeding it is cheap and needs no sync.
    t is uniform (Algorithm 1) and weights None, unless a warmed-up ImportanceSampler draws t.
    """
    generator.manual_seed(stream_seed('noise', seed, step))
    weights = None
    if t_sampler is not None and t_sampler.warmed_up():
        t, weights = t_sampler.sample(global_batch, generator)
    else:
        t = torch.randint(0, timesteps, (global_batch,), generator=generator, device=generator.device)
    eps = torch.randn((global_batch, *shape), generator=generator, device=generator.device)
    return t, eps, weights


class ImportanceSampler:
    """p_t proportional to sqrt(E[L_t^2]) over each t's last HISTORY losses (iDDPM section 3.3)."""

    def __init__(self, timesteps, history=HISTORY):
        self.timesteps = timesteps
        self.losses = torch.zeros(timesteps, history, dtype=torch.float64)   # oldest first
        self.counts = torch.zeros(timesteps, dtype=torch.long)

    def warmed_up(self):
        return bool((self.counts == self.losses.shape[1]).all())

    def probabilities(self):
        """p_t, float64 [T]: uniform until every t holds HISTORY losses."""
        uniform = torch.full((self.timesteps,), 1.0 / self.timesteps, dtype=torch.float64)
        if not self.warmed_up():
            return uniform
        p = self.losses.pow(2).mean(1).sqrt()
        return (1 - UNIFORM_MIX) * p / p.sum() + UNIFORM_MIX * uniform

    def sample(self, n, generator):
        """n steps t ~ p_t and their weights 1 / (T p_t), on the generator's device."""
        p = self.probabilities().to(generator.device)
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1.0 / (self.timesteps * p[t])).float()

    def update(self, t, losses, world_size=1):
        """Record each image's loss at its t, in global batch order (the newest HISTORY per t are kept).

        Under DDP `losses` is this rank's share (rank r holds the r-th slice of the global batch);
        every rank gathers all of them, so every rank keeps the same history.
        """
        if world_size > 1:
            gathered = [torch.empty_like(losses) for _ in range(world_size)]
            torch_dist.all_gather(gathered, losses)
            losses = torch.cat(gathered)
        history = self.losses.shape[1]
        for step, loss in zip(t.tolist(), losses.double().cpu().tolist()):
            if self.counts[step] == history:
                self.losses[step] = torch.cat([self.losses[step, 1:], self.losses.new_tensor([loss])])
            else:
                self.losses[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self):
        return {'losses': self.losses.clone(), 'counts': self.counts.clone()}

    def load_state_dict(self, state):
        if state['losses'].shape != self.losses.shape:
            raise ValueError(f'importance-sampler state is for {list(state["losses"].shape)} (T, history), '
                             f'this run has {list(self.losses.shape)}')
        self.losses, self.counts = state['losses'].double().clone(), state['counts'].long().clone()
