"""llamax.compilation_cache: where the persistent cache goes, and when it stays off."""
import jax

from llamax import compilation_cache


def test_multi_process_runs_use_the_cache_only_when_asked(tmp_path, monkeypatch):
    updates = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    for name in (compilation_cache.ENV, "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LLAMAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # Per-host caches can differ: one process would compile while its peer times out waiting.
    assert compilation_cache.enable(multi_process=True) is None
    assert updates == {}
    assert compilation_cache.enable(str(tmp_path / "shared"), multi_process=True) == str(tmp_path / "shared")
    assert updates["jax_compilation_cache_dir"] == str(tmp_path / "shared")
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
    assert compilation_cache.enable(multi_process=True) == str(tmp_path / "env")
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.enable() is None
    monkeypatch.delenv(compilation_cache.ENV)
    single = compilation_cache.enable()  # a single process: on by default, in the user's cache
    assert single is not None and single.startswith(str(tmp_path / "xdg"))
