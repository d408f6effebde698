"""Tests for data/ (process_cifar.py and image_folder.py): decoding, caching, CIFAR-10 files, synthetic data, the loader.

All offline and CPU-only; the one test that reads real CIFAR JPEGs streams a
few out of ../shared/data/cifar10-jpeg.tar.gz and skips when it is absent.
"""

import os
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from data import image_folder
from data.process_cifar import InMemoryLoader, load_dataset, to_model_range, to_uint8

from conftest import ROOT

CIFAR_JPEG_TAR = os.path.join(ROOT, '..', 'shared', 'data', 'cifar10-jpeg.tar.gz')


def solid(mode, size, value):
    """A PIL image of one colour/value."""
    return Image.new(mode, size, value)


def pixel(images, i=0):
    """The centre pixel of image i as a tuple of ints."""
    s = images.shape[-1] // 2
    return tuple(images[i, :, s, s].tolist())


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path, monkeypatch):
    """Keep the fallback cache dir inside the test's tmp dir, never the user's ~/.cache."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'user_cache'))


# ----------------------------------------------------------------------------- image folders

def test_folder_converts_every_mode_to_rgb(tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    solid('RGB', (40, 40), (200, 30, 60)).save(folder / 'a_rgb.png')
    solid('L', (40, 40), 128).save(folder / 'b_gray.png')
    solid('RGBA', (40, 40), (10, 20, 30, 255)).save(folder / 'c_rgba_opaque.png')
    solid('RGBA', (40, 40), (0, 0, 0, 0)).save(folder / 'd_rgba_clear.png')  # transparent -> white background
    palette = solid('P', (40, 40), 1)
    palette.putpalette([0, 0, 0, 90, 180, 45] + [0] * 762)
    palette.save(folder / 'e_palette.png')
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(folder / 'f_16bit_max.png')
    Image.fromarray(np.full((40, 40), 257 * 100, np.uint16)).save(folder / 'g_16bit_mid.png')
    Image.fromarray(np.full((40, 40), 1000, np.int32)).save(folder / 'h_int32.tif')  # mode 'I'
    solid('RGB', (40, 40), (30, 120, 220)).save(folder / 'i_photo.JPG', quality=95)

    images = load_dataset('folder', str(folder), image_size=16)
    assert images.dtype == torch.uint8 and images.shape == (9, 3, 16, 16)
    assert pixel(images, 0) == (200, 30, 60)
    assert pixel(images, 1) == (128, 128, 128)
    assert pixel(images, 2) == (10, 20, 30)
    assert pixel(images, 3) == (255, 255, 255)
    assert pixel(images, 4) == (90, 180, 45)
    assert pixel(images, 5) == (255, 255, 255)  # 65535 scales to 255 ...
    assert pixel(images, 6) == (100, 100, 100)  # ... and 25700 to 100, not clipped to 255
    assert pixel(images, 7) == (4, 4, 4)  # 1000 / 257 = 3.9
    assert all(abs(v - w) <= 3 for v, w in zip(pixel(images, 8), (30, 120, 220)))  # lossy JPEG


@pytest.mark.parametrize('ext', ['jpeg', 'webp', 'bmp', 'gif', 'tiff', 'PNG'])
def test_folder_reads_every_extension(tmp_path, ext):
    solid('RGB', (20, 20), (0, 255, 0)).save(tmp_path / f'x.{ext}', quality=95)
    images = load_dataset('folder', str(tmp_path), image_size=8)
    assert images.shape == (1, 3, 8, 8)
    assert all(abs(v - w) <= 3 for v, w in zip(pixel(images), (0, 255, 0)))


def test_folder_resizes_shorter_side_and_centre_crops(tmp_path):
    strip = np.zeros((32, 96, 3), np.uint8)  # red | blue | green, left to right
    strip[:, :32], strip[:, 32:64], strip[:, 64:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    Image.fromarray(strip).save(tmp_path / 'wide.png')
    Image.fromarray(strip.transpose(1, 0, 2).copy()).save(tmp_path / 'tall.png')
    images = load_dataset('folder', str(tmp_path), image_size=16)
    assert images.shape == (2, 3, 16, 16)
    inner = images[:, :, 2:-2, 2:-2]  # bicubic may mix in a pixel's worth of the neighbours at the border
    assert (inner[:, 2] == 255).all() and (inner[:, :2] == 0).all()


def test_folder_walks_subfolders_skips_corrupt_and_ignores_other_files(tmp_path, capsys):
    (tmp_path / 'cats' / 'deep').mkdir(parents=True)
    solid('RGB', (8, 8), (1, 2, 3)).save(tmp_path / 'cats' / 'deep' / 'ok.png')
    solid('RGB', (8, 8), (4, 5, 6)).save(tmp_path / 'ok.jpg', quality=100)
    (tmp_path / 'cats' / 'bad.png').write_bytes(b'this is not a png')
    good_jpeg = (tmp_path / 'ok.jpg').read_bytes()
    (tmp_path / 'truncated.jpg').write_bytes(good_jpeg[:len(good_jpeg) // 2])
    (tmp_path / 'notes.txt').write_text('not an image')
    (tmp_path / 'labels.npy').write_bytes(b'\x93NUMPY')
    (tmp_path / '.hidden.png').write_bytes(b'junk')  # e.g. macOS '._' files: not listed at all

    images = load_dataset('folder', str(tmp_path), image_size=8)
    assert images.shape == (2, 3, 8, 8)
    out = capsys.readouterr().out
    assert 'skipped 2 unreadable files, e.g. ' in out and 'bad.png' in out
    assert 'notes.txt' not in out and 'hidden' not in out



def test_folder_says_at_every_load_what_was_skipped_and_upscaled(tmp_path, capsys):
    """Issue 22, item 5: 8x8 images trained at 16x16 are reported as upscaled, and a corrupt file as
    skipped, on the first load and again when the decode cache is reused."""
    for i in range(3):
        solid('RGB', (8, 8), (i, 0, 0)).save(tmp_path / f'small{i}.png')
    solid('RGB', (20, 16), (0, 9, 0)).save(tmp_path / 'big.png')
    (tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
    for load in ('decoded', 'cached'):
        images = load_dataset('folder', str(tmp_path), image_size=16)
        out = capsys.readouterr().out
        assert images.shape == (4, 3, 16, 16)
        assert ('from cache' in out) == (load == 'cached'), out
        assert f'skipped 1 unreadable file, e.g. {tmp_path / "broken.jpg"}' in out, (load, out)
        assert f'note: 3 images under {tmp_path} are smaller than 16 px and were upscaled to 16x16' in out, (load, out)
    load_dataset('folder', str(tmp_path), image_size=8)   # at their own size nothing is upscaled
    assert 'upscaled' not in capsys.readouterr().out


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        load_dataset('folder', str(tmp_path / 'missing'))
    (tmp_path / 'readme.txt').write_text('no images here')
    with pytest.raises(FileNotFoundError, match='no image files'):
        load_dataset('folder', str(tmp_path))
    (tmp_path / 'broken.png').write_bytes(b'garbage')
    with pytest.raises(ValueError, match='none of the 1 image files'):
        load_dataset('folder', str(tmp_path))
    with pytest.raises(ValueError, match='unknown dataset'):
        load_dataset('imagenet', str(tmp_path))


def test_folder_train_and_test_subfolders(tmp_path):
    split_root, flat = tmp_path / 'split', tmp_path / 'flat'
    for sub, colour in [('train/a', (255, 0, 0)), ('test/a', (0, 0, 255))]:
        (split_root / sub).mkdir(parents=True)
        solid('RGB', (8, 8), colour).save(split_root / sub / 'x.png')
    flat.mkdir()
    solid('RGB', (8, 8), (0, 255, 0)).save(flat / 'x.png')

    assert pixel(load_dataset('folder', str(split_root), image_size=8, train=True)) == (255, 0, 0)
    assert pixel(load_dataset('folder', str(split_root), image_size=8, train=False)) == (0, 0, 255)
    for train in (True, False):  # no train/ or test/: the folder itself serves both
        assert pixel(load_dataset('folder', str(flat), image_size=8, train=train)) == (0, 255, 0)


def make_folder(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        solid('RGB', (12, 12), (10 * i, 0, 0)).save(folder / f'{i}.png')


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('decoded although a valid cache exists')
    monkeypatch.setattr(image_folder, 'decode_images', fail)


def test_cache_is_reused_and_invalidated_by_changes(tmp_path, monkeypatch):
    make_folder(tmp_path)
    first = load_dataset('folder', str(tmp_path), image_size=8)
    caches = list(tmp_path.glob('.ddpm_cache_8px_*.pt'))
    assert len(caches) == 1

    with monkeypatch.context() as m:
        forbid_decoding(m)
        assert torch.equal(load_dataset('folder', str(tmp_path), image_size=8), first)
        with pytest.raises(AssertionError):  # another image_size is another cache
            load_dataset('folder', str(tmp_path), image_size=4)

    solid('RGB', (12, 12), (0, 99, 0)).save(tmp_path / '1.png')
    os.utime(tmp_path / '1.png', ns=(1, 10 ** 18))  # a distinct mtime even on coarse-clock file systems
    changed = load_dataset('folder', str(tmp_path), image_size=8)
    assert pixel(changed, 1) == (0, 99, 0) and torch.equal(changed[0], first[0])
    assert list(tmp_path.glob('.ddpm_cache_8px_*.pt')) != caches  # the stale cache was replaced
    assert len(list(tmp_path.glob('.ddpm_cache_8px_*.pt'))) == 1

    (tmp_path / '3.png').write_bytes((tmp_path / '0.png').read_bytes())  # a new file
    assert len(load_dataset('folder', str(tmp_path), image_size=8)) == 4


def test_cache_falls_back_to_user_dir_when_folder_is_read_only(tmp_path, monkeypatch):
    data = tmp_path / 'readonly'
    make_folder(data)
    real_save = image_folder._atomic_save

    def save(obj, path):  # running as root defeats chmod, so simulate the read-only folder
        if os.path.dirname(path) == str(data):
            raise PermissionError(13, 'Read-only file system', path)
        real_save(obj, path)
    monkeypatch.setattr(image_folder, '_atomic_save', save)

    first = load_dataset('folder', str(data), image_size=8)
    assert not list(data.glob('.ddpm_cache*'))
    assert len(list((tmp_path / 'user_cache' / 'ddpm_data').glob('*_8px_*.pt'))) == 1
    forbid_decoding(monkeypatch)
    assert torch.equal(load_dataset('folder', str(data), image_size=8), first)


def test_corrupt_cache_is_ignored(tmp_path):
    make_folder(tmp_path)
    first = load_dataset('folder', str(tmp_path), image_size=8)
    cache, = tmp_path.glob('.ddpm_cache_8px_*.pt')
    cache.write_bytes(b'half-written')
    assert torch.equal(load_dataset('folder', str(tmp_path), image_size=8), first)


def test_real_cifar_jpegs_from_the_shared_archive(tmp_path):
    if not os.path.isfile(CIFAR_JPEG_TAR):
        pytest.skip(f'{CIFAR_JPEG_TAR} is not available')
    expected = {}
    with tarfile.open(CIFAR_JPEG_TAR, 'r|gz') as tar:  # stream: stop after a handful of members
        for member in tar:
            if member.isfile() and member.name.endswith('.jpg'):
                name = member.name.replace('/', '_')
                (tmp_path / name).write_bytes(tar.extractfile(member).read())
                expected[name] = np.asarray(Image.open(tmp_path / name).convert('RGB'))
                if len(expected) == 8:
                    break
    images = load_dataset('folder', str(tmp_path))
    assert images.shape == (8, 3, 32, 32)
    for i, name in enumerate(sorted(expected)):  # already 32x32: pixels pass through unchanged
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), expected[name])


# ----------------------------------------------------------------------------- CIFAR-10

def write_fake_cifar10(root, per_batch=2):
    """A tiny cifar-10-batches-py in torchvision's format: pickled dicts, rows of 3072 bytes (R, G, B planes)."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in ['data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5', 'test_batch']:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batches[name] = data
        entry = {'batch_label': name, 'labels': [0] * per_batch, 'data': data,
                 'filenames': [f'{name}_{i}.png' for i in range(per_batch)]}
        with open(folder / name, 'wb') as f:
            pickle.dump(entry, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                                     'ship', 'truck'], 'num_cases_per_batch': per_batch, 'num_vis': 3072}, f)
    return batches


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision verifies each CIFAR file against the real dataset's md5, which fake files can't match.
    Test-only: make that check "the file exists"; the library code runs unpatched."""
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity',
                        lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_reads_torchvision_files(tmp_path, skip_md5):
    batches = write_fake_cifar10(tmp_path)
    train = load_dataset('cifar10', str(tmp_path), train=True, download=False)
    test = load_dataset('cifar10', str(tmp_path), train=False, download=True)  # present: nothing downloaded
    assert train.shape == (10, 3, 32, 32) and test.shape == (2, 3, 32, 32) and train.dtype == torch.uint8
    row = batches['data_batch_2'][1]  # image 3 of the train set
    assert np.array_equal(train[3].numpy(), row.reshape(3, 32, 32))
    assert train[3, 0, 0, 1] == row[1] and train[3, 1, 0, 0] == row[1024] and train[3, 2, 31, 31] == row[3071]
    assert np.array_equal(test.numpy(), batches['test_batch'].reshape(2, 3, 32, 32))
    assert load_dataset('cifar10', str(tmp_path), image_size=16, download=False).shape == (10, 3, 16, 16)


def test_cifar10_offline_gives_one_line_fix(tmp_path, monkeypatch):
    def no_network(self):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', no_network)
    for download in (True, False):
        with pytest.raises(FileNotFoundError) as info:
            load_dataset('cifar10', str(tmp_path), download=download)
        message = str(info.value)
        assert '\n' not in message and 'cifar-10-batches-py' in message and 'cifar-10-python.tar.gz' in message
        assert "dataset='folder'" in message and str(tmp_path) in message
        assert info.value.__cause__ is None and info.value.__suppress_context__  # raised `from None`
    assert 'URLError' in message or 'RuntimeError' in message


# ----------------------------------------------------------------------------- synthetic and ranges

def test_synthetic_is_deterministic_and_varied():
    a = load_dataset('synthetic', None, num_synthetic=64)
    assert a.shape == (64, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, load_dataset('synthetic', None, num_synthetic=64))
    assert not torch.equal(a, load_dataset('synthetic', None, num_synthetic=64, train=False))
    assert a.float().std() > 30 and len(torch.unique(a.reshape(64, -1), dim=0)) == 64
    assert load_dataset('synthetic', None).shape[0] == 512
    assert load_dataset('synthetic', None, image_size=16, num_synthetic=3).shape == (3, 3, 16, 16)


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y[0] == -1 and y[-1] == 1
    assert torch.equal(to_uint8(y), x)
    assert to_uint8(torch.tensor([-3.0, 5.0, 0.0])).tolist() == [0, 255, 128]


# ----------------------------------------------------------------------------- InMemoryLoader

def tagged_images(n):
    """Image i is 4 pixels wide: column 0 holds i, the rest 250; a flip moves i to column 3."""
    x = torch.full((n, 3, 2, 4), 250, dtype=torch.uint8)
    x[:, :, :, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    return x


def decode_tags(batch):
    """(image ids, flipped?) of a loader batch made from tagged_images."""
    x = to_uint8(batch)
    flipped = x[:, 0, 0, 3] != 250
    ids = torch.where(flipped, x[:, 0, 0, 3], x[:, 0, 0, 0])
    return ids.tolist(), flipped.tolist()


def epoch(loader, e, start=0):
    loader.set_epoch(e)
    return list(loader.iterate(start))


def test_loader_batches_are_reproducible_and_cover_the_epoch():
    loader = InMemoryLoader(tagged_images(40), batch_size=8, seed=3)
    assert len(loader) == 5
    batches = epoch(loader, 0)
    assert all(b.shape == (8, 3, 2, 4) and b.dtype == torch.float32 for b in batches)
    assert all(b.min() >= -1 and b.max() <= 1 for b in batches)
    ids = [i for b in batches for i in decode_tags(b)[0]]
    assert sorted(ids) == list(range(40))
    again = InMemoryLoader(tagged_images(40), batch_size=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch(again, 0)))
    assert [decode_tags(b)[0] for b in epoch(loader, 1)] != [decode_tags(b)[0] for b in batches]
    other_seed = InMemoryLoader(tagged_images(40), batch_size=8, seed=4)
    assert [decode_tags(b)[0] for b in epoch(other_seed, 0)] != [decode_tags(b)[0] for b in batches]


@pytest.mark.parametrize('world_size', [2, 4])
def test_loader_rank_shards_are_disjoint_and_form_the_global_batch(world_size):
    images = tagged_images(48)
    single = epoch(InMemoryLoader(images, batch_size=16, seed=1), 2)
    shards = [epoch(InMemoryLoader(images, batch_size=16, seed=1, rank=r, world_size=world_size), 2)
              for r in range(world_size)]  # no torch.distributed needed: pure indexing
    for b, global_batch in enumerate(single):
        parts = [shard[b] for shard in shards]
        assert all(len(p) == 16 // world_size for p in parts)
        assert torch.equal(torch.cat(parts), global_batch)
        ids = [set(decode_tags(p)[0]) for p in parts]
        assert sum(map(len, ids)) == len(set.union(*ids)) == 16


def test_loader_resumes_mid_epoch_exactly():
    loader = InMemoryLoader(tagged_images(40), batch_size=4, seed=7, rank=1, world_size=2)
    full = epoch(loader, 5)
    resumed = epoch(InMemoryLoader(tagged_images(40), batch_size=4, seed=7, rank=1, world_size=2), 5, start=6)
    assert len(resumed) == len(full) - 6
    assert all(torch.equal(a, b) for a, b in zip(full[6:], resumed))
    assert epoch(loader, 5, start=len(loader)) == []
    with pytest.raises(ValueError, match='start_batch'):
        epoch(loader, 5, start=len(loader) + 1)


def test_loader_flips_about_half():
    images = tagged_images(200)
    flips = [f for b in epoch(InMemoryLoader(images, batch_size=50), 0) for f in decode_tags(b)[1]]
    assert 0.38 < sum(flips) / len(flips) < 0.62
    no_flip = InMemoryLoader(images, batch_size=50, flip=False)
    assert not any(f for b in epoch(no_flip, 0) for f in decode_tags(b)[1])


def test_loader_length_and_partial_last_batch():
    images = tagged_images(10)
    assert len(InMemoryLoader(images, batch_size=3)) == 3
    keep = InMemoryLoader(images, batch_size=3, drop_last=False)
    sizes = [len(b) for b in epoch(keep, 0)]
    assert len(keep) == 4 and sizes == [3, 3, 3, 1]
    ranks = [InMemoryLoader(images, batch_size=4, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert [[len(b) for b in epoch(r, 0)] for r in ranks] == [[2, 2, 1], [2, 2, 1]]


def test_loader_rejects_bad_arguments():
    images = tagged_images(10)
    message = r'batch_size=11 is larger than the dataset \(10 images\); lower batch_size'
    with pytest.raises(ValueError, match=message):
        InMemoryLoader(images, batch_size=11)
    with pytest.raises(ValueError, match='divisible by world_size=3'):
        InMemoryLoader(images, batch_size=4, world_size=3)
    with pytest.raises(ValueError, match='rank'):
        InMemoryLoader(images, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match='uint8'):
        InMemoryLoader(to_model_range(images), batch_size=4)
