"""Exact-likelihood toy family: a two-token autoregressive model over a 16x16 grid.

A sample is x = (row, col) with p_theta(x) = softmax(first)[row] * softmax(second[row])[col], so
log-likelihoods are exact and the whole distribution (256 cells) can be enumerated. This is the setting of
Theorem 3.1: with alpha = beta = 1 and enough capacity, DDO's optimum is p_data whatever the reference.

The ground truth is a mixture of discretised Gaussian bumps plus a small uniform floor (full support).
The "pretrained" reference has limited capacity: the two tokens are independent (every row of `second`
is the same), fitted by maximum likelihood, i.e. the product of the data's marginals.
"""
import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.data import pipeline
from ddo_jax.families.base import Family

SIZE = 16


def data_distribution(size: int = SIZE) -> np.ndarray:
  """p_data over the grid, shape [size, size], float64, full support."""
  r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  bumps = [(3.0, 4.0, 1.5, 0.45), (11.0, 11.0, 2.0, 0.35), (4.0, 12.0, 1.0, 0.2)]
  p = np.zeros((size, size))
  for cr, cc, s, w in bumps:
    g = np.exp(-((r - cr) ** 2 + (c - cc) ** 2) / (2 * s ** 2))
    p += w * g / g.sum()
  p = 0.97 * p + 0.03 / p.size
  return p / p.sum()


def logp_table(params) -> jax.Array:
  """log p_theta over the whole grid, [SIZE, SIZE]."""
  return jax.nn.log_softmax(params["first"])[:, None] + jax.nn.log_softmax(params["second"], axis=-1)


def log_prob(params, x: jax.Array) -> jax.Array:
  """Exact log p_theta(x) for integer samples x [N, 2]."""
  first = jax.nn.log_softmax(params["first"])[x[:, 0]]
  second = jax.nn.log_softmax(params["second"], axis=-1)[x[:, 0], x[:, 1]]
  return first + second


def params_from_table(p: np.ndarray) -> dict:
  """Logits that represent the distribution `p` [SIZE, SIZE] exactly."""
  p = np.asarray(p, np.float64)
  marg = p.sum(axis=1)
  return {"first": jnp.asarray(np.log(marg), jnp.float32),
          "second": jnp.asarray(np.log(p / marg[:, None]), jnp.float32)}


def independent_fit(p: np.ndarray) -> dict:
  """Maximum-likelihood fit of the limited-capacity (independent tokens) model: the marginals."""
  row, col = p.sum(axis=1), p.sum(axis=0)
  return {"first": jnp.asarray(np.log(row), jnp.float32),
          "second": jnp.asarray(np.tile(np.log(col)[None], (p.shape[0], 1)), jnp.float32)}


def kl(p: np.ndarray, logq: np.ndarray) -> float:
  """KL(p || q) with q given by its log-table."""
  p = np.asarray(p, np.float64)
  return float(np.sum(p * (np.log(p) - np.asarray(logq, np.float64))))


def exact_gaps_loss(params, ref_params, p_data: jax.Array, *, alpha: float, beta: float) -> jax.Array:
  """The DDO loss with exact expectations: sum over the grid weighted by p_data and by p_ref."""
  gap = logp_table(params) - jax.lax.stop_gradient(logp_table(ref_params))
  p_ref = jnp.exp(jax.lax.stop_gradient(logp_table(ref_params)))
  return (-jnp.sum(p_data * jax.nn.log_sigmoid(beta * gap))
          - alpha * jnp.sum(p_ref * jax.nn.log_sigmoid(-beta * gap)))


def sample(params, keys: jax.Array) -> jax.Array:
  """One (row, col) sample per key, ancestral sampling; int32 [N, 2]."""

  def one(k):
    k1, k2 = jax.random.split(k)
    row = jax.random.categorical(k1, params["first"])
    col = jax.random.categorical(k2, params["second"][row])
    return jnp.stack([row, col]).astype(jnp.int32)

  return jax.vmap(one)(keys)


class ToyGrid(Family):
  """The family object for the round driver (configs/toy_grid.py)."""
  name = "toy_grid"
  metric_mode = "min"

  def __init__(self, config):
    super().__init__(config)
    self.p_data = data_distribution()

  def init_params(self, rng):
    del rng
    return {"first": jnp.zeros([SIZE], jnp.float32), "second": jnp.zeros([SIZE, SIZE], jnp.float32)}

  def pretrain_loss(self, params, batch, rng):
    """Likelihood of the independent-token model (the rows of `second` are tied to their mean)."""
    del rng
    tied = {"first": params["first"],
            "second": jnp.broadcast_to(params["second"].mean(axis=0), params["second"].shape)}
    return -jnp.mean(log_prob(tied, batch["x"]))

  def finalize_pretrained(self, params):
    return {"first": params["first"],
            "second": jnp.broadcast_to(params["second"].mean(axis=0), params["second"].shape)}

  def log_ratio(self, params, ref_params, batch, rng):
    del rng
    x_real, x_fake = batch["real"]["x"], batch["fake"]["x"]
    x = jnp.concatenate([x_real, x_fake])
    gap = log_prob(params, x) - jax.lax.stop_gradient(log_prob(ref_params, x))
    return gap[:len(x_real)], gap[len(x_real):]

  def sample(self, params, keys, seeds=None):
    return {"x": sample(params, keys)}

  def real_source(self, seed: int):
    rng = np.random.default_rng([seed, 1])
    flat = rng.choice(SIZE * SIZE, size=self.config.num_train, p=self.p_data.ravel())
    x = np.stack([flat // SIZE, flat % SIZE], axis=-1).astype(np.int32)
    return pipeline.array_source({"x": x}), len(x)

  def evaluate(self, params, sample, seed: int) -> dict:
    del sample, seed
    logq = np.asarray(logp_table(jax.tree_util.tree_map(np.asarray, params)))
    return {"kl": kl(self.p_data, logq), "reverse_kl": kl(np.exp(logq), np.log(self.p_data))}

  def reference_metrics(self, seed: int) -> dict:
    return {"kl": 0.0, "reverse_kl": 0.0}

  def ground_truth(self, seed: int, num: int) -> np.ndarray:
    flat = np.random.default_rng([seed, 4]).choice(SIZE * SIZE, size=num, p=self.p_data.ravel())
    return np.stack([flat // SIZE, flat % SIZE], axis=-1).astype(np.int32)

  def plot_samples(self, ax, x, title):
    from ddo_jax import plots  # pylint: disable=import-outside-toplevel (matplotlib only when plotting)
    counts = np.zeros((SIZE, SIZE))
    np.add.at(counts, (x[:, 0], x[:, 1]), 1)
    plots.heatmap(ax, None, counts / max(counts.sum(), 1), title, "second token (column)", "first token (row)",
                  "share of samples", vmin=0.0, vmax=float(self.p_data.max()) * 1.5)
