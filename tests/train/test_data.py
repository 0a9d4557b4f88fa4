"""The training data: the stdlib split, the BPE tokenizer, the cached token stream and step batches."""
import hashlib
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nemotron.train import data
from tests.close import assert_equal

# Golden split decisions: a change here moves files between train and held-out for every run.
_GOLDEN_HELDOUT = ["pkg/mod5.py", "pkg/mod30.py", "pkg/mod117.py", "pkg/mod124.py", "pkg/mod204.py", "pkg/mod250.py"]


@pytest.fixture(scope="module")
def stdlib():
    root = data.stdlib_root()
    return root, data.stdlib_files(root)


@pytest.fixture(scope="module")
def small(stdlib):
    """The first 40 training files and a 4096-token tokenizer trained on them (under a second)."""
    root, files = stdlib
    train, _ = data.split(files, root)
    return train[:40], data.train_tokenizer(train[:40], vocab_size=4096)


def _tree(tmp_path):
    """A fake stdlib: kept, skipped (site-packages, __pycache__, Latin-1, not .py, a directory) files."""
    root = tmp_path / "lib"
    for rel, body in {"b.py": b"x = 1\n", "a/z.py": b"y = 2\r\n", "a_b.py": b"# \xc3\xa9\n", "a/__init__.py": b"",
                      "site-packages/s.py": b"s = 1\n", "a/__pycache__/c.py": b"c = 1\n", "latin.py": b"# \xe9\n",
                      "notes.txt": b"hi\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    (root / "dir.py").mkdir()
    return root


# ------------------------------------------------------------------------------------------- files and split

def test_stdlib_files_sorted_and_skips(tmp_path):
    root = _tree(tmp_path)
    rels = [p.relative_to(root).as_posix() for p in data.stdlib_files(root)]
    assert rels == ["a/__init__.py", "a/z.py", "a_b.py", "b.py"]     # POSIX string order: "/" < "_"


def test_stdlib_files_bad_root(tmp_path):
    with pytest.raises(ValueError, match="root: expected a directory"):
        data.stdlib_files(tmp_path / "missing")


def test_split_disjoint_and_covering(stdlib):
    root, files = stdlib
    train, heldout = data.split(files, root)
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == sorted(files) and len(train) + len(heldout) == len(files)
    assert train == [f for f in files if f in set(train)]              # input order kept


def test_split_golden():
    names = [f"pkg/mod{i}.py" for i in range(400)]
    assert [n for n in names if data.is_heldout(n)] == _GOLDEN_HELDOUT
    assert data.is_heldout("ast.py") and data.is_heldout("asyncio/constants.py")
    assert not data.is_heldout("os.py") and not data.is_heldout("typing.py")


def test_split_about_two_percent(stdlib):
    root, files = stdlib
    _, heldout = data.split(files, root)
    assert len(files) > 500                                            # the real stdlib, not a stub
    # expected 2% of ~1800 files is 36 +- 6; [1%, 3.5%] is about 3 sigma either side
    assert 0.01 <= len(heldout) / len(files) <= 0.035, (len(heldout), len(files))


def test_split_file_outside_root(tmp_path):
    with pytest.raises(ValueError, match="files: .* is not under root"):
        data.split([tmp_path / "x.py"], tmp_path / "lib")


def test_manifest(tmp_path):
    root = _tree(tmp_path)
    m = data.manifest(root)
    digest = lambda rels: hashlib.sha256("".join(r + "\n" for r in sorted(rels)).encode()).hexdigest()  # noqa: E731
    rels = ["a/__init__.py", "a/z.py", "a_b.py", "b.py"]
    held = [r for r in rels if data.is_heldout(r)]
    assert m["files_sha256"] == digest(rels)
    assert m["train"]["files"] + m["heldout"]["files"] == 4
    assert m["heldout"]["files_sha256"] == digest(held)
    assert m["train"]["bytes"] + m["heldout"]["bytes"] == 6 + 7 + 5 + 0                 # "# é\n" is 5 UTF-8 bytes
    assert m["python"].count(".") == 2
    assert data.manifest(root) == m


# ------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_vocab_and_special(small):
    _, tok = small
    assert tok.get_vocab_size() == 4096
    assert tok.token_to_id(data.EOT) == 0


_SNIPPETS = ["\t", "\r\n", "\n", "    ", "def f(x):\n    return x\n", "é", "日本語", "🐍", "\x00", data.EOT, "'''"]


@settings(max_examples=40)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(_SNIPPETS)), max_size=12).map("".join))
@example("")
@example("if x:\r\n\treturn '<|endoftext|>'\r\n")
def test_tokenizer_round_trip(small, s):
    _, tok = small
    ids = tok.encode(s).ids
    assert 0 not in ids                                                # the separator only comes from encode_corpus
    assert tok.decode(ids, skip_special_tokens=False) == s


