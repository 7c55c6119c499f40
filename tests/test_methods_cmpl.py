"""CMPL (Xu et al., CVPR 2022): the auxiliary network is a 3-D CNN (a structure unlike the main
transformer, the paper's premise), each network's confident weak-view pseudo-labels supervise the
OTHER network's strong view (a hand-computed loss), and the auxiliary network round-trips through
method.safetensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models.video import resnet as video_resnet

from tests.test_semi import _config


def _build(cfg, out):
    from mmvssl.methods import BuildContext
    from mmvssl.methods.cmpl import CMPL
    from mmvssl.train.engine import sample_spec
    return CMPL.build(cfg, BuildContext(accelerator=None, out=out, spec=sample_spec(cfg, train=True)))


def test_the_auxiliary_network_is_a_3d_cnn_of_torchvisions_blocks(demo_shards, tmp_path):
    from mmvssl.methods.cmpl import AuxVideoCNN
    torch.manual_seed(0)
    main, method = _build(_config("cmpl", demo_shards["train"], tmp_path), tmp_path)
    aux = method.aux_net
    assert isinstance(aux, AuxVideoCNN) and aux.arch == "r3d_18"  # the shipped config's
    blocks = [m for m in aux.modules() if isinstance(m, video_resnet.BasicBlock)]
    assert len(blocks) == 4 and all(isinstance(m.conv1[0], video_resnet.Conv3DSimple) for m in blocks)
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.LayerNorm)) for m in aux.modules())
    assert any("attn" in name for name, _ in main.named_modules())  # the main network is the transformer
    video = torch.randn(3, 2, 3, 4, 32, 32)  # (B, weak/strong, C, T, H, W) at the test's size
    aux.eval()
    with torch.no_grad():
        out = aux({"video": video})
    assert out["logits"].shape == (3, 2, 5) and out["pooled"].shape == (3, 2, 64)  # 5 demo classes, width 64
    assert torch.equal(out["logits"], torch.zeros(3, 2, 5))  # zero-initialised head: uniform predictions
    # widths 64..512 with 2 blocks per stage is torchvision's network itself, parameter for parameter
    full = AuxVideoCNN(400, "r2plus1d_18", [2, 2, 2, 2], [64, 128, 256, 512])
    reference = video_resnet.r2plus1d_18(weights=None)
    assert [tuple(p.shape) for p in full.parameters()] == [tuple(p.shape) for p in reference.parameters()]


def test_a_misnamed_auxiliary_arch_or_stage_list_is_one_line_naming_the_option():
    from mmvssl.errors import ConfigError
    from mmvssl.methods.cmpl import AuxVideoCNN
    with pytest.raises(ConfigError, match=r"method.options.aux.arch: 'r50'"):
        AuxVideoCNN(5, "r50")
    with pytest.raises(ConfigError, match=r"method.options.aux: layers \[1, 1\] and widths \[8\]"):
        AuxVideoCNN(5, "r3d_18", [1, 1], [8])


def test_each_networks_pseudo_labels_supervise_the_other_one_by_hand():
    """B = 3, K = 2, sample 0 labelled (class 0), samples 1 and 2 unlabelled, threshold 0.95, lambda_u 2.
    - labelled: both networks' weak logits uniform -> CE ln 2 each;
    - sample 1: aux weak (5, 0) -> p = 0.9933 >= 0.95 -> class 0 for the MAIN strong view (0, ln 3):
      CE = ln 4; the main weak (0, 0) is not confident;
    - sample 2: main weak (0, 4) -> p = 0.982 -> class 1 for the AUX strong view (0, 0): CE = ln 2;
      the aux weak (1, 0) (p = 0.73) is not confident, so the main strong view of sample 2 learns nothing.
    U_main = ln 4 / 2, U_aux = ln 2 / 2 (FixMatch: over every unlabelled sample);
    loss = ln 2 + ln 2 + 2 (ln 4 / 2 + ln 2 / 2) = 5 ln 2."""
    from mmvssl.methods.cmpl import CMPL, CMPLOptions
    method = CMPL(CMPLOptions(task="demo", threshold=0.95, unlabelled_weight=2.0), aux_net=None)
    main = torch.zeros(3, 2, 2)
    aux = torch.zeros(3, 2, 2)
    main[1, 1] = torch.tensor([0.0, math.log(3.0)])
    main[2, 0] = torch.tensor([0.0, 4.0])
    main[2, 1] = torch.tensor([3.0, -1.0])  # no confident aux label for sample 2: must get no gradient
    aux[1, 0] = torch.tensor([5.0, 0.0])
    aux[1, 1] = torch.tensor([-2.0, 2.0])  # no confident main label for sample 1: must get no gradient
    aux[2, 0] = torch.tensor([1.0, 0.0])
    main.requires_grad_(True)
    aux.requires_grad_(True)
    loss, terms = method({"main_logits": main, "aux_logits": aux}, {"labels": torch.tensor([0, -1, -1])})
    ln2 = math.log(2.0)
    # float32 cross-entropies of a few logits: a few ulps of ln 2 each
    assert loss.item() == pytest.approx(5 * ln2, abs=1e-5)
    assert terms["ce_main"].item() == pytest.approx(ln2, abs=1e-6) and terms["ce_aux"].item() == pytest.approx(ln2, abs=1e-6)
    assert terms["pseudo_main"].item() == pytest.approx(math.log(4.0) / 2, abs=1e-6)
    assert terms["pseudo_aux"].item() == pytest.approx(ln2 / 2, abs=1e-6)
    assert terms["pseudo_label_share"].item() == 0.5 and terms["pseudo_label_share_aux"].item() == 0.5
    loss.backward()
    assert torch.equal(main.grad[1:, 0], torch.zeros(2, 2)) and torch.equal(aux.grad[1:, 0], torch.zeros(2, 2))
    assert torch.equal(main.grad[2, 1], torch.zeros(2))  # its own confident label does not train the main net
    assert torch.equal(aux.grad[1, 1], torch.zeros(2))
    assert main.grad[1, 1, 0] < 0 and aux.grad[2, 1, 1] < 0  # each strong view pulled to the OTHER's label


def test_the_auxiliary_cnn_is_checkpointed_with_the_method_and_loads_back(demo_shards, tmp_path):
    from safetensors.torch import load_file

    from mmvssl.train.engine import pretrain
    cfg = _config("cmpl", demo_shards["train"], tmp_path / "run", "train.max_steps=1", "train.save_every=1")
    pretrain(cfg)
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000001" / "method.safetensors"))
    assert state["aux_net.stem.0.weight"].shape == (8, 3, 3, 7, 7)  # the CNN's first 3x7x7 convolution
    assert "aux_net.stem.1.running_mean" in state  # its batch-norm statistics too
    torch.manual_seed(123)  # another initialisation than the run's
    _, fresh = _build(cfg, tmp_path / "fresh")
    assert set(fresh.state_dict()) == set(state)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in state.items() if k.startswith("aux_net."))
    fresh.load_state_dict(state, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
