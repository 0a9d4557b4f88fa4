"""Training data: the Python standard library's own source, a byte-level BPE tokenizer, token batches.

The corpus is every ``*.py`` file of the running interpreter's stdlib (:func:`stdlib_files`), split
into train / held-out by a hash of each file's relative path (:func:`split`), so the split is the
same on every machine and Python version for the files they share. :func:`manifest` records what a
run trained on. The tokenizer is an HF ``tokenizers`` byte-level BPE trained on the training split
(:func:`train_tokenizer`); ``<|endoftext|>`` (id 0) separates documents in the token stream
(:func:`encode_corpus`, cached on disk by :func:`cached_tokens`). :func:`batch` draws the windows of
one training step as a pure function of ``(seed, step)``, so a resumed run sees the same data without
saved RNG state. :func:`bytes_per_token` turns a loss per token into bits per byte.

Example::

    train_files, heldout_files = split(stdlib_files(), stdlib_root())
    tok = train_tokenizer(train_files, vocab_size=8192)
    tokens = cached_tokens("train", train_files, tok)          # int32 [N]
    x = batch(tokens, step=0, batch_size=8, seq_len=512, seed=0)  # int64 [8, 513]
    inputs, targets = x[:, :-1], x[:, 1:]
"""
from __future__ import annotations

import hashlib
import math
import os
import pathlib
import platform
import sysconfig
import tempfile
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .. import dispatch

if TYPE_CHECKING:
    import tokenizers

__all__ = ["EOT", "HELDOUT_MODULUS", "stdlib_root", "stdlib_files", "is_heldout", "split", "manifest", "heldout_sample",
           "train_tokenizer", "save_tokenizer", "load_tokenizer", "tokenizer_hash", "encode_corpus",
           "cached_tokens", "default_cache_dir", "batch", "bytes_per_token", "bits_per_byte"]

EOT = "<|endoftext|>"
HELDOUT_MODULUS = 50                 # 1 file in 50 (2%) is held out
MIN_VOCAB, MAX_VOCAB = 4096, 8192
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------- files

def stdlib_root() -> pathlib.Path:
    """The running interpreter's stdlib directory (``sysconfig.get_paths()["stdlib"]``)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _rel(path: pathlib.Path, root: pathlib.Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"files: {str(path)!r} is not under root {str(root)!r}") from None


def _read_text(path: pathlib.Path) -> str:
    """The file's text, decoded as strict UTF-8 with line endings kept (CRLF stays CRLF)."""
    return path.read_bytes().decode("utf-8")


def stdlib_files(root: Optional[PathLike] = None) -> list[pathlib.Path]:
    """Every ``*.py`` file under ``root`` (default :func:`stdlib_root`), sorted by its POSIX path
    relative to ``root``.

    Skipped: anything below a directory named ``site-packages``, ``dist-packages`` (Debian's name for
    it) or ``__pycache__`` (relative to ``root``); entries that are not regular files; files that cannot
    be read (``OSError``) or are not strict UTF-8 (the stdlib's tests ship a few Latin-1 and
    deliberately broken files). Every returned file therefore decodes with ``bytes.decode("utf-8")``.
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    if not root.is_dir():
        raise ValueError(f"root: expected a directory, got {str(root)!r}")
    keep = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or not p.is_file():
            continue
        try:
            _read_text(p)
        except (OSError, UnicodeDecodeError):
            continue
        keep.append((rel.as_posix(), p))
    keep.sort(key=lambda rp: rp[0])
    return [p for _, p in keep]


def is_heldout(rel_path: str) -> bool:
    """Whether the file at POSIX path ``rel_path`` (relative to the stdlib root) is held out:
    ``int(sha256(rel_path.encode("utf-8")).hexdigest()[:8], 16) % 50 == 0`` (about 2% of files)."""
    if not isinstance(rel_path, str):
        raise TypeError(f"rel_path: expected a str, got {type(rel_path).__name__}")
    return int(hashlib.sha256(rel_path.encode("utf-8")).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


def split(files: Iterable[PathLike], root: PathLike) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """``(train, heldout)``: ``files`` (each under ``root``) partitioned by :func:`is_heldout` of its
    POSIX path relative to ``root``; both lists keep the input order. Deterministic across machines
    and Python versions: it depends only on the relative path's bytes."""
    root = pathlib.Path(root)
    train, heldout = [], []
    for f in files:
        f = pathlib.Path(f)
        (heldout if is_heldout(_rel(f, root)) else train).append(f)
    return train, heldout


