"""tf.data input pipelines producing globally sharded `jax.Array` batches.

* Every process reads the same (undecoded, shuffled) record stream and cuts
  each global batch into per-process slices; only its own slice is decoded and
  augmented, and the slices form one global array sharded over the mesh's
  'data' axis (`jax.make_array_from_process_local_data`). The global batches
  are therefore identical whatever the number of processes, so a run on 2
  hosts equals a run on 1 and resumes on any topology. (Reading records is
  cheap; decoding, the expensive part, is split.)
* Training order is a pure function of (seed, step): epoch e is shuffled with
  a seed derived from (seed, e), and augmentation is seeded per example. The
  iterator position is therefore just the step: a run resumed at step s skips
  s mod steps_per_epoch batches of epoch s // steps_per_epoch (before decoding)
  and sees exactly the batches an uninterrupted run would have seen.
* Evaluation visits every example exactly once: the last batch is padded and a
  `mask` marks real examples.
* `val_fraction` holds out the end of the training split as a validation split by
  TFDS slicing (`train[:90%]` / `train[90%:]`, one boundary, so the two are disjoint
  and cover the split; TFDS writes a split's examples in an order shuffled at
  preparation, so its end is a random sample, the same one every run).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.multihost import on_process0

Batch = dict[str, jax.Array]
DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet100')


@dataclass
class Source:
    """A prepared TFDS builder, its splits, and an optional label filter."""

    builder: Any
    train_split: str
    eval_split: str
    num_classes: int
    keep_labels: np.ndarray | None = None  # imagenet2012 label -> new label, or -1
    val_split: str = ''                    # held out of the training split; '' = none


def hold_out(source: Source, fraction: float) -> Source:
    """`source` with the last `fraction` of its training split as its validation split."""
    if not fraction:
        return source
    cut = f'{100 * (1 - fraction):.6g}%'  # TFDS rounds both slices at the same boundary
    return replace(source, train_split=f'{source.train_split}[:{cut}]',
                   val_split=f'{source.train_split}[{cut}:]')


def data_dir_of(cfg: Any) -> str:
    return os.path.expanduser(cfg.get('data_dir') or os.environ.get('TFDS_DATA_DIR')
                              or '~/tensorflow_datasets')


def _prepare_once(make: Any, prepare: Any) -> Any:
    """The builder `make()`, prepared by `prepare(builder)` in process 0 only, once.

    The other processes wait for it, then open the prepared files; so several
    processes starting on a fresh data directory do not race to write it, and a
    failure to prepare (a dataset to download by hand) stops them all with its line.
    """
    builder = make()
    on_process0(lambda: _is_prepared(builder) or prepare(builder))  # process 0's view decides
    return make() if jax.process_count() > 1 else builder


def _is_prepared(builder: Any) -> bool:
    """`builder.is_prepared()`, without the warning TFDS logs for a dataset not prepared yet
    (a fresh data directory: the first run's normal case)."""
    return (builder.data_path / 'dataset_info.json').exists() and builder.is_prepared()


def hide_accelerators_from_tensorflow() -> None:
    """TensorFlow only feeds the input pipeline: with the full `tensorflow` package on a GPU
    machine it would otherwise reserve the GPUs' memory (and TPUs) that JAX needs. Must run
    before TensorFlow's first operation; later it is too late and changes nothing."""
    import tensorflow as tf
    for kind in ('GPU', 'TPU'):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # already initialised, or no such device type
            pass


def get_source(cfg: Any) -> Source:
    """Resolves config.data into a TFDS builder and its splits. Nothing is downloaded."""
    return hold_out(_builder_source(cfg), cfg.get('val_fraction', 0.0))


def _builder_source(cfg: Any) -> Source:
    import tensorflow_datasets as tfds

    hide_accelerators_from_tensorflow()

    from sparse_vit_jax.data.builders import Digits, Imagenet100Folder, read_class_list

    name, data_dir = cfg.name, data_dir_of(cfg)
    if name == 'digits':  # generated from scikit-learn, offline
        builder = _prepare_once(lambda: Digits(data_dir=data_dir),
                                lambda b: b.download_and_prepare())
        return Source(builder, 'train', 'test', 10)
    if name in ('cifar10', 'cifar100'):
        return Source(tfds.builder(name, data_dir=data_dir), 'train', 'test',
                      10 if name == 'cifar10' else 100)
    if name == 'imagenet100':
        ids = read_class_list(cfg.class_list)
        if cfg.source == 'folder':
            def prepare(b: Any) -> None:
                if not cfg.root or not os.path.isdir(cfg.root):
                    raise UserError(f'imagenet100 is not prepared in {data_dir} and '
                                    f'config.data.root={cfg.root!r} is not a folder; point it '
                                    'at root/{train,val}/<wnid>/*.JPEG')
                b.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=cfg.root))

            builder = _prepare_once(
                lambda: Imagenet100Folder(class_ids=ids, data_dir=data_dir), prepare)
            return Source(builder, 'train', 'validation', len(ids))
        if cfg.source == 'imagenet2012':
            builder = tfds.builder('imagenet2012', data_dir=data_dir)
            names = builder.info.features['label'].names
            unknown = [i for i in ids if i not in names]
            if unknown:
                raise UserError(f'{cfg.class_list}: {len(unknown)} IDs are not ImageNet-1k '
                                f'classes (first: {unknown[0]})')
            keep = np.full(len(names), -1, np.int64)
            keep[[names.index(i) for i in ids]] = np.arange(len(ids))
            return Source(builder, 'train', 'validation', len(ids), keep)
        raise UserError(f"config.data.source must be 'folder' or 'imagenet2012', "
                        f'got {cfg.source!r}')
    raise UserError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')


