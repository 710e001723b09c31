"""raytrain.model: backbones, box encoding, fusion variants, decoders, the full network."""
import math

import pytest
import torch
from conftest import body_dir

from raytrain.geometry import PAPER_OFFSETS, PAPER_SCALES, cam_crop_to_full, multi_roi_boxes
from raytrain.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IterativeRegressor,
    build_model,
    create_backbone,
    create_fusion,
    encoding_dim,
    list_backbones,
    list_fusions,
    normalize_images,
    positional_encoding,
)
from raytrain.model.encoding import box_encoding

FUSIONS = ["none", "h_null", "abs_pe", "raf", "self_attention"]
TINY = "resnet10t"
S = 64  # crop size for the tests


def make_batch(N=2, M=5, seed=0):
    """Normalised images (N,M,3,S,S), paper-schedule boxes (N,M,3), image sizes, focals."""
    g = torch.Generator().manual_seed(seed)
    image_size = torch.tensor([[640.0, 480.0], [1920.0, 1080.0]])[:N]
    focal = image_size.norm(dim=-1)
    centres = image_size / 2 + torch.tensor([[-80.0, 40.0], [300.0, -120.0]])[:N]
    sides = torch.tensor([180.0, 400.0])[:N, None]
    boxes = multi_roi_boxes(torch.cat([centres, sides], dim=-1), PAPER_OFFSETS, PAPER_SCALES)[:, :M]
    images = torch.randn(N, M, 3, S, S, generator=g)
    return images, boxes, image_size, focal


# ----------------------------------------------------------------------------- encoding

