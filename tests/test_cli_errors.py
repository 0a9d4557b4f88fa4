"""The command line on user mistakes: a non-zero exit and one line ``nemotron <cmd>: error: ...`` on
stderr, never a traceback. In-process ``main([...])``: each subprocess would import torch again."""
import os

import pytest

from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from tests.cli import assert_cli_error as _error


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), seed=0).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("ids", ["1,a,3", "1.5", ",", ""])
def test_non_numeric_ids(capsys, checkpoint, ids):
    _error(capsys, ["generate", "--model", str(checkpoint), "--ids", ids], 2, "--ids", "integer token ids")


@pytest.mark.parametrize("argv, fragment", [
    (["--cols", "17"], "--cols: expected a positive multiple of 16"),
    (["--cols", "0"], "--cols"),
    (["--rows", "0"], "--rows: expected an integer >= 1"),
    (["--seed", "x"], "--seed: expected an integer"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_demo_options_are_checked_before_anything_runs(capsys, argv, fragment):
    _error(capsys, ["demo", *argv], 2, fragment)


@pytest.mark.parametrize("scale", ["-1", "0", "nan", "inf", "x"])
def test_quantize_input_scale_must_be_positive_finite(capsys, checkpoint, tmp_path, scale):
    _error(capsys, ["quantize", "--model", str(checkpoint), "--out", str(tmp_path / "q"), "--input-scale", scale],
           2, "--input-scale")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("text, fragment", [('{"backbone.layers.0.mixer.in_proj": nvfp4}', "is not valid JSON"),
                                            ('["nvfp4"]', "must hold a JSON object")])
def test_invalid_json_recipe(capsys, checkpoint, tmp_path, text, fragment):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(text)
    _error(capsys, ["quantize", "--model", str(checkpoint), "--recipe", str(recipe), "--out", str(tmp_path / "q")],
           2, "--recipe", str(recipe), fragment)


def test_recipe_naming_no_module_of_the_model(capsys, checkpoint, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"backbone.layers.99.mixer.in_proj": "nvfp4"}')
    _error(capsys, ["quantize", "--model", str(checkpoint), "--recipe", str(recipe), "--out", str(tmp_path / "q")],
           1, "recipe", "layers.99")


def test_quantize_refuses_to_overwrite_its_source(capsys, checkpoint):
    before = {f: os.path.getmtime(checkpoint / f) for f in os.listdir(checkpoint)}
    _error(capsys, ["quantize", "--model", str(checkpoint), "--out", str(checkpoint) + os.sep], 2,
           "--out", "is the --model directory")
    assert {f: os.path.getmtime(checkpoint / f) for f in os.listdir(checkpoint)} == before


def test_truncated_checkpoint(capsys, checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    data = (checkpoint / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    _error(capsys, ["generate", "--model", str(bad), "--ids", "1,2"], 1,
           str(bad / "model.safetensors"), "not a valid safetensors file")


def test_missing_checkpoint_and_out_of_range_ids(capsys, checkpoint, tmp_path):
    _error(capsys, ["generate", "--model", str(tmp_path / "none"), "--ids", "1"], 1, "not a checkpoint directory")
    _error(capsys, ["generate", "--model", str(checkpoint), "--ids", "1,999"], 1, "input_ids", "[0, 256)")
