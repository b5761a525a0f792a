"""Golden vectors (python -m runtime.golden) reproduce with the runtime and catch a changed value; the per-step
scalars export writes for hosts (schedule.steps) agree with the loop the runtime computes itself."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from distill.dmd2 import DMD2Config, train_dmd2  # noqa: E402
from distill.sfd import SFDConfig, train_sfd  # noqa: E402
from distill.teachers import load_teacher  # noqa: E402
from export.onnx import ENGINE_MANIFEST, export_onnx, step_coefficients  # noqa: E402
from runtime import Pipeline  # noqa: E402
from runtime import golden as golden_cli  # noqa: E402
from runtime.convention import x0_from_output  # noqa: E402
from runtime.golden import check_golden, write_golden  # noqa: E402
from runtime.noise import request_noise  # noqa: E402
from runtime.pipeline import to_uint8  # noqa: E402

from .conftest import make_tiny_pixel_dir  # noqa: E402
from .test_dmd2 import run_main  # noqa: E402


def export_tiny_engines(root: Path, unconditional: bool = False) -> dict[str, Path]:
    """Engine folders of a tiny 3-class teacher's students: DMD2 (NFE 1, 2; serves 2) and SFD-v (NFE 2, 3, AFS);
    with `unconditional`, also "uncond": a 1-step DMD2 student of an unconditional teacher."""
    teacher_dir = make_tiny_pixel_dir(root / "teacher", num_classes=3)
    dmd2 = train_dmd2(DMD2Config(steps=1, batch_size=2, student_timesteps=(999, 499), use_gan=False, warmup=0,
                                 lr_generator=1e-3, lr_fake=1e-3), load_teacher(teacher_dir), None, root / "dmd2",
                      progress=False)
    sfdv = train_sfd(SFDConfig(nfes=(2, 3), steps=2, batch_size=2, lr=1e-3), load_teacher(teacher_dir), root / "sfdv",
                     progress=False)
    out = {"dmd2": export_onnx(dmd2, root / "dmd2_engine", nfe=2, quality_samples=False),
           "sfd-v": export_onnx(sfdv, root / "sfdv_engine", nfe=3, quality_samples=False)}
    if unconditional:
        student = train_dmd2(DMD2Config(steps=1, batch_size=2, use_gan=False, warmup=0, lr_generator=1e-3,
                                        lr_fake=1e-3), load_teacher(make_tiny_pixel_dir(root / "uncond_teacher")),
                             None, root / "uncond", progress=False)
        out["uncond"] = export_onnx(student, root / "uncond_engine", quality_samples=False)
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return export_tiny_engines(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("sfd-v", 3)])
def test_golden_vectors_reproduce_and_a_changed_value_fails(engines, tmp_path, capsys, kind, nfe):
    out = tmp_path / "golden"
    index = write_golden(engines[kind], out, labels=[0, 1, 2], seed=11, nfe=nfe)
    assert len(index["calls"]) == nfe and index["request"] == {"labels": [0, 1, 2], "n": 3, "seed": 11, "nfe": nfe}
    images = Pipeline.load(engines[kind]).generate([0, 1, 2], seed=11, nfe=nfe).images
    np.testing.assert_array_equal(np.load(out / "images.npy"), images)
    feed = {p.name.split("_", 1)[1][:-4] for p in out.glob("call0_*.npy")} - {"prediction", "state", "x0"}
    assert feed == {"x", "sigma", "timestep", "class_labels"} | ({"nfe"} if kind == "sfd-v" else set())
    results = check_golden(out)
    assert all(r["ok"] for r in results.values()), results
    # the same ONNX Runtime on the same CPU: exact
    assert all(r["max_abs_err"] == 0 for r in results.values()), results

    tol = index["tolerance"]
    changes = {  # file, how to change it, the quantity that must then fail
        "images": ("images.npy", lambda a: a.__setitem__((0, 0, 0, 0), (int(a[0, 0, 0, 0]) + 128) % 256), "images"),
        "noise": ("noise.npy", lambda a: a.__setitem__((1, 0, 0, 2, 3), a[1, 0, 0, 2, 3] + 1e-3), "noise"),
        "prediction": (f"call{nfe - 1}_prediction.npy",
                       lambda a: a.__setitem__((2, 0, 1, 1), a[2, 0, 1, 1] + 10 * tol["prediction_max_abs"]),
                       "prediction"),
    }
    for name, (file, change, quantity) in changes.items():
        bad = tmp_path / f"bad_{name}"
        shutil.copytree(out, bad)
        array = np.load(bad / file)
        change(array)
        np.save(bad / file, array)
        results = check_golden(bad, engines[kind])
        assert not results[quantity]["ok"], (name, results)
    code, stdout, err = run_main(golden_cli.main, ["--check", str(tmp_path / "bad_images")], capsys)
    assert code == 2 and "do not reproduce: images" in err, err


def test_golden_cli_writes_and_checks(engines, tmp_path, capsys):
    code, stdout, err = run_main(golden_cli.main, ["--engine", str(engines["dmd2"]), "--out", str(tmp_path / "g"),
                                                   "--n", "2", "--seed", "3"], capsys)
    assert code == 0 and (tmp_path / "g" / "golden.json").exists(), err
    code, stdout, err = run_main(golden_cli.main, ["--check", str(tmp_path / "g")], capsys)
    assert code == 0 and "reproduce" in stdout, err
    code, stdout, err = run_main(golden_cli.main, ["--check", str(tmp_path / "missing")], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def host_loop(manifest: dict, onnx_path: Path, labels: np.ndarray, seed: int, nfe: int) -> np.ndarray:
    """A host's loop from the manifest's precomputed `steps` alone (no runtime code but the noise)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    schedule = manifest["schedules"][str(nfe)]
    names = [i["name"] for i in manifest["inputs"]]
    x_shape = tuple(manifest["inputs"][0]["shape"][1:])
    draws = nfe if schedule["renoise"] == "fresh_noise" else 1
    noise = request_noise(seed, 0, len(labels), draws, x_shape)
    n = len(labels)
    x = noise[:, 0].astype(np.float64) * schedule["sigmas"][0]
    for i, step in enumerate(schedule["steps"]):
        if step["network_call"]:
            feed = {"x": x.astype(np.float32), "sigma": np.full(n, step["sigma"], np.float32),
                    "timestep": np.full(n, step["timestep"], np.float32), "class_labels": labels,
                    "nfe": np.full(n, nfe, np.int64)}
            p = session.run(["prediction"], {k: v for k, v in feed.items() if k in names})[0].astype(np.float64)
            x0 = step["x0_from_x"] * x + step["x0_from_prediction"] * p
        if schedule["renoise"] == "none":
            d = step["input_scale"] * x if not step["network_call"] else (x - x0) / step["sigma"]
            x = x + step["euler_dt"] * d
        elif i + 1 < len(schedule["steps"]):
            x = x0 + step["renoise_sigma"] * noise[:, i + 1].astype(np.float64)
    return x if schedule["renoise"] == "none" else x0


