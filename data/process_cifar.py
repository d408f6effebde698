"""Datasets and the training loader: every image set becomes one uint8 tensor in memory.

CIFAR-sized data fits in RAM (50,000 images x 3 x 32 x 32 = 150 MB), so instead
of a per-image Dataset/DataLoader pipeline we decode everything once and slice
batches out of a single tensor. That removes worker processes and per-image
Python work from the training loop and makes batches exactly reproducible.

    images = load_dataset('cifar10', 'data')                    # uint8 [50000, 3, 32, 32]
    images = load_dataset('folder', '/tmp/cifar10/cifar10-jpeg')  # its train/ split
    images = load_dataset('synthetic', None, num_synthetic=512)   # smoke tests
    loader = InMemoryLoader(images, batch_size=128, device='cuda')
    for epoch in range(num_epochs):
        loader.set_epoch(epoch)
        for x_0 in loader:                                        # float [128, 3, 32, 32] in [-1, 1]
            ...

    # Class labels (class-conditional training): the same images, their labels and the class names.
    images, labels, classes = load_dataset('cifar10', 'data', labels=True)   # labels int64 [50000]
    loader = InMemoryLoader(images, batch_size=128, labels=labels)
    for x_0, y in loader:                                         # y: the labels of x_0's images
        ...

Sources:
    'cifar10'    torchvision's CIFAR-10 (downloaded into data_dir when missing).
    'folder'     any folder of images, searched recursively; decoded once, then
                 cached as a tensor file (data/image_folder.py).
    'synthetic'  seeded smooth colour blobs on gradients; needs no files. Its two
                 classes are 'dark' and 'light' (mean pixel below / above the median).
"""

import hashlib
import math
import os

import torch
import torch.nn.functional as F

from data.image_folder import load_image_folder

DATASETS = ('cifar10', 'folder', 'synthetic')


# ----------------------------------------------------------------------------- public API

def load_dataset(dataset, data_dir, image_size=32, train=True, download=True, num_synthetic=512, labels=False):
    """Return a whole dataset as one uint8 tensor [N, 3, image_size, image_size].

    labels=True returns (images, labels, class_names): labels int64 [N] index the
    list of class names (CIFAR-10's ten, an image folder's sorted class subfolders).

    Args:
        dataset: 'cifar10', 'folder' or 'synthetic'.
        data_dir: where CIFAR-10 lives / is downloaded to, or the image folder; unused for 'synthetic'.
        image_size: output height and width.
        train: the training split (CIFAR-10 train set, the folder's train/) or the test split.
        download: let torchvision download CIFAR-10 when it is not in data_dir.
        num_synthetic: number of images for dataset='synthetic'.
    """
    if dataset in ('cifar10', 'folder') and not data_dir:
        raise ValueError(f"dataset={dataset!r} needs a data_dir")
    if dataset == 'cifar10':
        return load_cifar10(data_dir, image_size=image_size, train=train, download=download, labels=labels)
    if dataset == 'folder':
        return load_image_folder(data_dir, image_size=image_size, train=train, labels=labels)
    if dataset == 'synthetic':
        images = synthetic_images(num_synthetic, image_size=image_size, seed=0 if train else 1)
        return synthetic_labels(images) if labels else images
    raise ValueError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')


def to_model_range(x_uint8):
    """uint8 pixels 0..255 -> float in [-1, 1], the range the diffusion model works in."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x):
    """Samples in [-1, 1] -> uint8 pixels; values outside the range are clamped."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- CIFAR-10

