"""The pixel (UNet2DModel) and factory (fewstep_factory.json) adapters against their closed forms."""

import importlib.util
import json
import shutil
import textwrap

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from distill.errors import UserError
from distill.teachers import load_teacher
from distill.teachers.factory import FactoryTeacher
from distill.teachers.pixel import PixelTeacher

from .conftest import make_tiny_pixel_dir, scheduler_config

TOL = dict(rtol=1e-5, atol=1e-5)
# at sigma ~ 157, |x| ~ 600: one float32 ulp of x_vp inside the UNet shows up as ~6e-5 in x0
PIXEL_TOL = dict(rtol=1e-4, atol=1e-4)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
STEPS = torch.tensor([0, 10, 400, 990])  # integer timesteps: their sigmas map back exactly


def discrete_sigmas(t: torch.Tensor) -> torch.Tensor:
    """The schedule's own sigma_t = sqrt((1 - a_t) / a_t) at integer t (float64, like the adapter)."""
    a = DDPMScheduler(**scheduler_config()).alphas_cumprod.double()[t]
    return ((1 - a) / a).sqrt()


def noisy(sigma: torch.Tensor, seed: int = 0, shape=(1, 8, 8)) -> torch.Tensor:
    """x = x0 + sigma * eps with x0 in [-1, 1], float32, one sample per sigma."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(len(sigma), *shape, generator=g) * 2 - 1
    eps = torch.randn(len(sigma), *shape, generator=g)
    return x0 + sigma.float().reshape(-1, 1, 1, 1) * eps


def vp_closed_form(out, x, sigma, prediction_type):
    """x0 from a VP model output `out` at x_vp = x / sqrt(1 + sigma^2), written out by hand."""
    s = sigma.float().reshape(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return x - s * out
    if prediction_type == "v_prediction":  # x0 = alpha x_vp - sigma_vp v, alpha^2 = 1 / (1 + s^2)
        return x / (1 + s**2) - s / (1 + s**2).sqrt() * out
    return out


# --- pixel teachers (diffusers DDPMPipeline layout) ------------------------------------------------


@pytest.fixture(scope="module", params=PREDICTION_TYPES)
def pixel_dir(request, tmp_path_factory):
    """(folder, prediction_type) of a tiny class-conditional pixel teacher."""
    folder = make_tiny_pixel_dir(tmp_path_factory.mktemp(request.param), num_classes=3, prediction_type=request.param)
    return folder, request.param


def test_pixel_teacher_metadata(tiny_pixel_dir):
    teacher = load_teacher(tiny_pixel_dir)
    assert isinstance(teacher, PixelTeacher) and teacher.family == "pixel"
    assert teacher.x_shape == (1, 8, 8)
    assert teacher.conditioning == "class"
    assert teacher.num_classes == 3 and teacher.null_class == 3
    assert teacher.guidance_scale == 2.0
    assert teacher.source == str(tiny_pixel_dir)
    assert teacher.denoiser.sigma_min == pytest.approx(float(discrete_sigmas(torch.tensor(0))))
    assert teacher.denoiser.sigma_max == pytest.approx(float(discrete_sigmas(torch.tensor(999))))


@pytest.mark.parametrize("with_cond", [True, False], ids=["cond", "uncond"])
def test_pixel_denoiser_is_the_closed_form(pixel_dir, with_cond):
    folder, prediction_type = pixel_dir
    teacher = load_teacher(folder)
    assert teacher.denoiser.prediction_type == prediction_type
    raw = UNet2DModel.from_pretrained(folder / "unet").eval()  # loaded by diffusers, not by fewstep
    sigma = discrete_sigmas(STEPS)
    assert torch.equal(teacher.denoiser.schedule.sigma_to_t(sigma), STEPS.double())
    x = noisy(sigma)
    labels = torch.tensor([0, 1, 2, 1])
    cond = teacher.cond(labels=labels) if with_cond else teacher.uncond(len(labels))
    with torch.no_grad():
        x0 = teacher.denoiser(x, sigma, cond)
        x_vp = x / (1 + sigma.float().reshape(-1, 1, 1, 1) ** 2).sqrt()
        out = raw(x_vp, STEPS, class_labels=labels if with_cond else torch.full((4,), 3)).sample
    torch.testing.assert_close(x0, vp_closed_form(out, x, sigma, prediction_type), **PIXEL_TOL)
    if prediction_type != "sample":  # sanity: the output is not dominated by x alone
        assert (x0 - x).abs().max() > 1e-2


def test_pixel_cond_and_uncond(tiny_pixel_dir):
    teacher = load_teacher(tiny_pixel_dir)
    c = teacher.cond(labels=[0, 1, 2])
    assert set(c) == {"class_labels"}
    assert c["class_labels"].dtype == torch.long and c["class_labels"].tolist() == [0, 1, 2]
    u = teacher.uncond(4)
    assert set(u) == {"class_labels"} and u["class_labels"].tolist() == [3, 3, 3, 3]
    # the null class is a different condition: D changes with it
    sigma = discrete_sigmas(torch.tensor([400, 400, 400]))
    x = noisy(sigma)
    with torch.no_grad():
        assert (teacher.denoiser(x, sigma, c) - teacher.denoiser(x, sigma, teacher.uncond(3))).abs().max() > 1e-4


@pytest.mark.parametrize("labels", [[0, 3], [-1], [5, 1]])
def test_pixel_labels_out_of_range(tiny_pixel_dir, labels):
    teacher = load_teacher(tiny_pixel_dir)
    bad = next(v for v in labels if not 0 <= v < 3)
    with pytest.raises(UserError, match=rf"class label {bad} is out of range.*0\.\.2"):
        teacher.cond(labels=labels)


def test_pixel_rejects_prompts_and_missing_labels(tiny_pixel_dir):
    teacher = load_teacher(tiny_pixel_dir)
    with pytest.raises(UserError, match="takes no prompts"):
        teacher.cond(prompts=["a cat"])
    with pytest.raises(UserError, match="give class labels"):
        teacher.cond()


def test_error_path_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        load_teacher(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)


def test_error_empty_folder(tmp_path):
    with pytest.raises(UserError, match="holds no loadable teacher"):
        load_teacher(tmp_path)


def test_error_missing_scheduler(tiny_pixel_dir):
    shutil.rmtree(tiny_pixel_dir / "scheduler")
    with pytest.raises(UserError, match=r"no scheduler/scheduler_config\.json"):
        load_teacher(tiny_pixel_dir)


def test_error_unet_weights_with_a_renamed_key(tiny_pixel_dir):
    file = tiny_pixel_dir / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    key = "conv_in.weight"
    state["conv_in.renamed"] = state.pop(key)
    save_file(state, file)
    with pytest.raises(UserError) as e:
        load_teacher(tiny_pixel_dir)
    msg = str(e.value)
    assert "weights do not fit UNet2DModel" in msg
    assert f"missing 1 keys: {key}" in msg and "unexpected 1 keys: conv_in.renamed" in msg


def test_error_file_that_is_not_json(tiny_pixel_dir):
    file = tiny_pixel_dir / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(UserError, match="is a file; give the teacher's folder"):
        load_teacher(file)
    broken = tiny_pixel_dir / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="cannot read .*broken.json"):
        load_teacher(broken)


def test_error_unsupported_unet_class(tiny_pixel_dir):
    config_file = tiny_pixel_dir / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": "UNet3DConditionModel"}))
    with pytest.raises(UserError, match="describes a UNet3DConditionModel"):
        load_teacher(tiny_pixel_dir)


# --- factory teachers (any nn.Module, declared in fewstep_factory.json) ---------------------------

NETS_PY = textwrap.dedent('''
    """A home-grown tiny network: conv layers, a sinusoidal time embedding and a class embedding."""
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, channels, num_classes, one_hot):
            super().__init__()
            self.num_classes, self.one_hot = num_classes, one_hot
            self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
            self.time = nn.Linear(6, channels)
            self.label = nn.Linear(num_classes, channels) if one_hot else nn.Embedding(num_classes + 1, channels)
            self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)
            self.seen_labels = None  # a plain attribute: not part of the state dict

        def forward(self, x, t, class_labels=None):
            self.seen_labels = class_labels
            freqs = torch.tensor([1.0, 0.1, 0.01], device=t.device)
            emb = self.time(torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1))
            if class_labels is not None:
                if self.one_hot:
                    assert class_labels.dtype == torch.float32, class_labels.dtype
                    assert class_labels.shape == (x.shape[0], self.num_classes), class_labels.shape
                else:
                    assert class_labels.dtype == torch.long, class_labels.dtype
                emb = emb + self.label(class_labels)
            h = torch.nn.functional.silu(self.conv_in(x) + emb[:, :, None, None])
            return self.conv_out(h)


    def build(channels=8, num_classes=3, one_hot=False):
        return TinyNet(channels, num_classes, one_hot)
''')

DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", **scheduler_config()}
EDM_SCHEDULER = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80, "sigma_data": 0.5}


def import_nets(folder):
    """The test's own copy of nets.py (not registered in sys.modules, so independent of the adapter's)."""
    spec = importlib.util.spec_from_file_location("fewstep_test_nets", folder / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_factory_dir(folder, one_hot=False, channels=6, **spec_overrides):
    """A folder with nets.py, its weights (safetensors and .pt) and fewstep_factory.json; -> (folder, raw net)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nets.py").write_text(NETS_PY)
    torch.manual_seed(1)
    net = import_nets(folder).build(channels=channels, one_hot=one_hot).eval()
    save_file(net.state_dict(), folder / "net.safetensors")
    torch.save(net.state_dict(), folder / "net.pt")
    spec = {"factory": "nets.py:build", "kwargs": {"channels": channels, "one_hot": one_hot},
            "weights": "net.safetensors", "prediction_type": "epsilon",
            "scheduler": EDM_SCHEDULER if one_hot else DDPM_SCHEDULER,
            "x_shape": [1, 8, 8], "num_classes": 3, "null_class": 3, "guidance_scale": 1.5,
            **({"class_format": "one_hot"} if one_hot else {}), **spec_overrides}
    (folder / "fewstep_factory.json").write_text(json.dumps(spec))
    return folder, net


