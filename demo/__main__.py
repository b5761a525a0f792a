"""Serve the Gradio demo: `python -m demo [--engine DIR] [--host 127.0.0.1] [--port 7860]`.

With no --engine it serves your quickstart student if `make quickstart` has trained one (runs/quickstart/student),
else the embedded digits student committed in the package (distill/assets/digits_student: SFD-v's 1-NFE stage,
FD 0.070 against the teacher's 50-step 0.078). Either is exported once to an engine folder beside it under runs/
(ONNX fp32 + int8) and again whenever the student is newer than the engine.
"""

import argparse
from pathlib import Path

from fewstep.errors import UserError, cli_main

QUICKSTART = Path("runs/quickstart")
EMBEDDED_ENGINE = Path("runs/embedded/engine")


def embedded_student() -> Path:
    from distill.digits import ASSETS

    return ASSETS / "digits_student"


def default_engine(run: Path = QUICKSTART, embedded: Path = EMBEDDED_ENGINE) -> Path:
    """The quickstart student's engine if there is a quickstart student (or engine), else the embedded student's."""
    if (run / "student" / "fewstep_student.json").exists():
        return student_engine(run / "student", run / "engine")
    if (run / "engine" / "fewstep_engine.json").exists():
        return run / "engine"
    return student_engine(embedded_student(), embedded)


def student_engine(student: Path, engine: Path) -> Path:
    """`engine`, exported from `student` first when it is missing or older than the student."""
    student_manifest, engine_manifest = student / "fewstep_student.json", engine / "fewstep_engine.json"
    if not student_manifest.exists():
        raise UserError(f"no engine to serve: {student} is not a student bundle; pass --engine DIR (an engine "
                        "folder from python -m export.onnx)")
    if engine_manifest.exists() and engine_manifest.stat().st_mtime >= student_manifest.stat().st_mtime:
        return engine
    from export.onnx import export_onnx

    print(f"exporting the digits student {student} to {engine} (ONNX fp32 + int8, with parity and quality checks; "
          "once, under a minute)...", flush=True)
    return export_onnx(student, engine, precisions=("fp32", "int8"))


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, help=f"an engine folder (default: the quickstart student's, exported to "
                                               f"{QUICKSTART}/engine, else the embedded digits student's, "
                                               f"exported to {EMBEDDED_ENGINE})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--backend", help="the backend selected at first (default: ONNX Runtime on the CPU)")
    p.add_argument("--precision", help="the precision selected at first (default: fp32)")
    p.add_argument("--concurrency", type=int, default=2, help="requests run at once (the rest wait in the queue)")
    p.add_argument("--max-queue", type=int, default=32, help="requests allowed to wait; more are turned away")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1:
        raise UserError("--concurrency and --max-queue must be at least 1")
    try:
        from .app import build_app
    except ImportError as e:
        raise UserError(f"the demo needs Gradio ({e}): pip install -e '.[demo]'") from None
    engine = args.engine or default_engine()
    app = build_app(engine, args.backend, args.precision, args.concurrency, args.max_queue)
    print(app.fewstep_demo.describe(), flush=True)
    app.launch(server_name=args.host, server_port=args.port, ssr_mode=False)


if __name__ == "__main__":
    main()
