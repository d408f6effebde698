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
from sampling.samplers import CLIPS_BY_DEFAULT

META_FORMAT = 1


class PartialRun:
    """The folder of finished batches of one interrupted-or-running sampling run.

    meta.json holds the options the images depend on; batch_NNNNNN.npz one batch each.
    """

    def __init__(self, folder):
        self.folder = folder

    def path(self, index):
        return os.path.join(self.folder, f'batch_{index:06d}.npz')

    def check_or_start(self, meta):
        """Create the folder for `meta`, or check that an existing one was made with the same options."""
        meta_path = os.path.join(self.folder, 'meta.json')
        if os.path.exists(meta_path):
            diff = meta_difference(read_json(meta_path), meta)
            if diff:
                raise ValueError(f'{self.folder} holds a partial run made with other options ({diff}); rerun with '
                                 f'the same options to continue it, or delete that folder (or choose another '
                                 f'--npz / --out_dir) to start afresh')
        else:
            os.makedirs(self.folder, exist_ok=True)
            write_json(meta_path, meta)

    def load(self, index, count):
        """The finished batch `index` if it is there and holds `count` images, else None."""
        path = self.path(index)
        if not os.path.exists(path):
            return None
        try:
            images = read_npz_images(path)
        except Exception:  # an unreadable part is simply sampled again
            return None
        return images if images.shape[0] == count else None

    def save(self, index, images):
        save_npz(self.path(index), images)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


# The options that change the images; a partial run is continued only when all of them match.
IDENTITY_KEYS = ('checkpoint_sha256', 'ema', 'sampler', 'steps', 'spacing', 'clip_denoised', 'eta', 'seed',
                 'batch_size', 'amp', 'image_shape', 'class_label', 'guidance_scale')
# Keys recorded since there is a choice, with the value older runs had.
LEGACY_META = {'class_label': None, 'guidance_scale': 0.0}


def meta_difference(old, new):
    """'' when `old` and `new` describe the same images, else a short list of what differs."""
    if not isinstance(old, dict):
        return 'its meta.json is unreadable'
    diffs = []
    if 'spacing' not in old:   # recorded since there is a choice: older runs were uniform DDIM or DDPM
        old = {**old, 'spacing': 'uniform' if old.get('sampler') == 'ddim' else None}
    if 'clip_denoised' not in old:   # likewise: older runs clipped as their sampler does by default
        old = {**old, 'clip_denoised': CLIPS_BY_DEFAULT.get(old.get('sampler'))}
    old = {**LEGACY_META, **old}
    for key in IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            if key == 'checkpoint_sha256':
                diffs.append(f'checkpoint contents differ (was step {old.get("checkpoint_step")} of '
                             f'{old.get("checkpoint")})')
            else:
                diffs.append(f'{key}: {old.get(key)!r} then, {new.get(key)!r} now')
    return '; '.join(diffs)


def run_meta(model, info, sampler, steps, eta, seed, batch_size, amp, spacing=None, class_label=None,
             guidance_scale=0.0, clip_denoised=None):
    """What the images depend on; `spacing` and `clip_denoised` as the sampler resolved them
    (samplers.resolve_spacing, resolve_clip);
    class_label: the class index of every image, 'all' (class i % num_classes for image i) or None."""
    return {
        'format': META_FORMAT,
        'checkpoint': info.get('checkpoint'),
        'checkpoint_sha256': info.get('sha256'),
        'checkpoint_step': info.get('step'),
        'ema': info.get('ema'),
        'sampler': sampler,
        'steps': int(steps),
        'spacing': spacing,
        'clip_denoised': clip_denoised,
        'eta': float(eta),
        'seed': int(seed),
        'batch_size': int(batch_size),
        'amp': amp,
        'image_shape': list(model.image_shape),
        'class_label': class_label,
        'guidance_scale': float(guidance_scale),
    }


def reuse_complete_npz(npz, meta, num_samples):
    """The images of an existing .npz made with the same options and at least `num_samples` images, else None."""
    sidecar = f'{npz}.json'
    old = read_json(sidecar) if os.path.exists(npz) else None
    if old is None:
        return None
    if meta_difference(old, meta) or old.get('num_samples', 0) < num_samples:
        return None
    # Batches are seeded by index, so the first num_samples of a larger run are
    # this run's images only if the batches line up (true when num_samples % batch_size == 0
    # or equals the old count).
    if old['num_samples'] != num_samples and num_samples % meta['batch_size']:
        return None
    return read_npz_images(npz)[:num_samples]
