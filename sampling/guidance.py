"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): the parts around the network.

The network side is the U-Net's class embedding (model/Blocks.py, `num_classes`, with
a null class at index num_classes) and the guided noise prediction
eps~ = (1 + w) eps(x_t, c) - w eps(x_t, null), computed in DDPM.network_outputs,
the one place every sampler reads eps from. This module holds the rest:

    drop_labels        training: each label replaced by the null class with probability p_uncond
    check_labels       sampling: labels given as one int or n ints, checked against the model
    resolve_class_label / run_labels
                       sample.py: --class_label (index or name) or 'all' -> the class of every image
    cycled_labels / class_grid_order
                       which class each sample of a run gets, and grids with one row per class
"""

import torch

from runtime import closest

ALL_CLASSES = 'all'   # class_label meaning: image i gets class i % num_classes


def drop_labels(generator, seed_value, labels, p_uncond, null_class, global_batch=None, rank=0):
    """Algorithm 1 of Ho & Salimans: each label of this rank's share of the global batch becomes
    `null_class` with probability p_uncond. `generator` is re-seeded with `seed_value` (a stream of its
    own, from (seed, step)) and the coins are drawn for the global batch, so a resumed run, N ranks and
    one process drop the same labels."""
    generator.manual_seed(seed_value)
    n = len(labels)
    coins = torch.rand((global_batch or n,), generator=generator, device=generator.device)[n * rank:n * (rank + 1)]
    return torch.where(coins < p_uncond, torch.full_like(labels, null_class), labels)


def check_labels(labels, n, num_classes, device):
    """`labels` (None, one int, or n ints in 0..num_classes-1) as a LongTensor [n] on `device`, or None;
    a one-line ValueError for labels the model cannot take."""
    if labels is None:
        return None
    if num_classes is None:
        raise ValueError('this model is unconditional (trained without class_cond), so it takes no class '
                         'labels; drop labels / --class_label')
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    labels = labels.expand(n) if labels.numel() == 1 else labels
    if labels.shape[0] != n or not bool(((labels >= 0) & (labels < num_classes)).all()):
        raise ValueError(f'need {n} class labels in 0..{num_classes - 1} (or one for all), got '
                         f'{labels.tolist()[:8]}')
    return labels


def resolve_class_label(num_classes, class_names, class_label, guidance_scale=0.0):
    """The class index of --class_label (an int, a digit string or a class name), ALL_CLASSES, or None;
    a one-line ValueError for a label the checkpoint cannot take."""
    if num_classes is None and guidance_scale and class_label is None:   # adding a class would not help
        raise ValueError(f'this checkpoint is unconditional (trained without --class_cond), so '
                         f'--guidance_scale {guidance_scale:g} does not apply to it; drop it')
    if class_label is None:
        if guidance_scale:
            raise ValueError(f'--guidance_scale {guidance_scale:g} needs a class to guide towards: add '
                             f'--class_label or --classes all')
        return None
    if num_classes is None:
        raise ValueError('this checkpoint is unconditional (trained without --class_cond), so it takes no '
                         '--class_label / --classes; drop them')
    if guidance_scale < 0:
        raise ValueError(f'--guidance_scale must not be negative, got {guidance_scale:g}')
    if class_label == ALL_CLASSES:
        return ALL_CLASSES
    names = list(class_names or [])
    if isinstance(class_label, str) and not class_label.isdigit():
        if class_label not in names:
            raise ValueError(f'unknown class {class_label!r}{closest(class_label, names)}; this checkpoint\'s '
                             f'classes: {names or list(range(num_classes))}')
        return names.index(class_label)
    if not 0 <= int(class_label) < num_classes:
        raise ValueError(f'--class_label must be in 0..{num_classes - 1}, got {class_label}')
    return int(class_label)


def run_labels(class_label, num_samples, num_classes):
    """The class of every image of a run (a LongTensor [N]) for a resolved class_label, or None."""
    if class_label is None:
        return None
    if class_label == ALL_CLASSES:
        return cycled_labels(num_samples, num_classes)
    return torch.full((num_samples,), class_label, dtype=torch.long)


def cycled_labels(n, num_classes):
    """Class i % num_classes for sample i: every class equally often, and the first m labels of a run
    of n are those of a run of m (so a longer run extends a shorter one)."""
    return torch.arange(n) % num_classes


def class_grid_order(labels, num_classes):
    """(indices, nrow) that lay samples out one row per class: the first k = len // num_classes samples
    of each class in class order, k per row (all in one row when there are fewer samples than classes)."""
    labels = torch.as_tensor(labels)
    k = len(labels) // num_classes
    order = torch.argsort(labels, stable=True)
    if k == 0:
        return order, len(labels)
    keep = torch.cat([order[labels[order] == c][:k] for c in range(num_classes)])
    return keep, k
