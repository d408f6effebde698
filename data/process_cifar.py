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

Sources:
    'cifar10'    torchvision's CIFAR-10 (downloaded into data_dir when missing).
    'folder'     any folder of images, searched recursively; decoded once, then
                 cached as a tensor file (see `load_image_folder`).
    'synthetic'  seeded smooth colour blobs on gradients; needs no files.
"""

import glob
import hashlib
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from diffusion import atomic_write

DATASETS = ('cifar10', 'folder', 'synthetic')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused


# ----------------------------------------------------------------------------- public API

def load_dataset(dataset, data_dir, image_size=32, train=True, download=True, num_synthetic=512):
    """Return a whole dataset as one uint8 tensor [N, 3, image_size, image_size].

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
        return load_cifar10(data_dir, image_size=image_size, train=train, download=download)
    if dataset == 'folder':
        return load_image_folder(data_dir, image_size=image_size, train=train)
    if dataset == 'synthetic':
        return synthetic_images(num_synthetic, image_size=image_size, seed=0 if train else 1)
    raise ValueError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')


def to_model_range(x_uint8):
    """uint8 pixels 0..255 -> float in [-1, 1], the range the diffusion model works in."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x):
    """Samples in [-1, 1] -> uint8 pixels; values outside the range are clamped."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- CIFAR-10

def load_cifar10(data_dir, image_size=32, train=True, download=True):
    """CIFAR-10 through torchvision, read straight from its numpy array (no per-image transforms)."""
    import torchvision

    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    # A local copy of the archive is extracted by torchvision's download step without any network.
    download = download or os.path.isfile(os.path.join(data_dir, 'cifar-10-python.tar.gz'))
    try:
        dataset = torchvision.datasets.CIFAR10(root=data_dir, train=train, download=download)
    except Exception as e:  # no network (URLError), missing or corrupt files (RuntimeError), ...
        reason = f'{type(e).__name__}: {e}'.splitlines()[0]
        raise FileNotFoundError(
            f'CIFAR-10 is not in {data_dir} and could not be downloaded ({reason}). Fix: put the '
            f"extracted 'cifar-10-batches-py' folder (or 'cifar-10-python.tar.gz') into {data_dir}, "
            "or train on an image folder with dataset='folder' and data_dir=<folder>.") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return images if image_size == 32 else resize_uint8(images, image_size)


def resize_uint8(images, image_size, chunk=4096):
    """Resize a uint8 [N, 3, H, W] tensor with antialiased bicubic filtering, in chunks to bound memory."""
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(image_size, image_size), mode='bicubic',
                          antialias=True, align_corners=False)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


# ----------------------------------------------------------------------------- image folders

def load_image_folder(folder, image_size=32, train=True):
    """Decode every image under `folder` (recursively) into a uint8 tensor, cached on disk.

    The split is `folder/train` (train=True) or `folder/test` (train=False)
    when that subfolder exists, else the folder itself. Each image is converted
    to RGB, its shorter side resized to image_size (bicubic, antialiased) and
    centre-cropped. Unreadable files are skipped and counted.

    Decoding tens of thousands of files takes a while, so the result is saved
    as `.ddpm_cache_<size>px_<key>.pt` inside the split folder, or in the user
    cache dir ($XDG_CACHE_HOME or ~/.cache, then ddpm_data/) when the folder is
    read-only. The key hashes the file list with sizes and mtimes, the
    image_size and CACHE_VERSION, so adding, removing or editing any image
    triggers a fresh decode.
    """
    folder = _split_folder(folder, train)
    paths = list_images(folder)
    key = _cache_key(folder, paths, image_size)
    candidates = _cache_candidates(folder, image_size, key)
    for path, _ in candidates:
        images = _read_cache(path, key)
        if images is not None:
            print(f'loaded {len(images)} images from cache {path}')
            return images

    images, failed = decode_images(paths, image_size)
    if failed:
        print(f'skipped {len(failed)} unreadable file{"s" if len(failed) > 1 else ""}, e.g. {failed[0]}')
    if len(images) == 0:
        raise ValueError(f'none of the {len(paths)} image files under {folder} could be read, e.g. {failed[0]}')
    _write_cache(images, key, candidates)
    return images


