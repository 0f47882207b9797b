"""MAViT: MALA in stages 1-2 and RoPE softmax in stages 3-4 (kept when depths change), with the
official blocks' RoPE, LePE and gate."""
import timm
import torch


def test_stages_split_mala_and_rope_softmax():
    with torch.device("meta"):
        model = timm.create_model("mavit_tiny")
        deeper = timm.create_model("mavit_tiny", depths=(1, 3, 2, 1))
    assert model.attn_schedule.names == ["mala"] * 4 + ["softmax_rope"] * 8
    assert deeper.attn_schedule.names == ["mala"] * 4 + ["softmax_rope"] * 3
    mala, rope_softmax = model.stages[1].blocks[0].attn, model.stages[2].blocks[0].attn
    assert mala.rope and mala.gate is not None and mala.lepe.weight.shape[-1] == 5
    assert rope_softmax.family == "softmax_rope" and rope_softmax.lepe.weight.shape[-1] == 5
