"""The whole model trains under the NVFP4 recipe: prepare_training_, a few AdamW steps, the ModelOpt
NVFP4 export of the trained weights (the README's five lines)."""
import torch
import torch.nn.functional as F

import nemotron
from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from nemotron.model.config import PRESETS
from nemotron.nvfp4 import NVFP4Recipe
from tests.close import rms

# the tiny preset with 16 Mamba heads, so in_proj's width (2 * 64 + 2 * 2 * 16 + 16) is a multiple of 16
CFG = dict(PRESETS["tiny"], mamba_num_heads=16, mamba_head_dim=4)


def _loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_nemotron3_recipe_trains_the_model_and_exports_it(tmp_path):
    torch.manual_seed(0)
    cfg = NemotronHConfig(**CFG)
    model = NemotronHForCausalLM.random(cfg, seed=0)
    nemotron.prepare_training_(model, NVFP4Recipe.nemotron3())
    experts = [m for n, m in model.named_modules() if n.endswith("mixer.experts")]
    assert experts and experts[0].training_recipe is not None          # routed experts train in NVFP4 too
    assert experts[-1].training_recipe is None                         # the final 15% of layers: high precision
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = _loss(model, ids)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
                   and not n.startswith("mtp.")]                        # MTP is not in this loss
        assert not missing, missing[:5]
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # memorizing one batch: the loss must fall clearly within six steps
    assert losses[-1] < losses[0] - 0.5, losses
    model.eval()
    with torch.no_grad():
        trained = model(ids)
    nemotron.quantize_(model, "nvfp4").save_pretrained(str(tmp_path / "out"))
    back = NemotronHForCausalLM.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        served = back(ids)
    # W4A16 serving of the NVFP4 export (16x16 blocks for the trained layers, 1x16 for the rest):
    # quantizing the high-precision layers too adds NVFP4 noise, but the logits stay close
    assert rms(served - trained) / rms(trained) < 0.25


def test_trained_experts_export_their_16x16_blocks():
    cfg = NemotronHConfig(**CFG)
    model = NemotronHForCausalLM.random(cfg, seed=1)
    nemotron.prepare_training_(model, NVFP4Recipe())
    stack = model.backbone.layers[1].mixer.experts
    want = nemotron.nvfp4.quantize(stack.up_proj.detach()[2], block_shape=(16, 16))
    nemotron.quantize_(model, "nvfp4")
    assert torch.equal(stack.up_codes[2], want.codes) and torch.equal(stack.up_scales[2].view(torch.uint8),
                                                                      want.block_scales.view(torch.uint8))