@pytest.fixture
def factory_dir(tmp_path):
    return make_factory_dir(tmp_path / "factory")


def test_factory_loads_from_folder_and_json(factory_dir):
    folder, _ = factory_dir
    for path in (folder, folder / "fewstep_factory.json"):
        teacher = load_teacher(path)
        assert isinstance(teacher, FactoryTeacher) and teacher.family == "factory"
        assert teacher.x_shape == (1, 8, 8) and teacher.conditioning == "class"
        assert teacher.num_classes == 3 and teacher.null_class == 3 and teacher.guidance_scale == 1.5
        assert teacher.denoiser.net.net.conv_in.out_channels == 6  # kwargs reached the factory
        assert teacher.source == str(folder / "fewstep_factory.json")


def test_factory_vp_denoiser_is_the_closed_form(factory_dir):
    folder, raw = factory_dir
    teacher = load_teacher(folder)
    sigma = discrete_sigmas(STEPS)
    x = noisy(sigma, seed=3)
    labels = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        x0 = teacher.denoiser(x, sigma, teacher.cond(labels=labels))
        x_vp = x / (1 + sigma.float().reshape(-1, 1, 1, 1) ** 2).sqrt()
        expected = x - sigma.float().reshape(-1, 1, 1, 1) * raw(x_vp, STEPS.float(), class_labels=labels)
        torch.testing.assert_close(x0, expected, **TOL)
        assert torch.equal(teacher.denoiser.net.net.seen_labels, labels)  # index format: labels as given
        x0_u = teacher.denoiser(x, sigma, teacher.uncond(4))
        assert teacher.denoiser.net.net.seen_labels.tolist() == [3, 3, 3, 3]
        assert (x0_u - x0).abs().max() > 1e-4


