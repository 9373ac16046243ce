"""Test setup: 8 virtual CPU devices and float32 'highest' matmuls for every test."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The launch commands turn JAX's persistent compilation cache on by default (ddo_jax/compile_cache.py); the
# tests, which run them in subprocesses that inherit this environment, keep it off so that they never write
# to ~/.cache. tests/test_compile_cache.py turns it on explicitly.
os.environ.setdefault("DDO_JAX_COMPILE_CACHE", "off")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
