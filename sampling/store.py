"""Resumable sampling runs: finished batches on disk, and the options that made them.

A long run (50,000 FID samples) writes every finished batch at once to a parts
folder (`PartialRun`) whose meta.json records everything the images depend on
(`run_meta`); a rerun with the same options continues where it stopped, a rerun
with other options is refused (`meta_difference`), and a finished .npz with the
same options is reused (`reuse_complete_npz`).
"""

import os
import shutil

from data.image_folder import read_npz_images, save_npz
from runtime import read_json, write_json
from sampling.options import SAMPLE_OPTION_NAMES, resolve_clip, resolve_spacing

META_FORMAT = 2   # 2: seeds per image (1: per batch, whose images depend on the batch size)


class PartialRun:
    """The folder of finished batches of one interrupted-or-running sampling run.

    meta.json holds the options the images depend on; images_FIRST_COUNT.npz one batch each, named by the
    images it holds (seeds are per image, so a part is valid whatever the batch size of the run continuing it).
    """

    def __init__(self, folder):
        self.folder = folder

    def path(self, first, count):
        return os.path.join(self.folder, f'images_{first:06d}_{count:06d}.npz')

    def check_or_start(self, meta):
        """Create the folder for `meta`, or check that an existing one was made with the same options."""
        meta_path = os.path.join(self.folder, 'meta.json')
        if os.path.exists(meta_path):
            old = read_json(meta_path)
            if isinstance(old, dict) and old.get('format', 1) < META_FORMAT:
                raise ValueError(f'{self.folder} holds parts of a run seeded per batch (made before seeds were per '
                                 f'image), which cannot be continued; delete that folder to sample afresh')
            diff = meta_difference(old, meta)
            if diff:
                raise ValueError(f'{self.folder} holds a partial run made with other options ({diff}); rerun with '
                                 f'the same options to continue it, or delete that folder (or choose another '
                                 f'--npz / --out_dir) to start afresh')
        else:
            os.makedirs(self.folder, exist_ok=True)
            write_json(meta_path, meta)

    def load(self, first, count):
        """The finished batch of images first .. first + count - 1 if it is there, else None."""
        path = self.path(first, count)
        if not os.path.exists(path):
            return None
        try:
            images = read_npz_images(path)
        except Exception:  # an unreadable part is simply sampled again
            return None
        return images if images.shape[0] == count else None

    def save(self, first, images):
        save_npz(self.path(first, len(images)), images)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


# The options that change the images: the sampler's (every SampleOptions field) and the run's; a partial run is
# continued only when all of them match. Not the batch size: seeds are per image. 'format' keeps runs seeded
# per batch (format 1) apart.
IDENTITY_KEYS = ('format', 'checkpoint_sha256', 'ema', *SAMPLE_OPTION_NAMES, 'seed', 'amp', 'image_shape',
                 'class_label')
# Keys recorded since there is a choice, with the value older runs had.
LEGACY_META = {'class_label': None, 'guidance_scale': 0.0}


def meta_difference(old, new):
    """'' when `old` and `new` describe the same images, else a short list of what differs."""
    if not isinstance(old, dict):
        return 'its meta.json is unreadable'
    diffs = []
    if 'spacing' not in old:   # recorded since there is a choice: older runs were uniform DDIM or DDPM
        old = {**old, 'spacing': resolve_spacing(old['sampler'], None) if old.get('sampler') else None}
    if 'clip_denoised' not in old:   # likewise: older runs clipped as their sampler does by default
        old = {**old, 'clip_denoised': resolve_clip(old['sampler'], None) if old.get('sampler') else None}
    old = {'format': 1, **LEGACY_META, **old}
    for key in IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            if key == 'checkpoint_sha256':
                diffs.append(f'checkpoint contents differ (was step {old.get("checkpoint_step")} of '
                             f'{old.get("checkpoint")})')
            else:
                diffs.append(f'{key}: {old.get(key)!r} then, {new.get(key)!r} now')
    return '; '.join(diffs)


def run_meta(model, info, options, run):
    """What the images depend on: the resolved SampleOptions `options` (as asdict), the SampleRun `run`
    (its class_label resolved: a class index, 'all' or None) and the checkpoint (`info` of load_model)."""
    return {
        'format': META_FORMAT,
        'checkpoint': info.get('checkpoint'),
        'checkpoint_sha256': info.get('sha256'),
        'checkpoint_step': info.get('step'),
        'ema': info.get('ema'),
        **options.asdict(),
        'seed': int(run.seed),
        'batch_size': int(run.batch_size),
        'amp': run.amp,
        'image_shape': list(model.image_shape),
        'class_label': run.class_label,
    }


def reuse_complete_npz(npz, meta, num_samples):
    """The images of an existing .npz made with the same options and at least `num_samples` images, else None."""
    sidecar = f'{npz}.json'
    old = read_json(sidecar) if os.path.exists(npz) else None
    if old is None:
        return None
    if meta_difference(old, meta) or old.get('num_samples', 0) < num_samples:
        return None
    # Images are seeded by index, so the first num_samples of a larger run are this run's images.
    return read_npz_images(npz)[:num_samples]
