"""Image preprocessing in TensorFlow (runs inside tf.data, after shuffling).

Modes:
* 'paper': resize to the model's size, random horizontal flip (train), scale
  to [-1, 1] -- the recipe of the paper's implementation.
* 'inception_crop': the standard ViT fine-tuning augmentation: random crop of
  5-100% of the area with aspect ratio 3/4..4/3, resized, random flip; eval
  images are resized.
Randomness is stateless, seeded per example, so a seed fixes the batches.
"""

from __future__ import annotations

import tensorflow as tf

MODES = ('paper', 'inception_crop')


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _resize_and_scale(image: tf.Tensor, size: int) -> tf.Tensor:
    image = tf.image.resize(tf.cast(image, tf.float32), (size, size), method='bilinear')
    return image / 127.5 - 1.0


def train_image(image_bytes: tf.Tensor, seed: tf.Tensor, *, mode: str, size: int,
                flip: bool) -> tf.Tensor:
    image = decode(image_bytes)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    if mode == 'inception_crop':
        begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seeds[0],
            area_range=(0.05, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
            min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
        image = tf.slice(image, begin, crop)
    image = _resize_and_scale(image, size)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    return image


def eval_image(image_bytes: tf.Tensor, *, size: int) -> tf.Tensor:
    return _resize_and_scale(decode(image_bytes), size)
