"""FID during training: every `fid_every` epochs train.py scores its EMA model against the training set.

The EMA model draws `fid_samples` images with a fixed seed (the same noise at
every evaluation, so the curve shows the model changing, not the noise), batch
i on rank i % world_size under torchrun exactly as sample.py shards them. Rank 0
extracts their Inception features and computes FID against the statistics of
the training images, which are computed once from the uint8 tensor the loop
already holds and cached on disk by its content (fid.cached_statistics). The
best score so far is kept next to the checkpoints as ddpm_best_fid.pth.
"""

import hashlib
import os
import time

import numpy as np

from metrics.fid import (INCEPTION, cached_statistics, extract_features, extractor_id, feature_statistics,
                         frechet_distance, load_feature_extractor)
from sampling.generate import SampleRun, generate
from sampling.options import SampleOptions, fast_steps
from weights.checkpoint import load_checkpoint

SAMPLE_BATCH = 250      # images per sampling batch (with the seed it fixes the samples; see sample.py)
FEATURE_BATCH = 250
BEST_FILE = 'ddpm_best_fid.pth'
OFF_HINT = ('FID during training is off; turn it on with --fid_every N (offline it needs --fid_weights PATH, '
            'see the README, "Offline FID")')


class FIDDuringTraining:
    """FID of the EMA model's samples against the training images, and the best one so far.

    images: the training set as uint8 [N, C, H, W] (CPU); c: the run's TrainConfig (fid_samples, fid_sampler,
    fid_steps, fid_weights, seed, amp, checkpoint_dir). Construction loads the feature extractor and the
    reference statistics on rank 0, so missing weights fail before the first training step.
    """

    def __init__(self, images, c, device, dist, say=print, cache_dir=None):
        num_samples, sampler, steps = c.fid_samples, c.fid_sampler, fast_steps(c.fid_sampler, c.fid_steps)
        self.options = SampleOptions(sampler, steps)
        self.run = SampleRun(num_samples, min(SAMPLE_BATCH, num_samples), c.seed, amp=c.amp)
        self.device, self.dist, self.say = device, dist, say
        self.best_path = os.path.join(c.checkpoint_dir, BEST_FILE)
        self.best = None
        if not dist.is_main:
            return
        self.extractor, self.fid_layer, _ = load_feature_extractor(INCEPTION, c.fid_weights, device,
                                                                   cache_dir=cache_dir)
        pixels = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())
        ref_id = f'train-{hashlib.sha256(pixels).hexdigest()[:12]}'   # the content: no re-decoding, any dataset
        self.mu, self.sigma, self.ref_count, _, _ = cached_statistics(
            ref_id, pixels, self.extractor, self.fid_layer, cache_dir, FEATURE_BATCH, device,
            source=f'the {len(pixels)} training images')
        self.settings = {'num_samples': num_samples, 'sampler': sampler, 'steps': steps, 'seed': c.seed,
                         'feature_extractor': extractor_id(self.extractor, self.fid_layer), 'ref_id': ref_id}
        self.best = self._previous_best()

    def _previous_best(self):
        """The FID recorded in an existing ddpm_best_fid.pth (a resumed run) when it was measured the same way."""
        if not os.path.exists(self.best_path):
            return None
        record = load_checkpoint(self.best_path).get('fid') or {}
        if {k: record.get(k) for k in self.settings} != self.settings:
            self.say(f'note: {self.best_path} was scored with other FID settings; the next evaluation replaces it')
            return None
        return record['fid']

    def evaluate(self, ema_model, epoch, step):
        """Sample and score (every rank samples its share); on rank 0 the FID record, elsewhere None."""
        start = time.time()
        images = generate(ema_model, self.options, self.run, self.device, self.dist, progress=self.dist.is_main)
        if images is None:
            return None
        features = extract_features(images, self.extractor, FEATURE_BATCH, self.device, progress=False)
        fid = frechet_distance(*feature_statistics(features[self.fid_layer]), self.mu, self.sigma)
        record = {**self.settings, 'fid': fid, 'epoch': epoch, 'step': step, 'ref_count': self.ref_count,
                  'seconds': round(time.time() - start, 1)}
        record['is_best'] = self.best is None or fid < self.best
        if record['is_best']:
            self.best = fid
        return record
