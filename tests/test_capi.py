"""The C ABI (runtime/capi: libfewstep.so embedding CPython) through the example C++ host: built with CMake, its
bytes equal the Python Pipeline's exactly, bad input is a non-zero exit with the runtime's own message, several
host threads get the same bytes, and after a failed call the engine still generates."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from export.onnx import ENGINE_MANIFEST  # noqa: E402
from runtime import Pipeline, UserError  # noqa: E402

from .test_golden import export_tiny_engines  # noqa: E402

CAPI = Path(__file__).resolve().parents[1] / "runtime" / "capi"
CHECKOUT = CAPI.parents[1]


def missing_toolchain() -> str | None:
    """Why the C ABI cannot be built here, or None."""
    if not shutil.which("cmake"):
        return "cmake is not installed"
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")) or \
            not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "no C/C++ compiler (cc, c++)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return f"no Python headers (Python.h in {sysconfig.get_paths()['include']}): install python3-dev"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return "this Python has no shared libpython to embed (build it with --enable-shared)"
    return None


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    why = missing_toolchain()
    if why:
        pytest.skip(f"cannot build the C ABI: {why}")
    build = tmp_path_factory.mktemp("capi_build")
    for cmd in (["cmake", "-S", str(CAPI), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
                 "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build / "fewstep_host"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return export_tiny_engines(tmp_path_factory.mktemp("capi_engines"))


def run_host(host: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEWSTEP_PYTHON": sys.executable, "FEWSTEP_PYTHONPATH": str(CHECKOUT), **(env or {})}
    return subprocess.run([str(host), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("dmd2", 1), ("sfd-v", 3), ("sfd-v", 2)])
def test_host_bytes_equal_the_python_pipeline(host, engines, tmp_path, kind, nfe):
    labels, seed = [2, 0, 1, 1, 2], 1234
    out = tmp_path / "images.u8"
    done = run_host(host, engines[kind], "--labels", ",".join(map(str, labels)), "--seed", seed, "--nfe", nfe,
                    "--out", out, "--pnm", tmp_path / "images.pgm")
    assert done.returncode == 0, done.stderr
    want = Pipeline.load(engines[kind]).generate(labels, seed=seed, nfe=nfe).images
    assert out.read_bytes() == want.tobytes()
    assert (tmp_path / "images.pgm").read_bytes().startswith(b"P5\n40 8\n255\n")  # 5 images of 8x8 in a row


def test_threads_and_recovery_after_errors(host, engines):
    """Bad calls through the ABI fail with the runtime's message and leave the engine serving; host threads
    calling one engine at once get the same bytes."""
    done = run_host(host, engines["dmd2"], "--labels", "0,1,2", "--seed", 3, "--threads", 3, "--repeat", 3,
                    "--check-recovery")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout
    assert "threads: 3 concurrent calls gave the same bytes" in lines
    assert "label out of range -> status 1: class labels must lie in 0..2" in lines
    assert "n = 0 -> status 1: n must be at least 1" in lines
    assert "buffer one byte short -> status 2: the output buffer holds 191 bytes" in lines
    assert "nfe 99 -> status 1: this engine serves NFE 1, 2, not 99" in lines
    assert "recovery: the engine still generates the same bytes" in lines
    assert "latency_ms: first" in lines


def test_bad_input_is_a_nonzero_exit_with_the_runtime_message(host, engines, tmp_path):
    with pytest.raises(UserError) as python_error:
        Pipeline.load(engines["dmd2"]).generate([0, 3], seed=0)
    done = run_host(host, engines["dmd2"], "--labels", "0,3")
    assert done.returncode == 1 and done.stderr.strip() == f"error: {python_error.value}", done.stderr

    done = run_host(host, tmp_path / "missing")
    assert done.returncode == 1 and "engine folder" in done.stderr and "does not exist" in done.stderr, done.stderr

    newer = tmp_path / "newer"
    shutil.copytree(engines["dmd2"], newer)
    manifest = json.loads((newer / ENGINE_MANIFEST).read_text())
    (newer / ENGINE_MANIFEST).write_text(json.dumps(manifest | {"format_version": manifest["format_version"] + 1}))
    done = run_host(host, newer)
    assert done.returncode == 1 and "written by a newer fewstep (engine format 2)" in done.stderr, done.stderr

    done = run_host(host, engines["dmd2"], env={"FEWSTEP_PYTHON": str(tmp_path / "no_python")})
    assert done.returncode == 1 and "cannot start CPython" in done.stderr and "FEWSTEP_PYTHON" in done.stderr

    done = run_host(host, engines["dmd2"], "--bogus")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown option --bogus"), done.stderr


def test_seed_range_and_default_labels(host, engines):
    done = run_host(host, engines["sfd-v"], "--seed", 2**63)
    assert done.returncode == 1 and "seed must be an integer in 0.." in done.stderr, done.stderr
    done = run_host(host, engines["sfd-v"], "--n", 3, "--seed", 2**63 - 1)  # labels 0, 1, 2: the classes cycling
    assert done.returncode == 0 and "generated 3 images of 8x8x1" in done.stdout, done.stderr
