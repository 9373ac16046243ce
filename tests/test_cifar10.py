"""CIFAR-10 sources: tfds (mock_data and a real ArrayRecord build, both without TensorFlow) and EDM's zip."""
import io
import json
import os
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddo_jax.data import cifar10
from ddo_jax.data.pipeline import IndexBatches, PairedBatches

MOCK = dict(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE)


def _random_cifar(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _png(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _to_uint8(x):
  """Inverse of the EDM scaling; exact because uint8 / 127.5 - 1 is exact to float32 rounding."""
  return np.rint((x + 1) * 127.5).astype(np.uint8)


def write_tfds_array_record(data_dir, images, labels, split="train"):
  """A real tfds cifar10 build (ArrayRecord of tf.Examples with PNG images), written without TF."""
  from array_record.python import array_record_module
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2 as f
  builder = tfds.builder("cifar10", data_dir=str(data_dir), file_format="array_record")
  os.makedirs(builder.data_dir, exist_ok=True)
  path = os.path.join(builder.data_dir, f"cifar10-{split}.array_record-00000-of-00001")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for i, (image, label) in enumerate(zip(images, labels)):
    feature = {"id": f.Feature(bytes_list=f.BytesList(value=[f"{split}_{i:05d}".encode()])),
               "image": f.Feature(bytes_list=f.BytesList(value=[_png(image)])),
               "label": f.Feature(int64_list=f.Int64List(value=[int(label)]))}
    writer.write(tf_example_pb2.Example(features=f.Features(feature=feature)).SerializeToString())
  writer.close()
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name="cifar10",
                                           split=split, filetype_suffix="array_record")
  info = tfds.core.SplitInfo(name=split, shard_lengths=[len(images)], num_bytes=0,
                             filename_template=template)
  builder.info.set_splits(tfds.core.SplitDict([info]))
  builder.info.write_to_directory(builder.data_dir)


def write_edm_zip(path, images, labels, names):
  """A zip laid out like EDM's dataset_tool.py output: PNG members plus dataset.json."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
    for name, image in zip(names, images):
      zf.writestr(name, _png(image))
    if labels is not False:
      value = None if labels is None else [[n, int(l)] for n, l in zip(names, labels)]
      zf.writestr("dataset.json", json.dumps({"labels": value}))


# ---------------------------------------------------------------------------------------------
# tfds with mock_data.


def _check_batch(batch, size):
  assert set(batch) == {"x", "label"}
  assert batch["x"].dtype == np.float32 and batch["x"].shape == (size, 32, 32, 3)
  assert batch["label"].dtype == np.float32 and batch["label"].shape == (size, 10)
  assert batch["x"].min() >= -1 and batch["x"].max() <= 1
  np.testing.assert_array_equal(batch["x"], _to_uint8(batch["x"]) / np.float32(127.5) - 1)
  assert set(np.unique(batch["label"])) <= {0.0, 1.0}
  np.testing.assert_array_equal(batch["label"].sum(1), 1)


def test_tfds_mock_shapes_range_onehot(tmp_path):
  with tfds.testing.mock_data(**MOCK):
    source, n = cifar10.load_tfds("train", data_dir=str(tmp_path), cache=False)
    assert n == MOCK["num_examples"]
    batch = source(np.array([0, 5, 5, 23, 1]))
  _check_batch(batch, 5)
  np.testing.assert_array_equal(batch["x"][1], batch["x"][2])
  assert "tensorflow" not in sys.modules


def test_tfds_mock_deterministic_and_per_index(tmp_path):
  idx = np.array([7, 3, 11, 0])
  with tfds.testing.mock_data(**MOCK):
    a, _ = cifar10.load_tfds("train", data_dir=str(tmp_path), cache=False)
    b, _ = cifar10.load_tfds("train", data_dir=str(tmp_path), cache=False)
    ba, bb = a(idx), b(idx)
    singles = [a(np.array([i])) for i in idx[::-1]]
    cached, _ = cifar10.load_tfds("train", data_dir=str(tmp_path), cache=True)
    bc = cached(idx)
  for k in ba:
    np.testing.assert_array_equal(ba[k], bb[k])
    np.testing.assert_array_equal(ba[k], np.concatenate([s[k] for s in singles[::-1]]))
    np.testing.assert_array_equal(ba[k], bc[k])


@pytest.mark.parametrize("cache", [False, True])
def test_tfds_mock_plugs_into_paired_batches(tmp_path, cache):
  with tfds.testing.mock_data(**MOCK):
    source, n = cifar10.load_tfds("train", data_dir=str(tmp_path), cache=cache)
    it = PairedBatches(source, n, global_batch=16, seed=3)
    first, second = it.next(), it.next()
    it.set_state({"position": 1})
    again = it.next()
    expected = source(IndexBatches(n, 16, seed=3)[1])
  for batch in (first, second):
    assert set(batch) == {"real"}
    _check_batch(batch["real"], 16)
  for k in expected:
    np.testing.assert_array_equal(second["real"][k], expected[k])
    np.testing.assert_array_equal(again["real"][k], expected[k])


def test_out_of_range_indices_raise(tmp_path):
  with tfds.testing.mock_data(**MOCK):
    source, n = cifar10.load_tfds("train", data_dir=str(tmp_path), cache=False)
    with pytest.raises(IndexError):
      source(np.array([0, n]))
    with pytest.raises(IndexError):
      source(np.array([-1]))


# ---------------------------------------------------------------------------------------------
# tfds with a real ArrayRecord build (the decode path mock_data skips).


def test_tfds_array_record_exact_pixels_and_labels(tmp_path):
  images, labels = _random_cifar(12)
  write_tfds_array_record(tmp_path, images, labels)
  idx = np.array([4, 0, 11, 4, 7])
  source, n = cifar10.load_tfds("train", data_dir=str(tmp_path), cache=False)
  assert n == 12
  batch = source(idx)
  _check_batch(batch, len(idx))
  np.testing.assert_array_equal(_to_uint8(batch["x"]), images[idx])
  np.testing.assert_array_equal(batch["label"].argmax(1), labels[idx])
  cached, _ = cifar10.load_tfds("train", data_dir=str(tmp_path), cache=True)
  for k, v in cached(idx).items():
    np.testing.assert_array_equal(v, batch[k])
  head, m = cifar10.load({"source": "tfds", "split": "train[:5]", "data_dir": str(tmp_path)})
  assert m == 5
  np.testing.assert_array_equal(_to_uint8(head(np.arange(5))["x"]), images[:5])
  assert "tensorflow" not in sys.modules


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(cifar10.DatasetNotFoundError) as e:
    cifar10.load_tfds("train", data_dir=str(tmp_path))
  msg = str(e.value)
  assert "not prepared" in msg and str(tmp_path) in msg
  assert "pip install tensorflow" in msg
  assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in msg


def test_tfds_tfrecord_only_says_to_convert(tmp_path):
  builder = tfds.builder("cifar10", data_dir=str(tmp_path))
  builder.info.set_file_format("tfrecord")
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  with pytest.raises(cifar10.DatasetNotFoundError) as e:
    cifar10.load({"source": "tfds", "data_dir": str(tmp_path)})
  msg = str(e.value)
  assert "['tfrecord'] only" in msg
  assert f"tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record" in msg
  assert "--file_format=array_record" in msg


# ---------------------------------------------------------------------------------------------
# EDM's zip.


def _edm_names(n):
  return [f"{i // 1000:05d}/img{i:08d}.png" for i in range(n)]


def test_edm_zip_exact_pixels_labels_and_order(tmp_path):
  images, labels = _random_cifar(7, seed=1)
  names = _edm_names(7)
  order = [3, 0, 6, 1, 5, 2, 4]  # members written out of order: the loader sorts names, as EDM does
  path = str(tmp_path / "cifar10-32x32.zip")
  write_edm_zip(path, images[order], labels[order], [names[i] for i in order])
  source, n = cifar10.load_edm_zip(path)
  assert n == 7
  idx = np.array([6, 0, 3, 3])
  batch = source(idx)
  _check_batch(batch, 4)
  np.testing.assert_array_equal(_to_uint8(batch["x"]), images[idx])
  np.testing.assert_array_equal(batch["x"], images[idx] / np.float32(127.5) - 1)
  np.testing.assert_array_equal(batch["label"], np.eye(10, dtype=np.float32)[labels[idx]])


@pytest.mark.parametrize("labels", [None, False])  # "labels": null, or no dataset.json at all
def test_edm_zip_without_labels_is_unconditional(tmp_path, labels):
  images, _ = _random_cifar(3, seed=2)
  path = str(tmp_path / "uncond.zip")
  write_edm_zip(path, images, labels, _edm_names(3))
  source, n = cifar10.load({"source": "edm_zip", "path": path})
  batch = source(np.arange(n))
  assert set(batch) == {"x"}
  np.testing.assert_array_equal(_to_uint8(batch["x"]), images)


def test_edm_zip_missing_says_how_to_make_it(tmp_path):
  config = ml_collections.ConfigDict({"source": "edm_zip", "path": str(tmp_path / "cifar10-32x32.zip")})
  with pytest.raises(cifar10.DatasetNotFoundError) as e:
    cifar10.load(config)
  msg = str(e.value)
  assert "cifar10-32x32.zip" in msg
  assert "python dataset_tool.py --source=cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip" in msg


def test_edm_zip_with_unlabelled_images_fails(tmp_path):
  images, labels = _random_cifar(3, seed=3)
  names = _edm_names(3)
  path = str(tmp_path / "partial.zip")
  with zipfile.ZipFile(path, "w") as zf:
    for name, image in zip(names, images):
      zf.writestr(name, _png(image))
    zf.writestr("dataset.json", json.dumps({"labels": [[names[0], int(labels[0])]]}))
  with pytest.raises(ValueError, match="no label for 2 images"):
    cifar10.load_edm_zip(path)


def test_load_rejects_unknown_source():
  with pytest.raises(ValueError, match="'edm_zip', 'synthetic', 'tfds'"):
    cifar10.load(ml_collections.ConfigDict({"source": "imagenet"}))


def test_evaluate_reads_tfds_cifar10_as_uint8(tmp_path):
  """launch.evaluate --images tfds:cifar10[:split][@data_dir] (e.g. --make_ref on CIFAR-10 train)."""
  from launch import evaluate as cli  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(**MOCK):
    src = cli.open_images(f"tfds:cifar10:train@{tmp_path}")
    batches = list(src.batches(10))
    source, n = cifar10.load_tfds("train", data_dir=str(tmp_path))
    want = _to_uint8(source(np.arange(n))["x"])
  assert src.count == n and [len(b) for b in batches] == [10, 10, n - 20]
  got = np.concatenate(batches)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
