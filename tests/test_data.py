"""Input pipelines on the real digits builder, a generated ImageNet folder tree, and mock TFDS."""

import itertools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sparse_vit_jax.configs import base_config
from sparse_vit_jax.data import TrainData, eval_batches, get_source
from sparse_vit_jax.data.builders import DIGITS_TRAIN, read_class_list
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.train.sharding import make_mesh


def data_cfg(tmp_path, **kw):
    c = base_config().data
    c.data_dir = str(tmp_path / 'tfds')
    c.flip = False
    c.shuffle_buffer = 2000
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('digits')


def test_digits_builder_splits_and_values(digits_dir):
    from sklearn.datasets import load_digits
    source = get_source(data_cfg(digits_dir))
    info = source.builder.info
    assert info.splits['train'].num_examples == DIGITS_TRAIN == 1437
    assert info.splits['test'].num_examples == 360
    ds = tfds.as_numpy(source.builder.as_dataset(split='train'))
    images, labels = zip(*((ex['image'], ex['label']) for ex in ds))
    images = np.stack(images)
    assert images.shape == (1437, 8, 8, 1) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert sorted(set(labels)) == list(range(10))
    # independent check: the documented split and scaling of scikit-learn's data
    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    ref = np.round(d.images[perm[:DIGITS_TRAIN]] * 255 / 16).astype(np.uint8)
    assert sorted(map(bytes, ref)) == sorted(map(bytes, images[..., 0]))


def test_a_fresh_data_dir_is_prepared_without_warnings(tmp_path, caplog):
    """TFDS logs a warning when it finds a dataset not prepared yet: the normal first run."""
    import logging
    with caplog.at_level(logging.WARNING):
        source = get_source(data_cfg(tmp_path))
    assert source.builder.is_prepared()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_train_batches_deterministic_resumable_sharded(digits_dir):
    mesh = make_mesh()
    cfg = data_cfg(digits_dir)
    data = TrainData.create(cfg, 64, mesh)
    assert data.steps_per_epoch == 1437 // 64
    first = list(itertools.islice(data.batches(cfg, 16, seed=3, start_step=0, mesh=mesh), 30))
    b = first[0]
    assert b['image'].shape == (64, 16, 16, 3) and b['image'].dtype == np.float32
    assert len(b['image'].sharding.device_set) == jax.device_count() == 8
    img = np.asarray(b['image'])
    assert -1.0 <= img.min() < -0.9 and 0.9 < img.max() <= 1.0
    again = list(itertools.islice(data.batches(cfg, 16, seed=3, start_step=0, mesh=mesh), 30))
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x['image'], y['image'])
    resumed = list(itertools.islice(data.batches(cfg, 16, seed=3, start_step=25, mesh=mesh), 5))
    for x, y in zip(first[25:], resumed):  # crosses the epoch boundary at step 22
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['label'], y['label'])
    # A shuffle buffer past the split's 1,437 examples shuffles the same (TF would reserve it:
    # 1e11 crashed the process)
    cfg.shuffle_buffer = 10 ** 11
    huge = list(itertools.islice(data.batches(cfg, 16, seed=3, start_step=20, mesh=mesh), 5))
    for x, y in zip(first[20:], huge):
        np.testing.assert_array_equal(x['label'], y['label'])
    cfg.shuffle_buffer = 2000
    other = next(data.batches(cfg, 16, seed=4, start_step=0, mesh=mesh))
    assert not np.array_equal(other['label'], first[0]['label'])
    # one epoch sees distinct examples
    epoch = np.concatenate([np.asarray(x['image']).reshape(64, -1) for x in first[:22]])
    assert len({row.tobytes() for row in epoch}) > 0.97 * len(epoch)


def test_eval_counts_every_example_once(digits_dir):
    mesh = make_mesh()
    cfg = data_cfg(digits_dir)
    batches, n = eval_batches(cfg, 8, 48, mesh)  # 360 = 7 * 48 + 24
    batches = list(batches)
    assert n == 360 and len(batches) == 8
    masks = np.concatenate([np.asarray(b['mask']) for b in batches])
    assert masks.sum() == 360 and masks[:360].all() and not masks[360:].any()
    labels = np.concatenate([np.asarray(b['label']) for b in batches])[:360]
    ref = [ex['label'] for ex in tfds.as_numpy(get_source(cfg).builder.as_dataset(split='test'))]
    np.testing.assert_array_equal(labels, ref)
    # a batch past the split is cut to it (360, a multiple of the 8 devices): no padding
    whole, n = eval_batches(cfg, 8, 10 ** 11, mesh)
    whole = list(whole)
    assert n == 360 and len(whole) == 1 and whole[0]['mask'].shape == (360,)
    np.testing.assert_array_equal(whole[0]['label'], ref)
    np.testing.assert_array_equal(whole[0]['image'], np.concatenate(
        [np.asarray(b['image']) for b in batches])[:360])


