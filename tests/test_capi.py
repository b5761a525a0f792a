"""The native runtime (runtime/capi: libfewstep, C++ over OpenVINO, a C ABI; no Python inside), built with CMake from
this checkout: its bytes equal the Python runtime's and the golden vectors' for 1-step and multi-step, class and
unconditional engines; bad input through the ABI is a status and one line, and the context keeps serving; several
host threads get the same bytes; the library links no libpython; a service builds against the installed package
with find_package(fewstep)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from export.onnx import ENGINE_MANIFEST  # noqa: E402
from runtime import Pipeline, UserError  # noqa: E402
from runtime.golden import write_golden  # noqa: E402

from .test_golden import export_tiny_engines  # noqa: E402

CAPI = Path(__file__).resolve().parents[1] / "runtime" / "capi"
BACKEND = "openvino-cpu"  # what the native library runs; the Python runtime runs the same file the same way


def openvino_cmake_dir() -> Path | None:
    try:
        import openvino
    except ImportError:
        return None
    path = Path(openvino.__file__).parent / "cmake"
    return path if (path / "OpenVINOConfig.cmake").exists() else None


def missing_toolchain() -> str | None:
    """Why the native library cannot be built here, or None."""
    if not shutil.which("cmake"):
        return "cmake is not installed"
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler (c++)"
    if openvino_cmake_dir() is None:
        return "OpenVINO's C++ package is not here (pip install openvino: the wheel ships it)"
    if not any(Path(p, "nlohmann", "json.hpp").exists() for p in ("/usr/include", "/usr/local/include")):
        return "nlohmann_json is not installed (Debian: apt-get install nlohmann-json3-dev; make test installs it)"
    return None


# An ONNX Runtime C package (include/onnxruntime_cxx_api.h, lib/libonnxruntime.so) to build that backend against
ORT_ROOT = os.environ.get("ONNXRUNTIME_ROOT")


def cmake(*args: str) -> None:
    done = subprocess.run(["cmake", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"cmake {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    why = missing_toolchain()
    if why:
        pytest.skip(f"cannot build the native runtime: {why}")
    build = tmp_path_factory.mktemp("capi_build")
    ort = [f"-Donnxruntime_ROOT={ORT_ROOT}", "-DFEWSTEP_ONNXRUNTIME=ON"] if ORT_ROOT else ["-DFEWSTEP_ONNXRUNTIME=OFF"]
    cmake("-S", str(CAPI), "-B", str(build), f"-DOpenVINO_DIR={openvino_cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release",
          *ort)
    cmake("--build", str(build), "-j", "2")
    return build


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The golden tests' tiny class engines (DMD2 serving NFE 1 and 2; SFD-v, NFE 2 and 3) and an unconditional
    1-step DMD2 engine."""
    return export_tiny_engines(tmp_path_factory.mktemp("capi_engines"), unconditional=True)


def run_host(build: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(build / "fewstep_host"), *map(str, args)], capture_output=True, text=True, timeout=300)


def python_images(engine: Path, labels, n: int, seed: int, nfe: int) -> np.ndarray:
    return Pipeline.load(engine, BACKEND).generate(labels, n=None if labels else n, seed=seed, nfe=nfe).images


@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("dmd2", 1), ("sfd-v", 3), ("sfd-v", 2), ("uncond", 1)])
def test_native_bytes_equal_the_python_runtime(build, engines, tmp_path, kind, nfe):
    labels = None if kind == "uncond" else [2, 0, 1, 1, 2]
    seed, out = 1234, tmp_path / "images.u8"
    args = ["--n", 5] if labels is None else ["--labels", ",".join(map(str, labels))]
    done = run_host(build, engines[kind], *args, "--seed", seed, "--nfe", nfe, "--out", out,
                    "--pnm", tmp_path / "images.pgm")
    assert done.returncode == 0, done.stderr
    want = python_images(engines[kind], labels, 5, seed, nfe)
    assert out.read_bytes() == want.tobytes()
    assert (tmp_path / "images.pgm").read_bytes().startswith(b"P5\n40 8\n255\n")  # 5 images of 8x8 in a row


@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("dmd2", 1), ("sfd-v", 3), ("uncond", 1)])
def test_golden_vectors_through_the_native_library(build, engines, tmp_path, kind, nfe):
    """Every golden vector set (python -m runtime.golden, recorded on the backend the native library runs) is
    reproduced byte for byte: the documented noise, the loop's arithmetic and the uint8 rounding."""
    labels = None if kind == "uncond" else [0, 1, 2, 2]
    index = write_golden(engines[kind], tmp_path / "golden", labels=labels, n=4, seed=11, nfe=nfe, backend=BACKEND)
    args = ["--n", 4] if labels is None else ["--labels", "0,1,2,2"]
    done = run_host(build, engines[kind], *args, "--seed", 11, "--nfe", nfe, "--out", tmp_path / "native.u8")
    assert done.returncode == 0, done.stderr
    golden = np.load(tmp_path / "golden" / "images.npy")
    assert index["request"]["nfe"] == nfe and (tmp_path / "native.u8").read_bytes() == golden.tobytes()


