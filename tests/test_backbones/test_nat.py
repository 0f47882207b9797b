"""NAT / DiNAT: 7x7 neighborhoods everywhere; DiNAT dilates every second block of a stage to the
largest dilation that fits the stage map at 224x224, also when depths change."""
import timm
import torch


def dilations(model):
    return [[b.attn.dilation for b in stage.blocks] for stage in model.stages]


def test_nat_and_dinat_dilations():
    with torch.device("meta"):
        nat, dinat = timm.create_model("nat_mini"), timm.create_model("dinat_mini")
        deeper = timm.create_model("dinat_mini", depths=(2, 3, 1, 1))
    assert set(nat.attn_schedule.names) == {"neighborhood"} and set(dinat.attn_schedule.names) == {"neighborhood"}
    assert all(b.attn.kernel_size == 7 for s in dinat.stages for b in s.blocks)
    assert dilations(nat) == [[1] * 3, [1] * 4, [1] * 6, [1] * 5]
    assert dilations(dinat) == [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]
    assert dilations(deeper) == [[1, 8], [1, 4, 1], [1], [1]]


def test_dinat_large_dilations_follow_resolution_and_kernel():
    """The official dinat_large / _384 / _384_11x11: dilations 8-4-2-1, 13-6-3-1 and (11x11) 8-4-2-1."""
    with torch.device("meta"):
        models = {n: timm.create_model(n) for n in ("dinat_large", "dinat_large_384", "dinat_large_384_11x11")}
    for name, odd, kernel in [("dinat_large", (8, 4, 2, 1), 7), ("dinat_large_384", (13, 6, 3, 1), 7),
                              ("dinat_large_384_11x11", (8, 4, 2, 1), 11)]:
        model = models[name]
        assert [d[1] for d in dilations(model)] == list(odd)
        assert all(d[0] == 1 for d in dilations(model))
        assert {b.attn.kernel_size for s in model.stages for b in s.blocks} == {kernel}
        assert model.stages[0].blocks[0].attn.rpb.shape == (6, 2 * kernel - 1, 2 * kernel - 1)


def test_dinat_s_is_swin_layout_with_dilated_neighborhoods():
    """The official dinats.py: Swin's patch embedding and merging, dilations 8/4/2/1 on odd blocks (13/6/3/1 at 384)."""
    with torch.device("meta"):
        tiny, large = timm.create_model("dinat_s_tiny"), timm.create_model("dinat_s_large_384")
    assert dilations(tiny) == [[1, 8], [1, 4], [1, 2] * 3, [1, 1]]
    assert [d[1] for d in dilations(large)] == [13, 6, 3, 1]
    assert tiny.patch_embed.proj.kernel_size == (4, 4) and hasattr(tiny.stages[1].downsample, "reduction")
    assert tiny.stages[0].blocks[0].mlp.fc1.out_features == 4 * 96