def _list_digest(rels: Sequence[str]) -> str:
    """sha256 of the sorted relative paths, one per line."""
    return hashlib.sha256("".join(r + "\n" for r in sorted(rels)).encode("utf-8")).hexdigest()


def _content_digest(files: Sequence[pathlib.Path]) -> str:
    """sha256 over the files' contents in order (paths do not enter: the same text gives the same key
    on every machine)."""
    h = hashlib.sha256()
    for f in files:
        h.update(hashlib.sha256(pathlib.Path(f).read_bytes()).digest())
    return h.hexdigest()


def manifest(root: Optional[PathLike] = None) -> dict:
    """What the corpus is, as a JSON-able dict::

        {"python": "3.11.7", "implementation": "CPython", "heldout_modulus": 50,
         "files_sha256": <sha256 of all sorted relative paths, one per line>,
         "train":   {"files": n, "bytes": b, "files_sha256": ..., "content_sha256": ...},
         "heldout": {"files": n, "bytes": b, "files_sha256": ..., "content_sha256": ...}}

    ``bytes`` is the sum of the files' sizes on disk (UTF-8 bytes); ``content_sha256`` hashes the
    files' contents in order (it keys :func:`cached_tokens`).
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    files = stdlib_files(root)
    parts = dict(zip(("train", "heldout"), split(files, root)))
    out = {"python": platform.python_version(), "implementation": platform.python_implementation(),
           "heldout_modulus": HELDOUT_MODULUS, "files_sha256": _list_digest([_rel(f, root) for f in files])}
    for name, fs in parts.items():
        out[name] = {"files": len(fs), "bytes": sum(f.stat().st_size for f in fs),
                     "files_sha256": _list_digest([_rel(f, root) for f in fs]),
                     "content_sha256": _content_digest(fs)}
    return out


# ------------------------------------------------------------------------------------------- tokenizer

def _files_arg(files) -> list[pathlib.Path]:
    if isinstance(files, (str, os.PathLike)):
        raise TypeError("files: expected a sequence of paths, got a single path")
    files = [pathlib.Path(f) for f in files]
    if not files:
        raise ValueError("files: expected at least one file, got none")
    return files


def _texts(files: Sequence[pathlib.Path]) -> list[str]:
    out = []
    for f in files:
        try:
            out.append(_read_text(f))
        except UnicodeDecodeError as e:
            raise ValueError(f"files: {str(f)!r} is not UTF-8 ({e})") from None
    return out


def train_tokenizer(files: Sequence[PathLike], vocab_size: int = 8192) -> "tokenizers.Tokenizer":
    """A byte-level BPE (HF ``tokenizers``) trained on the text of ``files`` (pass the training split).

    Vocabulary: ``<|endoftext|>`` (id 0, the document separator), the 256 byte symbols (ids 1..256),
    then merges, at most ``vocab_size`` in all, ``vocab_size`` in [4096, 8192]; a merge needs a pair
    seen at least twice, so a tiny corpus may end with fewer. No normalizer and no prefix space, so
    ``tok.decode(tok.encode(s).ids) == s`` for every string ``s``. The literal text ``<|endoftext|>``
    in a document is encoded as ordinary text (``encode_special_tokens``), so id 0 only ever comes from
    :func:`encode_corpus`'s separators. The same files give the same tokenizer (same JSON).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab_size = dispatch.check_int("vocab_size", vocab_size, lo=MIN_VOCAB, hi=MAX_VOCAB)
    files = _files_arg(files)
    texts = _texts(files)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    tok.encode_special_tokens = True
    return tok


