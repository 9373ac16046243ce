"""ddo-jax: Direct Discriminative Optimization in JAX/Flax."""
import setuptools

# Tested ranges (see README "Supported versions"); CI runs the suite on Python 3.11 (jax 0.10) and 3.12
# (jax 0.12), see .ci/run. jax 0.11, flax 0.12.9 and numpy 2.5 need Python >= 3.12 (flax 0.12.9 also
# jax >= 0.11.1), so Python 3.11 keeps the jax 0.10 stack and 3.12+ admits jax 0.10 to 0.12. flax before
# 0.12.7 calls jax.core.get_opaque_trace_state (deprecated in jax 0.10, absent from jax 0.11.2 and 0.12).
# Widen only after testing.
PY311 = "python_version < '3.12'"
PY312 = "python_version >= '3.12'"
INSTALL_REQUIRES = [
    f"jax>=0.10.0,<0.11; {PY311}",
    f"jax>=0.10.0,<0.13; {PY312}",
    f"jaxlib>=0.10.0,<0.11; {PY311}",
    f"jaxlib>=0.10.0,<0.13; {PY312}",
    f"flax>=0.12.7,<0.12.9; {PY311}",
    f"flax>=0.12.7,<0.13; {PY312}",
    "optax>=0.2.6,<0.3",
    "orbax-checkpoint>=0.12.4,<0.13",
    "chex>=0.1.90,<0.1.93",
    "tensorflow-datasets>=4.9.9,<4.10",
    "grain>=0.2.16,<0.3",
    "ml-collections>=1.1.0,<1.2",
    f"numpy>=2.0,<2.5; {PY311}",
    f"numpy>=2.0,<2.6; {PY312}",
    "absl-py>=2.1",
    "pillow>=10",
    "matplotlib>=3.8",
]

setuptools.setup(
    name="ddo-jax",
    version="0.1.0",
    description="Direct Discriminative Optimization (DDO) for diffusion and autoregressive models in JAX/Flax",
    packages=setuptools.find_packages(include=["ddo_jax", "ddo_jax.*", "launch", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "scipy>=1.13", "safetensors>=0.4"],
    },
)