def test_tokenizer_deterministic(small):
    files, tok = small
    again = data.train_tokenizer(files, vocab_size=4096)
    assert again.to_str() == tok.to_str()
    assert data.tokenizer_hash(again) == data.tokenizer_hash(tok)
    other = data.train_tokenizer(files[:20], vocab_size=4096)
    assert data.tokenizer_hash(other) != data.tokenizer_hash(tok)


@pytest.mark.parametrize("v, err", [(4095, ValueError), (8193, ValueError), (4096.0, TypeError), (True, TypeError)])
def test_tokenizer_bad_vocab(small, v, err):
    files, _ = small
    with pytest.raises(err, match="vocab_size"):
        data.train_tokenizer(files[:2], vocab_size=v)


def test_tokenizer_bad_files(tmp_path):
    with pytest.raises(ValueError, match="files: expected at least one"):
        data.train_tokenizer([])
    with pytest.raises(TypeError, match="files: expected a sequence"):
        data.train_tokenizer(str(tmp_path / "a.py"))
    (tmp_path / "l.py").write_bytes(b"\xe9\n")
    with pytest.raises(ValueError, match="files: .* is not UTF-8"):
        data.train_tokenizer([tmp_path / "l.py"])


def test_save_load(small, tmp_path):
    _, tok = small
    f = data.save_tokenizer(tok, tmp_path / "out")
    assert f == tmp_path / "out" / "tokenizer.json"
    for where in (tmp_path / "out", f):
        back = data.load_tokenizer(where)
        assert back.to_str() == tok.to_str()
        assert 0 not in back.encode(data.EOT).ids                      # the runtime flag is restored on load


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path_or_dir: no tokenizer file"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="path_or_dir: .* is not a tokenizers JSON"):
        data.load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------- token stream

def test_encode_corpus(small, tmp_path):
    files, tok = small
    (tmp_path / "eot.py").write_text(f"s = '{data.EOT}'\n")
    files = files[:5] + [tmp_path / "eot.py"]
    s = data.encode_corpus(files, tok)
    assert s.dtype == torch.int32 and s.dim() == 1
    ends = (s == 0).nonzero().flatten().tolist()
    assert len(ends) == len(files) and ends[-1] == s.numel() - 1     # one separator after each file, none inside
    starts = [0] + [e + 1 for e in ends[:-1]]
    for f, a, b in zip(files, starts, ends):
        assert tok.decode(s[a:b].tolist(), skip_special_tokens=False) == f.read_bytes().decode("utf-8")


def test_cached_tokens(small, tmp_path, monkeypatch):
    files, tok = small
    files = files[:5]
    first = data.cached_tokens("train", files, tok, tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 1 and written[0].startswith("train-") and written[0].endswith(".pt")
    assert_equal(first, data.encode_corpus(files, tok))

    def no_encode(*a, **k):
        raise AssertionError("re-encoded although cached")
    monkeypatch.setattr(data, "encode_corpus", no_encode)
    assert_equal(data.cached_tokens("train", files, tok, tmp_path), first)
    monkeypatch.undo()

    (tmp_path / written[0]).write_bytes(b"truncated")                  # a broken cache file is rebuilt
    assert_equal(data.cached_tokens("train", files, tok, tmp_path), first)
    data.cached_tokens("train", files[:3], tok, tmp_path)              # other files: another key
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ValueError, match="split_name"):
        data.cached_tokens("../x", files, tok, tmp_path)


