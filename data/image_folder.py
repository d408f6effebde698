"""Image files: the one reader of image folders, and the .npz image arrays FID tools exchange.

`load_image_folder` decodes a folder (its train/ or test/ split) into one uint8
tensor at the training resolution and caches it on disk (with labels=True also
the class of every image, from its class subfolder: folder/train/<class>/...); `read_image_folder`
reads images at their own size for scoring (evaluate.py); both find files with
`list_images`. `save_npz` / `read_npz_images` write and read uint8 [N, H, W, C].
"""

import glob
import hashlib
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from runtime import atomic_write

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused


def load_image_folder(folder, image_size=32, train=True, labels=False):
    """Decode every image under `folder` (recursively) into a uint8 tensor, cached on disk.

    labels=True returns (images, labels, class_names) instead: class_names are the
    split's subfolders, sorted, and labels (int64) index them, one per image.

    The split is `folder/train` (train=True) or `folder/test` (train=False)
    when that subfolder exists, else the folder itself. Each image is converted
    to RGB, its shorter side resized to image_size (bicubic, antialiased) and
    centre-cropped. Unreadable files are skipped and counted.

    Decoding tens of thousands of files takes a while, so the result is saved
    as `.ddpm_cache_<size>px_<key>.pt` inside the split folder, or in the user
    cache dir ($XDG_CACHE_HOME or ~/.cache, then ddpm_data/) when the folder is
    read-only. The key hashes the file list with sizes and mtimes, the
    image_size and CACHE_VERSION, so adding, removing or editing any image
    triggers a fresh decode. The cache also lists the files that failed to decode,
    so that labels line up with the images a cache holds.
    """
    folder = _split_folder(folder, train)
    paths = list_images(folder)
    classes = class_subfolders(folder, paths) if labels else None
    key = _cache_key(folder, paths, image_size)
    candidates = _cache_candidates(folder, image_size, key)
    for path, _ in candidates:
        cache = _read_cache(path, key)
        if cache is not None and labels:
            # Caches written before 'failed' was kept say nothing about which files they skipped.
            failed = cache.get('failed', [] if len(cache['images']) == len(paths) else None)
            cache = None if failed is None else {**cache, 'failed': failed}
        if cache is not None:
            print(f'loaded {len(cache["images"])} images from cache {path}')
            _report(folder, cache.get('failed') or [], cache.get('upscaled'), image_size)
            return _with_labels(cache['images'], folder, paths, cache.get('failed'), classes)

    images, failed, upscaled = decode_images(paths, image_size)
    failed = [os.path.relpath(p, folder) for p in failed]
    _report(folder, failed, upscaled, image_size)
    if len(images) == 0:
        raise ValueError(f'none of the {len(paths)} image files under {folder} could be read, e.g. '
                         f'{os.path.join(folder, failed[0])}')
    _write_cache(images, key, candidates, failed, upscaled)
    return _with_labels(images, folder, paths, failed, classes)


def _report(folder, failed, upscaled, image_size):
    """What decoding did to the data, said at every load (a reused cache too): skipped files, upscaled images."""
    if failed:
        print(f'skipped {len(failed)} unreadable file{"s" if len(failed) > 1 else ""}, e.g. '
              f'{os.path.join(folder, failed[0])}')
    if upscaled:   # (None: a cache written before this was counted)
        print(f'note: {upscaled} image{"s" if upscaled > 1 else ""} under {folder} '
              f'{"are" if upscaled > 1 else "is"} smaller than {image_size} px and {"were" if upscaled > 1 else "was"} '
              f'upscaled to {image_size}x{image_size} (image_size sets the training resolution)')


def class_subfolders(folder, paths):
    """The sorted class names of an image folder: the first subfolder of every image under `folder`."""
    loose = [p for p in paths if os.path.dirname(os.path.relpath(p, folder)) == '']
    if loose:
        raise ValueError(f'class labels come from class subfolders ({folder}/<class>/...), but {loose[0]} lies '
                         f'directly in {folder}; move the images into one folder per class')
    return sorted({os.path.relpath(p, folder).split(os.sep)[0] for p in paths})


