"""The persistent compilation cache: on by default in the launch commands, a folder the user can change or
turn off, and a second process that compiles the same program loads it from the folder."""
import os
import subprocess
import sys
import textwrap

from ddo_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.resolve() == str(tmp_path / "xdg" / "ddo_jax" / "jax_cache")    # default: on
  monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
  assert compile_cache.resolve() == str(tmp_path / "env")
  assert compile_cache.resolve(str(tmp_path / "flag")) == str(tmp_path / "flag")      # the flag wins
  for off in ("off", "", "none"):
    assert compile_cache.resolve(off) is None
  monkeypatch.setenv(compile_cache.ENV_VAR, "off")
  assert compile_cache.resolve() is None


_PROGRAM = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from ddo_jax import compile_cache
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
    compile_cache.enable(sys.argv[1], min_compile_time_secs=0.0)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0 + jnp.cos(x).mean())
    print(float(f(jnp.ones((8, 8)))), len(hits))
""")


def test_second_process_loads_from_the_cache(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda: subprocess.run([sys.executable, "-c", _PROGRAM, str(cache)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
  first = run()
  assert first.returncode == 0, first.stderr[-2000:]
  assert any(cache.iterdir()), "the first process wrote no cache entry"
  second = run()
  assert second.returncode == 0, second.stderr[-2000:]
  value1, hits1 = first.stdout.split()
  value2, hits2 = second.stdout.split()
  assert value1 == value2
  assert int(hits1) == 0 and int(hits2) >= 1


def test_launch_train_flag(tmp_path):
  """launch.train --compile_cache=DIR turns the cache on in DIR; the suite's default (conftest) is off."""
  cache = tmp_path / "cc"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-m", "launch.train", "--config", "configs/toy_grid.py:tiny",
                        "--workdir", str(tmp_path / "w"), f"--compile_cache={cache}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert cache.is_dir()