def test_default_cache_dir_outside_package(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "nemotron-kernels" / "tokens"


# ------------------------------------------------------------------------------------------- batches

_STREAM = torch.arange(1000, dtype=torch.int32)


@settings(max_examples=20)
@given(step=st.integers(0, 10**9), seed=st.integers(0, 2**40), b=st.integers(1, 9), t=st.integers(1, 999))
@example(step=0, seed=0, b=4, t=999)                                   # a stream of exactly seq_len + 1
def test_batch_deterministic_and_in_stream(step, seed, b, t):
    x = data.batch(_STREAM, step=step, batch_size=b, seq_len=t, seed=seed)
    assert x.dtype == torch.int64 and x.shape == (b, t + 1)
    assert_equal(x, data.batch(_STREAM.clone(), step=step, batch_size=b, seq_len=t, seed=seed))
    # windows of the arange stream: consecutive values starting in [0, N - t - 1]
    assert_equal(x - x[:, :1], torch.arange(t + 1).expand(b, -1))
    assert int(x[:, 0].min()) >= 0 and int(x[:, -1].max()) <= _STREAM.numel() - 1


def test_batch_differs_across_steps_and_seeds():
    kw = dict(batch_size=8, seq_len=16)
    a = data.batch(_STREAM, step=3, seed=0, **kw)
    # 8 starts out of 984 each: an accidental full match has probability ~984**-8
    assert not torch.equal(a, data.batch(_STREAM, step=4, seed=0, **kw))
    assert not torch.equal(a, data.batch(_STREAM, step=3, seed=1, **kw))
    torch.manual_seed(123)                                             # the global RNG plays no part
    assert_equal(a, data.batch(_STREAM, step=3, seed=0, **kw))


@pytest.mark.parametrize("kw, err, match", [
    (dict(seq_len=1000), ValueError, "fewer than seq_len"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(seq_len=0), ValueError, "seq_len"),
    (dict(step=-1), ValueError, "step"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(tokens=_STREAM.float()), TypeError, "tokens: expected a 1-D integer"),
    (dict(tokens=_STREAM.view(10, 100)), TypeError, "tokens: expected a 1-D integer"),
    (dict(tokens=list(range(10))), TypeError, "tokens: expected a 1-D integer"),
])
def test_batch_errors(kw, err, match):
    args = dict(tokens=_STREAM, step=0, batch_size=2, seq_len=8, seed=0) | kw
    with pytest.raises(err, match=match):
        data.batch(args.pop("tokens"), **args)


# ------------------------------------------------------------------------------------------- evaluation

def test_bytes_per_token(small):
    files, tok = small
    files = files[:5]
    s = data.encode_corpus(files, tok)
    n_bytes = sum(len(f.read_bytes()) for f in files)
    assert data.bytes_per_token(files, tok) == n_bytes / s.numel()
    assert data.bytes_per_token(files, tok, tokens=s) == n_bytes / s.numel()
    assert 2.0 < n_bytes / s.numel() < 6.0                             # BPE on source code: a few bytes a token
    assert math.isclose(data.bits_per_byte(3 * math.log(2), 3.0), 1.0, rel_tol=1e-12)  # float rounding only
    with pytest.raises(ValueError, match="bytes_per_token"):
        data.bits_per_byte(1.0, 0.0)
    with pytest.raises(ValueError, match="tokens: expected the 1-D stream"):
        data.bytes_per_token(files, tok, tokens=s[:2])


def test_heldout_sample(small, stdlib):
    _, tok = small
    root, files = stdlib
    sample, names = data.heldout_sample(tok, files=3, tokens_per_file=50)
    heldout = data.split(files, root)[1]
    assert names == [f.relative_to(root).as_posix() for f in heldout[:3]]
    assert all(data.is_heldout(n) for n in names)
    assert sample.dtype == torch.int32 and sample.numel() <= 3 * 51
    ends = (sample == 0).nonzero().flatten().tolist()
    assert len(ends) == 3 and ends[-1] == sample.numel() - 1         # each file closed by <|endoftext|>
    assert_equal(sample[:ends[0]], data.encode_corpus(heldout[:1], tok)[:ends[0]])
    with pytest.raises(ValueError, match="tokens_per_file"):
        data.heldout_sample(tok, tokens_per_file=0)
