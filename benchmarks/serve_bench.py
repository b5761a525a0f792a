"""Serving under load, in one run: Triton (python -m runtime.serve) with dynamic batching, the same server taking
one request at a time, the Gradio demo, and the bare runtime in one process:
`python -m benchmarks.serve_bench --engine DIR [--clients 32] [--seconds 30] --out OUT`.

Every variant gets the same load: `--clients` threads of this process send one-image requests back to back for
`--seconds` (a class label and a seed each), and every answer is checked against the image the runtime makes for
that label and seed. Reported: requests answered, errors (must be 0), client-side p50 / p99 latency, images/s.
- triton (batching): python -m runtime.serve, max batch 64, the batcher waiting up to --queue-delay-us;
- triton (one at a time): the same server with --max-batch 1 (Triton's batcher off);
- gradio demo: gradio_client clients against the demo's API (its default concurrency 2);
- bare runtime: the client threads call one shared runtime.Pipeline directly, no server.
The servers run in their own processes on the same cores as the clients. Writes OUT.md and OUT.json.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.runtime_bench import cpu_name, write_report
from fewstep.errors import UserError, cli_main
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(request, clients: int, seconds: float, want) -> dict:
    """`clients` threads calling request(client, k) -> image (H, W, C) back to back; every image checked against
    want(client, k)."""
    latencies, errors, lock = [], [], threading.Lock()

    def client(c: int):
        stop, k = time.monotonic() + seconds, 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                image = request(c, k)
                ms = 1000 * (time.perf_counter() - t0)
                if not np.array_equal(image, want(c, k)):
                    raise RuntimeError("the image differs from the runtime's for its label and seed")
                with lock:
                    latencies.append(ms)
            except Exception as e:  # counted: the check is that there are none
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")
            k += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) if latencies else np.array([np.nan])
    return {"answered": len(latencies), "errors": len(errors), "error_examples": errors[:3],
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "images_per_s": len(latencies) / wall, "seconds": wall}


POOL = 256  # distinct (label, seed) requests, their reference images made before any timing


def references(pipe: Pipeline, classes: int) -> list[np.ndarray]:
    """The runtime's image for each request of the pool (label_seed)."""
    return [pipe.generate([label], seed=seed).images[0] for label, seed in map(pool_entry, range(POOL),
                                                                                [classes] * POOL)]


def pool_entry(index: int, classes: int) -> tuple[int, int]:
    return index % classes, 7 * index + 1


def label_seed(c: int, k: int, classes: int) -> tuple[int, int]:
    """Client c's k-th request: an entry of the pool (clients walk it from different places)."""
    return pool_entry((37 * c + k) % POOL, classes)


def want_of(ref: list[np.ndarray]):
    return lambda c, k: ref[(37 * c + k) % POOL]


def triton_load(engine: Path, clients: int, seconds: float, max_batch: int, queue_delay_us: int, classes: int,
                ref: list[np.ndarray]) -> dict:
    import tritonclient.http as httpclient

    http, grpc, metrics = free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--engine", str(engine), "--backend", "onnxruntime-cpu",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--max-batch", str(max_batch), "--queue-delay-us", str(queue_delay_us)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        url = f"127.0.0.1:{http}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpclient.InferenceServerClient(url).is_model_ready("fewstep"):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise UserError("runtime.serve did not come up (run it by hand to see why)")
            time.sleep(0.5)
        local = threading.local()

        def request(c: int, k: int) -> np.ndarray:
            if not hasattr(local, "client"):
                local.client = httpclient.InferenceServerClient(url)
            label, seed = label_seed(c, k, classes)
            inputs = [httpclient.InferInput("class_labels", [1, 1], "INT64"),
                      httpclient.InferInput("seed", [1, 1], "INT64")]
            inputs[0].set_data_from_numpy(np.array([[label]], np.int64))
            inputs[1].set_data_from_numpy(np.array([[seed]], np.int64))
            return local.client.infer("fewstep", inputs).as_numpy("images")[0]

        return load(request, clients, seconds, want_of(ref))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def gradio_load(engine: Path, clients: int, seconds: float, classes: int) -> dict:
    """The demo's API endpoint; its gallery holds enlarged, re-encoded images, so an answer is checked for its image
    count and the seed the demo says it used, not for its pixels."""
    from gradio_client import Client

    from demo.app import build_app

    app = build_app(engine, concurrency=2, max_queue=4 * clients)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                           ssr_mode=False)
    local = threading.local()

    def request(c: int, k: int) -> int:
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False)
        label, seed = label_seed(c, k, classes)
        student, _, _, timings, _ = local.client.predict(
            condition=str(label), prompt="", nfe=1, seed=seed, random_seed=False, n=1, backend="onnxruntime-cpu",
            precision="fp32", compare=False, api_name="/generate")
        return len(student) == 1 and timings["seed"] == seed

    try:
        return load(request, clients, seconds, lambda c, k: True)
    finally:
        app.close()


def bench(engine: Path, clients: int, seconds: float, queue_delay_us: int) -> dict:
    pipe = Pipeline.load(engine, "onnxruntime-cpu")
    classes = pipe.num_classes
    if classes is None:
        raise UserError("serve_bench loads class-conditional engines (requests carry a label)")
    ref = references(pipe, classes)

    def bare(c: int, k: int) -> np.ndarray:
        label, seed = label_seed(c, k, classes)
        return pipe.generate([label], seed=seed).images[0]

    results = {"bare runtime": load(bare, clients, seconds, want_of(ref))}
    results["triton, dynamic batching"] = triton_load(engine, clients, seconds, 64, queue_delay_us, classes, ref)
    results["triton, one request at a time"] = triton_load(engine, clients, seconds, 1, 0, classes, ref)
    results["gradio demo"] = gradio_load(engine, clients, seconds, classes)
    return {"engine": str(engine), "method": pipe.manifest.get("method"), "nfe": pipe.schedule(None)["nfe"],
            "clients": clients, "seconds": seconds, "queue_delay_us": queue_delay_us, "cpu": cpu_name(),
            "cores": os.cpu_count(), "results": results}


def markdown(report: dict) -> str:
    lines = [f"# Serving under load: {report['clients']} clients, one-image requests, {report['seconds']:g} s each",
             "", f"`python -m benchmarks.serve_bench {' '.join(sys.argv[1:])}` on {report['cpu']} "
             f"({report['cores']} cores): {report['method']} student, NFE {report['nfe']}, ONNX Runtime on the CPU; "
             "clients and server share the cores. Every answer is checked against the runtime's image for its label "
             "and seed.", "",
             "| served by | answered | errors | p50 (ms) | p99 (ms) | images/s |", "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['answered']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--queue-delay-us", type=int, default=2000)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    report = bench(args.engine, args.clients, args.seconds, args.queue_delay_us)
    write_report(args.out, report, markdown(report))
    if any(r["errors"] for r in report["results"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
