"""The Gradio demo, served on a free loopback port and driven as its users drive it: gradio_client on the named API
endpoint, and headless Chromium through Playwright. A tiny 1-step DMD2 engine of a random 3-class 8x8 teacher.

The browser test writes its screenshot to a temporary folder; the README's picture is the same test on the
quickstart engine:
    FEWSTEP_DEMO_ENGINE=runs/quickstart/engine FEWSTEP_DEMO_SCREENSHOT=docs/demo_screenshot.png \\
        pytest tests/test_demo.py -k browser
"""

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo needs Gradio: pip install -e '.[demo]' (the [dev] extra has it)")
pytest.importorskip("gradio_client", reason="the demo tests drive the page with gradio_client")
pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from gradio_client import Client  # noqa: E402
from PIL import Image  # noqa: E402

from demo.__main__ import default_engine  # noqa: E402
from demo.app import DISPLAY_PX, MAX_IMAGES, Demo, build_app  # noqa: E402
from distill.dmd2 import DMD2Config, train_dmd2  # noqa: E402
from distill.teachers import load_teacher  # noqa: E402
from export.onnx import export_onnx  # noqa: E402
from runtime.errors import UserError  # noqa: E402

from .conftest import make_tiny_pixel_dir  # noqa: E402

SIDE = 8  # the tiny teacher's images are 8x8, shown enlarged to DISPLAY_PX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(engine_dir: Path):
    """The demo on a free loopback port, served from a background thread: (app, url)."""
    app = build_app(engine_dir)
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
               ssr_mode=False)
    return app, app.local_url


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    teacher_dir = make_tiny_pixel_dir(root / "teacher", num_classes=3)
    bundle = train_dmd2(DMD2Config(steps=1, batch_size=2, student_timesteps=(999,), use_gan=False, warmup=0,
                                   lr_generator=1e-3, lr_fake=1e-3), load_teacher(teacher_dir), None,
                        root / "run" / "student", progress=False)
    engine = export_onnx(bundle, root / "engine", nfe=1, precisions=("fp32", "int8"))
    return {"root": root, "bundle": bundle, "engine": engine}


@pytest.fixture(scope="module")
def server(tiny):
    app, url = serve(tiny["engine"])
    yield Client(url, verbose=False)
    app.close()


def request(client, **overrides):
    args = dict(condition="1", prompt="", nfe=1, seed=7, random_seed=False, n=3, backend="onnxruntime-cpu",
                precision="fp32", compare=False) | overrides
    return client.predict(**args, api_name="/generate")


def pixels(gallery) -> np.ndarray:
    return np.stack([np.asarray(Image.open(item["image"])) for item in gallery])


def test_images_latency_and_same_seed_same_images(server):
    student, teacher, latency, timings, seed = request(server)
    images = pixels(student)
    k = DISPLAY_PX // SIDE
    assert images.shape == (3, SIDE * k, SIDE * k) and images.dtype == np.uint8
    assert [item["caption"] for item in student] == ["1", "1", "1"] and not teacher
    # nearest-neighbour enlargement: every k x k block is one pixel
    assert (images == images[:, ::k, ::k].repeat(k, 1).repeat(k, 2)).all()
    assert isinstance(timings["total_ms"], float) and timings["total_ms"] > 0 and len(timings["step_ms"]) == 1
    assert "3 × digit 1 in 1 step" in latency and "ms" in latency and seed == 7

    again = pixels(request(server)[0])
    assert (again == images).all()
    other_seed = pixels(request(server, seed=8)[0])
    assert not (other_seed == images).all()
    int8 = request(server, precision="int8", condition="all", n=4)
    assert [item["caption"] for item in int8[0]] == ["0", "1", "2", "0"] and int8[3]["precision"] == "int8"
    drawn = request(server, random_seed=True, seed=-5)[4]  # 'random' ignores the box and reports the seed drawn
    assert isinstance(drawn, int) and drawn >= 0


def test_side_by_side_runs_the_teacher_on_the_same_seed(server):
    student, teacher, latency, timings, _ = request(server, compare=True, n=2)
    assert pixels(teacher).shape == pixels(student).shape == (2, DISPLAY_PX, DISPLAY_PX)
    assert timings["teacher_ms"] > 0 and "the teacher, dpmpp-2m 50 steps" in latency