def _open(source: Source, split: str, *, shuffle_seed: int | None = None) -> Any:
    """The split's tf.data.Dataset with undecoded images (decoded after shuffling)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    b = source.builder
    try:
        ds = b.as_dataset(
            split=split, shuffle_files=shuffle_seed is not None,
            decoders={'image': tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False))
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        raise UserError(
            f'{b.name} is not prepared in {b.data_dir_root} ({str(e).splitlines()[0][:120]}); '
            f'on a machine with internet run python -c "import tensorflow_datasets as tfds; '
            f"tfds.builder('{b.name}', data_dir='DIR').download_and_prepare()\" and copy "
            f'DIR/{b.name} into {b.data_dir_root} (or set config.data.data_dir / '
            '$TFDS_DATA_DIR)') from None
    except ValueError as e:  # a slice that rounds to no example
        if 'corresponds to no data' not in str(e):
            raise
        raise _empty(source, split) from None
    ds = ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})
    if source.keep_labels is not None:
        table = tf.constant(source.keep_labels)
        ds = ds.map(lambda ex: {'image': ex['image'], 'label': tf.gather(table, ex['label'])})
        ds = ds.filter(lambda ex: ex['label'] >= 0)
    return ds


def _count(ds: Any, where: tuple[str, str]) -> int:
    import tensorflow as tf

    n = int(ds.cardinality())
    if n >= 0:
        return n
    with _readable(where):
        return int(ds.map(lambda ex: 0).reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))


@contextlib.contextmanager
def _readable(where: tuple[str, str]) -> Iterator[None]:
    """A missing or damaged record file -> one UserError naming the split and its directory."""
    import tensorflow as tf
    try:
        yield
    except (tf.errors.NotFoundError, tf.errors.DataLossError) as e:
        what = (e.message or str(e)).split('}')[-1].strip().split(' [Op:')[0][:300]
        split, directory = where
        raise UserError(f'cannot read the prepared dataset (split {split!r} in {directory}): '
                        f'{what}; prepare it again: delete {directory}, then re-run') from None


def _where(source: Source, split: str) -> tuple[str, str]:
    return split, str(source.builder.data_dir)


def _numpy(ds: Any, where: tuple[str, str]) -> Iterator[dict[str, np.ndarray]]:
    with _readable(where):
        yield from ds.as_numpy_iterator()


def _my_slice(ds: Any, global_batch: int, local: int) -> Any:
    """Global batches of undecoded examples -> this process's rows, one example at a time."""
    p = jax.process_index()
    ds = ds.batch(global_batch, drop_remainder=True)
    return ds.map(lambda b: {k: v[p * local:(p + 1) * local] for k, v in b.items()}).unbatch()


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    n_data = mesh.shape['data']
    if global_batch % n_data or global_batch % jax.process_count():
        raise UserError(f'global batch {global_batch} is not divisible by the {n_data} devices '
                        f'of the data axis ({jax.process_count()} processes); choose a multiple')
    return global_batch // jax.process_count()


