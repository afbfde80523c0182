"""Official CAC checkpoints (mmseg 0.x layout) convert, load strictly, and predict the official p_p."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cac.cli import main
from cac.exp.runner import make_unit
from cac.exp.spec import load_spec
from cac.mmseg.params import build_model
from cac.synthetic import seg_batch

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "experiments" / "table1_ade20k.yaml"
N = 150


def _conv_module(prefix: str, cout: int, cin: int, k: int) -> dict:
    """mmcv ConvModule (conv without bias + BN), as the official heads build them."""
    return {f"{prefix}.conv.weight": (cout, cin, k, k), f"{prefix}.bn.weight": (cout,), f"{prefix}.bn.bias": (cout,),
            f"{prefix}.bn.running_mean": (cout,), f"{prefix}.bn.running_var": (cout,),
            f"{prefix}.bn.num_batches_tracked": ()}


def _cac_tail(ch: int) -> dict:
    """conv_seg and the two projectors of every official *_cac head (first Linear without bias)."""
    out = {"conv_seg.weight": (N, ch, 1, 1), "conv_seg.bias": (N,)}
    for name in ("proj", "apd_proj"):
        out.update({f"{name}.0.weight": (ch // 2, 2 * ch), f"{name}.2.weight": (ch, ch // 2), f"{name}.2.bias": (ch,)})
    return out


def official_fcn_head(in_ch: int = 320, ch: int = 512) -> dict:
    """FCNHeadCAC of the official FCN-MV2 config: two 3x3 convs, concat_input, conv_seg, projectors."""
    return {**_conv_module("convs.0", ch, in_ch, 3), **_conv_module("convs.1", ch, ch, 3),
            **_conv_module("conv_cat", ch, in_ch + ch, 3), **_cac_tail(ch)}


def official_uper_head(in_chs=(96, 192, 384, 768), ch: int = 512, scales=(1, 2, 3, 6)) -> dict:
    """UPerHeadCAC of the official UperNet-Swin-T config: PPM, bottleneck, FPN, conv_seg, projectors."""
    keys: dict = {}
    for i in range(len(scales)):
        keys.update(_conv_module(f"psp_modules.{i}.1", ch, in_chs[-1], 1))
    keys.update(_conv_module("bottleneck", ch, in_chs[-1] + len(scales) * ch, 3))
    for i, c in enumerate(in_chs[:-1]):
        keys.update(_conv_module(f"lateral_convs.{i}", ch, c, 1))
        keys.update(_conv_module(f"fpn_convs.{i}", ch, ch, 3))
    keys.update(_conv_module("fpn_bottleneck", ch, len(in_chs) * ch, 3))
    return {**keys, **_cac_tail(ch)}


def _official_checkpoint(row: str, head: dict, path: Path) -> dict:
    """An official-layout checkpoint: the CAC head's official keys under ``decode_head.``, the other
    modules (backbone, auxiliary head) as mmseg names them, random values of the right shapes."""
    unit = make_unit(load_spec(TABLE1), load_spec(TABLE1).row(row), 0, "paper")
    others = {k: v.shape for k, v in build_model(unit.cfg["model"]).state_dict().items()
              if not k.startswith("decode_head.")}
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in {**others, **{f"decode_head.{k}": s for k, s in head.items()}}.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    torch.save({"state_dict": state, "meta": {"CLASSES": tuple(f"c{i}" for i in range(N)), "PALETTE": [[0, 0, 0]] * N}},
               path)
    return state


def _official_p_p(f: torch.Tensor, state: dict) -> torch.Tensor:
    """The official post_refine_proto_v2 from the official tensors: 15 cos(f, proj(softpool ⊕ C))."""
    b, c, h, w = f.shape
    weight, bias = state["decode_head.conv_seg.weight"].flatten(1), state["decode_head.conv_seg.bias"]
    pred = F.softmax(F.conv2d(f, weight[:, :, None, None], bias).reshape(b, N, h * w), 1)
    protos = (pred @ f.reshape(b, c, h * w).permute(0, 2, 1)) / (pred.sum(-1).unsqueeze(-1) + 1e-12)
    x = torch.cat([protos, weight.unsqueeze(0).repeat(b, 1, 1)], -1)
    x = F.linear(F.relu(F.linear(x, state["decode_head.proj.0.weight"])), state["decode_head.proj.2.weight"],
                 state["decode_head.proj.2.bias"])
    fn = f / (f.norm(2, 1, True) + 1e-12)
    an = x / (x.norm(2, -1, True) + 1e-12)
    return (an @ fn.reshape(b, c, h * w)).reshape(b, N, h, w) * 15


@pytest.mark.parametrize("row,head", [("fcn-mv2+cac", official_fcn_head), ("upernet-swin-t+cac", official_uper_head)])
def test_official_checkpoint_converts_loads_strictly_and_predicts_official_p_p(tmp_path, row, head):
    state = _official_checkpoint(row, head(), tmp_path / "official.pth")
    out = tmp_path / "converted.pth"
    assert main(["import-official", str(tmp_path / "official.pth"), "--spec", str(TABLE1), "--row", row,
                 "--out", str(out)]) == 0
    converted = torch.load(out, weights_only=True)
    assert converted["meta"]["cac_options"] == {"profile": "official"}
    unit = make_unit(load_spec(TABLE1), load_spec(TABLE1).row(row), 0, "paper", cac_extra={"profile": "official"})
    model = build_model(unit.cfg["model"]).eval()
    model.load_state_dict(converted["state_dict"], strict=True)
    cac_head = model.decode_head
    assert torch.equal(cac_head.classifier.proj_y[0].weight, state["decode_head.apd_proj.0.weight"])
    data = model.data_preprocessor(seg_batch(64, 1), False)
    with torch.no_grad():
        f = cac_head.features(model.extract_feat(data["inputs"]))
        torch.testing.assert_close(cac_head.forward(model.extract_feat(data["inputs"])), _official_p_p(f, state),
                                   rtol=1e-4, atol=1e-4)


def test_a_mismatched_official_checkpoint_is_named_in_one_line(tmp_path, capsys):
    head = official_fcn_head()
    head["extra_block.weight"] = (3,)          # a module our FCN head does not have
    head["conv_seg.weight"] = (N + 1, 512, 1, 1)  # another class count
    del head["apd_proj.2.bias"]
    _official_checkpoint("fcn-mv2+cac", head, tmp_path / "official.pth")
    code = main(["import-official", str(tmp_path / "official.pth"), "--spec", str(TABLE1), "--row", "fcn-mv2+cac",
                 "--out", str(tmp_path / "converted.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "extra_block" in err[0] and "proj_y.2.bias" in err[0] and "reshaped" in err[0]
    assert not (tmp_path / "converted.pth").exists()
