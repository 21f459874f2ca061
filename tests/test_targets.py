import pytest
import torch

from harden.errors import TargetError
from harden.targets import resolve_targets
from harden.tiny import tiny_unet

NEMO_ORDER = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
NEMO_ORDER.append("mid_block.attentions.0.transformer_blocks.0.attn2")


def test_default_is_nemo_down_and_mid_in_model_order():
    targets = resolve_targets(tiny_unet(sample_size=32))
    assert [t.name for t in targets] == NEMO_ORDER
    assert [t.width for t in targets] == [16, 16, 16, 16, 32, 32, 32]
    assert all(t.heads == 4 for t in targets)


def test_all_and_pattern():
    unet = tiny_unet(sample_size=32)
    assert len(resolve_targets(unet, "all")) == 16
    assert [t.name for t in resolve_targets(unet, r"^up_blocks\.3")] == [
        f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn2" for i in range(3)]


def test_nothing_matches_is_a_clear_error():
    with pytest.raises(TargetError, match="matches none of the 16 cross-attention layers"):
        resolve_targets(tiny_unet(sample_size=32), r"no_such_layer")
    with pytest.raises(TargetError, match="not a valid regular expression"):
        resolve_targets(tiny_unet(sample_size=32), r"(")


def test_model_without_cross_attention():
    with pytest.raises(TargetError, match="no cross-attention layers"):
        resolve_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fused_projections_are_refused():
    unet = tiny_unet(sample_size=32)
    unet.fuse_qkv_projections()
    with pytest.raises(TargetError, match="fused key/value projections") as err:
        resolve_targets(unet)
    assert "load the UNet again without fuse_qkv_projections()" in err.value.hint  # unfusing leaves value copies


def test_wrapped_to_v_is_refused():
    unet = tiny_unet(sample_size=32)
    attn = unet.get_submodule(NEMO_ORDER[0])
    attn.to_v = torch.nn.Sequential(attn.to_v)
    with pytest.raises(TargetError, match="not a plain torch.nn.Linear"):
        resolve_targets(unet)