def load_cifar10(data_dir, image_size=32, train=True, download=True, labels=False):
    """CIFAR-10 through torchvision, read straight from its numpy array (no per-image transforms);
    labels=True: (images, labels, class names)."""
    import torchvision

    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    # A local copy of the archive is extracted by torchvision's download step without any network.
    download = download or os.path.isfile(os.path.join(data_dir, 'cifar-10-python.tar.gz'))
    try:
        dataset = torchvision.datasets.CIFAR10(root=data_dir, train=train, download=download)
    except Exception as e:  # no network (URLError), missing or corrupt files (RuntimeError), ...
        reason = f'{type(e).__name__}: {e}'.splitlines()[0]
        fix = (f'CIFAR-10 is not in {data_dir} and could not be downloaded ({reason}). Fix: put the '
               f"extracted 'cifar-10-batches-py' folder (or 'cifar-10-python.tar.gz') into {data_dir}, "
               'or train on an image folder with ')
        error = FileNotFoundError(fix + "dataset='folder' and data_dir=<folder>.")
        error.cli_message = fix + '--dataset folder --data_dir <folder>.'   # what a command line prints (runtime)
        raise error from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    images = images if image_size == 32 else resize_uint8(images, image_size)
    if labels:
        return images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes)
    return images


def resize_uint8(images, image_size, chunk=4096):
    """Resize a uint8 [N, 3, H, W] tensor with antialiased bicubic filtering, in chunks to bound memory."""
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(image_size, image_size), mode='bicubic',
                          antialias=True, align_corners=False)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


# ----------------------------------------------------------------------------- synthetic data

def synthetic_images(n, image_size=32, seed=0, chunk=1024):
    """n deterministic images: a two-colour linear gradient with one to three soft colour blobs.

    Smooth, colourful and cheap: enough structure for a smoke run or a test to
    see the loss fall, with no files involved. Same (n, image_size, seed), same pixels.
    """
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1.0, 1.0, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing='ij')
    out = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, n, chunk):  # bounded memory; a fixed chunk keeps the random stream fixed
        out[start:start + chunk] = _synthetic_chunk(min(chunk, n - start), xx, yy, g)
    return out


def synthetic_labels(images):
    """(images, labels, ['dark', 'light']): label 1 where an image's mean pixel is above the median."""
    brightness = images.float().mean(dim=(1, 2, 3))
    return images, (brightness > brightness.median()).long(), ['dark', 'light']


def _synthetic_chunk(m, xx, yy, g):
    """m images of a synthetic_images() chunk, drawing all randomness from g."""
    angle = torch.rand(m, generator=g) * 2 * math.pi
    ramp = xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]  # [m, S, S]
    ramp = (ramp / math.sqrt(2) + 1) / 2  # -> [0, 1]
    colour_a, colour_b = torch.rand(m, 3, 1, 1, generator=g), torch.rand(m, 3, 1, 1, generator=g)
    img = colour_a + (colour_b - colour_a) * ramp[:, None]  # [m, 3, S, S]
    for k in range(3):
        centre = torch.rand(m, 2, generator=g) * 1.6 - 0.8
        radius = 0.15 + 0.35 * torch.rand(m, generator=g)
        colour = torch.rand(m, 3, 1, 1, generator=g)
        present = (torch.rand(m, generator=g) < (1.0 if k == 0 else 0.5)).float()
        d2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
        # Clamping the exponent keeps the blob's tail out of denormal floats, which are ~50x slower on CPUs.
        falloff = torch.exp((-d2 / (2 * radius[:, None, None] ** 2)).clamp(min=-30))
        weight = (falloff * present[:, None, None])[:, None]
        img = img + (colour - img) * weight
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- training loader