def _to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    sharding = NamedSharding(mesh, P('data'))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
    """Runs `iterator` in a background thread, `size` items ahead (device puts included).

    The thread stops (and is joined) when the returned generator is closed or collected.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
        put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)  # no reader left running behind the caller's back


@dataclass
class TrainData:
    """A deterministic, resumable training stream; `steps_per_epoch` in global batches."""

    source: Source
    global_batch: int
    local_batch: int
    steps_per_epoch: int
    num_classes: int
    num_examples: int

    @classmethod
    def create(cls, cfg: Any, global_batch: int, mesh: Mesh, source: Source | None = None
               ) -> TrainData:
        source = source or get_source(cfg)
        local = local_batch_size(global_batch, mesh)
        n = _count(_open(source, source.train_split), _where(source, source.train_split))
        if n < global_batch:
            raise UserError(f'{cfg.name} train split has {n} examples, fewer than the batch '
                            f'{global_batch}; lower config.batch_size')
        return cls(source, global_batch, local, n // global_batch, source.num_classes, n)

    def batches(self, cfg: Any, image_size: int, seed: int, start_step: int, mesh: Mesh
                ) -> Iterator[Batch]:
        """Global batches from `start_step` on, forever, prefetched onto the mesh."""
        return prefetch(_to_global(b, mesh) for b in self._numpy_batches(
            cfg, image_size, seed, start_step))

    def _numpy_batches(self, cfg: Any, image_size: int, seed: int, start_step: int
                       ) -> Iterator[dict[str, np.ndarray]]:
        import tensorflow as tf

        from sparse_vit_jax.data.preprocess import train_image

        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while True:
            epoch_seed = int(np.random.default_rng([seed, epoch]).integers(2 ** 31))
            ds = _open(self.source, self.source.train_split, shuffle_seed=epoch_seed)
            ds = ds.enumerate().map(lambda i, ex: {'index': i, **ex})
            # A buffer past the split's size shuffles the same (TF fills it with the whole
            # split either way) but TF would reserve it: a huge one crashes the process.
            buffer = min(cfg.shuffle_buffer, self.num_examples)
            ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
            ds = ds.take(self.steps_per_epoch * self.global_batch)
            ds = ds.skip(skip * self.global_batch)  # resume: skipped before decoding
            ds = _my_slice(ds, self.global_batch, self.local_batch)

            def prep(ex: dict[str, tf.Tensor], e: int = epoch) -> dict[str, tf.Tensor]:
                s = tf.stack([tf.constant(seed, tf.int64), e * (1 << 32) + ex['index']])
                return {'image': train_image(ex['image'], s, mode=cfg.preprocess,
                                             size=image_size, flip=cfg.flip),
                        'label': tf.cast(ex['label'], tf.int32)}

            ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            yield from _numpy(ds, _where(self.source, self.source.train_split))
            epoch, skip = epoch + 1, 0


def _empty(source: Source, split: str) -> UserError:
    return UserError(f'the {"validation " * (split == source.val_split)}split {split} of '
                     f'{source.builder.name} holds no examples' +
                     ('; raise config.data.val_fraction' if split == source.val_split else ''))


def split_size(source: Source, split: str, ds: Any = None) -> int:
    """The number of examples of `split` (`ds`, if opened already); the held-out validation
    split must have some."""
    n = _count(_open(source, split) if ds is None else ds, _where(source, split))
    if n == 0 and split == source.val_split:
        raise _empty(source, split)
    return n


def eval_batches(cfg: Any, image_size: int, global_batch: int, mesh: Mesh,
                 source: Source | None = None, count: int | None = None,
                 split: str = '') -> tuple[Iterator[Batch], int]:
    """(global batches with a 0/1 'mask', number of real examples in the split).

    `split`: the split read ('' = the test split; `source.val_split` for validation).
    `count`: the split's size if known (counting a filtered split reads it whole). A batch
    larger than the split is cut to the split's size, rounded up to a multiple of the devices
    and processes (the rest would be padding, allocated all the same).
    """
    import tensorflow as tf

    from sparse_vit_jax.data.preprocess import eval_image

    source = source or get_source(cfg)
    split = split or source.eval_split
    local_batch_size(global_batch, mesh)  # a batch the devices do not divide: one line
    ds = _open(source, split)
    where = _where(source, split)
    n = split_size(source, split, ds) if count is None else count
    unit = math.lcm(mesh.shape['data'], jax.process_count())
    global_batch = min(global_batch, max(1, math.ceil(n / unit)) * unit)
    local = local_batch_size(global_batch, mesh)
    padded = math.ceil(n / global_batch) * global_batch
    ds = ds.map(lambda ex: {**ex, 'mask': tf.constant(1.0, tf.float32)})
    pad = tf.data.Dataset.from_tensors({'image': tf.constant(b''), 'label': tf.constant(
        0, ds.element_spec['label'].dtype), 'mask': tf.constant(0.0, tf.float32)})
    ds = _my_slice(ds.concatenate(pad.repeat(padded - n)), global_batch, local)

    def prep(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = tf.cond(ex['mask'] > 0, lambda: eval_image(ex['image'], size=image_size),
                        lambda: tf.zeros((image_size, image_size, 3), tf.float32))
        return {'image': image, 'label': tf.cast(ex['label'], tf.int32), 'mask': ex['mask']}

    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local).prefetch(tf.data.AUTOTUNE)
    return prefetch(_to_global(b, mesh) for b in _numpy(ds, where)), n
