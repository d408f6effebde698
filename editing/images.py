"""The user's pictures for the editing tools: images and masks in, tensors in [-1, 1] out.

Images of another size than the model's are centre-cropped to a square and resized (data/image_folder's
decode_image, as for training), with one line saying so. A mask is a PNG of the image's size, white =
keep, black = fill in; it is cropped and resized the same way (nearest neighbour, so it stays 0/1).
"""

import os
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.image_folder import decode_image, list_images, read_npz_images
from data.process_cifar import to_model_range


def image_size_of(path):
    """(width, height) of an image file; a one-line ValueError for a file that is not an image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    try:
        with Image.open(path) as img:
            img.verify()
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f'{path} is not an image file PIL can read ({type(e).__name__}); give a PNG or JPEG') from e


def load_image(path, image_size):
    """One image file -> float [1, 3, S, S] in [-1, 1], resized to the model's S with one line saying so."""
    w, h = image_size_of(path)
    if (w, h) != (image_size, image_size):
        print(f'resized {path} from {w}x{h} to the model\'s {image_size}x{image_size} (centre square)',
              file=sys.stderr)
    pixels = torch.from_numpy(decode_image(path, image_size).copy()).permute(2, 0, 1)
    return to_model_range(pixels).unsqueeze(0)


def load_mask(path, image_path, image_size):
    """A mask PNG of the image's own size -> float [1, 1, S, S] of 1 (white: keep) and 0 (black: fill in)."""
    mask_size, size = image_size_of(path), image_size_of(image_path)
    if mask_size != size:
        raise ValueError(f'the mask {path} is {mask_size[0]}x{mask_size[1]} but the image {image_path} is '
                         f'{size[0]}x{size[1]}; draw the mask at the image\'s size')
    with Image.open(path) as img:
        gray = np.asarray(img.convert('L'))
    w, h = size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    square = Image.fromarray(gray).crop(box).resize((image_size, image_size), Image.Resampling.NEAREST)
    mask = torch.from_numpy((np.asarray(square) > 127).astype(np.float32))
    if mask.all():
        print(f'note: the mask {path} is all white, so nothing is filled in', file=sys.stderr)
    return mask.reshape(1, 1, image_size, image_size)


def load_images(source, n, image_size):
    """Up to n images [n, 3, S, S] in [-1, 1] from a folder (sorted paths), an .npz of uint8 [N, H, W, 3],
    or image files (a list of paths)."""
    if isinstance(source, (list, tuple)):
        return torch.cat([load_image(p, image_size) for p in source[:n]])
    if str(source).endswith('.npz'):
        images = torch.from_numpy(read_npz_images(source)[:n]).permute(0, 3, 1, 2)
        if images.shape[-1] != image_size:
            raise ValueError(f'{source} holds {images.shape[-1]}px images; the model makes {image_size}px')
        return to_model_range(images)
    if os.path.isdir(source):
        return load_images(list_images(source)[:n], n, image_size)
    return load_image(source, image_size)
