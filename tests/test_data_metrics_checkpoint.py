"""The digits data, the metrics (Fréchet distance, classifier accuracy, grids, records) and the training state."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from distill.checkpoint import load_state, save_state
from distill.data import from_uint8, to_uint8
from distill.digits.data import NUM_CLASSES, augment, load_digits_split
from distill.errors import UserError
from distill.eval.metrics import append_record, digits_metric, frechet_distance, save_grid

# --- data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    return load_digits_split("train"), load_digits_split("heldout")


def test_digits_split_sizes_ranges_and_classes(splits):
    (x_tr, y_tr), (x_ho, y_ho) = splits
    assert x_tr.shape == (1437, 1, 16, 16) and y_tr.shape == (1437,)
    assert x_ho.shape == (360, 1, 16, 16) and y_ho.shape == (360,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.long
    for x in (x_tr, x_ho):
        assert x.min() >= -1 and x.max() <= 1
        assert x.min() == -1 and x.max() > 0.9  # the full range is used, background at -1
    for y in (y_tr, y_ho):
        counts = torch.bincount(y, minlength=NUM_CLASSES)
        assert len(counts) == NUM_CLASSES and (counts > 0).all()
    # stratified: each class is ~20% held out
    frac = torch.bincount(y_ho, minlength=NUM_CLASSES) / torch.bincount(torch.cat([y_tr, y_ho]))
    assert ((frac - 0.2).abs() < 0.02).all()


def test_digits_split_is_disjoint(splits):
    (x_tr, _), (x_ho, _) = splits
    dist = torch.cdist(x_ho.flatten(1), x_tr.flatten(1))  # (360, 1437)
    assert dist.min() > 0.1  # no held-out image also occurs in training
    assert len(torch.unique(torch.cat([x_tr, x_ho]).flatten(1), dim=0)) == 1797


def test_digits_split_is_deterministic(splits):
    (x_tr, y_tr), (x_ho, y_ho) = splits
    x2, y2 = load_digits_split("train")
    assert torch.equal(x2, x_tr) and torch.equal(y2, y_tr)
    x3, y3 = load_digits_split("heldout")
    assert torch.equal(x3, x_ho) and torch.equal(y3, y_ho)
    with pytest.raises(ValueError, match="split must be"):
        load_digits_split("test")


def test_augment_without_shift_is_identity(splits):
    (x, _), _ = splits
    assert torch.equal(augment(x[:32], torch.Generator().manual_seed(0), max_shift=0), x[:32])


def test_augment_shifts_by_at_most_one_pixel(splits):
    (x, _), _ = splits
    x = x[:64]
    out = augment(x, torch.Generator().manual_seed(0), max_shift=1)
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0), max_shift=1))  # seeded
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    shifts = {(dy, dx): padded[:, :, 1 + dy: 17 + dy, 1 + dx: 17 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    found = []
    for i in range(len(x)):
        matches = [s for s, shifted in shifts.items() if torch.equal(out[i], shifted[i])]
        assert matches, f"image {i} is not a background-filled shift of its input"
        found.append(matches)
    assert sum((0, 0) not in m for m in found) > 20  # most images did move (8 of 9 shifts are moves)


def test_uint8_round_trip(splits):
    (x, _), _ = splits
    u = to_uint8(x[:50])
    assert u.dtype == torch.uint8 and u.shape == (50, 16, 16, 1)
    back = from_uint8(u)
    assert back.dtype == torch.float32 and back.shape == x[:50].shape
    assert (back - x[:50]).abs().max() <= 1 / 127.5
    ends = to_uint8(torch.tensor([-1.0, 1.0, -3.0, 3.0]).reshape(1, 1, 1, 4))
    assert ends.flatten().tolist() == [0, 255, 0, 255]  # clamped outside [-1, 1]


# --- Fréchet distance ---------------------------------------------------------------------------


def random_gaussian(rng, d):
    a = rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = random_gaussian(rng, 8)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert expected > 1  # not trivially zero


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(2)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, 5), random_gaussian(rng, 5)
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 > 1 and d12 == pytest.approx(d21, rel=1e-8)


# --- the digits metric (the committed classifier) -----------------------------------------------


@pytest.fixture(scope="module")
def metric():
    return digits_metric()


@pytest.fixture(scope="module")
def heldout_result(metric, splits):
    _, (x, y) = splits
    return metric(to_uint8(x), y)


def test_heldout_split_scores_well(heldout_result):
    assert heldout_result["accuracy"] >= 0.97
    assert 0 <= heldout_result["fd"] < 0.5


def test_noise_scores_badly(metric, heldout_result):
    noise = torch.randint(0, 256, (360, 16, 16, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = metric(noise)
    assert set(result) == {"fd"}  # no labels, no accuracy
    assert result["fd"] > 10 * heldout_result["fd"] and result["fd"] > 1


def test_wrong_labels_give_low_accuracy(metric, splits, heldout_result):
    _, (x, y) = splits
    result = metric(to_uint8(x), (y + 1) % NUM_CLASSES)
    assert result["accuracy"] < 0.2
    assert result["fd"] == pytest.approx(heldout_result["fd"])  # FD ignores labels


# --- grids and records --------------------------------------------------------------------------


@pytest.mark.parametrize("n, nrow, scale, pad, channels", [(13, 5, 3, 2, 1), (4, 10, 1, 0, 3)])
def test_save_grid_size_and_placement(tmp_path, n, nrow, scale, pad, channels):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 16, 12, channels), dtype=torch.uint8, generator=g).numpy()
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=nrow, scale=scale, pad=pad)
    assert path.exists()
    rows = -(-n // nrow)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == ("L" if channels == 1 else "RGB")
        assert im.size == ((nrow * (12 + pad) + pad) * scale, (rows * (16 + pad) + pad) * scale)  # (W, H)
        grid = np.asarray(im).reshape(im.size[1], im.size[0], channels)
    # image k sits at row k // nrow, column k % nrow, each pixel a scale x scale block
    k = n - 1
    top, left = (pad + (k // nrow) * (16 + pad)) * scale, (pad + (k % nrow) * (12 + pad)) * scale
    cell = grid[top: top + 16 * scale, left: left + 12 * scale]
    assert np.array_equal(cell, images[k].repeat(scale, 0).repeat(scale, 1))
    if pad:
        assert (grid[:pad * scale] == 255).all()  # padding is white


def test_append_record(tmp_path):
    out = tmp_path / "run"
    first = append_record(out, {"step": 1, "fd": 2.5})
    append_record(out, {"step": 2, "fd": 1.25, "note": "ema"})
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == first and {"step": 1, "fd": 2.5}.items() <= first.items() and "time" in first
    records = json.loads((out / "metrics.json").read_text())
    assert [(r["step"], r["fd"]) for r in records] == [(1, 2.5), (2, 1.25)]
    assert records[1]["note"] == "ema" and records == [json.loads(line) for line in lines]
    assert not list(out.glob("*.tmp"))


# --- training state -----------------------------------------------------------------------------


def train_two_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    for _ in range(2):
        step(model, opt)
    return model, opt


def step(model, opt):
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    loss = (model(x) - 0.5).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_state_round_trip_resumes_exactly(tmp_path):
    model, opt = train_two_steps()
    gen = torch.Generator().manual_seed(123)
    torch.randn(5, generator=gen)  # advance it away from the seed
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2,
             "extra": {"pair": (3, "b"), "nothing": None, "lr": 1e-2, "name": "run-a", "flag": True,
                       "nested": [1.5, {"t": torch.arange(3)}]},
             "rng": gen.get_state()}
    path = tmp_path / "ckpt" / "state.safetensors"
    save_state(path, state)
    save_state(path, state)  # overwriting goes through the temporary file too
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    loaded = load_state(path)

    assert loaded["step"] == 2 and isinstance(loaded["step"], int)
    assert loaded["extra"]["pair"] == (3, "b") and isinstance(loaded["extra"]["pair"], tuple)
    assert loaded["extra"]["nothing"] is None and loaded["extra"]["lr"] == 1e-2
    assert loaded["extra"]["name"] == "run-a" and loaded["extra"]["flag"] is True
    assert loaded["extra"]["nested"][0] == 1.5 and torch.equal(loaded["extra"]["nested"][1]["t"], torch.arange(3))
    assert loaded["model"].keys() == state["model"].keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    opt_state = loaded["optimizer"]
    assert list(opt_state["state"]) == [0, 1, 2, 3]  # int parameter ids survive
    assert opt_state["param_groups"] == state["optimizer"]["param_groups"]

    # a fresh model + optimizer resumed from the file takes the same next step as the original
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    opt2.load_state_dict(opt_state)
    step(model, opt)
    step(model2, opt2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.8, 0.95)

    gen2 = torch.Generator()
    gen2.set_state(loaded["rng"])
    assert torch.equal(torch.randn(4, generator=gen2), torch.randn(4, generator=gen))


def test_state_keeps_key_types_apart(tmp_path):
    state = {"a": {0: torch.zeros(1), "0": torch.ones(1)}, "b": torch.full((2,), 7.0)}
    save_state(tmp_path / "s.safetensors", state)
    loaded = load_state(tmp_path / "s.safetensors")
    assert torch.equal(loaded["a"][0], torch.zeros(1)) and torch.equal(loaded["a"]["0"], torch.ones(1))


def test_state_refuses_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="cannot store object at '/x'"):
        save_state(tmp_path / "s.safetensors", {"x": object()})


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "missing"])
def test_damaged_state_is_unreadable(tmp_path, damage):
    path = tmp_path / "state.safetensors"
    save_state(path, {"w": torch.randn(64, 64), "step": 3})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        path.write_bytes(b"\xff" * 16 + data[16:])
    else:
        path.unlink()
    with pytest.raises(UserError, match="unreadable or not a fewstep state"):
        load_state(path)


def test_plain_safetensors_is_not_a_state(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="unreadable or not a fewstep state"):
        load_state(path)
    save_file({"w": torch.zeros(2)}, path, metadata={"fewstep_state": "{not json"})
    with pytest.raises(UserError, match="not a fewstep state"):
        load_state(path)
