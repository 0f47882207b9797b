"""PVT-layout models: the papers' attention in every block, and PVT's position embeddings and the
attention maps resized to any input."""
import pytest
import timm
import torch


@pytest.mark.parametrize("name,family,depths", [("agent_pvt_medium", "agent", (3, 4, 18, 3)),
                                                ("flatten_pvt_small", "focused_linear", (3, 4, 6, 3))])
def test_paper_attention_in_every_block(name, family, depths):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.attn_schedule.names == [family] * sum(depths)
    assert [tuple(s.pos_embed.shape) for s in model.stages] == [(1, 56 * 56, 64), (1, 28 * 28, 128),
                                                                (1, 14 * 14, 320), (1, 7 * 7, 512)]


def test_any_input_size_resizes_the_maps():
    model = timm.create_model("flatten_pvt_tiny", num_classes=4).eval()
    for h, w in [(64, 64), (96, 160), (256, 32)]:
        assert model(torch.randn(1, 3, h, w)).shape == (1, 4)
