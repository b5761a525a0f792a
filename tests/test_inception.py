"""FID Inception-v3: architecture layout of the pytorch-fid weights, strict loading, feature extraction.

A randomly initialized network stands in for the real weights (nothing is downloaded); BatchNorm statistics are
randomized too so that loading them is actually checked.
"""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distill.errors import UserError
from distill.eval.inception import FIDInceptionV3, inception_features, load_fid_inception

# Learnable parameters of pt_inception-2015-12-05 (no AuxLogits, 1008-way fc): torchvision's inception_v3
# (27,161,264 with aux head and 1000 classes) - aux head (3,326,696) + 8 extra classes (16,392).
# Adding the BatchNorm running_mean/running_var buffers (2 x 17,216 channels) gives 23,885,392.
EXPECTED_PARAMS = 23_850_960
EXPECTED_PARAMS_AND_BN_STATS = 23_885_392


@pytest.fixture(scope="module")
def model():
    gen = torch.Generator().manual_seed(0)
    net = FIDInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):  # variance-preserving so the deep random net keeps non-trivial features
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.05 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
    return net.eval()


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=gen)


@pytest.fixture(scope="module")
def features(model, images):
    return inception_features(model, images, batch_size=1)


def test_layout_matches_pytorch_fid_weights(model):
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS
    state = model.state_dict()
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")) \
        == EXPECTED_PARAMS_AND_BN_STATS
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_mean": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch_pool.bn.running_var": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)


def test_features_shape_and_dtype(model, images, features):
    assert features.shape == (images.shape[0], 2048)
    assert features.dtype == torch.float64
    assert torch.isfinite(features).all()
    assert features.std() > 0
    assert not torch.allclose(features[0], features[1])  # different images -> different features


def test_forward_float_and_grayscale(model, images, features):
    with torch.no_grad():
        direct = model(images[:1].permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(direct.double(), features[:1])
    gray = images[:1, :, :, :1]
    with torch.no_grad():
        repeated = model(gray.permute(0, 3, 1, 2).float().repeat(1, 3, 1, 1) / 255)
    torch.testing.assert_close(inception_features(model, gray).float(), repeated)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_roundtrip(model, images, features, tmp_path, suffix):
    path = tmp_path / f"inception{suffix}"
    state = model.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    loaded = load_fid_inception(path)
    assert not loaded.training
    torch.testing.assert_close(inception_features(loaded, images, batch_size=2), features, rtol=0, atol=0)


def test_load_rejects_missing_key(model, tmp_path):
    state = dict(model.state_dict())
    del state["Mixed_6c.branch7x7dbl_3.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError, match=r"Mixed_6c\.branch7x7dbl_3\.conv\.weight") as info:
        load_fid_inception(path)
    assert "extra.weight" in str(info.value)


def test_load_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="local file.*nothing is downloaded"):
        load_fid_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


def test_bad_image_input(model):
    with pytest.raises(UserError):
        inception_features(model, torch.zeros(1, 8, 8, 3))  # float, not uint8
    with pytest.raises(UserError):
        inception_features(model, torch.zeros(1, 3, 8, 8, dtype=torch.uint8))  # NCHW, not NHWC