def list_images(folder):
    """All image files under `folder`, recursively, sorted; hidden files and folders are skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        found += [os.path.join(root, f) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')]
    if not found:
        raise FileNotFoundError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) found under {folder}')
    return sorted(found)


def decode_images(paths, image_size):
    """Decode `paths` into uint8 [N, 3, S, S]; returns (images, paths that could not be read).

    Serial on purpose: for 50,000 CIFAR JPEGs on a 2-vCPU machine a 2-thread
    pool took 7.7 s and a 2-process pool 9.0 s against 6.0 s serial, and the
    result is cached, so decoding is a one-time cost anyway.
    """
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(tqdm(paths, desc='decoding images', unit='img')):
        pixels = _try_decode(path, image_size)
        if pixels is not None:
            out[i], ok[i] = pixels, True
    failed = [p for p, good in zip(paths, ok) if not good]
    return torch.from_numpy(out[ok]).permute(0, 3, 1, 2).contiguous(), failed


def decode_image(path, image_size):
    """One image file -> uint8 array [image_size, image_size, 3]: RGB, shorter side resized, centre-cropped."""
    with Image.open(path) as img:
        img.draft('RGB', (image_size, image_size))  # JPEG only: libjpeg downscales big photos while decoding
        img = ImageOps.exif_transpose(img)  # camera photos: honour the orientation tag
        img = _to_rgb(img)
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)  # the centred square
        if (w, h) != (image_size, image_size):
            # Resampling the centred square directly equals "resize the shorter side, then centre-crop".
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
        return np.asarray(img, dtype=np.uint8)


def _to_rgb(img):
    """Any PIL mode -> 'RGB'. 16/32-bit integer images are scaled (not clipped) to 8 bits;
    transparent images are composited onto white, since the colour under alpha=0 is arbitrary."""
    if img.mode.startswith('I'):  # 'I;16', 'I;16B', ... and 'I' (what older Pillows make of 16-bit PNGs)
        # 16-bit range 0..65535 -> 0..255: 65535 / 257 = 255 exactly. PIL's own convert would clip instead.
        pixels = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
        rgba = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert('RGB')


def _try_decode(path, image_size):
    """decode_image, or None for a file PIL cannot read (corrupt, truncated, not really an image)."""
    try:
        return decode_image(path, image_size)
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return None


def _split_folder(folder, train):
    """The folder holding the requested split: <folder>/train or <folder>/test when present."""
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'image folder not found: {folder}')
    split = os.path.join(folder, 'train' if train else 'test')
    return split if os.path.isdir(split) else folder


# ----------------------------------------------------------------------------- the decode cache

def _cache_key(folder, paths, image_size):
    """A hash of everything the decoded tensor depends on: files (name, size, mtime), size, decoder version."""
    h = hashlib.sha256(f'v{CACHE_VERSION} {image_size}px\n'.encode())
    for p in paths:
        st = os.stat(p)
        h.update(f'{os.path.relpath(p, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()


def _cache_candidates(folder, image_size, key):
    """(cache path, glob of older caches it replaces): next to the images first, then the user cache dir."""
    user_dir = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'ddpm_data')
    tag = hashlib.sha256(folder.encode()).hexdigest()[:12]  # the user dir is shared by every folder
    return [(os.path.join(folder, f'.ddpm_cache_{image_size}px_{key[:16]}.pt'),
             os.path.join(folder, f'.ddpm_cache_{image_size}px_*.pt')),
            (os.path.join(user_dir, f'{tag}_{image_size}px_{key[:16]}.pt'),
             os.path.join(user_dir, f'{tag}_{image_size}px_*.pt'))]


def _read_cache(path, key):
    """The cached tensor when `path` exists and was made for `key`, else None (a broken cache is ignored)."""
    if not os.path.isfile(path):
        return None
    try:
        cache = torch.load(path, map_location='cpu', weights_only=True)
        return cache['images'] if cache.get('key') == key else None
    except Exception as e:
        print(f'ignoring unreadable cache {path} ({type(e).__name__}); decoding again', file=sys.stderr)
        return None


def _write_cache(images, key, candidates):
    """Save to the first writable candidate and delete the caches it supersedes; never fatal."""
    for path, stale in candidates:
        try:
            _atomic_save({'images': images, 'key': key}, path)
        except OSError:
            continue
        for old in glob.glob(stale):
            if old != path:
                try:
                    os.remove(old)
                except OSError:
                    pass
        print(f'cached {len(images)} decoded images in {path}')
        return path
    print('could not write a decode cache (read-only folder and cache dir); the next run decodes again',
          file=sys.stderr)
    return None


def _atomic_save(obj, path):
    """torch.save via a temporary file and rename, so concurrent ranks never read a half-written cache."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


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
    """

    def __init__(self, images_uint8, batch_size, seed=0, rank=0, world_size=1, flip=True, device='cpu',
                 drop_last=True):
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
        self.images = images_uint8.to(device)
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
        """Yield float batches in [-1, 1] on the device, starting at batch `start_batch` of this epoch.

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
            yield to_model_range(x)

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
