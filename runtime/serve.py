"""Serve an engine folder on Triton Inference Server, on this machine:
`python -m runtime.serve --engine DIR [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001]
[--metrics-port 8002] [--max-batch 64] [--queue-delay-us 2000]`.

The server is a real `tritonserver`, the one NVIDIA's PyTriton ships (pip install "fewstep[serve]"; it runs on a
CPU-only machine too), started through PyTriton on a model repository holding runtime/triton_model.py, the
runtime behind Triton's Python backend: dynamic batching, HTTP and gRPC (KServe v2 protocol), health
(/v2/health/ready) and Prometheus metrics (/metrics). Loopback by default; --host 0.0.0.0 serves the network.

Why a model repository rather than PyTriton's bind(): a Triton Python-backend model answers each request of a
dynamic batch on its own, so one wrong request gets its own error and the requests batched with it are served;
a PyTriton callable fails every request of the batch together. The same model goes into the repositories
`python -m runtime.triton` writes for Triton containers, so what is served here is what is served there.
"""

import argparse
import os
import signal
import sys
import sysconfig
import tempfile
from pathlib import Path

from fewstep.errors import UserError, cli_main

from .manifest import read_manifest
from .pipeline import BACKENDS
from .triton import check_serving, python_model


def use_this_libpython() -> None:
    """Put this interpreter's libpython first on the library path of the processes started from here. Triton's
    Python backend runs models in a stub linked against libpython3.X.so, which the dynamic loader takes from the
    first place it finds one; where the system has another build of the same version (a distribution's beside
    pyenv's or conda's), the stub would run this interpreter's standard library on the other's libpython, and
    extension modules built for this one fail to import (seen: ssl, "undefined symbol")."""
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and name and (Path(libdir) / name).exists():
        paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


def triton_server(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, strict: bool = True):
    """A PyTriton Triton (not started) serving the model repository `repo`; not `strict`: it starts and serves the
    models that load even when others in the repository fail to."""
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise UserError("serving needs NVIDIA's PyTriton (it ships tritonserver): pip install \"fewstep[serve]\" "
                        "(Linux only)") from None
    use_this_libpython()
    config = TritonConfig(model_repository=repo, http_address=host, http_port=http_port, grpc_address=host,
                          grpc_port=grpc_port, metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=5,
                          log_verbose=0, exit_on_error=strict, strict_readiness=strict)
    return Triton(config=config)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True, help="an engine folder (python -m export.onnx)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="the runtime backend (default: auto)")
    p.add_argument("--precision", default="fp32", help="which network file (default fp32)")
    p.add_argument("--nfe", type=int, help="the NFE served (default: the engine's default schedule)")
    p.add_argument("--threads", type=int, help="intra-op threads of the backend (default: the backend's own)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=64, help="the largest batch Triton forms (default 64)")
    p.add_argument("--queue-delay-us", type=int, default=2000,
                   help="how long the batcher waits for more requests (default 2000 µs)")
    args = p.parse_args(argv)
    manifest = read_manifest(args.engine)
    check_serving(manifest, args.nfe, args.max_batch)
    with tempfile.TemporaryDirectory(prefix="fewstep-triton-") as tmp:
        repo = Path(tmp)
        python_model(repo, args.engine, manifest, copy_engine=False, backend=args.backend, precision=args.precision,
                     nfe=args.nfe, max_batch=args.max_batch, queue_delay_us=args.queue_delay_us, threads=args.threads)
        triton = triton_server(repo, args.host, args.http_port, args.grpc_port, args.metrics_port)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a terminated server stops tritonserver too
        with triton:
            triton.run()
            print(f"serving {args.engine} as model \"fewstep\": HTTP http://{args.host}:{args.http_port}, "
                  f"gRPC {args.host}:{args.grpc_port}, metrics http://{args.host}:{args.metrics_port}/metrics "
                  "(Ctrl-C stops)", flush=True)
            triton.serve()


if __name__ == "__main__":
    main()
