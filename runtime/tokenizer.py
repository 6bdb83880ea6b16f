"""The GPT-2 tokenizer (tiktoken `gpt2`), working offline.

tiktoken downloads GPT-2's BPE files from the internet on first use. This module instead builds the
same encoding from a local rank file (`gpt2.tiktoken`, 50,256 ranks, sha256-verified), looked up in:
1. an explicit path (`load_tokenizer(path=...)`, CLI `--tokenizer-file`);
2. the environment variable NANOGPT_DEPLOY_TOKENIZER (air-gapped servers: copy the file, point at it);
3. the cache, `$NANOGPT_DEPLOY_CACHE` or `$XDG_CACHE_HOME/nanogpt-deploy` or `~/.cache/nanogpt-deploy`.
`nanogpt-deploy fetch-tokenizer` (run by scripts/setup.sh) fills the cache from the package registry:
the `openai-whisper` source distribution on PyPI ships the ranks as whisper/assets/gpt2.tiktoken.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's own r50k/gpt2 pattern (possessive quantifiers, same splits as GPT-2's original regex)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
EOT_TOKEN = 50256
ENV_VAR = "NANOGPT_DEPLOY_TOKENIZER"
WHISPER_SDIST = "openai-whisper==20250625"
RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"


class TokenizerError(RuntimeError):
    """The tokenizer's rank file is missing or corrupt."""


def cache_dir() -> Path:
    if os.environ.get("NANOGPT_DEPLOY_CACHE"):
        return Path(os.environ["NANOGPT_DEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanogpt-deploy"


def default_ranks_path() -> Path:
    return cache_dir() / "gpt2.tiktoken"


def find_ranks(path: str | os.PathLike | None = None) -> Path:
    """The rank file to use, by the lookup order in the module docstring."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise TokenizerError(f"tokenizer file {p} does not exist")
        return p
    if os.environ.get(ENV_VAR):
        p = Path(os.environ[ENV_VAR]).expanduser()
        if not p.is_file():
            raise TokenizerError(f"{ENV_VAR}={p} does not exist; point it at a gpt2.tiktoken file")
        return p
    p = default_ranks_path()
    if p.is_file():
        return p
    raise TokenizerError(
        f"GPT-2 tokenizer ranks not found at {p}. Run `nanogpt-deploy fetch-tokenizer` (needs PyPI), "
        f"or on an air-gapped machine copy gpt2.tiktoken (sha256 {GPT2_RANKS_SHA256[:12]}...) there "
        f"or set {ENV_VAR}=/path/to/gpt2.tiktoken")


_CACHE: dict = {}


def load_tokenizer(name: str = "gpt2", path: str | os.PathLike | None = None):
    """A tiktoken Encoding for GPT-2, built from the local rank file (cached per path)."""
    if name != "gpt2":
        raise TokenizerError(f"tokenizer {name!r} is not supported; this project serves GPT-2 models ('gpt2')")
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks_path = find_ranks(path)
    if ranks_path in _CACHE:
        return _CACHE[ranks_path]
    try:
        ranks = load_tiktoken_bpe(str(ranks_path), expected_hash=GPT2_RANKS_SHA256)
    except ValueError as e:
        raise TokenizerError(f"{ranks_path} is not the GPT-2 rank file (sha256 mismatch: {e}); "
                             f"delete it and run `nanogpt-deploy fetch-tokenizer`") from None
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={ENDOFTEXT: EOT_TOKEN}, explicit_n_vocab=EOT_TOKEN + 1)
    _CACHE[ranks_path] = enc
    return enc


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_ranks(dest: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None,
                progress=lambda msg: None) -> Path:
    """Get gpt2.tiktoken from the openai-whisper sdist (downloaded with pip, or `sdist` given), verify, install.

    The file is written atomically; an existing verified file is kept. `progress` gets a line per stage: whether the
    file was already there, or downloaded / read from the sdist.
    """
    dest = Path(dest) if dest else default_ranks_path()
    if dest.is_file() and sha256_file(dest) == GPT2_RANKS_SHA256:
        progress(f"GPT-2 tokenizer ranks already at {dest} (sha256 verified); nothing downloaded")
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            progress(f"downloading the {WHISPER_SDIST} source distribution from the package registry "
                     f"for its {RANKS_MEMBER}")
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   WHISPER_SDIST, "-d", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("openai_whisper-*.tar.gz"))
            if r.returncode != 0 or not found:
                raise TokenizerError(f"could not download {WHISPER_SDIST} from the package registry "
                                     f"({' '.join(cmd)}):\n{r.stderr.strip()[-2000:]}")
            sdist = found[0]
        else:
            progress(f"reading {RANKS_MEMBER} from {sdist}")
        how = (f"get it with `pip download --no-deps --no-binary :all: {WHISPER_SDIST}`, or run "
               f"`nanogpt-deploy fetch-tokenizer` without --sdist where PyPI is reachable")
        if not Path(sdist).is_file():
            raise TokenizerError(f"{sdist} does not exist; {how}")
        not_sdist = f"{sdist} is not the {WHISPER_SDIST} source distribution (openai_whisper-*.tar.gz)"
        try:
            with tarfile.open(sdist) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith(RANKS_MEMBER)), None)
                data = tar.extractfile(member).read() if member is not None and member.isfile() else None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            detail = (str(e).strip().splitlines() or [""])[0].rstrip(":")
            raise TokenizerError(f"{not_sdist}: not a readable .tar.gz ({type(e).__name__}: {detail}); {how}") from None
        if data is None:
            raise TokenizerError(f"{not_sdist}: it has no {RANKS_MEMBER}; {how}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise TokenizerError(f"{RANKS_MEMBER} from {WHISPER_SDIST} has sha256 {digest}, expected {GPT2_RANKS_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp_dest.write_bytes(data)
    os.replace(tmp_dest, dest)
    progress(f"GPT-2 tokenizer ranks written to {dest} (sha256 verified)")
    return dest