class InMemoryLoader:
    """Batches sliced from a uint8 image tensor that lives on the training device.

    Every epoch is a permutation plus one horizontal-flip coin per sample, both
    drawn from a CPU torch.Generator seeded by (seed, epoch). So the order is
    reproducible, independent of the device, and identical on every rank
    without any communication. `batch_size` is the global batch: under
    world_size > 1 rank r takes the r-th contiguous slice of each global batch,
    so the ranks' slices are disjoint and together form the 1-rank batch.
    `iterate(start_batch=k)` yields exactly batches k, k+1, ... of the epoch,
    which is what an exact mid-epoch resume needs.

    The whole tensor is moved to `device` once here, so a training step does
    only an on-device gather and no host-to-device copy (pinned memory would
    buy nothing). Call set_epoch(epoch) before each epoch, like a DistributedSampler.

    labels: an int64 [N] tensor of class labels; then every batch is (x_0, labels of
    its images), in the same order, and the images are exactly those of a loader
    without labels (the labels draw nothing from the random stream).
    """

    def __init__(self, images_uint8, batch_size, seed=0, rank=0, world_size=1, flip=True, device='cpu',
                 drop_last=True, labels=None):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f'images must be uint8 [N, C, H, W], got {images_uint8.dtype} '
                             f'{list(images_uint8.shape)}')
        n = len(images_uint8)
        if not 1 <= batch_size <= n:
            raise ValueError(f'batch_size={batch_size} is larger than the dataset ({n} images); lower batch_size'
                             if batch_size > n else f'batch_size must be positive, got {batch_size}')
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f'need 0 <= rank < world_size, got rank={rank}, world_size={world_size}')
        if batch_size % world_size:
            raise ValueError(f'batch_size={batch_size} is the global batch and must be divisible by '
                             f'world_size={world_size}')
        if labels is not None and (labels.dtype != torch.int64 or labels.shape != (n,)):
            raise ValueError(f'labels must be int64 [{n}] (one per image), got {labels.dtype} {list(labels.shape)}')
        self.images = images_uint8.to(device)
        self.labels = labels.to(device) if labels is not None else None
        self.batch_size, self.local_batch_size = batch_size, batch_size // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.flip, self.drop_last = flip, drop_last
        self.device = self.images.device
        self.epoch = 0

    def __len__(self):
        """Batches per epoch."""
        n, b = len(self.images), self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def set_epoch(self, epoch):
        """Select the epoch whose permutation and flips the next iteration uses."""
        self.epoch = int(epoch)

    def __iter__(self):
        return self.iterate()

    def iterate(self, start_batch=0):
        """Yield float batches in [-1, 1] on the device, starting at batch `start_batch` of this epoch
        (with labels: (batch, its labels)).

        With drop_last=False the last global batch is smaller and is split as
        evenly as possible across ranks (a rank may get one image fewer).
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f'start_batch={start_batch} is outside 0..{len(self)} (batches per epoch)')
        order, flips = self._epoch_plan()
        for b in range(start_batch, len(self)):
            span = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order[span].tensor_split(self.world_size)[self.rank]
            x = self.images[idx]
            if flips is not None:
                flip = flips[span].tensor_split(self.world_size)[self.rank]
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            yield to_model_range(x) if self.labels is None else (to_model_range(x), self.labels[idx])

    def _epoch_plan(self):
        """This epoch's sample order and per-sample flip coins, drawn on the CPU, moved to the device."""
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.images), generator=g)
        flips = torch.rand(len(self.images), generator=g) < 0.5 if self.flip else None
        return order.to(self.device), (flips.to(self.device) if flips is not None else None)


def _epoch_seed(seed, epoch):
    """A 63-bit generator seed for (seed, epoch): distinct pairs get unrelated streams."""
    digest = hashlib.sha256(f'{seed}/{epoch}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1


if __name__ == '__main__':
    # Pre-decode (and cache) a folder, or check that CIFAR-10 loads: python -m data.process_cifar folder <dir>
    import argparse
    import time
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('dataset', choices=DATASETS)
    parser.add_argument('data_dir', nargs='?', default='data')
    parser.add_argument('--image_size', type=int, default=32)
    parser.add_argument('--test', action='store_true', help='the test split instead of train')
    args = parser.parse_args()
    t0 = time.perf_counter()
    x = load_dataset(args.dataset, args.data_dir, image_size=args.image_size, train=not args.test)
    print(f'{list(x.shape)} {x.dtype} in {time.perf_counter() - t0:.1f} s, mean pixel {x.float().mean():.1f}')
