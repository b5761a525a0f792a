"""Load check of the demo: `python -m demo.load [--engine DIR | --url URL] --clients 8 --seconds 30`.

Starts the demo on a free loopback port (or targets a running one on this machine), runs `--clients` concurrent
gradio_client clients on the "generate" endpoint for `--seconds`, checks that every request was answered with the
images it asked for, and prints p50 / p90 latency: as a client sees it (queue and transport included) and as the
runtime reports it (total_ms). Exit status 1 when a request failed.
"""

import argparse
import json
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from runtime.errors import UserError, cli_main

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def client_loop(url: str, seconds: float, images: int, seed: int, results: list, errors: list) -> None:
    """One client: requests back to back until the time is up (each answered request: (client ms, runtime ms))."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    stop = time.monotonic() + seconds
    k = 0
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        try:
            student, _, _, timings, _ = client.predict(
                condition="all", prompt="", nfe=1, seed=seed + k, random_seed=False, n=images,
                backend="onnxruntime-cpu", precision="fp32", compare=False, api_name="/generate")
            if len(student) != images:
                raise RuntimeError(f"asked for {images} images, got {len(student)}")
            results.append((1000 * (time.perf_counter() - t0), timings["total_ms"]))
        except Exception as e:  # counted and reported: the check is that there are none
            errors.append(f"{type(e).__name__}: {e}")
        k += 1


def run_load(url: str, clients: int, seconds: float, images: int) -> dict:
    results, errors = [], []
    threads = [threading.Thread(target=client_loop, args=(url, seconds, images, 1000 * i, results, errors))
               for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client_ms = np.array([r[0] for r in results])
    runtime_ms = np.array([r[1] for r in results])

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else float("nan")

    return {"clients": clients, "seconds": round(wall, 1), "images_per_request": images,
            "requests": len(results) + len(errors), "answered": len(results), "failed": len(errors),
            "requests_per_s": len(results) / wall,
            "client_ms": {"p50": pct(client_ms, 50), "p90": pct(client_ms, 90), "max": pct(client_ms, 100)},
            "runtime_ms": {"p50": pct(runtime_ms, 50), "p90": pct(runtime_ms, 90)},
            "errors": errors[:5]}


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m demo.load", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--engine", type=Path, help="serve this engine folder (default: the quickstart's, as python -m "
                                                   "demo does)")
    where.add_argument("--url", help="a demo already running on this machine (loopback only), e.g. "
                                     "http://127.0.0.1:7860/")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--concurrency", type=int, default=2, help="the served demo's concurrency limit")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 600:
        raise UserError("--clients must lie in 1..64 and --seconds in (0, 600]")
    app = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            raise UserError(f"--url must point at this machine ({', '.join(LOOPBACK)}); got {args.url}")
        url = args.url
    else:
        from .__main__ import default_engine
        from .app import build_app

        app = build_app(args.engine or default_engine(), concurrency=args.concurrency, max_queue=4 * args.clients)
        _, url, _ = app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                               ssr_mode=False)
        print(app.fewstep_demo.describe(), flush=True)
    print(f"{args.clients} clients for {args.seconds:g} s on {url} ...", flush=True)
    try:
        report = run_load(url, args.clients, args.seconds, args.images)
    finally:
        if app is not None:
            app.close()
    c, r = report["client_ms"], report["runtime_ms"]
    print(f"{report['answered']} of {report['requests']} requests answered ({report['requests_per_s']:.1f}/s, "
          f"{args.images} image{'s' * (args.images > 1)} each); latency p50 {c['p50']:.0f} ms, p90 {c['p90']:.0f} ms "
          f"as clients see it; the runtime's own p50 {r['p50']:.1f} ms, p90 {r['p90']:.1f} ms")
    print(json.dumps(report))
    if report["failed"]:
        print(f"FAILED: {report['failed']} requests, e.g. {report['errors'][0]}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