def test_threads_and_recovery_after_errors(build, engines):
    """Bad calls through the ABI fail with a status and a message and leave the context serving; host threads
    calling one context at once get the same bytes."""
    done = run_host(build, engines["dmd2"], "--labels", "0,1,2", "--seed", 3, "--threads", 3, "--repeat", 3,
                    "--check-recovery")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout
    assert "threads: 3 concurrent calls gave the same bytes" in lines
    assert "label out of range -> status 1: class labels must lie in 0..2; got 1..3" in lines
    assert "n = 0 -> status 1: n must be at least 1" in lines
    assert "buffer one byte short -> status 2: the output buffer holds 191 bytes" in lines
    assert "nfe 99 -> status 1: this engine serves NFE 1, 2, not 99" in lines
    assert "NULL params -> status 1: context, params and out must not be NULL" in lines
    assert "non-finite noise -> status 1: the noise contains NaN or inf" in lines
    assert "recovery: the engine still generates the same bytes" in lines
    assert "latency_ms: first" in lines


@pytest.mark.skipif(not ORT_ROOT, reason="no ONNX Runtime C package: set ONNXRUNTIME_ROOT to one (its include/ and "
                                          "lib/, as in ONNX Runtime's release archives) to build and test that backend")
@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("sfd-v", 3), ("uncond", 1)])
def test_onnxruntime_backend_agrees_with_the_python_runtime(build, engines, tmp_path, kind, nfe):
    labels = None if kind == "uncond" else [2, 0, 1, 1, 2]
    out = tmp_path / "images.u8"
    args = ["--n", 5] if labels is None else ["--labels", ",".join(map(str, labels))]
    done = run_host(build, engines[kind], *args, "--seed", 77, "--nfe", nfe, "--backend", "onnxruntime-cpu",
                    "--out", out)
    assert done.returncode == 0, done.stderr
    want = Pipeline.load(engines[kind], "onnxruntime-cpu").generate(labels, n=None if labels else 5, seed=77,
                                                                    nfe=nfe).images
    got = np.frombuffer(out.read_bytes(), np.uint8).reshape(want.shape)
    # the same loop; the network's floats are ONNX Runtime's in both, from two builds that may differ in version
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_bad_engines_are_a_status_and_one_line(build, engines, tmp_path):
    with pytest.raises(UserError) as python_error:
        Pipeline.load(engines["dmd2"]).generate([0, 3], seed=0)
    done = run_host(build, engines["dmd2"], "--labels", "0,3")
    assert done.returncode == 1 and done.stderr.strip() == f"error: {python_error.value}", done.stderr

    done = run_host(build, tmp_path / "missing")
    assert done.returncode == 1 and "engine folder" in done.stderr and "does not exist" in done.stderr, done.stderr
    newer = tmp_path / "newer"
    shutil.copytree(engines["dmd2"], newer)
    manifest = json.loads((newer / ENGINE_MANIFEST).read_text())
    (newer / ENGINE_MANIFEST).write_text(json.dumps(manifest | {"format_version": manifest["format_version"] + 1}))
    done = run_host(build, newer)
    assert done.returncode == 1 and "written by a newer fewstep (engine format 2)" in done.stderr, done.stderr
    text = tmp_path / "text"
    shutil.copytree(engines["dmd2"], text)
    (text / ENGINE_MANIFEST).write_text(json.dumps(manifest | {"conditioning": {"kind": "text"}}))
    done = run_host(build, text)
    assert done.returncode == 1 and "served by the Python runtime only" in done.stderr, done.stderr
    done = run_host(build, engines["dmd2"], "--backend", "tensorrt")
    assert done.returncode == 1 and "built without TensorRT" in done.stderr, done.stderr
    if not ORT_ROOT:
        done = run_host(build, engines["dmd2"], "--backend", "onnxruntime-cpu")
        assert done.returncode == 1 and "built without ONNX Runtime" in done.stderr, done.stderr
    done = run_host(build, engines["dmd2"], "--precision", "int8")
    assert done.returncode == 1 and "has no int8 ONNX file; precisions here: fp32" in done.stderr, done.stderr
    done = run_host(build, engines["sfd-v"], "--seed", 2**63)
    assert done.returncode == 1 and "seed must be an integer in 0.." in done.stderr, done.stderr
    done = run_host(build, engines["dmd2"], "--bogus")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown option --bogus"), done.stderr


def test_the_library_links_no_python(build):
    if not shutil.which("ldd"):
        pytest.skip("ldd is not installed")
    libs = subprocess.run(["ldd", str(build / "libfewstep.so")], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in libs.splitlines() if line.strip()]  # "libx.so.N => /path (addr)"
    assert any(n.startswith("libopenvino") for n in names), libs
    assert not any(n.startswith("libpython") for n in names), libs


def test_a_service_builds_against_the_installed_package(build, engines, tmp_path):
    """cmake --install, then the README's program (example/minimal.cpp, under 40 lines) in a project of its own that
    finds the library with find_package(fewstep)."""
    program = CAPI / "example" / "minimal.cpp"
    assert len(program.read_text().splitlines()) < 40
    prefix = tmp_path / "prefix"
    cmake("--install", str(build), "--prefix", str(prefix))
    service = tmp_path / "service"
    service.mkdir()
    shutil.copy(program, service / "main.cpp")
    (service / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(service CXX)\nfind_package(fewstep 2 REQUIRED)\n"
        "add_executable(service main.cpp)\ntarget_link_libraries(service PRIVATE fewstep::fewstep)\n"
        "set_target_properties(service PROPERTIES CXX_STANDARD 17)\n")
    cmake("-S", str(service), "-B", str(service / "build"), f"-DCMAKE_PREFIX_PATH={prefix}")
    cmake("--build", str(service / "build"))
    done = subprocess.run([str(service / "build" / "service"), str(engines["uncond"])], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("4 images of 8x8x1 in "), done.stdout + done.stderr