@pytest.mark.parametrize("kind,nfe", [("dmd2", 1), ("dmd2", 2), ("sfd-v", 2), ("sfd-v", 3)])
def test_manifest_step_scalars_agree_with_the_runtime(engines, kind, nfe):
    engine = engines[kind]
    manifest = json.loads((engine / ENGINE_MANIFEST).read_text())
    schedule = manifest["schedules"][str(nfe)]
    steps = schedule["steps"]
    assert [s["sigma"] for s in steps] == schedule["sigmas"][:len(steps)]
    assert sum(s["network_call"] for s in steps) == nfe
    # the x0 coefficients, for every prediction type, against runtime/convention.py's closed forms
    rng = np.random.default_rng(0)
    x, p = rng.standard_normal((2, 1, 4, 4)) * 50, rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        for step in step_coefficients(schedule, prediction_type):
            sigma = np.full(2, step["sigma"], np.float32)
            want = x0_from_output(p, x, sigma, prediction_type)
            got = step["x0_from_x"] * x + step["x0_from_prediction"] * p.astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13 * np.abs(x).max())
    # the whole loop run from the scalars alone gives the runtime's images
    pipe = Pipeline.load(engine, "onnxruntime-cpu")
    labels = np.array([0, 1, 2, 0], np.int64)
    final = host_loop(manifest, engine / manifest["files"]["fp32"]["path"], labels, seed=5, nfe=nfe)
    images = pipe.generate(labels, seed=5, nfe=nfe).images
    np.testing.assert_array_equal(to_uint8(final), images)
