"""XLA compile options of the project's heavy programs: the DDO step, the samplers, the evaluator.

On CPU, XLA can hand parts of a program to YNNPACK (the XNNPACK team's kernel library, linked into jaxlib).
By default it hands over each convolution on its own and generates the rest itself. Handing it instead the
elementwise and reduction fusions and the single dots (`xla_cpu_experimental_ynn_fusion_type` =
ELTWISE, REDUCE, INDIVIDUAL_DOT) makes the project's CPU programs much faster. Measured on this project's
2-core CPU machine (jax 0.10.2, float32, `highest`) for the EDM CIFAR-10 network: the full-size DDO step at
8 + 8 from 23.8 s to 14.0 s, the tiny step at 32 + 32 from 0.70 s to 0.29 s. The arithmetic stays float32 at
the precision asked for; only the order of some float32 additions changes (the goldens' parity tests pass
unchanged). On GPU and TPU nothing is added.

  from ddo_jax import xla_options
  jax.jit(fn, ..., compiler_options=xla_options.compiler_options(mesh))

`DDO_JAX_XLA_CPU_FUSIONS` overrides the list: comma-separated fusion types (`eltwise,reduce,individual_dot`,
any of XLA's LIBRARY_FUSION_TYPE_ names, case-insensitive), or `xla` to compile with XLA's own defaults. A
jaxlib that does not know the option (or a value) gets XLA's defaults and one warning, never an error.
"""
import functools
import logging
import os
from typing import Any, Dict, Optional

ENV_VAR = "DDO_JAX_XLA_CPU_FUSIONS"
DEFAULT_CPU_FUSIONS = ("eltwise", "reduce", "individual_dot")
_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_PREFIX = "LIBRARY_FUSION_TYPE_"
_XLA_DEFAULTS = ("xla", "default", "off", "none", "")

_log = logging.getLogger(__name__)


def _cpu_fusions(value: Optional[str]) -> Optional[str]:
  """The option's value for `value` (None: the project's default list), or None for XLA's defaults."""
  if value is None:
    names = DEFAULT_CPU_FUSIONS
  elif value.strip().lower() in _XLA_DEFAULTS:
    return None
  else:
    names = [n.strip() for n in value.split(",") if n.strip()]
  return ",".join(n.upper() if n.upper().startswith(_PREFIX) else _PREFIX + n.upper() for n in names)


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple) -> bool:
  """Whether this jaxlib's CPU compiler takes `options` (one tiny compile, once per process)."""
  import jax
  import jax.numpy as jnp
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    jax.jit(lambda x: jnp.sum(jnp.exp(x) * x), in_shardings=cpu).lower(
        jax.ShapeDtypeStruct((8,), jnp.float32)).compile(compiler_options=dict(options))
    return True
  except Exception as e:  # an older or newer jaxlib without the option or the value
    _log.warning("XLA CPU options %s not accepted by this jaxlib (%s); using XLA's defaults",
                 dict(options), str(e).splitlines()[0][:200])
    return False


def _platform(where: Any) -> str:
  import jax
  if where is None:
    return jax.default_backend()
  if isinstance(where, str):
    return where
  devices = getattr(where, "devices", where)        # a Mesh, or a sequence / array of devices
  first = next(iter(getattr(devices, "flat", devices)))
  return first.platform


def compiler_options(where: Any = None) -> Dict[str, str]:
  """`compiler_options` for `jax.jit` of a program that runs on `where`: a Mesh, devices, a platform name,
  or None (JAX's default backend). Empty off CPU, when `DDO_JAX_XLA_CPU_FUSIONS=xla`, or when this
  jaxlib does not accept the option."""
  if _platform(where) != "cpu":
    return {}
  value = _cpu_fusions(os.environ.get(ENV_VAR))
  if value is None:
    return {}
  options = ((_OPTION, value),)
  return dict(options) if _accepted(options) else {}