def _with_labels(images, folder, paths, failed, classes):
    """images alone (classes None), or (images, labels int64, class names) for the files that decoded."""
    if classes is None:
        return images
    skipped = set(failed)
    index = {name: i for i, name in enumerate(classes)}
    kept = [os.path.relpath(p, folder) for p in paths if os.path.relpath(p, folder) not in skipped]
    labels = torch.tensor([index[rel.split(os.sep)[0]] for rel in kept], dtype=torch.int64)
    return images, labels, list(classes)


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
    """Decode `paths` into uint8 [N, 3, S, S]; returns (images, paths that could not be read,
    the number of images whose shorter side was below S and so were upscaled).

    Serial on purpose: for 50,000 CIFAR JPEGs on a 2-vCPU machine a 2-thread
    pool took 7.7 s and a 2-process pool 9.0 s against 6.0 s serial, and the
    result is cached, so decoding is a one-time cost anyway.
    """
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    upscaled = 0
    for i, path in enumerate(tqdm(paths, desc='decoding images', unit='img')):
        decoded = _try_decode(path, image_size)
        if decoded is not None:
            (out[i], side), ok[i] = decoded, True
            upscaled += side < image_size
    failed = [p for p, good in zip(paths, ok) if not good]
    return torch.from_numpy(out[ok]).permute(0, 3, 1, 2).contiguous(), failed, upscaled


def decode_image(path, image_size):
    """One image file -> uint8 array [image_size, image_size, 3]: RGB, shorter side resized, centre-cropped."""
    return _decode(path, image_size)[0]


def _decode(path, image_size):
    """decode_image's array and the shorter side of the image as stored (before any resizing)."""
    with Image.open(path) as img:
        stored_side = min(img.size)   # before draft(), which may already shrink a big JPEG
        img.draft('RGB', (image_size, image_size))  # JPEG only: libjpeg downscales big photos while decoding
        img = ImageOps.exif_transpose(img)  # camera photos: honour the orientation tag
        img = _to_rgb(img)
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)  # the centred square
        if (w, h) != (image_size, image_size):
            # Resampling the centred square directly equals "resize the shorter side, then centre-crop".
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
        return np.asarray(img, dtype=np.uint8), stored_side


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
    """(pixels, stored shorter side), or None for a file PIL cannot read (corrupt, truncated, not an image)."""
    try:
        return _decode(path, image_size)
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
    """The cache's dict ('images', and 'failed' in newer ones) when `path` exists and was made for `key`,
    else None (a broken cache is ignored)."""
    if not os.path.isfile(path):
        return None
    try:
        cache = torch.load(path, map_location='cpu', weights_only=True)
        return cache if cache.get('key') == key else None
    except Exception as e:
        print(f'ignoring unreadable cache {path} ({type(e).__name__}); decoding again', file=sys.stderr)
        return None


def _write_cache(images, key, candidates, failed=(), upscaled=0):
    """Save to the first writable candidate and delete the caches it supersedes; never fatal.
    `failed`: the files (relative paths) that could not be decoded, so labels can skip them too;
    `upscaled`: how many images were smaller than the cache's size (reported again when it is reused)."""
    for path, stale in candidates:
        try:
            _atomic_save({'images': images, 'key': key, 'failed': list(failed), 'upscaled': int(upscaled)}, path)
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


def read_image_folder(folder):
    """Every image under `folder` (recursively, sorted by path) at its own size, as uint8 [N, H, W, 3]."""
    images = []
    for path in list_images(folder):
        with Image.open(path) as img:
            images.append(np.asarray(_to_rgb(img)))
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f'the images under {folder} differ in size ({sorted(shapes)[:3]}...); resize them first')
    return np.stack(images)


def save_npz(path, images, labels=None):
    """uint8 [N, H, W, C] as arr_0 of an .npz: the layout FID tools (e.g. guided-diffusion's evaluator) read;
    class labels, when given, as a second array 'labels' (int64 [N]) that such tools ignore."""
    if labels is None:
        return atomic_write(path, lambda f: np.savez(f, images))
    return atomic_write(path, lambda f: np.savez(f, images, labels=np.asarray(labels, dtype=np.int64)))


def read_npz_images(path):
    """The uint8 [N, H, W, C] images of an .npz (arr_0, or the only array)."""
    with np.load(path) as data:
        key = 'arr_0' if 'arr_0' in data.files else (data.files[0] if len(data.files) == 1 else None)
        if key is None:
            raise ValueError(f'{path}: expected one image array (arr_0), found {data.files}')
        images = data[key]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'{path}: expected uint8 images shaped [N, H, W, 3], got {images.dtype} {images.shape}')
    return images
