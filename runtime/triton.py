"""A Triton Inference Server model repository for an engine folder:
`python -m runtime.triton --engine DIR --out REPO [--nfe K] [--max-batch 64] [--queue-delay-us 2000]`.

What REPO holds (docs/serving.md has the container command and a Kubernetes Deployment):
- `fewstep/`: the runtime behind Triton's Python backend (runtime/triton_model.py), the engine copied in beside
  it. Every engine and backend the runtime serves, text-to-image included; inputs the condition and a seed per row.
- `fewstep_sampler_nfe<K>_onnx/`: the whole sampler as one graph (export/sampler.py) on Triton's `onnxruntime`
  backend, where the engine folder has one; inputs the condition and the noise, output uint8 images.
- `fewstep_sampler_nfe<K>_trt/`: the same graph on Triton's `tensorrt` backend. A TensorRT plan is built for one
  GPU model and TensorRT version, so the folder gets the config and the ONNX file; the plan is built where it will
  run (`trtexec`, in the Triton container; the command is in its README.txt).
Each has dynamic batching with the stated queue delay and an instance group; the names, dtypes and dims come from
the engine manifest. The repository is written under a temporary name and renamed when complete.
"""

import argparse
import shutil
from pathlib import Path

from fewstep.errors import UserError, cli_main
from fewstep.folders import fresh_folder, replace_folder

from .manifest import read_manifest

TRITON_DTYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "uint8": "TYPE_UINT8", "bytes": "TYPE_STRING"}
PYTHON_MODEL = "fewstep"
MODEL_PY = '''"""fewstep's runtime on Triton's Python backend: runtime/triton_model.py of the fewstep package, which
must be installed where Triton's Python backend runs (pip install "fewstep[serve]")."""

from runtime.triton_model import TritonPythonModel  # noqa: F401
'''


def tensor(name: str, dtype: str, dims: list[int], reshape: list[int] | None = None) -> str:
    """One entry of a config.pbtxt's input or output list (dims without the batch dimension)."""
    text = f'{{ name: "{name}" data_type: {TRITON_DTYPES[dtype]} dims: [ {", ".join(map(str, dims))} ]'
    if reshape is not None:
        text += f' reshape: {{ shape: [ {", ".join(map(str, reshape))} ] }}'
    return text + " }"


def model_config(name: str, kind: str, inputs: list[str], outputs: list[str], max_batch: int, queue_delay_us: int,
                 instances: str, parameters: dict[str, str] | None = None) -> str:
    """config.pbtxt text (Triton's ModelConfig in protobuf text format). `kind`: `backend: "python"` or
    `platform: "..."`; `instances`: KIND_CPU or KIND_GPU."""
    lines = [f'name: "{name}"', kind, f"max_batch_size: {max_batch}",
             f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
             f"instance_group [ {{ kind: {instances} count: 1 }} ]",
             "input [\n  " + ",\n  ".join(inputs) + "\n]",
             "output [\n  " + ",\n  ".join(outputs) + "\n]"]
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def image_dims(manifest: dict) -> list[int]:
    image = manifest["image"]
    return [image["height"], image["width"], image["channels"]]


def python_model(repo: Path, engine_dir: Path, manifest: dict, *, copy_engine: bool = True, backend: str = "auto",
                 precision: str = "fp32", nfe: int | None = None, max_batch: int = 64, queue_delay_us: int = 2000,
                 threads: int | None = None) -> Path:
    """repo/fewstep: the Python-backend model over the runtime. `copy_engine`: the engine goes into the model's
    version folder (a self-contained repository); otherwise the config names its absolute path (runtime.serve)."""
    model = repo / PYTHON_MODEL
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(MODEL_PY)
    if copy_engine:
        shutil.copytree(engine_dir, model / "1" / "engine")
    kind = manifest["conditioning"].get("kind")
    inputs = {"class": [tensor("class_labels", "int64", [1])], "text": [tensor("prompt", "bytes", [1])]}.get(kind, [])
    params = {"engine": "engine" if copy_engine else str(Path(engine_dir).resolve()), "backend": backend,
              "precision": precision}
    if nfe is not None:
        params["nfe"] = str(nfe)
    if threads:
        params["threads"] = str(threads)
    text = model_config(PYTHON_MODEL, 'backend: "python"', [*inputs, tensor("seed", "int64", [1])],
                        [tensor("images", "uint8", image_dims(manifest))], max_batch, queue_delay_us, "KIND_CPU",
                        params)
    (model / "config.pbtxt").write_text(text)
    return model


