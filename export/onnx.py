"""Export a student bundle's network to ONNX, with parity against PyTorch as part of the export:
`python -m export.onnx [--bundle DIR] [--out ENGINE_DIR] [--nfe K] [--precision fp32,fp16,int8]`.

What goes into the graph (docs/design.md §5, graph.py): the student network with its input scaling c_in, in
float32, fed the network's own time: (x, sigma, timestep[, condition][, nfe]) -> its raw prediction. What the
runtime computes: x0 = c_skip x + c_out prediction in float64, and the sampling loop, from the engine manifest
(manifest.py). One module per precision path: fp16.py, int8.py (int8, int8-cpu), bf16.py; parity.py checks every
file on the calls of the student's own loop, quality.py samples digits students through each file. Latent
text-to-image students (SD 1.5 / SDXL / SD3 layouts) also get their teacher's text encoders, VAE decoder and
tokenizers (latent.py), in fp32. The folder is written under a temporary name and renamed at the end, so a failed
export leaves nothing that looks complete. TensorRT builds on these files (trt.py).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from distill.bundle import load_bundle
from fewstep.errors import UserError, cli_main
from fewstep.folders import fresh_folder, replace_folder

from .bf16 import checked_bf16
from .fp16 import HalfGraph
from .graph import GraphStudent, export_graph, loop_inputs, module_outputs, run_loop
from .int8 import calibration_inputs, to_int8, to_int8_cpu
from .manifest import ENGINE_MANIFEST, engine_manifest, step_coefficients
from .parity import checked_file
from .quality import openvino_serves, quality_gate
from .sampler import write_sampler

# What export_onnx makes, and the names other modules and tests import from here
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu", "bf16")
__all__ = ["ENGINE_MANIFEST", "GraphStudent", "HalfGraph", "PRECISIONS", "export_onnx", "loop_inputs",
           "step_coefficients"]


def export_onnx(bundle_dir: str | Path, out_dir: str | Path, nfe: int | None = None,
                precisions: tuple[str, ...] = ("fp32",), check_batch: int = 4, quality_samples: bool = True,
                teacher: str | Path | None = None) -> Path:
    """Write out_dir/{student_<precision>.onnx, fewstep_engine.json} (latent students: also their text encoder(s),
    VAE decoder and tokenizers, export/latent.py; `teacher` overrides the teacher folder the bundle names);
    returns out_dir. Fails (UserError) on parity, leaving nothing behind."""
    out_dir = Path(out_dir)
    bundle = load_bundle(bundle_dir)
    nfe = bundle.nfes[-1] if nfe is None else nfe
    if str(nfe) not in bundle.manifest["nfe"]:
        raise UserError(f"--nfe {nfe}: the {bundle.manifest['method']} student {bundle.source} serves NFE "
                        f"{', '.join(map(str, bundle.nfes))}; export one of those, or train a student for {nfe} "
                        f"steps (python -m distill.run --preset digits-4step, or --method sfd --nfe {nfe})")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise UserError(f"precision {unknown[0]!r} is not exported yet; available: {', '.join(PRECISIONS)}")
    latent = bundle.manifest["family"] == "latent"
    if latent:
        from . import latent as latent_parts

        latent_parts.check_precisions(precisions)
        text_teacher = latent_parts.load_teacher_parts(bundle, teacher)
    tmp = fresh_folder(out_dir, "engine folder")
    try:
        model = GraphStudent(bundle).eval()
        cond = latent_parts.loop_condition(text_teacher, check_batch) if latent else None
        feeds, x0 = run_loop(bundle, nfe, check_batch, cond=cond)
        wants = module_outputs(model, feeds)
        files, sections = {}, {}
        fp32 = tmp / "student_fp32.onnx"
        for precision in ("fp32", *[p for p in precisions if p != "fp32"]):
            path = tmp / f"student_{precision}.onnx"
            t0 = time.perf_counter()
            made_by = {}  # int8: which quantizer made the file
            if precision == "fp32":
                export_graph(model, feeds[0], path)
            elif precision == "fp16":
                export_graph(HalfGraph(model).eval(), feeds[0], path)
            elif precision == "bf16":
                files[precision] = checked_bf16(fp32, feeds, wants, time.perf_counter() - t0)
                continue
            elif precision == "int8-cpu":
                to_int8_cpu(fp32, path, calibration_inputs(bundle, [nfe]))
            else:
                made_by = {"quantizer": to_int8(fp32, path, calibration_inputs(bundle, [nfe]))}
            files[precision] = checked_file(path, feeds, wants, precision, "unet", time.perf_counter() - t0) | made_by
        if latent:
            more, sections = latent_parts.export_parts(text_teacher, x0, tmp)
            files |= more
            sections["guidance"] = latent_parts.guidance(bundle, text_teacher)

        def write_manifest():
            manifest = engine_manifest(bundle, nfe, model, files, feeds[0]) | sections
            (tmp / ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2))

        write_manifest()
        gate = quality_gate(bundle, tmp, nfe, files, list(files)) if quality_samples else {}
        for precision, result in gate.items():
            files[precision]["quality"] = result
        if quality_samples and openvino_serves(files):  # OpenVINO's int8 rounds its own way: its own FD
            ov = [p for p in files if p in ("fp32", "int8", "int8-cpu")]
            for precision, result in quality_gate(bundle, tmp, nfe, files, ov, backend="openvino-cpu").items():
                files[precision]["quality_openvino"] = result
        if "fp32" not in precisions and "bf16" not in precisions:  # it was the source of the others
            fp32.unlink()
            del files["fp32"]
        write_manifest()
    except BaseException:  # a failed export leaves nothing that looks complete
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, out_dir)
    return out_dir


def chosen_bundle(bundle: Path | None, out: Path | None) -> tuple[Path, Path]:
    """(bundle, engine folder): the ones given, or the default student (distill.digits.default_student), said aloud.
    The embedded student's engine goes under runs/, never into the installed package."""
    from distill.digits import STUDENT_DIR, default_student

    if bundle is None:
        bundle, which = default_student()
        print(f"no --bundle: exporting {which}")
    if out is None:
        out = Path("runs/embedded/engine") if Path(bundle).resolve() == STUDENT_DIR.resolve() else \
            Path(bundle).parent / "engine"
    return Path(bundle), out


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="a student bundle folder (…/student; default: the quickstart "
                                               "student runs/quickstart/student, else the embedded digits student)")
    p.add_argument("--out", type=Path, help="engine folder (default: BUNDLE/../engine; runs/embedded/engine for the "
                                            "embedded student)")
    p.add_argument("--nfe", type=int, help="the schedule the engine serves (default: the most the student serves)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, fp16, int8, int8-cpu, bf16 "
                                                        "(fp32 is always built first)")
    p.add_argument("--teacher", type=Path, help="latent students: the teacher folder whose text encoders, VAE and "
                                                "tokenizers go into the engine (default: the one the bundle names)")
    p.add_argument("--sampler-graph", action="store_true",
                   help="also write the whole sampler as one ONNX graph per precision (export/sampler.py)")
    args = p.parse_args(argv)
    bundle, out = chosen_bundle(args.bundle, args.out)
    precisions = tuple(s.strip() for s in args.precision.split(",") if s.strip())
    out = export_onnx(bundle, out, args.nfe, precisions, teacher=args.teacher)
    manifest = json.loads((out / ENGINE_MANIFEST).read_text())
    for f in manifest["files"].values():
        print(f"{out / f['path']}: max abs err {f['max_abs_err']:.2e}, max rel err {f['max_rel_err']:.2e} vs PyTorch "
              f"over {f['calls_checked']} calls; checked: {f['parity']}")
        if "quality" in f:
            q = f["quality"]
            print(f"  sampled through it ({q['n']} digits): FD {q['fd']:.4f} vs PyTorch fp32 "
                  f"{q['fd_pytorch_fp32']:.4f} "
                  f"({100 * q['fd_change']:+.1f}%), class accuracy {100 * q['accuracy']:.1f}%")
    print(f"engine manifest: {out / ENGINE_MANIFEST} (NFE {manifest['schedule']['nfe']})")
    if args.sampler_graph:
        for precision in [p for p in precisions if p != "bf16"]:
            print(f"{write_sampler(out, manifest['schedule']['nfe'], precision)}: the whole sampler in one graph")


if __name__ == "__main__":
    main()
