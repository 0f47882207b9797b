"""PVT-layout models: the papers' attention in every block, and PVT's position embeddings and the
attention maps resized to any input."""
import pytest
import timm
import torch


@pytest.mark.parametrize("name,family,depths,side", [("agent_pvt_medium", "agent", (3, 4, 18, 3), 56),
                                                     ("flatten_pvt_small", "focused_linear", (3, 4, 6, 3), 56),
                                                     ("flatten_pvt_large", "focused_linear", (3, 8, 27, 3), 56),
                                                     ("agent_pvt_medium_256", "agent", (3, 4, 18, 3), 64)])
def test_paper_attention_in_every_block(name, family, depths, side):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.attn_schedule.names == [family] * sum(depths)
    assert [tuple(s.pos_embed.shape) for s in model.stages] == [(1, (side // 2 ** i) ** 2, c)
                                                                for i, c in enumerate((64, 128, 320, 512))]
    maps = [getattr(s.blocks[0].attn, "bias_grid", None) or s.blocks[0].attn.pos_grid for s in model.stages]
    assert maps == [(side // 2 ** i,) * 2 for i in range(4)]


def test_any_input_size_resizes_the_maps():
    model = timm.create_model("flatten_pvt_tiny", num_classes=4).eval()
    for h, w in [(64, 64), (96, 160), (256, 32)]:
        assert model(torch.randn(1, 3, h, w)).shape == (1, 4)
