"""The whole few-step sampler as one ONNX graph: `python -m export.sampler --engine DIR [--nfe 1,4]
[--precision fp32]` (also `python -m export.onnx --sampler-graph`).

An engine folder's network file serves one network call; the host runs the loop around it (runtime/pipeline.py).
The sampler graph holds the loop too: the K network calls unrolled, the per-step arithmetic of the manifest's
`steps` between them, and the uint8 conversion at the end, so any ONNX server (ONNX Runtime, OpenVINO, TensorRT,
Triton) makes a whole generation in one call:

    class_labels (N,) int64                      [class-conditional engines]
    encoder_hidden_states, ... (N, ...) float32  [text-to-image engines: the prompt embeddings]
    noise (N, draws, C, H, W) float32   ->   images (N, H, W, C) uint8

`noise` is the runtime's caller noise (Pipeline.generate(noise=...)): draws = NFE for DMD2 engines (the start
noise, then the fresh noise of each later step), 1 for SFD engines. Batch first, so Triton's dynamic batcher can
stack requests. The K calls share one copy of the weights: each call's nodes are the network's nodes with their
intermediate tensors renamed per call, reading the same initializers.

Text-to-image engines take the prompt embeddings their text encoders make (runtime/text.py's encoding: the
network's condition inputs, as the manifest names them; tokenizing stays with the caller), and their VAE decoder
runs after the last call, inside the graph. The arithmetic between calls runs in float32 (the runtime's loop runs
it in float64), so a pixel can land one uint8 level apart where a value sits on a rounding boundary;
tests/test_sampler_graph.py measures it.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np

from fewstep.errors import UserError, cli_main

from .graph import needs_external_data
from .manifest import ENGINE_MANIFEST


def sampler_name(nfe: int, precision: str) -> str:
    return f"sampler_nfe{nfe}_{precision}.onnx"


class GraphBuilder:
    """Appends nodes and constants to one graph, naming each new tensor uniquely."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"sampler/{stem}_{self.count}"

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.fresh(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, value, dtype=np.float32, stem: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def scale(self, a: float, x: str) -> str:
        return self.op("Mul", [self.const(a), x])

    def axpby(self, a: float, x: str, b: float, y: str) -> str:
        """a x + b y, in float32."""
        return self.op("Add", [self.scale(a, x), self.scale(b, y)])


def hoist_constants(model) -> None:
    """Turn `model`'s Constant nodes into initializers, in place, so the unrolled calls share them as they share the
    weights (the exporter leaves folded tensors, some of them weight-sized, as Constant nodes)."""
    from onnx import helper

    kept = []
    for node in model.graph.node:
        value = [a for a in node.attribute if a.name == "value"] if node.op_type == "Constant" else []
        if value:
            tensor = helper.get_attribute_value(value[0])
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def copy_network_call(b: GraphBuilder, network, prefix: str, feeds: dict[str, str]) -> str:
    """The network's nodes once more, their tensors renamed with `prefix`, reading `feeds` (graph input name ->
    tensor) and the network's initializers under their own names (graph_initializers adds those once); returns the
    name of its output in this copy."""
    from onnx import AttributeProto, helper

    graph = network.graph
    shared = {t.name for t in graph.initializer}

    def rename(name: str) -> str:
        if not name or name in shared:
            return name
        return feeds.get(name, prefix + name)

    for node in graph.node:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise UserError(f"the network graph has a {node.op_type} node with a subgraph; the sampler graph "
                            "unrolls flat graphs only (re-export the student with python -m export.onnx)")
        copy = helper.make_node(node.op_type, [rename(n) for n in node.input], [rename(n) for n in node.output],
                                name=prefix + (node.name or node.output[0]), domain=node.domain)
        copy.attribute.extend(node.attribute)
        b.nodes.append(copy)
    return rename(graph.output[0].name)


def add_prefix(model, prefix: str) -> None:
    """Start every tensor name of `model` but its inputs (initializers included) with `prefix`, in place: a second
    network (the VAE decoder) whose weight names could collide with the first's."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    for t in graph.initializer:
        t.name = prefix + t.name
    for node in graph.node:
        node.input[:] = [n if not n or n in inputs else prefix + n for n in node.input]
        node.output[:] = [prefix + n for n in node.output]
        node.name = prefix + (node.name or node.output[0])
    for o in graph.output:
        o.name = prefix + o.name


def sampler_graph(network, manifest: dict, nfe: int, decoder=None):
    """The ONNX model of `nfe`-step sampling through `network` (an onnx.ModelProto of the engine's network file, its
    weights loaded), following the manifest's schedule for `nfe`; latent engines: `decoder` (the engine's VAE
    decoder, latents -> image in [-1, 1]) after the loop. Both are rewritten in place and their weights move into
    the result: pass models loaded for this (a UNet's protobuf is gigabytes; no copy is made)."""
    from onnx import TensorProto, helper

    schedule = manifest["schedules"].get(str(nfe))
    if schedule is None:
        raise UserError(f"this engine serves NFE {', '.join(sorted(manifest['schedules'], key=int))}, not {nfe}")
    if "steps" not in schedule:
        raise UserError("this engine folder predates the manifest's per-step scalars; re-export it with "
                        "python -m export.onnx")
    latent = bool(manifest["image"].get("latent_shape"))
    if latent and decoder is None:
        raise UserError("a latent engine's sampler graph needs its VAE decoder (write_sampler reads it from the "
                        "engine folder)")
    names = [i["name"] for i in manifest["inputs"]]
    hoist_constants(network)
    image = manifest["image"]
    c, h, w = image["channels"], image["height"], image["width"]
    x_shape = list(image.get("latent_shape") or (c, h, w))
    draws = nfe if schedule["renoise"] == "fresh_noise" else 1

    b = GraphBuilder()
    conditions = condition_inputs(manifest)
    dtypes = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}
    inputs = [helper.make_tensor_value_info(i["name"], dtypes[i["dtype"]], i["shape"]) for i in conditions]
    inputs.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", draws, *x_shape]))
    batch = b.op("Slice", ["sampler_noise_shape", b.const([0], np.int64), b.const([1], np.int64)], "batch")
    b.nodes.insert(0, helper.make_node("Shape", ["noise"], ["sampler_noise_shape"], name="sampler/shape"))

    def per_row(value, dtype) -> str:  # a (N,) tensor of one value, N the request's batch
        return b.op("Expand", [b.const(value, dtype), batch], "row")

    def draw(i: int) -> str:  # noise[:, i]
        return b.op("Gather", ["noise", b.const(i, np.int64)], "draw", axis=1)

    x = b.scale(schedule["sigmas"][0], draw(0))
    x0, call = None, 0
    for i, step in enumerate(schedule["steps"]):
        if step["network_call"]:
            feeds = {"x": x, "sigma": per_row(step["sigma"], np.float32),
                     "timestep": per_row(step["timestep"], np.float32)}
            feeds |= {i["name"]: i["name"] for i in conditions}  # the condition: graph inputs, read by every call
            if "nfe" in names:
                feeds["nfe"] = per_row(nfe, np.int64)
            missing = set(names) - set(feeds)
            if missing:
                raise UserError(f"the sampler graph cannot feed the network's input(s) {', '.join(sorted(missing))}")
            prediction = copy_network_call(b, network, f"call{call}/", feeds)
            if network.graph.output[0].type.tensor_type.elem_type != TensorProto.FLOAT:
                prediction = b.op("Cast", [prediction], "prediction", to=TensorProto.FLOAT)
            call += 1
            x0 = b.axpby(step["x0_from_x"], x, step["x0_from_prediction"], prediction)
        if schedule["renoise"] == "none":  # SFD: an Euler step, the first one analytical under AFS
            d = b.scale(step["input_scale"], x) if not step["network_call"] else \
                b.op("Div", [b.op("Sub", [x, x0]), b.const(step["sigma"])])
            x = b.op("Add", [x, b.scale(step["euler_dt"], d)], "x")
        elif i + 1 < len(schedule["steps"]):  # DMD2: re-noise x0 with the next draw
            x = b.op("Add", [x0, b.scale(step["renoise_sigma"], draw(i + 1))], "x")
    final = x if schedule["renoise"] == "none" else x0
    if latent:  # the VAE decoder once, its weights under their own prefix
        hoist_constants(decoder)
        add_prefix(decoder, "vae/")
        final = copy_network_call(b, decoder, "", {decoder.graph.input[0].name: final})
        b.initializers.extend(decoder.graph.initializer)
    # uint8 as runtime.to_uint8: round((clip(x, -1, 1) + 1) * 127.5), half to even, channels last
    clipped = b.op("Clip", [final, b.const(-1.0), b.const(1.0)])
    level = b.op("Round", [b.op("Mul", [b.op("Add", [clipped, b.const(1.0)]), b.const(127.5)])])
    b.nodes.append(helper.make_node("Transpose", [b.op("Cast", [level], to=TensorProto.UINT8)], ["images"],
                                    name="sampler/images", perm=[0, 2, 3, 1]))
    outputs = [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", h, w, c])]
    graph = helper.make_graph(b.nodes, f"fewstep_sampler_nfe{nfe}", inputs, outputs,
                              [*network.graph.initializer, *b.initializers])
    model = helper.make_model(graph, opset_imports=network.opset_import, producer_name="fewstep export.sampler")
    model.ir_version = network.ir_version
    model.doc_string = f"{manifest.get('method', '?')} sampler, NFE {nfe}, {call} network calls sharing one copy " \
                       "of the weights (export/sampler.py)"
    return model


def condition_inputs(manifest: dict) -> list[dict]:
    """The network inputs the sampler graph takes from its caller, as the manifest specifies them: the class labels,
    or a text engine's prompt embeddings (encoder_hidden_states, and text_embeds / time_ids or pooled_projections:
    runtime/text.py's encoding of the prompts); the loop feeds the rest (x, sigma, timestep, nfe) itself."""
    return [i for i in manifest["inputs"] if i["name"] not in ("x", "sigma", "timestep", "nfe")]


def sampler_io(manifest: dict, nfe: int) -> dict:
    """The sampler graph's inputs and outputs, as the manifest's `inputs` / `outputs` write them."""
    schedule = manifest["schedules"][str(nfe)]
    image = manifest["image"]
    draws = nfe if schedule["renoise"] == "fresh_noise" else 1
    x_shape = list(image.get("latent_shape") or (image["channels"], image["height"], image["width"]))
    inputs = [dict(i) for i in condition_inputs(manifest)]
    inputs.append({"name": "noise", "dtype": "float32", "shape": ["batch", draws, *x_shape]})
    outputs = [{"name": "images", "dtype": "uint8",
                "shape": ["batch", image["height"], image["width"], image["channels"]]}]
    return {"inputs": inputs, "outputs": outputs}


def write_sampler(engine_dir: str | Path, nfe: int | None = None, precision: str = "fp32") -> Path:
    """Write engine_dir/sampler_nfe<nfe>_<precision>.onnx and record it in the manifest's `samplers`; returns its
    path. The graph is checked with onnx's checker and loaded once by ONNX Runtime where it is installed."""
    import onnx

    engine_dir = Path(engine_dir)
    manifest_path = engine_dir / ENGINE_MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{engine_dir} is not an engine folder (no {ENGINE_MANIFEST}); make one with "
                        "python -m export.onnx")
    manifest = json.loads(manifest_path.read_text())
    nfe = manifest["schedule"]["nfe"] if nfe is None else nfe
    entry = manifest["files"].get(precision)
    if entry is None or not entry["path"].endswith(".onnx") or entry.get("backend"):
        have = [k for k, v in manifest["files"].items() if v["path"].endswith(".onnx") and not v.get("backend")]
        raise UserError(f"{engine_dir} has no {precision} network file to unroll; it has {', '.join(have)}")
    network = onnx.load(str(engine_dir / entry["path"]))  # external weights, if any, load with it
    decoder = None
    if manifest.get("vae_decoder"):
        decoder = onnx.load(str(engine_dir / manifest["files"][manifest["vae_decoder"]["files"]["fp32"]]["path"]))
    model = sampler_graph(network, manifest, nfe, decoder)
    path = engine_dir / sampler_name(nfe, precision)
    tmp = path.with_name(path.name + ".tmp")
    weight_bytes = sum(t.ByteSize() for t in model.graph.initializer)
    large = needs_external_data(weight_bytes)
    onnx.save_model(model, str(tmp), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(tmp))
    try:
        import onnxruntime as ort

        ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    except ImportError:
        pass
    os.replace(tmp, path)
    samplers = manifest.setdefault("samplers", {}).setdefault(str(nfe), {})
    samplers[precision] = {"path": path.name, "network": entry["path"], "network_calls": nfe,
                           "weights_bytes": weight_bytes, **({"external_data": True} if large else {}),
                           **sampler_io(manifest, nfe)}
    tmp_manifest = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, manifest_path)
    return path


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.sampler", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True, help="an engine folder (python -m export.onnx)")
    p.add_argument("--nfe", help="comma-separated NFEs (default: the engine's default schedule)")
    p.add_argument("--precision", default="fp32", help="which network file to unroll (fp32, fp16, int8, int8-cpu)")
    args = p.parse_args(argv)
    nfes = [None] if args.nfe is None else [int(k) for k in args.nfe.split(",") if k.strip()]
    for nfe in nfes:
        path = write_sampler(args.engine, nfe, args.precision)
        print(f"{path}: the whole sampler in one graph ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