def test_positional_encoding_hand_values():
    # L = 1: per variable (p, sin πp, cos πp, sin 2πp, cos 2πp)
    r = math.sqrt(0.5)
    p = torch.tensor([[0.0, 0.25, 0.5]])
    want = torch.tensor([[0, 0, 1, 0, 1,
                          0.25, r, r, 1, 0,
                          0.5, 1, 0, 0, -1]], dtype=torch.float32)
    got = positional_encoding(p, num_bands=1)
    assert got.shape == (1, 15) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_positional_encoding_shapes_and_top_band_float64():
    assert encoding_dim(32) == 3 * 67 == 201
    p = torch.zeros(2, 5, 3)
    assert positional_encoding(p).shape == (2, 5, 201)
    # p = 2^-31: band k = 30, 31, 32 has argument π/2, π, 2π; float64 gets them right.
    p = torch.tensor([2.0 ** -31])
    enc = positional_encoding(p, num_bands=32, dtype=torch.float64)
    sin_cos = enc[1:].view(33, 2)
    torch.testing.assert_close(sin_cos[30], torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(sin_cos[31], torch.tensor([0.0, -1.0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(sin_cos[32], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-9, rtol=0)
    assert enc[0].item() == 2.0 ** -31


def test_box_encoding_of_centred_reference_box_is_zero_point():
    # A box at the image centre with b = 0.24 f has bbox_info = (0, 0, 0): γ = (0, 0, 1, 0, 1, ...).
    image_size = torch.tensor([[640.0, 480.0]])
    focal = torch.tensor([800.0])
    boxes = torch.tensor([[[320.0, 240.0, 0.24 * 800.0]]])
    pe, info = box_encoding(boxes, image_size, focal, num_bands=4)
    torch.testing.assert_close(info, torch.zeros(1, 1, 3))
    one_var = torch.tensor([0.0] + [0.0, 1.0] * 5)
    torch.testing.assert_close(pe[0, 0], one_var.repeat(3))


def test_box_encoding_is_deterministic_per_box():
    _, boxes, image_size, focal = make_batch()
    boxes = torch.cat([boxes, boxes[:, :1]], dim=1)  # RoI 5 duplicates RoI 0
    pe, _ = box_encoding(boxes, image_size, focal)
    assert torch.equal(pe[:, 0], pe[:, 5])  # identical boxes -> γ_mn = 0 exactly
    bands = pe.view(2, 6, 3, 67)[..., 1:]  # per variable: p, then sin/cos pairs
    assert torch.isfinite(pe).all() and bands.abs().max() <= 1.0


# ----------------------------------------------------------------------------- fusion

@pytest.mark.parametrize("name", FUSIONS)
@pytest.mark.parametrize("hidden", [0, 16])
def test_fusion_weights_sum_to_one_and_permute(name, hidden):
    torch.manual_seed(0)
    N, M, d, P = 3, 5, 16, encoding_dim(4)
    fusion = create_fusion(name, d, P, hidden=hidden, heads=4).eval()
    h, pe = torch.randn(N, M, d), torch.randn(N, M, P)
    u, w = fusion(h, pe)
    assert u.shape == (N, M, d) and w.shape == (N, M, M)
    torch.testing.assert_close(w.sum(-1), torch.ones(N, M))
    assert (w >= 0).all()
    perm = torch.tensor([3, 0, 4, 1, 2])
    u_p, w_p = fusion(h[:, perm], pe[:, perm])
    torch.testing.assert_close(u_p, u[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_p, w[:, perm][:, :, perm], atol=1e-6, rtol=1e-5)


def test_raf_is_weighted_sum_of_features():
    torch.manual_seed(0)
    fusion = create_fusion("raf", 8, 5)
    h, pe = torch.randn(2, 4, 8), torch.randn(2, 4, 5)
    u, w = fusion(h, pe)
    m, n = 1, 2  # w_mn = softmax_n Linear(h_n ⊕ (γ_m - γ_n))
    logits = torch.stack([fusion.score(torch.cat([h[0, k], pe[0, m] - pe[0, k]])) for k in range(4)])
    torch.testing.assert_close(w[0, m], logits.squeeze(-1).softmax(0))
    torch.testing.assert_close(u[0, m], (w[0, m, :, None] * h[0]).sum(0))
    assert w[0, m, n] > 0


def test_raf_linear_score_weights_do_not_depend_on_m():
    # The γ_m part of Linear(h_n ⊕ (γ_m - γ_n)) is constant over n and cancels in the softmax.
    torch.manual_seed(0)
    h, pe = torch.randn(2, 5, 8), torch.randn(2, 5, 7)
    _, w_linear = create_fusion("raf", 8, 7, hidden=0)(h, pe)
    torch.testing.assert_close(w_linear, w_linear[:, :1].expand_as(w_linear))
    _, w_mlp = create_fusion("raf", 8, 7, hidden=16)(h, pe)
    assert (w_mlp - w_mlp[:, :1]).abs().max() > 1e-3


@pytest.mark.parametrize("name,hidden", [("raf", 0), ("raf", 6), ("abs_pe", 0), ("h_null", 0),
                                         ("self_attention", 0)])
def test_fusion_gradcheck_float64(name, hidden):
    torch.manual_seed(0)
    fusion = create_fusion(name, 4, 5, hidden=hidden, heads=2).double()
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    pe = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fusion(a, b)[0], (h, pe))
    assert torch.autograd.gradcheck(lambda a, b: fusion(a, b)[1], (h, pe))


# ----------------------------------------------------------------------------- decoders

def test_iterative_regressor_refines_from_init():
    reg = IterativeRegressor(8, 3, hidden=16, iters=3, dropout=0.5).eval()
    init = torch.tensor([0.9, 0.1, -0.2])
    torch.nn.init.zeros_(reg.head.weight)  # zero update -> the mean comes back
    torch.testing.assert_close(reg(torch.randn(4, 8), init), init.expand(4, 3))
    with pytest.raises(ValueError, match="iterations"):
        IterativeRegressor(8, 3, iters=0)


# ----------------------------------------------------------------------------- network

def test_normalize_images():
    x = torch.zeros(2, 5, 3, 4, 4, dtype=torch.uint8)
    x[:, :, 1] = 255
    y = normalize_images(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y[0, 0, 0, 0, 0], torch.tensor(-IMAGENET_MEAN[0] / IMAGENET_STD[0]))
    torch.testing.assert_close(y[1, 4, 1, 3, 3], torch.tensor((1 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]))


def _check_outputs(out, N, M, d, D=128):
    assert out["pose_6d"].shape == (N, 24, 6)
    assert out["pose_rotmat"].shape == (N, 24, 3, 3)
    assert out["betas"].shape == (N, 10)
    assert out["cam_crop"].shape == (N, M, 3) and out["cam_full"].shape == (N, M, 3)
    assert out["z"].shape == (N, M, D)
    assert out["h"].shape == (N, M, d) and out["u"].shape == (N, M, d)
    assert out["fusion_weights"].shape == (N, M, M)
    for value in out.values():
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_variant_builds_runs_and_trains(fusion):
    torch.manual_seed(0)
    model = build_model(backbone=TINY, fusion=fusion, decoder_hidden=64)
    images, boxes, image_size, focal = make_batch()
    out = model(images, boxes, image_size, focal)
    _check_outputs(out, 2, 5, 512)
    torch.testing.assert_close(out["fusion_weights"].sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(out["cam_full"], cam_crop_to_full(
        out["cam_crop"], boxes, image_size[:, None].expand(2, 5, 2), focal[:, None].expand(2, 5)))
    loss = out["pose_6d"].square().sum() + out["cam_full"].sum() + out["z"].square().sum() + out["betas"].sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("fusion_hidden", [0, 32])
def test_permuting_rois_permutes_outputs(fusion, fusion_hidden):
    torch.manual_seed(0)
    model = build_model(backbone=TINY, fusion=fusion, decoder_hidden=64, fusion_hidden=fusion_hidden).eval()
    images, boxes, image_size, focal = make_batch()
    perm = torch.tensor([2, 4, 0, 3, 1])
    with torch.no_grad():
        out = model(images, boxes, image_size, focal)
        out_p = model(images[:, perm], boxes[:, perm], image_size, focal)
    close = dict(atol=1e-4, rtol=1e-4)
    for key in ["cam_crop", "cam_full", "z", "h", "u"]:
        torch.testing.assert_close(out_p[key], out[key][:, perm], **close)
    torch.testing.assert_close(out_p["fusion_weights"], out["fusion_weights"][:, perm][:, :, perm], **close)
    for key in ["pose_6d", "pose_rotmat", "betas"]:
        torch.testing.assert_close(out_p[key], out[key], **close)


@pytest.mark.parametrize("M", [1, 2])
def test_fewer_rois(M):
    model = build_model(backbone=TINY, decoder_hidden=64).eval()
    images, boxes, image_size, focal = make_batch(M=M)
    with torch.no_grad():
        _check_outputs(model(images, boxes, image_size, focal), 2, M, 512)


def test_without_bbox_info_and_other_settings():
    model = build_model(backbone="mobilenetv3_small_050", bbox_info_to_decoders=False, pe_bands=8,
                        decoder_iters=1, proj_dim=32, dropout=0.0).eval()
    images, boxes, image_size, focal = make_batch()
    with torch.no_grad():
        _check_outputs(model(images, boxes, image_size, focal), 2, 5, 1024, D=32)
    assert model.mesh_decoder.net.mlp[0].in_features == 1024 + 154


def test_build_from_config_object():
    class Cfg:  # any object with ModelConfig's attribute names
        backbone, fusion, pe_bands, decoder_hidden, proj_dim = TINY, "abs_pe", 6, 32, 16
    model = build_model(Cfg(), dropout=0.1)
    assert model.cfg.fusion == "abs_pe" and model.cfg.pe_bands == 6 and model.cfg.dropout == 0.1
    assert model.proj.net[-1].out_features == 16
    with pytest.raises(TypeError, match="bogus"):
        build_model(Cfg(), bogus=1)


def test_build_from_model_config():
    from raytrain.config import ModelConfig
    model = build_model(ModelConfig(backbone=TINY, fusion="self_attention", decoder_hidden=32))
    assert model.cfg.backbone == TINY and model.cfg.fusion == "self_attention"
    assert model.cfg.pe_bands == 32 and model.cfg.proj_dim == 128


def test_autocast_bfloat16_keeps_cameras_in_float32():
    model = build_model(backbone=TINY, decoder_hidden=32)
    images, boxes, image_size, focal = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, boxes, image_size, focal)
    for key in ["pose_6d", "betas", "cam_crop", "cam_full", "z"]:
        assert out[key].dtype == torch.float32, key
    (out["cam_full"].sum() + out["z"].sum() + out["pose_6d"].sum()).backward()


def test_mean_params_are_the_start():
    mean = {"pose": torch.randn(144), "shape": torch.randn(10), "cam": torch.tensor([1.1, 0.2, -0.1])}
    model = build_model(backbone=TINY, decoder_hidden=32, mean_params=mean, cam_init="mean").eval()
    for dec in (model.mesh_decoder, model.cam_decoder):
        torch.nn.init.zeros_(dec.net.head.weight)
    images, boxes, image_size, focal = make_batch()
    with torch.no_grad():
        out = model(images, boxes, image_size, focal)
    torch.testing.assert_close(out["pose_6d"], mean["pose"].view(1, 24, 6).expand(2, 24, 6))
    torch.testing.assert_close(out["betas"], mean["shape"].expand(2, 10))
    torch.testing.assert_close(out["cam_crop"], mean["cam"].expand(2, 5, 3))


def test_consistent_camera_start_is_one_full_camera():
    """cam_init='consistent': every RoI starts at the crop camera of one full camera (the
    mean crop camera in the RoIs' mean box), so L_cam starts at 0 (the mean start not)."""
    from raytrain.losses import camera_consistency_loss

    mean = {"pose": torch.randn(144), "shape": torch.randn(10), "cam": torch.tensor([0.9, 0.1, -0.2])}
    images, boxes, image_size, focal = make_batch()
    starts = {}
    for init in ("mean", "consistent"):
        model = build_model(backbone=TINY, decoder_hidden=32, mean_params=mean, cam_init=init).eval()
        torch.nn.init.zeros_(model.cam_decoder.net.head.weight)
        with torch.no_grad():
            out = model(images, boxes, image_size, focal)
        starts[init] = out
    full = starts["consistent"]["cam_full"]
    torch.testing.assert_close(full, full[:, :1].expand_as(full))
    expected = cam_crop_to_full(mean["cam"].expand(2, 3), boxes.mean(dim=1), image_size, focal)
    torch.testing.assert_close(full[:, 0], expected)
    loss = {k: float(camera_consistency_loss(v["cam_crop"], boxes, image_size, focal)) for k, v in starts.items()}
    assert loss["consistent"] < 1e-6 < 1.0 < loss["mean"], loss


# ----------------------------------------------------------------------------- paper backbones

@pytest.mark.parametrize("name,dim", [("resnet50", 2048), ("hrnet_w48", 720), ("vit_tiny", 192),
                                      ("timm:resnet10t", 512)])
def test_paper_backbones_forward_backward(name, dim):
    torch.manual_seed(0)
    model = build_model(backbone=name)
    assert model.feature_dim == dim
    images, boxes, image_size, focal = make_batch(N=2, M=5)
    out = model(images, boxes, image_size, focal)
    _check_outputs(out, 2, 5, dim)
    (out["pose_6d"].square().sum() + out["cam_full"].sum() + out["z"].square().sum()).backward()
    # every parameter gets a gradient: DDP needs no find_unused_parameters
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused[:5]
    assert next(model.encoder.parameters()).grad.abs().sum() > 0


def test_hrnet_branch_widths():
    module, dim = create_backbone("hrnet_w48")
    assert module.net.feature_info.channels() == [48, 96, 192, 384] and dim == 720
    with torch.no_grad():
        assert module.eval()(torch.randn(1, 3, S, S)).shape == (1, 720)


# ----------------------------------------------------------------------------- errors, checkpoints

def test_unknown_names_are_clear():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet5'.*resnet50"):
        create_backbone("resnet5")
    with pytest.raises(ValueError, match=r"unknown fusion 'rafx'.*raf.*self_attention"):
        build_model(backbone=TINY, fusion="rafx")
    with pytest.raises(ValueError, match=r"unknown cam_init 'median'.*consistent, mean"):
        build_model(backbone=TINY, cam_init="median")
    assert {"resnet50", "hrnet_w48", "resnet18", TINY} <= set(list_backbones())
    assert set(FUSIONS) == set(list_fusions())


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="nope/weights.pth"):
        create_backbone(TINY, str(path))


def test_checkpoint_roundtrip_with_wrapper_prefix(tmp_path):
    torch.manual_seed(1)
    source, _ = create_backbone(TINY)
    state = {"state_dict": {"module.backbone." + k: v for k, v in source.net.state_dict().items()}}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded, _ = create_backbone(TINY, str(path))
    for (k, a), b in zip(source.net.state_dict().items(), loaded.net.state_dict().values()):
        assert torch.equal(a, b), k
    torch.save({"unrelated.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no tensor matching"):
        create_backbone(TINY, str(path))


# ----------------------------------------------------------------------------- body model

def test_with_body_model_outputs_mesh_and_stays_out_of_state_dict():
    from raytrain.body import load_body_model, load_mean_params
    # its own body model, not the shared fixture: model.double() below converts it
    body_model, mean = load_body_model(body_dir()), load_mean_params(body_dir())
    model = build_model(backbone=TINY, decoder_hidden=32, body_model=body_model, mean_params=mean)
    images, boxes, image_size, focal = make_batch()
    out = model(images, boxes, image_size, focal)
    assert out["vertices"].shape == (2, 6890, 3)
    assert out["joints"].shape == (2, 24, 3) and out["joints_h36m"].shape == (2, 17, 3)
    assert out["joints_smpl"].shape == (2, 24, 3)
    out["joints"].sum().backward()
    assert model.mesh_decoder.net.head.weight.grad.abs().sum() > 0
    assert all(k.split(".")[0] != "_body" and "body" not in k.split(".")[0] for k in model.state_dict())
    assert not any(p is q for p in model.parameters() for q in body_model.parameters())
    model.double()
    assert next(iter(body_model.buffers())).dtype == torch.float64
