"""ImageNet sources (ddo_jax/data/imagenet.py): VAR's transform, folder order, tfds, determinism, errors."""
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from ddo_jax import cli
from ddo_jax.data import imagenet, pipeline


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _images(n, rng, sizes):
  return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in (sizes[i % len(sizes)] for i in range(n))]


def make_tree(root, rng):
  """Classes created out of order, a nested folder, an upper-case extension, a grey image and a non-image
  file. Returns the expected (path, label) list in torchvision DatasetFolder order."""
  layout = {  # class -> [(relative file, (h, w)), ...]
      "n02_b": [("x1.png", (18, 24)), ("a0.PNG", (24, 18))],
      "n01_a": [("z.png", (18, 30)), ("sub/y.png", (20, 20)), ("b.png", (30, 18))],
      "n03_c": [("c.png", (25, 40))],
  }
  for cls, files in layout.items():
    for rel, (h, w) in files:
      path = os.path.join(root, cls, rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
  Image.fromarray(rng.integers(0, 256, size=(19, 21), dtype=np.uint8)).save(os.path.join(root, "n03_c", "grey.png"))
  with open(os.path.join(root, "n02_b", "notes.txt"), "w") as f:
    f.write("not an image")
  expected = [("n01_a/b.png", 0), ("n01_a/z.png", 0), ("n01_a/sub/y.png", 0),   # sorted(os.walk): root first
              ("n02_b/a0.PNG", 1), ("n02_b/x1.png", 1),
              ("n03_c/c.png", 2), ("n03_c/grey.png", 2)]
  return [(os.path.join(root, p), k) for p, k in expected]


def reference_example(path_or_bytes, seed, index, resolution, resize):
  """VAR's transform spelled out step by step with PIL and numpy (float32 as torch's ToTensor + x + x - 1)."""
  src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  with Image.open(src) as im:
    im = im.convert("RGB")
  w, h = im.size
  if min(w, h) != resize:
    im = im.resize(imagenet.resized_shape(w, h, resize), Image.LANCZOS)
  u = np.asarray(im)
  top, left = imagenet.crop_offset(seed, index, u.shape[0], u.shape[1], resolution)
  x = u[top:top + resolution, left:left + resolution].astype(np.float32) / np.float32(255)
  return (x + x) - np.float32(1)


# ---------------------------------------------------------------------------------------------
# The transform.


def test_resize_size_rule():
  # round(1.125 * final) with Python's round (half to even), as VAR's build_dataset.
  assert imagenet.resize_size(256) == 288 and imagenet.resize_size(64) == 72
  assert imagenet.resize_size(12) == 14 and imagenet.resize_size(20) == 22 and imagenet.resize_size(4) == 4
  # torchvision Resize(int): shorter side to `short`, longer int(short * long / short_side), truncated.
  assert imagenet.resized_shape(500, 375, 288) == (384, 288)
  assert imagenet.resized_shape(375, 500, 288) == (288, 384)
  assert imagenet.resized_shape(500, 333, 288) == (432, 288)     # 432.43 -> 432
  assert imagenet.resized_shape(3, 7, 4) == (4, 9)               # 9.33 -> 9
  assert imagenet.resized_shape(299, 300, 72) == (72, 72)        # 72.24 -> 72


def test_scaling_is_bit_equal_to_torch_to_tensor_then_var_pm1():
  torch = pytest.importorskip("torch")
  u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  t = torch.from_numpy(u.copy()).to(torch.float32).div(255)
  t = t.add(t).add_(-1)
  ours = imagenet.to_model_inputs(u)
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, t.numpy())
  assert ours.min() == -1.0 and ours.max() == 1.0


def test_crop_offsets_cover_the_range_and_depend_on_seed_and_index():
  offs = {imagenet.crop_offset(0, i, 40, 30, 24) for i in range(400)}
  tops, lefts = {t for t, _ in offs}, {l for _, l in offs}
  assert tops == set(range(17)) and lefts == set(range(7))
  assert imagenet.crop_offset(3, 5, 40, 30, 24) == imagenet.crop_offset(3, 5, 40, 30, 24)
  assert imagenet.crop_offset(0, 0, 24, 24, 24) == (0, 0)
  assert len({imagenet.crop_offset(s, 7, 300, 300, 24) for s in range(20)}) > 15
  with pytest.raises(ValueError):
    imagenet.crop_offset(0, 0, 20, 30, 24)


