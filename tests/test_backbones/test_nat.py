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