def tokenizer_hash(tokenizer: "tokenizers.Tokenizer") -> str:
    """sha256 of the tokenizer's JSON (what :func:`save_tokenizer` writes)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def _check_tokenizer(tokenizer) -> None:
    from tokenizers import Tokenizer
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.token_to_id(EOT) != 0:
        raise ValueError(f"tokenizer: expected {EOT!r} as id 0, got id {tokenizer.token_to_id(EOT)}")


def _tokenizer_file(path: PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    return path if path.suffix == ".json" else path / "tokenizer.json"


def save_tokenizer(tokenizer: "tokenizers.Tokenizer", path: PathLike) -> pathlib.Path:
    """Write ``tokenizer`` as ``path`` if it ends in ``.json``, else as ``path/tokenizer.json``
    (directories created); returns the file written."""
    _check_tokenizer(tokenizer)
    out = _tokenizer_file(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return out


def load_tokenizer(path_or_dir: PathLike) -> "tokenizers.Tokenizer":
    """Read a tokenizer written by :func:`save_tokenizer`: ``path_or_dir`` is the ``.json`` file or a
    directory holding ``tokenizer.json``. ``FileNotFoundError`` if it is missing, ``ValueError`` if it
    is not a tokenizer with ``<|endoftext|>`` as id 0."""
    from tokenizers import Tokenizer

    f = _tokenizer_file(path_or_dir)
    if not f.is_file():
        raise FileNotFoundError(f"path_or_dir: no tokenizer file at {str(f)!r}")
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:     # the Rust side raises a bare Exception for malformed JSON
        raise ValueError(f"path_or_dir: {str(f)!r} is not a tokenizers JSON file ({e})") from None
    _check_tokenizer(tok)
    tok.encode_special_tokens = True     # a runtime flag: the JSON does not keep it
    return tok


# ------------------------------------------------------------------------------------------- token stream

def encode_corpus(files: Sequence[PathLike], tokenizer: "tokenizers.Tokenizer") -> torch.Tensor:
    """The token stream of ``files``: int32 ``[N]``, each file's tokens followed by ``<|endoftext|>``
    (id 0), in file order. A literal ``<|endoftext|>`` inside a file is encoded as text, never as 0."""
    _check_tokenizer(tokenizer)
    texts = _texts(_files_arg(files))
    was = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        encs = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = was
    eot = np.zeros(1, dtype=np.int32)
    parts = []
    for e in encs:
        parts += [np.asarray(e.ids, dtype=np.int32), eot]
    return torch.from_numpy(np.concatenate(parts))


def heldout_sample(tokenizer: "tokenizers.Tokenizer", *, files: int = 4, tokens_per_file: int = 2048,
                   root: Optional[PathLike] = None) -> tuple[torch.Tensor, list[str]]:
    """A small, fixed held-out sample (the demo's, the MTP benchmark's prompts): the first
    ``tokens_per_file`` tokens of each of the first ``files`` held-out files under ``root`` (default
    :func:`stdlib_root`), each followed by ``<|endoftext|>``, as one int32 stream; and the files'
    relative paths."""
    files = dispatch.check_int("files", files, lo=1)
    tokens_per_file = dispatch.check_int("tokens_per_file", tokens_per_file, lo=1)
    root = stdlib_root() if root is None else pathlib.Path(root)
    picked = split(stdlib_files(root), root)[1][:files]
    eot = torch.zeros(1, dtype=torch.int32)                 # <|endoftext|> is id 0
    parts = [torch.cat([encode_corpus([f], tokenizer)[:-1][:tokens_per_file], eot]) for f in picked]
    return torch.cat(parts), [_rel(f, root) for f in picked]


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/nemotron-kernels/tokens`` (``~/.cache`` when unset): outside the package."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "nemotron-kernels" / "tokens"


def cached_tokens(split_name: str, files: Sequence[PathLike], tokenizer: "tokenizers.Tokenizer",
                  cache_dir: Optional[PathLike] = None) -> torch.Tensor:
    """:func:`encode_corpus` of ``files``, cached as ``<cache_dir>/<split_name>-<key>.pt``.

    ``key`` hashes the files' contents in order (the ``content_sha256`` of :func:`manifest`) and
    :func:`tokenizer_hash`, so another Python version's stdlib or another tokenizer never reads a
    stale stream. ``cache_dir`` defaults to :func:`default_cache_dir`. The file is written to a
    temporary name and renamed, so an interrupted run leaves no partial cache; an unreadable cache
    file is rebuilt.
    """
    if not isinstance(split_name, str) or not split_name or not split_name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"split_name: expected a non-empty name of letters, digits, '-' or '_', got {split_name!r}")
    _check_tokenizer(tokenizer)
    files = _files_arg(files)
    cache_dir = default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)
    key = hashlib.sha256(f"{_content_digest(files)}:{tokenizer_hash(tokenizer)}".encode()).hexdigest()[:24]
    path = cache_dir / f"{split_name}-{key}.pt"
    if path.is_file():
        try:
            t = torch.load(path, weights_only=True)
            if isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == 1:
                return t
        except Exception:   # a truncated or foreign file: rebuild it below
            pass
    tokens = encode_corpus(files, tokenizer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{split_name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(tokens, fh)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return tokens


# ------------------------------------------------------------------------------------------- batches

def _step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from a hash of (seed, step): distinct steps get unrelated streams."""
    h = hashlib.sha256(f"nemotron.train.batch:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") >> 1)