def test_factory_pt_weights_give_identical_output(factory_dir):
    folder, _ = factory_dir
    spec = json.loads((folder / "fewstep_factory.json").read_text())
    (folder / "pt_spec.json").write_text(json.dumps({**spec, "weights": "net.pt"}))
    a, b = load_teacher(folder), load_teacher(folder / "pt_spec.json")
    sigma = discrete_sigmas(STEPS)
    x = noisy(sigma, seed=4)
    cond = a.cond(labels=[0, 1, 2, 0])
    with torch.no_grad():
        assert torch.equal(a.denoiser(x, sigma, cond), b.denoiser(x, sigma, cond))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_factory_edm_one_hot_matches_diffusers(tmp_path, prediction_type):
    folder, raw = make_factory_dir(tmp_path / "edm", one_hot=True, prediction_type=prediction_type)
    teacher = load_teacher(folder)
    assert teacher.denoiser.sigma_min == 0.002 and teacher.denoiser.sigma_max == 80.0
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type=prediction_type)
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0], dtype=torch.float64)
    x = noisy(sigma, seed=5).double()
    s4 = sigma.reshape(-1, 1, 1, 1)
    net = teacher.denoiser.net.net
    for labels, one_hot in [(teacher.cond(labels=[0, 1, 2, 1]), torch.eye(3)[[0, 1, 2, 1]]),
                            (teacher.uncond(4), torch.zeros(4, 3))]:  # the null class: an all-zero row
        with torch.no_grad():
            x0 = teacher.denoiser(x.float(), sigma, labels)
            assert torch.equal(net.seen_labels, one_hot)
            out = raw(ref.precondition_inputs(x, s4).float(), ref.precondition_noise(sigma).float(),
                      class_labels=one_hot).double()
        torch.testing.assert_close(x0.double(), ref.precondition_outputs(x, out, s4), rtol=1e-5, atol=1e-4)


