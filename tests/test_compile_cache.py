"""unet_jax.compile_cache: programs land in the folder given, and 'none' turns the cache off."""

import os
import subprocess
import sys

PROGRAM = """
import sys
from unet_jax import compile_cache
print(compile_cache.enable(sys.argv[1]))
import jax, jax.numpy as jnp
# Big enough to take measurable compile time (the cache skips programs under 0.2 s).
f = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y @ y.T) + i, x))
f(jnp.ones((64, 64))).block_until_ready()
"""


def _run(arg, env=None):
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, arg],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(env or {})},
    )


def test_programs_are_cached_in_the_folder_given(tmp_path):
    folder = tmp_path / "xla"
    proc = _run(str(folder))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(folder)
    assert any(folder.iterdir())


def test_none_turns_the_cache_off(tmp_path):
    proc = _run("none", env={"UNET_JAX_COMPILE_CACHE": str(tmp_path / "env")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "None"
    assert not (tmp_path / "env").exists()


def test_default_folder(monkeypatch, tmp_path):
    from unet_jax import compile_cache

    monkeypatch.setenv("UNET_JAX_COMPILE_CACHE", str(tmp_path / "a"))
    assert compile_cache.default_dir() == str(tmp_path / "a")
    monkeypatch.delenv("UNET_JAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == str(tmp_path / "xdg" / "unet_jax" / "xla")