def sampler_models(repo: Path, engine_dir: Path, manifest: dict, nfe: int, precision: str, max_batch: int,
                   queue_delay_us: int) -> list[Path]:
    """repo/fewstep_sampler_nfe<nfe>_{onnx,trt}: the engine's sampler graph on Triton's onnxruntime and tensorrt
    backends (none when the engine folder has no sampler graph for nfe)."""
    entry = manifest.get("samplers", {}).get(str(nfe), {}).get(precision)
    if entry is None:
        return []
    inputs = [tensor(i["name"], i["dtype"], [1] if i["shape"] == ["batch"] else i["shape"][1:],
                     [] if i["shape"] == ["batch"] else None) for i in entry["inputs"]]
    outputs = [tensor(o["name"], o["dtype"], o["shape"][1:]) for o in entry["outputs"]]
    made = []
    for suffix, platform in (("onnx", "onnxruntime_onnx"), ("trt", "tensorrt_plan")):
        name = f"fewstep_sampler_nfe{nfe}_{suffix}"
        version = repo / name / "1"
        version.mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(model_config(
            name, f'platform: "{platform}"', inputs, outputs, max_batch, queue_delay_us, "KIND_GPU"))
        files = [entry["path"], *([entry["path"] + ".data"] if entry.get("external_data") else [])]
        if suffix == "onnx":
            shutil.copy(engine_dir / files[0], version / "model.onnx")
            for extra in files[1:]:  # external weights keep the name the graph refers to
                shutil.copy(engine_dir / extra, version / extra)
        else:
            for f in files:
                shutil.copy(engine_dir / f, repo / name / f)
            (repo / name / "README.txt").write_text(trt_build_note(name, entry, max_batch, precision))
        made.append(repo / name)
    return made


def trt_build_note(name: str, entry: dict, max_batch: int, precision: str) -> str:
    """How to build 1/model.plan inside the Triton container that will serve it (a plan is tied to its GPU model
    and TensorRT version)."""
    def shapes(batch: int) -> str:
        return ",".join(f"{i['name']}:" + "x".join(str(batch if d == "batch" else d) for d in i["shape"])
                        for i in entry["inputs"])

    flags = {"fp16": " --fp16", "int8": " --int8 --fp16"}.get(precision, "")
    return (f"Build 1/model.plan from {entry['path']} in the Triton container that serves it (same GPU model and "
            "TensorRT version), from this folder:\n\n"
            f"  trtexec --onnx={entry['path']} --saveEngine=1/model.plan{flags} \\\n"
            f"    --minShapes={shapes(1)} \\\n    --optShapes={shapes(max(1, max_batch // 4))} \\\n"
            f"    --maxShapes={shapes(max_batch)}\n")


def check_serving(manifest: dict, nfe: int | None, max_batch: int) -> int:
    """The NFE to serve (the engine's default for None); UserError for an NFE or a batch limit it cannot serve."""
    nfe = manifest["schedule"]["nfe"] if nfe is None else nfe
    if str(nfe) not in manifest["schedules"]:
        raise UserError(f"--nfe {nfe}: this engine serves NFE {', '.join(sorted(manifest['schedules'], key=int))}")
    limit = manifest.get("max_batch")
    if max_batch < 1 or (limit and max_batch > limit):
        raise UserError(f"--max-batch must lie in 1..{limit}; got {max_batch}" if limit else
                        f"--max-batch must be at least 1; got {max_batch}")
    return nfe


def write_repository(engine_dir: str | Path, out: str | Path, *, nfe: int | None = None, precision: str = "fp32",
                     backend: str = "auto", max_batch: int = 64, queue_delay_us: int = 2000) -> list[Path]:
    """The model repository for one engine folder at `out`; returns the model folders written."""
    engine_dir, out = Path(engine_dir), Path(out)
    manifest = read_manifest(engine_dir)
    nfe = check_serving(manifest, nfe, max_batch)
    tmp = fresh_folder(out, "model repository")
    try:
        models = [python_model(tmp, engine_dir, manifest, backend=backend, precision=precision, nfe=nfe,
                               max_batch=max_batch, queue_delay_us=queue_delay_us)]
        models += sampler_models(tmp, engine_dir, manifest, nfe, precision, max_batch, queue_delay_us)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, out)
    return [out / m.name for m in models]


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.triton", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True, help="an engine folder (python -m export.onnx)")
    p.add_argument("--out", type=Path, required=True, help="the model repository folder to write")
    p.add_argument("--nfe", type=int, help="the NFE served (default: the engine's default schedule)")
    p.add_argument("--precision", default="fp32", help="the network file the models use (default fp32)")
    p.add_argument("--backend", default="auto", help="the runtime backend of the Python-backend model")
    p.add_argument("--max-batch", type=int, default=64, help="Triton's max_batch_size (default 64)")
    p.add_argument("--queue-delay-us", type=int, default=2000,
                   help="the dynamic batcher's max_queue_delay_microseconds (default 2000)")
    args = p.parse_args(argv)
    models = write_repository(args.engine, args.out, nfe=args.nfe, precision=args.precision, backend=args.backend,
                              max_batch=args.max_batch, queue_delay_us=args.queue_delay_us)
    for m in models:
        print(f"{m}: {(m / 'config.pbtxt').read_text().splitlines()[1]}")
    if len(models) == 1:
        print("no sampler graph in the engine folder: python -m export.sampler --engine "
              f"{args.engine} adds one (then the onnxruntime / tensorrt models are written too)")
    print(f"serve it: tritonserver --model-repository {args.out.resolve()} (docs/serving.md)")


if __name__ == "__main__":
    main()
