"""The samplers by name, each with its defaults, and `SampleOptions`: the sampling options as one object.

Every sampler is one function with the same signature, (model, x_T, timesteps, cond, generator,
clip_denoised[, eta]), no defaults (they are the registry's and SampleOptions'), that yields (t, x_t, x_0_pred) after every step; it uses the DDPM only through
its methods (predict_eps, predict_x0_from_eps, p_mean_variance) and schedule buffers. `cond` holds the
class labels and guidance scale of a class-conditional model (None otherwise). This registry is the
one place where sampler names are compared and where each option has its default.
"""

import dataclasses
from dataclasses import dataclass

from sampling.ancestral import sample_ancestral
from sampling.ddim import sample_ddim
from sampling.dpm_solver import sample_dpm_solver
from sampling.timesteps import SPACINGS, timestep_sequence

DEFAULT_DDIM_STEPS = 100   # the DDIM steps of sample.py, evaluate.py, DDPM.sample and the training grids
DEFAULT_DPM_SOLVER_STEPS = 20   # dpm-solver's steps when none are given


@dataclass(frozen=True)
class Sampler:
    function: object        # the sampler: (model, x_T, timesteps, cond, generator, clip_denoised, ...) -> steps
    steps: int = None       # default network evaluations (capped at T); None: all T steps
    spacing: str = None     # default spacing; None: every step, or uniform when respaced ('ddpm')
    clip_denoised: bool = True   # x_0_pred clipped to [-1, 1] by default?
    spacings: tuple = ()    # the spacings it accepts
    eta: bool = False       # does it take DDIM's eta?
    deterministic: bool = False   # an ODE solver: eta > 0 is refused
    least_steps: int = None   # below this many steps its images fall apart (README, "Recommendation"): a warning


SAMPLERS = {
    'ddpm': Sampler(sample_ancestral),
    'ddim': Sampler(sample_ddim, DEFAULT_DDIM_STEPS, 'uniform', True, SPACINGS, eta=True),
    'dpm-solver': Sampler(sample_dpm_solver, DEFAULT_DPM_SOLVER_STEPS, 'logsnr', False, SPACINGS, deterministic=True,
                          least_steps=10),
}


def registered(sampler):
    """The registry entry of `sampler`; a one-line ValueError naming the choices for an unknown one."""
    if sampler not in SAMPLERS:
        raise ValueError(f'sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}')
    return SAMPLERS[sampler]


def few_steps_warning(sampler, steps):
    """A one-line warning when `steps` is below the fewest the README recommends for `sampler`, else None."""
    least = registered(sampler).least_steps
    if steps is None or least is None or not 1 <= steps < least:   # (steps < 1 is an error elsewhere)
        return None
    return (f'{sampler} with {steps} step{"s" if steps > 1 else ""} gives poor images; the README recommends '
            f'at least {least} (20 for final samples)')


def resolve_spacing(sampler, spacing, eta=0.0):
    """The spacing `sampler` uses: `spacing`, or its default (None for 'ddpm', which visits every step),
    after a one-line ValueError for a spacing or eta that does not apply to it."""
    spec = registered(sampler)
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f'spacing must be one of {SPACINGS}, got {spacing!r}')
    if spacing is not None and spacing not in spec.spacings:
        raise ValueError(f"the {sampler!r} sampler visits every step (or, respaced, uniform ones), so "
                         f"spacing={spacing!r} does not apply; spacing is for 'ddim' and 'dpm-solver'")
    if eta and spec.deterministic:
        raise ValueError(f"eta={eta:g} is DDIM's noise; {sampler!r} solves the deterministic ODE (use eta=0)")
    return spacing or spec.spacing


def resolve_clip(sampler, clip_denoised):
    """Whether `sampler` clips its predicted x_0 to [-1, 1]: `clip_denoised`, or None for its default."""
    return registered(sampler).clip_denoised if clip_denoised is None else bool(clip_denoised)


def resolve_steps(model, sampler, steps):
    """The number of network evaluations: `steps`, or the sampler's default (capped at T; all T for 'ddpm',
    whose fewer steps walk a respaced chain, iDDPM section 4)."""
    default = registered(sampler).steps
    if steps is None:
        return model.timesteps if default is None else min(default, model.timesteps)
    if not 1 <= steps <= model.timesteps:
        raise ValueError(f'steps must be between 1 and the model\'s timesteps={model.timesteps}, got {steps}')
    return int(steps)


@dataclass(frozen=True)
class SampleOptions:
    """How to sample; `resolve(model)` fills in the sampler's defaults and validates, once."""
    sampler: str = 'ddpm'
    steps: int = None
    spacing: str = None
    eta: float = 0.0
    clip_denoised: bool = None
    guidance_scale: float = 0.0

    def resolve(self, model):
        """These options with every None replaced by its default for `model`; ValueError (one line) if invalid.
        Resolved options resolve to themselves."""
        spacing = resolve_spacing(self.sampler, self.spacing, self.eta)
        return dataclasses.replace(self, steps=resolve_steps(model, self.sampler, self.steps), spacing=spacing,
                                   eta=float(self.eta), clip_denoised=resolve_clip(self.sampler, self.clip_denoised),
                                   guidance_scale=float(self.guidance_scale))

    def asdict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args):
        """The options of a command line's flags (an argparse namespace, the flags named as the fields);
        a flag the command lacks keeps its default."""
        return cls(**{f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls)})


DEFAULTS = SampleOptions()   # the one declaration of each option's default: CLIs and DDPM.sample read it here
SAMPLE_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SampleOptions))


def is_ancestral(sampler):
    """Does `sampler` walk the ancestral chain p_theta(x_{t-1} | x_t) (Algorithm 2), as RePaint needs?"""
    return registered(sampler).function is sample_ancestral


def fast_steps(sampler, steps):
    """A training option's `steps` for `sampler`: kept for a sampler with a default step count, None (all T,
    the paper's chain) for one that walks every step by default; sample_steps / fid_steps are for the fast ones."""
    spec = SAMPLERS.get(sampler)   # (an unknown one: an error where the options are validated)
    return None if spec is not None and spec.steps is None else steps


def timesteps_of(model, options, start=None):
    """The steps resolved `options` visit, T-1 down to 0, as a list. start: a code step where the walk begins
    instead (x_t already holds that step's state: SDEdit, shared latents), then the options' steps below it."""
    seq = timestep_sequence(model, options.steps, options.spacing or 'uniform').tolist()
    if start is None:
        return seq
    if isinstance(start, bool) or int(start) != start or not 0 <= start < model.timesteps:
        raise ValueError(f'start must be a code step in 0..{model.timesteps - 1}, got {start}')
    return [int(start)] + [step for step in seq if step < start]


def run_sampler(model, options, x_T, cond=None, generator=None, timesteps=None):
    """Run the resolved `options`' sampler from x_T; yields (t, x_t, x_0_pred) after every step.
    timesteps: the steps to visit (default: timesteps_of(model, options)); x_T is the state at the first."""
    spec = registered(options.sampler)
    extra = {'eta': options.eta} if spec.eta else {}
    timesteps = timesteps_of(model, options) if timesteps is None else timesteps
    return spec.function(model, x_T, timesteps, cond, generator, clip_denoised=options.clip_denoised, **extra)
