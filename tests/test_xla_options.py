"""ddo_jax.xla_options: the CPU compile options of the heavy programs, their override, and their values."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax import xla_options
from ddo_jax.nets import songunet

OPTION = "xla_cpu_experimental_ynn_fusion_type"


def test_cpu_gets_the_ynn_fusions_and_other_platforms_nothing(monkeypatch):
  monkeypatch.delenv(xla_options.ENV_VAR, raising=False)
  want = {OPTION: "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  assert xla_options.compiler_options() == want
  assert xla_options.compiler_options(jax.devices()) == want
  assert xla_options.compiler_options(jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))) == want
  assert xla_options.compiler_options("gpu") == {}
  assert xla_options.compiler_options("tpu") == {}


def test_environment_override(monkeypatch):
  monkeypatch.setenv(xla_options.ENV_VAR, "xla")
  assert xla_options.compiler_options() == {}
  monkeypatch.setenv(xla_options.ENV_VAR, "eltwise, LIBRARY_FUSION_TYPE_reduce")
  assert xla_options.compiler_options() == {OPTION: "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"}
  monkeypatch.setenv(xla_options.ENV_VAR, "no_such_fusion")   # rejected by XLA: its defaults and a warning
  warnings = []
  monkeypatch.setattr(xla_options._log, "warning", lambda msg, *args: warnings.append(msg % args))
  assert xla_options.compiler_options() == {}
  assert len(warnings) == 1 and "not accepted by this jaxlib" in warnings[0], warnings


def _ynn_elementwise_fusions(hlo: str) -> int:
  """Number of YNNPACK fusions in a compiled program's text with no convolution, dot or reduce (XLA's
  default hands YNNPACK only those; ELTWISE adds the purely elementwise fusions)."""
  bodies = dict(re.findall(r"^(?:%)?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, flags=re.S | re.M))
  called = re.findall(r"calls=%?([\w.\-]+).*?\"kind\":\"__ynn_fusion\"", hlo)
  return sum(not re.search(r" (convolution|dot|reduce)\(", bodies.get(c, "")) for c in called)


def test_same_values_as_xla_defaults_to_float32_rounding(monkeypatch):
  """A tiny SongUNet's loss and gradient compiled with the options and with XLA's defaults.

  Both are float32 at 'highest' precision; YNNPACK's kernels only sum in another order. The gradient is a sum
  over 2 x 8 x 8 positions and up to 192 channels per output, so its rounding is bounded relative to the
  largest entry: measured 2.3e-6 of max|g| here (the larger network in the benchmarks agrees as closely);
  the bound, 3e-5, is 13x that.
  """
  net = songunet.SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16,
                          channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  sigma = jnp.asarray([0.3, 2.0])
  params = net.init(jax.random.key(1), x, sigma)
  fn = jax.value_and_grad(lambda p: jnp.sum(net.apply(p, x, sigma) ** 2))

  monkeypatch.delenv(xla_options.ENV_VAR, raising=False)
  ours = jax.jit(fn, compiler_options=xla_options.compiler_options()).lower(params).compile()
  plain = jax.jit(fn).lower(params).compile()
  # the options reached XLA: more of the program went to YNNPACK
  assert _ynn_elementwise_fusions(ours.as_text()) > _ynn_elementwise_fusions(plain.as_text())
  (l1, g1), (l2, g2) = ours(params), plain(params)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    scale = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(a - b))) <= 3e-5 * scale + 1e-30


def _compiled_text(where: str) -> str:
  """The compiled text of the EDM family's DDO step or seeded sampler, on a small SongUNet."""
  from configs import edm_cifar10
  from ddo_jax import families, parallel
  from ddo_jax.convert.edm_names import config_from_init_kwargs
  from ddo_jax.sampling import seeded
  from ddo_jax.train import optim, step as step_lib
  config = edm_cifar10.get_config("tiny")
  config.model.net = config_from_init_kwargs(
      dict(edm_cifar10.TINY_NET, img_resolution=8, model_channels=16, attn_resolutions=[4]), "EDMPrecond")
  config.model.metric = "denoise_loss"
  config.model.sampler.num_steps = 2
  family = families.make(config)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  shapes = jax.eval_shape(family.init_params, jax.random.key(0))
  psh = parallel.param_shardings(shapes, mesh)
  b = 4
  if where == "sampler":
    fn = seeded.make_seeded_sampler(family.sample, mesh, psh)
    args = (shapes, jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((b,), jnp.int32))
  else:
    tx = optim.make_optimizer(config.optim)
    init = functools.partial(step_lib.init_state, tx=tx, ema_specs={})
    state = jax.eval_shape(init, shapes, jax.random.key(0))
    fn = step_lib.make_ddo_step(family, tx, {}, alpha=4.0, beta=0.02, batch_size=b, mesh=mesh,
                                shardings=parallel.param_shardings(state, mesh), ref_shardings=psh)
    part = {"x": jax.ShapeDtypeStruct((b, 8, 8, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((b, 10), jnp.float32)}
    args = (state, shapes, {"real": part, "fake": part})
  return fn.lower(*args).compile().as_text()


@pytest.mark.parametrize("where", ["step", "sampler"])
def test_the_project_programs_compile_with_the_options(where, monkeypatch):
  """The DDO step and the seeded sampler carry the options into their compiled programs."""
  monkeypatch.delenv(xla_options.ENV_VAR, raising=False)
  ours = _compiled_text(where)
  monkeypatch.setenv(xla_options.ENV_VAR, "xla")
  plain = _compiled_text(where)
  assert _ynn_elementwise_fusions(ours) > _ynn_elementwise_fusions(plain)
