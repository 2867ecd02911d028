"""unet_jax.compile_cache: programs land in the folder given, 'none' and '' turn the cache off, a
folder that cannot hold the cache is one warning line (the run goes on uncached), and damaged
entries are replaced with one line naming the folder."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each run is a child process: the cache is global JAX config, set once before compiling. The
# child prints what enable() returned, then how many programs it loaded from / wrote to the cache.
PROGRAM = """
import sys
from unet_jax import compile_cache
print(compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None))
import jax, jax.numpy as jnp
events = {"hits": 0, "misses": 0}
def listen(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        events["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        events["misses"] += 1
jax.monitoring.register_event_listener(listen)
# Big enough to take measurable compile time (the cache skips programs under 0.2 s).
f = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y @ y.T) + i, x))
f(jnp.ones((64, 64))).block_until_ready()
print(f"hits={events['hits']} misses={events['misses']}")
"""


def _env(env=None, drop=()):
    # This tree's unet_jax whatever the child's current folder.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONPATH": path,
        **(env or {}),
    }
    for name in drop:
        env.pop(name, None)
    return env


def _run(*args, env=None, drop=(), cwd=None, prefix=()):
    return subprocess.run(
        [*prefix, sys.executable, "-c", PROGRAM, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(env, drop),
        cwd=cwd,
    )


def _returned(proc):
    """What enable() returned in the child, and the child's cache hits and misses."""
    assert proc.returncode == 0, proc.stderr[-2000:]
    returned, counts = proc.stdout.strip().splitlines()
    hits, misses = (int(kv.split("=")[1]) for kv in counts.split())
    return returned, hits, misses


def _cache_lines(proc):
    """The child's stderr lines about the compile cache (ours and any of JAX's)."""
    return [line for line in proc.stderr.splitlines() if "cache" in line.lower()]


def _assert_unusable(proc, path, why):
    assert _returned(proc) == ("None", 0, 0)
    assert _cache_lines(proc) == [
        f"warning: compile cache {path} is not usable ({why}): compiling without a cache"
    ]


def test_programs_are_cached_in_the_folder_given(tmp_path):
    folder = tmp_path / "xla"
    returned, hits, misses = _returned(_run(str(folder)))
    assert returned == str(folder)
    assert hits == 0 and misses > 0
    assert any(folder.iterdir())


def test_none_turns_the_cache_off(tmp_path):
    proc = _run("none", env={"UNET_JAX_COMPILE_CACHE": str(tmp_path / "env")})
    assert _returned(proc) == ("None", 0, 0)
    assert not (tmp_path / "env").exists()


def test_empty_value_turns_the_cache_off(tmp_path):
    # `--compile_cache "$UNSET"`: off like 'none', not a cache in the current folder.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = _run("", env={"UNET_JAX_COMPILE_CACHE": str(tmp_path / "env")}, cwd=cwd)
    assert _returned(proc) == ("None", 0, 0)
    assert _cache_lines(proc) == []
    assert not any(cwd.iterdir())
    assert not (tmp_path / "env").exists()


def test_default_folder(monkeypatch, tmp_path):
    from unet_jax import compile_cache

    monkeypatch.setenv("UNET_JAX_COMPILE_CACHE", str(tmp_path / "a"))
    assert compile_cache.default_dir() == str(tmp_path / "a")
    monkeypatch.delenv("UNET_JAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == str(tmp_path / "xdg" / "unet_jax" / "xla")


def test_a_file_is_not_a_cache_folder(tmp_path):
    file = tmp_path / "f"
    file.write_text("x\n")
    _assert_unusable(_run(str(file)), file, "not a folder")
    assert file.read_text() == "x\n"


def test_a_path_under_a_file_is_not_a_cache_folder(tmp_path):
    file = tmp_path / "f"
    file.write_text("x\n")
    _assert_unusable(_run(str(file / "sub")), file / "sub", f"{file} is not a folder")


def test_xdg_cache_home_at_a_file_is_not_a_cache_folder(tmp_path):
    # No flag, no $UNET_JAX_COMPILE_CACHE: the default folder under $XDG_CACHE_HOME.
    file = tmp_path / "f"
    file.write_text("x\n")
    proc = _run(env={"XDG_CACHE_HOME": str(file)}, drop=["UNET_JAX_COMPILE_CACHE"])
    _assert_unusable(proc, file / "unet_jax" / "xla", f"{file} is not a folder")


def _can_write_into(folder):
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def test_a_read_only_folder_is_not_a_cache_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not _can_write_into(folder):
            _assert_unusable(_run(str(folder)), folder, "cannot write into it: permission denied")
            return
        # Root writes into a folder of mode 0o555 (and root's write would be right then). A
        # folder that refuses root too: a read-only file system mounted over it, in a user and
        # mount namespace of the child's own (a container with a read-only home).
        unshare = shutil.which("unshare")
        if unshare is None:
            pytest.skip("running as root (mode 0o555 does not stop writes) and no `unshare`")
        mount = 'mount -t tmpfs -o ro none "$0" && exec "$@"'
        proc = _run(str(folder), prefix=[unshare, "-rm", "sh", "-c", mount, str(folder)])
        if proc.returncode != 0 and not proc.stdout:
            pytest.skip(
                "running as root (mode 0o555 does not stop writes) and no read-only mount: "
                + (proc.stderr.strip().splitlines() or ["?"])[-1]
            )
        _assert_unusable(proc, folder, "cannot write into it: read-only file system")
    finally:
        folder.chmod(0o755)


def test_damaged_entries_are_replaced(tmp_path):
    folder = tmp_path / "xla"
    returned, hits, misses = _returned(_run(str(folder)))
    assert returned == str(folder)
    entries = sorted(folder.glob("*-cache"))
    assert entries and hits == 0 and misses == len(entries)
    damaged = {}
    for entry in entries:
        damaged[entry] = os.urandom(entry.stat().st_size)
        entry.write_bytes(damaged[entry])

    proc = _run(str(folder))
    assert _returned(proc) == (str(folder), 0, len(entries))
    n = len(entries)
    assert _cache_lines(proc) == [
        f"warning: compile cache {folder}: {n} damaged {'entry' if n == 1 else 'entries'} replaced"
    ]
    assert sorted(folder.glob("*-cache")) == entries
    for entry in entries:
        assert entry.read_bytes() != damaged[entry], entry.name

    proc = _run(str(folder))
    assert _returned(proc) == (str(folder), len(entries), 0)
    assert _cache_lines(proc) == []
    assert proc.stderr.strip() == ""


def test_compile_seconds_counts_compilations():
    import jax
    import jax.numpy as jnp

    from unet_jax.compile_cache import compile_seconds

    f = jax.jit(lambda x: jnp.sin(x) * 3 + 1)
    x = jnp.ones(13, jnp.float32)
    before = compile_seconds()
    f(x).block_until_ready()  # traced, lowered and compiled here
    compiled = compile_seconds()
    assert compiled > before
    f(x).block_until_ready()  # already compiled: nothing added
    assert compile_seconds() == compiled
