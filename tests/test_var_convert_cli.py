"""`launch.convert var | vqvae | export-var | export-vqvae` on the goldens' VAR files: the converted folder
exports back to exactly the file's state dict, the report names what was read, and a file of the other VAR
network (or a missing key) is one line with exit status 2."""
import os
import subprocess
import sys

import numpy as np

from ddo_jax.convert import torch_pickle, torch_write
from tests import test_var_vqvae
from tests.goldens import golden_path, load_npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "launch.convert", *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_equal_state(got, want):
  assert list(got) == list(want)
  for k in want:
    a, b = np.asarray(got[k]), np.asarray(want[k])
    assert a.dtype == b.dtype and a.shape == b.shape, k
    np.testing.assert_array_equal(a, b, err_msg=k)


def test_var_convert_and_export_round_trip(tmp_path):
  src = golden_path("formats", "var_tiny.pth")
  out = _convert("var", "--src", src, "--out", tmp_path / "var")
  assert out.returncode == 0, out.stderr
  assert "VAR(depth=" in out.stdout and "parameters" in out.stdout
  exported = _convert("export-var", "--src", tmp_path / "var", "--out", tmp_path / "back.pth")
  assert exported.returncode == 0, exported.stderr
  want = torch_pickle.load_torch_state_dict(src)
  _assert_equal_state(torch_pickle.load_torch_state_dict(tmp_path / "back.pth"), want)
  np.testing.assert_array_equal(want["head.weight"], load_npz("var", "var", "state.npz")["head.weight"])
  again = _convert("export-var", "--src", tmp_path / "var", "--out", tmp_path / "back.pth")
  assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "--overwrite" in again.stderr


def test_vqvae_convert_and_export_round_trip(tmp_path):
  meta, state = test_var_vqvae._state()
  torch_write.save_torch_zip(state, tmp_path / "vae.pth")
  patch_nums = ",".join(map(str, meta["init_kwargs"]["v_patch_nums"]))
  out = _convert("vqvae", "--src", tmp_path / "vae.pth", "--out", tmp_path / "vae", "--patch_nums", patch_nums)
  assert out.returncode == 0, out.stderr
  assert "VQVAE(" in out.stdout and f"patch_nums [{patch_nums.replace(',', ', ')}]" in out.stdout
  bad = _convert("vqvae", "--src", tmp_path / "vae.pth", "--out", tmp_path / "v2", "--patch_nums", "1,x")
  assert bad.returncode == 2 and bad.stderr.startswith("error:") and "--patch_nums" in bad.stderr
  exported = _convert("export-vqvae", "--src", tmp_path / "vae", "--out", tmp_path / "back.safetensors")
  assert exported.returncode == 0, exported.stderr
  back = torch_write.load_safetensors(tmp_path / "back.safetensors")
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(state[k], np.float32), err_msg=k)


def test_wrong_network_is_one_line(tmp_path):
  _, state = test_var_vqvae._state()
  torch_write.save_torch_zip(state, tmp_path / "vae.pth")
  for kind, src in (("vqvae", golden_path("formats", "var_tiny.pth")), ("var", tmp_path / "vae.pth")):
    out = _convert(kind, "--src", src, "--out", tmp_path / f"o_{kind}")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert ("VAR transformer" if kind == "vqvae" else "VQVAE") in lines[0]
    assert not (tmp_path / f"o_{kind}").exists()
  state.pop("decoder.conv_out.weight")
  torch_write.save_torch_zip(state, tmp_path / "cut.pth")
  out = _convert("vqvae", "--src", tmp_path / "cut.pth", "--out", tmp_path / "o_cut")
  assert out.returncode == 2 and "decoder.conv_out.weight" in out.stderr and len(out.stderr.strip().splitlines()) == 1
