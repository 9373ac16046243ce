"""ddo-jax: Direct Discriminative Optimization in JAX/Flax."""
import setuptools

# Ranges are the newest releases that install on Python 3.11 (jax 0.11 and chex 0.1.92 dropped 3.11),
# and the ones the test suite runs against. Widen only after testing.
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.11",
    "flax>=0.12.5,<0.13",
    "optax>=0.2.6,<0.3",
    "orbax-checkpoint>=0.12.4,<0.13",
    "chex>=0.1.90,<0.1.92",
    "tensorflow-datasets>=4.9.9,<4.10",
    "grain>=0.2.16,<0.3",
    "ml-collections>=1.1.0,<1.2",
    "numpy>=2.0,<2.5",
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
        "test": ["pytest>=8,<10", "scipy>=1.13", "safetensors>=0.4"],
    },
)
