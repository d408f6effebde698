"""A stand-in for the Inception network in tests: registered with torch-fidelity under TINY, cheap on a CPU."""
import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

TINY = 'ddpm-test-tiny'


def smooth_images(n, seed=0, size=8):
    """uint8 [n, H, W, 3] images with some spatial structure, less extreme than uniform noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 3, 3, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode='bilinear', align_corners=False)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----- a stand-in feature extractor, registered with torch-fidelity like its Inception ---------

class TinyExtractor(FeatureExtractorBase):
    """A fixed random projection of 4x4-pooled pixels: 'pool' (8-d) for FID/KID, 'logits' (5 classes) for IS."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.register_buffer('w1', torch.randn(3 * 4 * 4, 8, generator=g))
        self.register_buffer('w2', torch.randn(8, 5, generator=g))
        self.calls = 0

    @staticmethod
    def get_provided_features_list():
        return 'pool', 'logits'

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {'fid': 'pool', 'kid': 'pool', 'isc': 'logits'}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.calls += 1
        pool = F.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1) @ self.w1
        features = {'pool': pool, 'logits': 2.0 * torch.tanh(pool) @ self.w2}
        return tuple(features[name] for name in self.features_list)


@pytest.fixture(scope='module', autouse=True)
def registered_tiny_extractor():
    """Import this fixture into a test module to register TINY for all its tests."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    if TINY not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY, TinyExtractor)
