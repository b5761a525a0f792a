"""The engine manifest (fewstep_engine.json, docs/engine_spec.md): the schedules, the per-step scalars a host
needs, the graph's inputs and outputs, and the files with their parity."""

from pathlib import Path

import numpy as np
import torch

from .graph import GraphStudent, io_specs, loop_inputs

ENGINE_MANIFEST = "fewstep_engine.json"
ENGINE_FORMAT_VERSION = 1


def step_coefficients(schedule: dict, prediction_type: str, denoiser=None) -> list[dict]:
    """Per step of a schedule, the scalars a host's loop needs (docs/engine_spec.md), so it need not derive them.
    The runtime computes them itself (runtime/pipeline.py); tests/test_golden.py checks that both agree.

    x0 = x0_from_x * x + x0_from_prediction * prediction, with sigma as fed to the graph (float32);
    SFD ("renoise": "none"): x += euler_dt * (x - x0) / sigma, or with AFS on step 0 (no network call)
    x += euler_dt * input_scale * x; DMD2 ("fresh_noise"): x = x0 + renoise_sigma * the next noise draw."""
    sigmas, timesteps, renoise = schedule["sigmas"], schedule["timesteps"], schedule["renoise"]
    steps = []
    for i in range(len(sigmas) - 1 if renoise == "none" else len(sigmas)):
        s = float(np.float32(sigmas[i]))  # the x0 closed forms use the sigma the graph was fed
        if denoiser is None or denoiser.parameterization == "vp":
            x0_coefficients = {"epsilon": (1.0, -s), "v_prediction": (1 / (1 + s * s), -s / np.sqrt(1 + s * s)),
                               "sample": (0.0, 1.0)}[prediction_type]
            input_scale = 1 / float(np.sqrt(1 + sigmas[i] ** 2))
        else:  # the family's own (c_skip, c_out) and c_in
            sig = torch.tensor([s], dtype=torch.float64)
            x0_coefficients = [float(c) for c in denoiser.scalings(sig)]
            input_scale = float(denoiser.scale_input(torch.ones(1, dtype=torch.float64),
                                                     torch.tensor([float(sigmas[i])], dtype=torch.float64)))
        step = {"sigma": sigmas[i], "timestep": timesteps[i],
                "network_call": not (renoise == "none" and schedule["afs"] and i == 0),
                "input_scale": input_scale,
                "x0_from_x": float(x0_coefficients[0]), "x0_from_prediction": float(x0_coefficients[1])}
        if renoise == "none":
            step["euler_dt"] = sigmas[i + 1] - sigmas[i]
        else:
            step["renoise_sigma"] = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        steps.append(step)
    return steps


def engine_manifest(bundle, nfe: int, model: GraphStudent, files: dict, feed: dict | None = None) -> dict:
    """The engine manifest of the student's network; `feed`: one of its loop inputs (default: a pixel student's)."""
    m = bundle.manifest
    feed = loop_inputs(bundle, nfe, 1)[0] if feed is None else feed
    inputs = io_specs(model.input_names, feed)
    extra = {"class_labels": {"range": [0, (bundle.num_classes or 0) - 1]}, "nfe": {"value": nfe},
             "time_ids": {"value": feed["time_ids"][0].tolist() if "time_ids" in feed else None}}
    for spec in inputs:
        spec.update(extra.get(spec["name"], {}))

    def schedule(k: int) -> dict:
        sig = bundle.sigmas(k)
        entry = {"nfe": k, "sigmas": [float(s) for s in sig],
                 "timesteps": [float(t) for t in bundle.denoiser.net_time(sig)],
                 "afs": bool(m["nfe"][str(k)].get("afs", False)), "renoise": m["renoise"],
                 "first_input": "noise * sigmas[0]"}
        return entry | {"steps": step_coefficients(entry, m["prediction_type"], bundle.denoiser)}

    return {"format_version": ENGINE_FORMAT_VERSION, "method": m["method"], "family": m["family"],
            "graph": "prediction = network(c_in(sigma) x, timestep, ...): x in VE form (x = x0 + sigma * eps), c_in "
                     "the parameterization's input scaling; feed timestep = the schedule's timestep for each sigma; "
                     "x0 from prediction_type and parameterization (runtime/convention.py)",
            "prediction_type": m["prediction_type"],
            **{k: v for k, v in bundle.denoiser.spec().items() if k in ("parameterization", "sigma_data")},
            "inputs": inputs,
            "outputs": io_specs(model.output_names, {"prediction": feed["x"]}),
            # `schedule`: the NFE export checked (parity, quality gate) and the runtime's default; `schedules`: every
            # NFE the network serves (an SFD-v network takes the step count as an input)
            "schedule": schedule(nfe), "schedules": {str(k): schedule(k) for k in bundle.nfes},
            "conditioning": m["conditioning"], "image": m["image"], "files": files,
            "student": {"bundle": str(Path(bundle.source).resolve()), "metrics": m.get("metrics", {}),
                        "teacher": m.get("teacher")}}
