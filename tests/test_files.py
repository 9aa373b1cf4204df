"""Writing outputs safely: atomic folders that follow the user's umask, and staging folders of
writers killed outright (kill -9) that the next writer removes; the user cache folder."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from llamax.files import atomic_output_dir, cache_dir

REPO = Path(__file__).resolve().parents[1]


def test_outputs_follow_the_umask_like_any_folder(tmp_path):
    previous = os.umask(0o022)
    try:
        (tmp_path / "plain").mkdir()
        with atomic_output_dir(tmp_path / "out") as staging:
            (staging / "weights").write_text("x")
    finally:
        os.umask(previous)
    # mkdtemp alone makes 0700: colleagues on a shared cluster could not read the checkpoint.
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755


WRITER = textwrap.dedent("""
    import sys, time
    from llamax.files import atomic_output_dir
    with atomic_output_dir(sys.argv[1]) as staging:
        (staging / "half.bin").write_bytes(b"0" * 1000)
        print("writing", flush=True)
        time.sleep(600)
""")


def test_a_killed_writers_staging_folder_is_removed_by_the_next_writer(tmp_path):
    destination = tmp_path / "converted"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(destination)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert writer.stdout.readline().strip() == "writing"
    live = [p for p in tmp_path.iterdir() if p.name.startswith(".converted.tmp-")]
    assert len(live) == 1
    # A second writer while the first is alive leaves its staging alone.
    with atomic_output_dir(tmp_path / "converted", overwrite=True) as staging:
        (staging / "done").write_text("ok")
    assert live[0].exists()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert live[0].exists() and not destination.joinpath("half.bin").exists()  # left behind...
    with atomic_output_dir(tmp_path / "converted", overwrite=True) as staging:
        (staging / "done").write_text("again")
    # ...until the next writer of the same destination: only the finished output remains.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
    assert (destination / "done").read_text() == "again"


def test_cache_dir_is_the_users_cache_never_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert cache_dir("tokenizers") == tmp_path / "xdg" / "llamax" / "tokenizers"
    monkeypatch.setenv("LLAMAX_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir("jax").is_dir() and cache_dir("jax") == tmp_path / "mine" / "jax"


def test_the_corpus_tokenizer_is_trained_into_the_cache_from_any_directory(tmp_path, monkeypatch):
    from llamax.data.corpus import shakespeare_tokenizer

    monkeypatch.setenv("LLAMAX_CACHE_DIR", str(tmp_path / "cache"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    start = time.time()
    path = Path(shakespeare_tokenizer(vocab_size=512))
    assert path == tmp_path / "cache" / "tokenizers" / "shakespeare-512" / "tokenizer.model"
    assert path.is_file() and list(elsewhere.iterdir()) == []  # nothing written where we stood
    assert shakespeare_tokenizer(vocab_size=512) == str(path) and time.time() - start < 120