@pytest.mark.parametrize("overrides,message", [
    ({"seed": -1}, "seed must lie in"),
    ({"seed": 2**40}, "seed must lie in"),
    ({"n": MAX_IMAGES + 1}, str(MAX_IMAGES)),
    ({"nfe": 4}, "not in the list of choices"),  # Gradio checks dropdown values against their choices
    ({"backend": "tensorrt"}, "not in the list of choices"),
    ({"condition": "7"}, "not in the list of choices"),
])
def test_invalid_input_is_a_message_and_the_server_keeps_serving(server, overrides, message):
    with pytest.raises(Exception) as info:
        request(server, **overrides)
    assert message in str(info.value) and "Traceback" not in str(info.value)
    assert len(request(server)[0]) == 3


def test_text_engines_show_a_prompt_box_and_refuse_an_empty_prompt(tiny, tmp_path):
    engine = tmp_path / "text_engine"
    shutil.copytree(tiny["engine"], engine)
    path = engine / "fewstep_engine.json"
    manifest = json.loads(path.read_text())
    manifest["conditioning"] = {"kind": "text"}
    path.write_text(json.dumps(manifest))
    demo = Demo(engine)
    args = dict(condition="all", prompt="  ", nfe=1, seed=0, random_seed=False, n=1, backend="onnxruntime-cpu",
                precision="fp32", compare=False)
    with pytest.raises(UserError, match="prompt is empty"):
        demo.parse_request(**args)
    with pytest.raises(UserError, match="text-to-image"):
        demo.parse_request(**args | {"prompt": "a red fox"})
    prompt_boxes = [c for c in build_app(engine).config["components"] if c.get("props", {}).get("label") == "prompt"]
    assert prompt_boxes and prompt_boxes[0]["props"]["visible"] is True


def test_default_engine_is_the_quickstart_student_else_the_embedded_one_exported_once(tiny, tmp_path):
    embedded = default_engine(tmp_path / "nothing", tmp_path / "embedded")  # no quickstart: the committed student
    assert embedded == tmp_path / "embedded" and Demo(embedded).pipeline("onnxruntime-cpu", "fp32").nfes == [1]
    run = tmp_path / "run"
    shutil.copytree(tiny["bundle"], run / "student")
    engine = default_engine(run, tmp_path / "embedded")
    assert engine == run / "engine" and Demo(engine).precisions == ["fp32", "int8"]
    stamp = (engine / "fewstep_engine.json").stat().st_mtime_ns
    assert default_engine(run) == engine and (engine / "fewstep_engine.json").stat().st_mtime_ns == stamp


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(chromium_path() is None, reason="no Chromium here (Debian: apt-get install chromium; "
                                                    "make test installs it where apt-get can)")
def test_browser_picks_a_class_and_shows_images_with_their_latency(tiny, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright's Python "
                                                                   "package (the [dev] extra)")
    app, url = serve(Path(os.environ.get("FEWSTEP_DEMO_ENGINE", tiny["engine"])))
    out = Path(os.environ.get("FEWSTEP_DEMO_SCREENSHOT", tmp_path / "demo_screenshot.png"))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage"])  # root; small /dev/shm
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            latency = page.locator("#latency")
            playwright.expect(latency).to_contain_text(" ms", timeout=60_000)  # the first screen generates once
            page.get_by_label("digit class").click()
            page.get_by_role("option", name="2", exact=True).click()
            compare = page.get_by_label("side by side with the teacher", exact=False)
            if compare.is_visible():  # the engine's teacher is on this machine: its 50 steps beside the student
                compare.check()
            page.get_by_role("button", name="Generate").click()
            playwright.expect(latency).to_contain_text("× digit 2 in 1 step", timeout=60_000)
            if compare.is_visible():
                playwright.expect(latency).to_contain_text("the teacher", timeout=60_000)
                assert page.locator("#teacher img").count() > 0
            src = page.locator("#student img").first.get_attribute("src", timeout=30_000)
            assert src
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        app.close()
    assert out.stat().st_size > 0
