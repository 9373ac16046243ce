"""Model families. Each supplies per-sample log-likelihood gaps for the model-agnostic DDO objective."""


def make(config):
  """The family object named by `config.family`, built from `config.model`."""
  name = config.family
  if name == "toy_diffusion":
    from ddo_jax.families.toy_diffusion import ToyDiffusion
    return ToyDiffusion(config.model)
  if name == "toy_grid":
    from ddo_jax.families.toy_grid import ToyGrid
    return ToyGrid(config.model)
  if name == "edm":
    from ddo_jax.families.edm import EDM
    return EDM(config.model)
  raise ValueError(f"config.family={name!r} is not a known model family (toy_diffusion, toy_grid, edm)")