def batch(tokens: torch.Tensor, *, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The batch of training step ``step``: int64 ``[batch_size, seq_len + 1]`` on ``tokens.device``.

    Row ``b`` is ``tokens[s_b : s_b + seq_len + 1]`` with starts ``s_b`` drawn uniformly from
    ``[0, N - seq_len - 1]`` by a ``torch.Generator`` seeded from ``(seed, step)``: a pure function of
    its arguments, so a run resumed at step k sees exactly the batches it would have seen. Inputs are
    ``x[:, :-1]``, targets ``x[:, 1:]``. ``tokens``: a 1-D integer tensor ``[N]``, N >= seq_len + 1.
    """
    step = dispatch.check_int("step", step, lo=0)
    batch_size = dispatch.check_int("batch_size", batch_size, lo=1)
    seq_len = dispatch.check_int("seq_len", seq_len, lo=1)
    seed = dispatch.check_int("seed", seed, lo=0)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens: expected a 1-D integer tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens: expected a 1-D integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
    n = tokens.numel()
    if n < seq_len + 1:
        raise ValueError(f"tokens: the stream has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=_step_generator(seed, step))
    idx = starts[:, None] + torch.arange(seq_len + 1)
    return tokens[idx.to(tokens.device)].long()


# ------------------------------------------------------------------------------------------- evaluation

def bytes_per_token(files: Sequence[PathLike], tokenizer: "tokenizers.Tokenizer", *,
                    tokens: Optional[torch.Tensor] = None) -> float:
    """UTF-8 bytes of ``files`` divided by the length of their :func:`encode_corpus` stream (pass that
    stream as ``tokens`` to skip re-encoding). The stream counts one ``<|endoftext|>`` per file as a
    token of 0 bytes, as a loss averaged over the stream does.

    With ``L`` the mean cross-entropy per token in nats over that stream, bits per byte is
    ``L / ln 2 * tokens / bytes = L / ln 2 / bytes_per_token`` (:func:`bits_per_byte`).
    """
    files = _files_arg(files)
    n_bytes = sum(f.stat().st_size for f in files)
    if tokens is None:
        tokens = encode_corpus(files, tokenizer)
    elif not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.numel() < len(files):
        raise ValueError(f"tokens: expected the 1-D stream of these {len(files)} files, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    return n_bytes / tokens.numel()


def bits_per_byte(loss_per_token: float, bytes_per_token: float) -> float:
    """Bits per byte from a mean loss in nats per token: ``loss / ln 2 / bytes_per_token``."""
    loss = dispatch.check_float("loss_per_token", loss_per_token, lo=0.0)
    bpt = dispatch.check_float("bytes_per_token", bytes_per_token, lo=0.0, lo_open=True)
    return loss / math.log(2) / bpt