def test_validation_split_is_held_out_of_the_training_split(digits_dir):
    """val_fraction=0.1: the end of the training split (144 of 1,437 at TFDS's rounding) is the
    validation split: the two partition the split as TFDS reads it whole, and the training
    batches of an epoch are drawn from the rest only."""
    from collections import Counter
    mesh = make_mesh()
    cfg = data_cfg(digits_dir, val_fraction=0.1)
    source = get_source(cfg)

    def raw(split):
        return Counter((ex['image'].tobytes(), int(ex['label']))
                       for ex in tfds.as_numpy(source.builder.as_dataset(split=split)))

    whole, kept, held = raw('train'), raw(source.train_split), raw(source.val_split)
    assert kept.total() == 1293 and held.total() == 144 == round(0.1 * 1437)
    assert kept + held == whole

    def images(split):  # every example once, preprocessed at the images' own 8x8 size
        batches, n = eval_batches(cfg, 8, 48, mesh, source, split=split)
        seen = Counter()
        for b in batches:
            for x, y, m in zip(*(np.asarray(b[k]) for k in ('image', 'label', 'mask'))):
                seen[(x.tobytes(), int(y))] += int(m)
        return n, +seen

    n_val, _ = images(source.val_split)
    assert n_val == 144
    data = TrainData.create(cfg, 64, mesh, source)
    assert (data.num_examples, data.steps_per_epoch) == (1293, 1293 // 64)
    _, train_part = images(source.train_split)
    epoch = Counter()
    for b in itertools.islice(data.batches(cfg, 8, seed=3, start_step=0, mesh=mesh),
                              data.steps_per_epoch):
        epoch.update((x.tobytes(), int(y)) for x, y in zip(np.asarray(b['image']),
                                                            np.asarray(b['label'])))
    assert epoch.total() == 20 * 64 and epoch <= train_part
    tiny = get_source(data_cfg(digits_dir, val_fraction=1e-4))  # 0.14 examples: none
    with pytest.raises(UserError, match='holds no examples; raise config.data.val_fraction'):
        eval_batches(cfg, 8, 48, mesh, tiny, split=tiny.val_split)


def test_batch_not_divisible_by_devices(digits_dir):
    with pytest.raises(UserError, match='not divisible by the 8 devices'):
        TrainData.create(data_cfg(digits_dir), 12, make_mesh())


def test_cifar_not_prepared_is_one_clear_error(tmp_path):
    cfg = data_cfg(tmp_path, name='cifar10')
    with pytest.raises(UserError, match='cifar10 is not prepared in .*download_and_prepare'):
        TrainData.create(cfg, 16, make_mesh())


def write_tree(root, classes, n_train=3, n_val=2):
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = tuple(int(s) for s in rng.integers(12, 40, 2))
                arr = rng.integers(0, 255, size + (3,), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f'{c}_{i}.JPEG', format='JPEG')


def test_imagenet100_folder_tree(tmp_path):
    classes = ['n01440764', 'n02102040', 'n02979186']
    write_tree(tmp_path / 'tree', classes + ['n09999999'])  # an extra, unlisted class
    (tmp_path / 'classes.txt').write_text('# the subset\nn02979186\nn01440764\n\nn02102040\n')
    cfg = data_cfg(tmp_path, name='imagenet100', root=str(tmp_path / 'tree'),
                   class_list=str(tmp_path / 'classes.txt'))
    source = get_source(cfg)
    assert source.num_classes == 3
    assert source.builder.info.splits['train'].num_examples == 9
    ds = tfds.as_numpy(source.builder.as_dataset(split='validation'))
    got = {ex['file_name'].decode().split('_')[0]: ex['label'] for ex in ds}
    assert got == {'n02979186': 0, 'n01440764': 1, 'n02102040': 2}  # class-list order
    mesh = make_mesh()
    batches, n = eval_batches(cfg, 32, 8, mesh)
    b = list(batches)
    assert n == 6 and sum(float(np.asarray(x['mask']).sum()) for x in b) == 6
    assert b[0]['image'].shape == (8, 32, 32, 3)
    train = TrainData.create(data_cfg(tmp_path, name='imagenet100', root=str(tmp_path / 'tree'),
                                      class_list=str(tmp_path / 'classes.txt'),
                                      preprocess='inception_crop'), 8, mesh)
    x = next(train.batches(cfg, 32, 0, 0, mesh))
    assert x['image'].shape == (8, 32, 32, 3) and int(np.asarray(x['label']).max()) < 3


def test_imagenet100_bad_class_lists_and_missing_classes(tmp_path):
    cases = {'malformed.txt': ('n0144076\n', 'not a WordNet ID'),
             'dup.txt': ('n01440764\nn01440764\n', 'duplicate class n01440764'),
             'empty.txt': ('# nothing\n', 'is empty')}
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=msg):
            read_class_list(tmp_path / name)
    write_tree(tmp_path / 'tree', ['n01440764'])
    (tmp_path / 'two.txt').write_text('n01440764\nn02102040\n')
    cfg = data_cfg(tmp_path, name='imagenet100', root=str(tmp_path / 'tree'),
                   class_list=str(tmp_path / 'two.txt'))
    with pytest.raises(UserError, match='lacks 1 of the listed classes .first: n02102040'):
        get_source(cfg)


