"""Which step of a multi-step DMD2 student helps and which hurts (`python -m benchmarks.steps_probe BUNDLE ...`).

For digits-teacher students, on the reported metric's noise (seed 1, labels cycling, 1,000 samples), FD
against the training split of:
- the loop cut after each step (the x0 that step returns), also against the held-out split;
- the whole loop with the teacher's one call in place of the student's at one step: where that beats the
  whole student loop, training made that step worse than the network it started from;
- each step alone on real images noised to its sigma, student next to teacher.
"""

import argparse
import json
from pathlib import Path

import torch

from distill.errors import UserError, cli_main
from distill.run import EVAL_SEED  # the same noise as the reported FD


def loop(nets: list, x: torch.Tensor, sigmas: torch.Tensor, cond: dict, renoise: torch.Tensor) -> list:
    """The DMD2 loop with nets[k] at step k; the x0 of every step."""
    outs = []
    for k, net in enumerate(nets):
        x0 = net(x, sigmas[k].to(x).expand(len(x)), cond).float()
        outs.append(x0)
        if k + 1 < len(nets):
            x = x0 + sigmas[k + 1].item() * renoise[k]
    return outs


@torch.no_grad()
def probe(bundle_dir: Path, teacher, n: int = 1000) -> dict:
    from distill.bundle import load_bundle
    from distill.data import to_uint8
    from distill.digits.data import load_digits_split
    from distill.eval.metrics import digits_metric, digits_scores
    from distill.sample import noise_for, parse_labels

    bundle = load_bundle(bundle_dir)
    if bundle.manifest["method"] != "dmd2":
        raise UserError(f"{bundle_dir} is a {bundle.manifest['method']} student; the probe reads DMD2's "
                        "re-noising loop")
    metric = digits_metric()

    def fd(x0, labels):
        return metric(to_uint8(x0).numpy(), labels.numpy())["fd"]

    sigmas = bundle.sigmas(bundle.nfes[-1])
    steps = len(sigmas)
    labels = parse_labels("cycle", n, bundle.num_classes)
    cond = bundle.cond(labels)
    draws = noise_for(EVAL_SEED, 0, n, (steps, *bundle.x_shape))
    x, renoise = draws[:, 0] * sigmas[0].item(), draws[:, 1:].transpose(0, 1)
    student, real = bundle.denoiser, teacher.denoiser
    cuts = [digits_scores(to_uint8(x0).numpy()) for x0 in loop([student] * steps, x, sigmas, cond, renoise)]
    after, after_heldout = [c["fd"] for c in cuts], [c["fd_heldout"] for c in cuts]
    swapped = [fd(loop([real if i == k else student for i in range(steps)], x, sigmas, cond, renoise)[-1], labels)
               for k in range(steps)]
    images, image_labels = load_digits_split("train")
    images, image_labels = images[:n], image_labels[:n]
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    real_cond = {"class_labels": image_labels}
    alone = [{name: fd(net(images + s * eps, torch.full((len(images),), s), real_cond).float(), image_labels)
              for name, net in (("student", student), ("teacher", real))} for s in sigmas.tolist()]
    return {"bundle": str(bundle_dir), "sigmas": sigmas.tolist(), "fd_after_step": after,
            "fd_heldout_after_step": after_heldout,
            "fd_teacher_at_step": swapped, "fd_on_noised_real": alone, "n": n}


def table(result: dict) -> str:
    rows = ["| step | σ | FD of the loop cut here | held-out FD, cut here | FD, teacher at this step | "
            "student alone on noised real | teacher alone |", "|---:|---:|---:|---:|---:|---:|---:|"]
    heldout = result.get("fd_heldout_after_step")  # absent in probes written before it was measured
    for k, s in enumerate(result["sigmas"]):
        alone = result["fd_on_noised_real"][k]
        cut_heldout = f"{heldout[k]:.3f}" if heldout else "–"
        rows.append(f"| {k} | {s:.3g} | {result['fd_after_step'][k]:.3f} | {cut_heldout} | "
                    f"{result['fd_teacher_at_step'][k]:.3f} | {alone['student']:.3f} | {alone['teacher']:.3f} |")
    return f"`{result['bundle']}` ({result['n']} samples; FD of the whole student loop: " \
           f"{result['fd_after_step'][-1]:.3f})\n\n" + "\n".join(rows)


def teacher_of(bundle_dir: Path):
    """The digits teacher a bundle names in its manifest (the probe's FD is the digits metric)."""
    from distill.bundle import MANIFEST_NAME
    from distill.run import is_digits_teacher
    from distill.teachers import load_teacher

    manifest = Path(bundle_dir) / MANIFEST_NAME
    if not manifest.exists():
        raise UserError(f"{bundle_dir} is not a student bundle (no {MANIFEST_NAME})")
    teacher_dir = Path(json.loads(manifest.read_text())["teacher"])
    if not is_digits_teacher(teacher_dir):
        raise UserError(f"{bundle_dir}: its teacher {teacher_dir} is not the digits teacher; the probe measures FD "
                        "with the digits classifier")
    return load_teacher(teacher_dir)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.steps_probe", description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", type=Path, help="multi-step DMD2 student bundles of the digits teacher")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    results = []
    for bundle_dir in args.bundles:
        results.append(probe(bundle_dir, teacher_of(bundle_dir), args.samples))
        print(table(results[-1]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
