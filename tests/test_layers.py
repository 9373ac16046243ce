"""The import layering of DESIGN.md, checked on the source (every import, also inside functions).

    launch/  configs/          flags and experiment files
    train/                     the driver
    families/                  per-family model math and host hooks
    metrics/  data/  convert/  FID, datasets and negatives, torch-free readers and writers
    sampling/  nets/           samplers, Flax modules
    objective  tree_io  plots  parallel  xla_options  utils  cli  faults
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOTTOM = {"utils", "cli", "faults", "parallel", "objective", "tree_io", "plots", "compat", "xla_options"}
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "nets": {"utils", "parallel", "compat"},
    "objective": set(),
    "sampling": BOTTOM,
    "metrics": BOTTOM | {"nets", "sampling", "data", "convert"},
    "data": BOTTOM | {"nets", "sampling", "metrics", "convert"},
    "convert": BOTTOM | {"nets", "sampling", "metrics", "data"},
    "families": BOTTOM | {"nets", "sampling", "metrics", "data", "convert"},
    "train": BOTTOM | {"nets", "sampling", "metrics", "data", "convert", "families"},
}


def _project_imports(path: pathlib.Path) -> set:
  """The first component under ddo_jax of every `ddo_jax...` (or launch/configs) import in a file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] in ("launch", "configs"):
        out.add(parts[0])
      elif parts[0] == "ddo_jax" and len(parts) > 1:
        out.add(parts[1])
  return out


def _package_of(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT / "ddo_jax")
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


FILES = sorted((ROOT / "ddo_jax").rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_imports(path):
  package = _package_of(path)
  imports = _project_imports(path) - {package, "__init__"}
  assert not imports & {"launch", "configs"}, f"{path} imports launch/configs"
  if package in ALLOWED:
    bad = imports - ALLOWED[package]
  elif package in BOTTOM:
    bad = imports - BOTTOM - {"nets"} if package == "plots" else imports - BOTTOM
  else:
    bad = set()
  assert not bad, f"{path.relative_to(ROOT)} ({package}) imports {sorted(bad)} from above its layer"


def test_every_family_is_registered_and_fulfils_the_contract():
  from ddo_jax import families
  from ddo_jax.families.base import Family
  modules = {p.stem for p in (ROOT / "ddo_jax" / "families").glob("*.py")} - {"__init__", "base", "diffusion"}
  assert {v.split(":")[0].split(".")[-1] for v in families.REGISTRY.values()} == modules
  for name in families.REGISTRY:
    cls = families.get(name)
    assert issubclass(cls, Family) and not cls.__abstractmethods__, name