def test_shared_paper_class_list_is_valid():
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'imagenet100_classes.txt'
    if not path.exists():
        pytest.skip('../shared is not beside this checkout')
    assert len(read_class_list(path)) == 100


@pytest.mark.parametrize('name,classes', [('cifar10', 10), ('cifar100', 100)])
def test_mock_cifar(tmp_path, name, classes):
    mesh = make_mesh()
    cfg = data_cfg(tmp_path, name=name)
    with tfds.testing.mock_data(num_examples=160):
        data = TrainData.create(cfg, 16, mesh)
        assert data.num_classes == classes and data.steps_per_epoch == 10
        b = next(data.batches(cfg, 32, 0, 0, mesh))
        batches, n = eval_batches(cfg, 32, 16, mesh)
        masks = sum(float(np.asarray(x['mask']).sum()) for x in batches)
    assert b['image'].shape == (16, 32, 32, 3) and n == 160 and masks == 160


def test_mock_imagenet2012_filtered_by_class_list(tmp_path):
    cfg = data_cfg(tmp_path, name='imagenet100', source='imagenet2012',
                   class_list=str(tmp_path / 'classes.txt'))
    mesh = make_mesh()
    with tfds.testing.mock_data(num_examples=600):
        names = tfds.builder('imagenet2012', data_dir=cfg.data_dir).info.features['label'].names
        (tmp_path / 'classes.txt').write_text('\n'.join([names[5], names[900], names[17]]))
        source = get_source(cfg)
        batches, n = eval_batches(cfg, 32, 8, mesh, source)
        labels = np.concatenate([np.asarray(b['label'])[np.asarray(b['mask']) > 0]
                                 for b in batches])
    assert source.num_classes == 3 and len(labels) == n > 0
    assert set(labels) <= {0, 1, 2}
    (tmp_path / 'bad.txt').write_text('n00000001\n')
    cfg.class_list = str(tmp_path / 'bad.txt')
    with tfds.testing.mock_data(num_examples=10), pytest.raises(
            UserError, match='not ImageNet-1k classes'):
        get_source(cfg)


def test_imagenet100_folder_with_broken_images_is_refused_whole(tmp_path):
    """Every undecodable file named in one line; nothing prepared, so a fix + re-run works."""
    classes = ['n01440764', 'n02102040']
    write_tree(tmp_path / 'tree', classes)
    good = tmp_path / 'tree' / 'train' / 'n01440764' / 'n01440764_0.JPEG'
    truncated = tmp_path / 'tree' / 'train' / 'n02102040' / 'n02102040_1.JPEG'
    truncated.write_bytes(good.read_bytes()[:40])
    garbage = tmp_path / 'tree' / 'val' / 'n01440764' / 'n01440764_1.JPEG'
    garbage.write_bytes(b'\x00not an image' * 10)
    (tmp_path / 'classes.txt').write_text('\n'.join(classes) + '\n')
    cfg = data_cfg(tmp_path, name='imagenet100', root=str(tmp_path / 'tree'),
                   class_list=str(tmp_path / 'classes.txt'))
    with pytest.raises(UserError, match='2 images under .* do not decode') as e:
        get_source(cfg)
    assert str(truncated) in str(e.value) and str(garbage) in str(e.value)
    truncated.unlink()
    garbage.unlink()
    assert get_source(cfg).builder.info.splits['train'].num_examples == 5


def test_tensorflow_never_sees_accelerators(tmp_path):
    """The pipeline hides GPUs and TPUs from TensorFlow before its first operation (a user
    with the full `tensorflow` package would otherwise lose the GPU memory to it)."""
    import subprocess
    import sys
    code = f'''
import tensorflow as tf
calls = []
real = tf.config.set_visible_devices
def spy(devices, kind=None):
    calls.append((kind, list(devices)))
    return real(devices, kind)
tf.config.set_visible_devices = spy
from sparse_vit_jax.configs import base_config
from sparse_vit_jax.data import get_source
c = base_config().data
c.data_dir = {str(tmp_path)!r}
get_source(c)
print(sorted(calls))
print([d.device_type for d in tf.config.get_visible_devices()])
'''
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.strip().splitlines()
    assert out[-2] == "[('GPU', []), ('TPU', [])]" and out[-1] == "['CPU']", r.stdout