def write_spec(folder, **changes):
    spec_file = folder / "fewstep_factory.json"
    spec = {**json.loads(spec_file.read_text()), **changes}
    spec_file.write_text(json.dumps({k: v for k, v in spec.items() if v is not None}))


def test_factory_error_without_colon(factory_dir):
    folder, _ = factory_dir
    write_spec(folder, factory="nets.py")
    with pytest.raises(UserError, match="'nets.py' must look like 'module:function'"):
        load_teacher(folder)


@pytest.mark.parametrize("ref", ["absent.py:build", "fewstep_no_such_module:build"])
def test_factory_error_missing_module(factory_dir, ref):
    folder, _ = factory_dir
    write_spec(folder, factory=ref)
    with pytest.raises(UserError, match=r"absent\.py does not exist|cannot import .*fewstep_no_such_module"):
        load_teacher(folder)


def test_factory_error_missing_function(factory_dir):
    folder, _ = factory_dir
    write_spec(folder, factory="nets.py:make_net")
    with pytest.raises(UserError, match="nets.py has no function 'make_net'"):
        load_teacher(folder)


def test_factory_error_missing_spec_keys(factory_dir):
    folder, _ = factory_dir
    write_spec(folder, weights=None, x_shape=None)
    with pytest.raises(UserError, match="lacks weights, x_shape"):
        load_teacher(folder)


def test_factory_error_bad_kwargs(factory_dir):
    folder, _ = factory_dir
    write_spec(folder, kwargs={"width": 4})
    with pytest.raises(UserError, match="failed with the given kwargs.*width"):
        load_teacher(folder)


def test_factory_error_weights_with_wrong_keys(factory_dir):
    folder, net = factory_dir
    state = net.state_dict()
    state["conv_out.kernel"] = state.pop("conv_out.weight")
    save_file(state, folder / "net.safetensors")
    with pytest.raises(UserError) as e:
        load_teacher(folder)
    msg = str(e.value)
    assert "the network from nets.py:build" in msg
    assert "missing 1 keys: conv_out.weight" in msg and "unexpected 1 keys: conv_out.kernel" in msg


def test_factory_error_weights_file_missing(factory_dir):
    folder, _ = factory_dir
    write_spec(folder, weights="gone.safetensors")
    with pytest.raises(UserError, match="gone.safetensors does not exist"):
        load_teacher(folder)
