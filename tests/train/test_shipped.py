"""The shipped stdlib-tiny demo checkpoints: they load, their held-out loss is the one results.json and
the README report, MTP drafting leaves greedy output unchanged, and the CLI generates text from them."""
import json
import os
import pathlib

import pytest
import torch

pytest.importorskip("tokenizers")

from nemotron.__main__ import main  # noqa: E402
from nemotron.model import DEMO_CHECKPOINTS, NemotronHForCausalLM, demo_checkpoint  # noqa: E402
from nemotron.nvfp4 import NVFP4Linear  # noqa: E402
from nemotron.train import data as d  # noqa: E402
from nemotron.train import loop  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = json.loads((pathlib.Path(demo_checkpoint("nvfp4")).parent / "results.json").read_text())


@pytest.fixture(scope="module")
def models():
    return {k: NemotronHForCausalLM.from_pretrained(demo_checkpoint(k)).eval() for k in DEMO_CHECKPOINTS}


@pytest.fixture(scope="module")
def heldout():
    """The held-out split of this interpreter's stdlib with the shipped tokenizer; skips when the
    held-out files are not the ones the shipped numbers were measured on (another Python build)."""
    root = d.stdlib_root()
    files = d.split(d.stdlib_files(root), root)[1]
    want = RESULTS["corpus"]["heldout"]["content_sha256"]
    if d._content_digest(files) != want:
        pytest.skip(f"this interpreter's held-out stdlib files differ from those of Python "
                    f"{RESULTS['corpus']['python']} the shipped numbers were measured on")
    return d.encode_corpus(files, d.load_tokenizer(demo_checkpoint("nvfp4")))


def test_demo_checkpoint_paths_and_size():
    total = 0
    for kind in DEMO_CHECKPOINTS:
        path = pathlib.Path(demo_checkpoint(kind))
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
        total += sum(p.stat().st_size for p in path.iterdir())
    assert total < 20 * 2 ** 20
    with pytest.raises(ValueError, match="kind"):
        demo_checkpoint("fp8")


def test_nvfp4_checkpoint_is_a_modelopt_nvfp4_export(models):
    path = pathlib.Path(demo_checkpoint("nvfp4"))
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] in ("NVFP4", "MIXED_PRECISION")
    nvfp4 = [m for m in models["nvfp4"].modules() if isinstance(m, NVFP4Linear)]
    assert nvfp4, "the NVFP4-trained linears load as NVFP4Linear"
    assert not (pathlib.Path(demo_checkpoint("bf16")) / "hf_quant_config.json").exists()
    assert not [m for m in models["bf16"].modules() if isinstance(m, NVFP4Linear)]


@pytest.mark.parametrize("kind", DEMO_CHECKPOINTS)
def test_heldout_loss_is_the_reported_one(models, heldout, kind):
    loss, count = loop.token_loss(models[kind], heldout)
    want = RESULTS["runs"][kind]["heldout"]
    assert count == want["tokens"]
    # the same fp32 CPU computation as the report; only summation order across builds can differ
    assert f"{loss:.3f}" == f"{want['loss']:.3f}"
    row = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith(f"| `{kind}` ")]
    assert len(row) == 1 and f"{want['loss']:.3f}" in row[0], f"README's `{kind}` row: {row}"


def test_tokenizer_round_trips_heldout_code():
    tok = d.load_tokenizer(demo_checkpoint("nvfp4"))
    root = d.stdlib_root()
    f = d.split(d.stdlib_files(root), root)[1][0]
    text = f.read_bytes().decode("utf-8")
    assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_greedy_equals_plain_greedy(models, k):
    model = models["nvfp4"]
    tok = d.load_tokenizer(demo_checkpoint("nvfp4"))
    ids = torch.tensor([tok.encode("import os\n\n\ndef walk(top):\n").ids])
    plain = model.generate(ids, max_new_tokens=40)
    spec, st = model.generate(ids, max_new_tokens=40, mtp_draft_tokens=k, output_stats=True)
    assert torch.equal(spec, plain)
    assert st.drafted > 0 and 0 < st.accepted <= st.drafted          # a trained drafter is right sometimes


def test_generate_cli_prints_text(capsys):
    assert main(["generate", "--model", demo_checkpoint("nvfp4"), "--prompt", "import os", "--max-new-tokens",
                 "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.strip() and not out.strip().replace(",", "").isdigit()      # decoded text, not token ids


def test_results_record_the_corpus_and_commands():
    corpus = RESULTS["corpus"]
    assert corpus["heldout"]["files"] > 0 and corpus["train"]["files"] > 50 * corpus["heldout"]["files"] // 2
    for kind in DEMO_CHECKPOINTS:
        run = RESULTS["runs"][kind]
        assert run["recipe"] == kind and f"--recipe {kind}" in run["command"]
        assert os.path.basename(demo_checkpoint(kind)) == f"stdlib-tiny-{kind}"