# ---------------------------------------------------------------------------------------------
# Image folder.


def test_folder_order_labels_and_exact_pixels(tmp_path):
  expected = make_tree(str(tmp_path), np.random.default_rng(0))
  classes, paths, labels = imagenet.folder_index(str(tmp_path))
  assert classes == ["n01_a", "n02_b", "n03_c"]
  assert list(zip(paths, labels.tolist())) == expected and labels.dtype == np.int32
  source, n = imagenet.load_folder(str(tmp_path), seed=5, resolution=16, resize=18, num_workers=1)
  assert n == len(expected)
  batch = source(np.arange(n))
  assert batch["x"].shape == (n, 16, 16, 3) and batch["x"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["label"].tolist() == [k for _, k in expected]
  assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
  for i, (path, _) in enumerate(expected):
    np.testing.assert_array_equal(batch["x"][i], reference_example(path, 5, i, 16, 18), err_msg=path)


def test_folder_image_at_the_resize_size_is_cropped_not_resampled(tmp_path):
  # Shorter side already 18 = resize: torchvision returns the image as is, so the output is raw pixels.
  rng = np.random.default_rng(1)
  raw = rng.integers(0, 256, size=(18, 33, 3), dtype=np.uint8)
  os.makedirs(tmp_path / "k")
  Image.fromarray(raw).save(tmp_path / "k" / "a.png")
  source, _ = imagenet.load_folder(str(tmp_path), seed=2, resolution=16, resize=18)
  top, left = imagenet.crop_offset(2, 0, 18, 33, 16)
  u = raw[top:top + 16, left:left + 16].astype(np.float32)
  np.testing.assert_array_equal(source([0])["x"][0], (u / 255 + u / 255) - 1)


def test_folder_deterministic_per_seed_threads_and_batching(tmp_path):
  make_tree(str(tmp_path), np.random.default_rng(0))
  a, n = imagenet.load_folder(str(tmp_path), seed=0, resolution=16, resize=0, num_workers=1)
  assert a.resize == 18                                       # round(1.125 * 16)
  b, _ = imagenet.load_folder(str(tmp_path), seed=0, resolution=16, num_workers=4)
  c, _ = imagenet.load_folder(str(tmp_path), seed=1, resolution=16, num_workers=4)
  idx = np.array([6, 0, 3, 3, 5])
  xa, xb, xc = a(idx), b(idx), c(idx)
  np.testing.assert_array_equal(xa["x"], xb["x"])
  np.testing.assert_array_equal(xa["label"], xc["label"])
  assert not np.array_equal(xa["x"], xc["x"])                 # another seed, other crops
  np.testing.assert_array_equal(xa["x"][2], xa["x"][3])       # an index always gives the same example
  np.testing.assert_array_equal(a(idx[1:2])["x"][0], xa["x"][1])
  with pytest.raises(IndexError):
    a([n])


def test_folder_plugs_into_paired_batches_resumably(tmp_path):
  make_tree(str(tmp_path), np.random.default_rng(0))
  source, n = imagenet.load_folder(str(tmp_path), seed=3, resolution=16)
  run = pipeline.PairedBatches(source, n, global_batch=4, seed=11)
  first = [run.next()["real"] for _ in range(3)]
  resumed = pipeline.PairedBatches(source, n, global_batch=4, seed=11)
  resumed.set_state({"position": 2})
  again = resumed.next()["real"]
  np.testing.assert_array_equal(again["x"], first[2]["x"])
  np.testing.assert_array_equal(again["label"], first[2]["label"])


def test_folder_missing_or_empty_is_one_line_error(tmp_path):
  with pytest.raises(imagenet.DatasetNotFoundError) as e:
    imagenet.load_folder(str(tmp_path / "nope"), seed=0)
  msg = str(e.value)
  assert msg.startswith("error: no image folder at") and "\n" not in msg
  assert "(config.model.data.path)" in msg and "ROOT/<class_dir>/<image>" in msg
  os.makedirs(tmp_path / "empty" / "cls")
  with pytest.raises(imagenet.DatasetNotFoundError, match="no images"):
    imagenet.load_folder(str(tmp_path / "empty"), seed=0)
  with pytest.raises(imagenet.DatasetNotFoundError, match="no class subfolders"):
    imagenet.load_folder(str(tmp_path / "empty" / "cls"), seed=0)
  make_tree(str(tmp_path / "t"), np.random.default_rng(0))
  with pytest.raises(imagenet.DatasetNotFoundError, match="3 classes, more than the model's 2"):
    imagenet.load_folder(str(tmp_path / "t"), seed=0, num_classes=2)
  with pytest.raises(cli.ConfigError, match="smaller than the crop"):
    imagenet.load_folder(str(tmp_path / "t"), seed=0, resolution=16, resize=12)


def test_missing_dataset_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
  def main(argv):
    del argv
    imagenet.load({"source": "folder", "path": str(tmp_path / "missing")}, seed=0)
  monkeypatch.setattr(sys, "argv", ["prog"])
  with pytest.raises(SystemExit) as e:
    cli.run(main)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: no image folder at") and "--config.model.data.path" in err[0]


# ---------------------------------------------------------------------------------------------
# tfds.


def write_tfds_imagenet(data_dir, blobs, labels, split="train"):
  """A real tfds imagenet2012 build (ArrayRecord of tf.Examples holding JPEG bytes), written without TF."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2 as f
  builder = tfds.builder("imagenet2012", data_dir=str(data_dir), file_format="array_record")
  os.makedirs(builder.data_dir, exist_ok=True)
  path = os.path.join(builder.data_dir, f"imagenet2012-{split}.array_record-00000-of-00001")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for i, (data, label) in enumerate(zip(blobs, labels)):
    feature = {"file_name": f.Feature(bytes_list=f.BytesList(value=[f"n{label:08d}_{i}.JPEG".encode()])),
               "image": f.Feature(bytes_list=f.BytesList(value=[data])),
               "label": f.Feature(int64_list=f.Int64List(value=[int(label)]))}
    writer.write(tf_example_pb2.Example(features=f.Features(feature=feature)).SerializeToString())
  writer.close()
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name="imagenet2012", split=split,
                                           filetype_suffix="array_record")
  info = tfds.core.SplitInfo(name=split, shard_lengths=[len(blobs)], num_bytes=0, filename_template=template)
  builder.info.set_splits(tfds.core.SplitDict([info]))
  builder.info.write_to_directory(builder.data_dir)


def test_tfds_array_record_matches_the_folder_source(tmp_path):
  rng = np.random.default_rng(4)
  images = _images(5, rng, [(20, 27), (31, 19), (18, 18)])
  blobs, labels = [_jpeg(im) for im in images], [3, 999, 0, 3, 517]
  write_tfds_imagenet(tmp_path / "tfds", blobs, labels)
  source, n = imagenet.load({"source": "tfds", "data_dir": str(tmp_path / "tfds"), "resolution": 16}, seed=9)
  assert n == 5
  batch = source(np.array([4, 1, 0, 2, 3]))
  assert batch["x"].shape == (5, 16, 16, 3) and batch["label"].tolist() == [517, 999, 3, 0, 3]
  for row, i in enumerate([4, 1, 0, 2, 3]):
    np.testing.assert_array_equal(batch["x"][row], reference_example(blobs[i], 9, i, 16, 18))
  # A fake in-memory data source (any sequence of {'image': bytes, 'label'}) reads the same.
  fake = [{"image": b, "label": k} for b, k in zip(blobs, labels)]
  same, _ = imagenet.load_tfds(seed=9, resolution=16, data_source=fake)
  np.testing.assert_array_equal(same(np.arange(5))["x"], source(np.arange(5))["x"])


def test_tfds_missing_says_manual_download(tmp_path):
  with pytest.raises(imagenet.DatasetNotFoundError) as e:
    imagenet.load({"source": "tfds", "data_dir": str(tmp_path)}, seed=0)
  msg = str(e.value)
  assert "\n" not in msg and "not prepared" in msg and "(config.model.data.data_dir)" in msg
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  assert f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into tfds's manual_dir {manual}" in msg
  assert (f"tfds build imagenet2012 --file_format=array_record --data_dir={tmp_path} --manual_dir={manual}"
          in msg)
  assert "--config.model.data.source=folder" in msg


def test_unknown_source_is_a_config_error():
  with pytest.raises(cli.ConfigError, match="unknown ImageNet source"):
    imagenet.load({"source": "zip"}, seed=0)
