"""The GPT-2 tokenizer, offline: known ids, the explicit path / environment variable / cache lookup, bad files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from runtime.tokenizer import ENV_VAR, TokenizerError, default_ranks_path, find_ranks, load_tokenizer


@pytest.fixture(scope="module")
def ranks():
    p = default_ranks_path()
    if not p.is_file():
        pytest.skip(f"GPT-2 ranks not installed at {p}; run `nanogpt-deploy fetch-tokenizer` (scripts/setup.sh does)")
    return p


def test_known_ids_and_round_trip(ranks):
    tok = load_tokenizer()
    assert tok.encode("Hello, my dog is cute") == [15496, 11, 616, 3290, 318, 13779]
    assert tok.n_vocab == 50257
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "def f(x):\n    return x ** 2  # héllo 😀"
    assert tok.decode(tok.encode(text)) == text


def _isolated_env(tmp_path, **extra):
    """An environment whose home and caches are empty: only what the test points at can be found."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "NANOGPT_DEPLOY_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(ROOT),
               TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken"), **extra)
    return env


LOAD = "from runtime.tokenizer import load_tokenizer; print(load_tokenizer().encode('Hello, my dog is cute'))"


def test_offline_by_environment_variable(ranks, tmp_path):
    copy = tmp_path / "airgap" / "gpt2.tiktoken"
    copy.parent.mkdir()
    shutil.copy(ranks, copy)
    # no network needed: an unreachable proxy makes any download attempt fail loudly
    env = _isolated_env(tmp_path,
                        **{ENV_VAR: str(copy), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    r = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[15496, 11, 616, 3290, 318, 13779]"


def test_missing_ranks_say_how_to_get_them(tmp_path):
    r = subprocess.run([sys.executable, "-c", LOAD], env=_isolated_env(tmp_path), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "nanogpt-deploy fetch-tokenizer" in r.stderr and ENV_VAR in r.stderr, r.stderr[-2000:]
    with pytest.raises(TokenizerError, match="does not exist"):
        find_ranks(tmp_path / "nope.tiktoken")


def test_a_corrupt_rank_file_is_refused(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    with pytest.raises(TokenizerError, match="is not the GPT-2 rank file"):
        load_tokenizer(path=bad)


def test_only_gpt2_is_supported():
    with pytest.raises(TokenizerError, match="tokenizer 'cl100k_base' is not supported"):
        load_tokenizer("cl100k_base")


def test_fetch_from_a_file_that_is_not_the_whisper_sdist_says_how_to_get_it(tmp_path, capsys):
    import tarfile

    from runtime.cli import main
    from runtime.tokenizer import fetch_ranks

    text = tmp_path / "hostname"
    text.write_text("not a tarball\n")
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.add(text, arcname="pkg/README")
    dest = tmp_path / "gpt2.tiktoken"
    for sdist, message in ((text, "not a readable .tar.gz"), (other, "it has no whisper/assets/gpt2.tiktoken"),
                           (tmp_path / "missing.tar.gz", "does not exist")):
        with pytest.raises(TokenizerError, match="pip download --no-deps --no-binary :all: openai-whisper==") as e:
            fetch_ranks(dest, sdist=sdist)
        assert message in str(e.value) and not dest.exists()
    assert main(["fetch-tokenizer", "--sdist", str(text), "--out", str(dest)]) == 1
    assert f"error: {text} is not the openai-whisper==" in capsys.readouterr().err


def test_fetch_says_whether_it_found_or_wrote_the_file(ranks, tmp_path, capsys):
    import io
    import tarfile

    from runtime.cli import main

    sdist = tmp_path / "openai_whisper-20250625.tar.gz"  # a stand-in sdist holding the real ranks
    with tarfile.open(sdist, "w:gz") as tar:
        data = ranks.read_bytes()
        info = tarfile.TarInfo("openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "gpt2.tiktoken"
    assert main(["fetch-tokenizer", "--sdist", str(sdist), "--out", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"reading whisper/assets/gpt2.tiktoken from {sdist}" in out and f"written to {dest}" in out, out
    assert main(["fetch-tokenizer", "--out", str(dest)]) == 0
    assert f"already at {dest} (sha256 verified); nothing downloaded" in capsys.readouterr().out
