"""TFDS builders that need no download: scikit-learn's digits and ImageNet-100 from folders.

* `Digits`: the 1,797 real 8x8 handwritten digits that ship inside
  scikit-learn, values 0..16 scaled to 0..255 (x * 255 / 16, rounded), one
  channel. Fixed split: a permutation with numpy seed 0; its first 1,437
  images are `train`, the other 360 `test`.
* `Imagenet100Folder`: a tree `root/{train,val}/<wnid>/*.JPEG` prepared once
  into TFRecords; the labels are the positions of the WordNet IDs in the class
  list file (0..99 in file order). Each class list gets its own builder
  config, named by a hash of the list.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from sparse_vit_jax.errors import UserError

DIGITS_TRAIN = 1437
WNID = re.compile(r'n\d{8}')
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's embedded handwritten digits as a TFDS dataset."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description='scikit-learn load_digits: 1,797 8x8 handwritten digits (UCI).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(8, 8, 1)),
                'label': tfds.features.ClassLabel(num_classes=10)}),
            supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager
        return {'train': self._generate_examples(True), 'test': self._generate_examples(False)}

    def _generate_examples(self, train: bool):
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        perm = np.random.default_rng(0).permutation(len(images))
        for i in (perm[:DIGITS_TRAIN] if train else perm[DIGITS_TRAIN:]):
            yield int(i), {'image': images[i], 'label': int(d.target[i])}


def read_class_list(path: str | Path) -> list[str]:
    """WordNet IDs, one per line ('#' comments and blank lines skipped), validated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'class list not found: {path}')
    ids: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        if not WNID.fullmatch(line):
            raise UserError(f'{path}:{n}: {line!r} is not a WordNet ID like n01440764')
        if line in ids:
            raise UserError(f'{path}:{n}: duplicate class {line}')
        ids.append(line)
    if not ids:
        raise UserError(f'class list {path} is empty')
    return ids


class Imagenet100Folder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ImageNet subset from `root/{train,val}/<wnid>/*.JPEG`, labels in class-list order."""

    VERSION = tfds.core.Version('1.0.0')
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Pass the folder root as manual_dir.'

    def __init__(self, *, class_ids: list[str], **kwargs):
        self.class_ids = list(class_ids)
        digest = hashlib.sha1('\n'.join(self.class_ids).encode()).hexdigest()[:10]
        config = tfds.core.BuilderConfig(name=f'classes_{digest}',
                                         description=f'{len(class_ids)} classes')
        self.BUILDER_CONFIGS = [config]
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description='ImageNet subset from an image folder tree.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=self.class_ids),
                'file_name': tfds.features.Text()}),
            supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        files = {}
        for split, folder in (('train', 'train'), ('validation', 'val')):
            missing = [c for c in self.class_ids if not (root / folder / c).is_dir()]
            if missing:
                raise UserError(f'{root / folder} lacks {len(missing)} of the listed classes '
                                f'(first: {missing[0]}); expected {root}/{folder}/<wnid>/*.JPEG')
            files[split] = [(label, f) for label, wnid in enumerate(self.class_ids)
                            for f in sorted((root / folder / wnid).iterdir())
                            if f.suffix.lower() in IMAGE_SUFFIXES]
        bad = undecodable([f for fs in files.values() for _, f in fs])
        if bad:  # before anything is written: nothing is half-prepared
            raise UserError(f'{len(bad)} images under {root} do not decode: {"; ".join(bad)}; '
                            'replace or remove them, then re-run')
        return {split: self._generate_examples(fs) for split, fs in files.items()}

    def _generate_examples(self, files: list[tuple[int, Path]]):
        for label, f in files:
            yield f'{f.parent.name}/{f.name}', {'image': str(f), 'label': label,
                                                'file_name': f.name}


def undecodable(files: list[Path]) -> list[str]:
    """'path (why)' for every file that TensorFlow's decoder (the pipeline's) cannot read."""
    import tensorflow as tf

    def why(f: Path) -> str | None:
        try:
            tf.io.decode_image(tf.io.read_file(str(f)), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError, ValueError) as e:
            return f'{f} ({(e.message if hasattr(e, "message") else str(e)).strip()[:80]})'
        return None

    with ThreadPoolExecutor(8) as pool:
        return [w for w in pool.map(why, files) if w]
