"""Reading an engine folder's manifest (`fewstep_engine.json`, written by `python -m export.onnx`), with the checks
a host needs before it trusts it. The fields are described in docs/engine_spec.md."""

import json
from pathlib import Path

from .errors import UserError

ENGINE_MANIFEST = "fewstep_engine.json"
ENGINE_FORMAT_VERSION = 1  # the newest engine format this runtime reads


def read_manifest(engine_dir: str | Path) -> dict:
    """The checked manifest of an engine folder, with `schedules` ({nfe: schedule}) filled in."""
    engine_dir = Path(engine_dir)
    path = engine_dir / ENGINE_MANIFEST
    if not engine_dir.is_dir():
        raise UserError(f"engine folder {engine_dir} does not exist; export one with python -m export.onnx")
    if not path.exists():
        raise UserError(f"{engine_dir} has no {ENGINE_MANIFEST}: not a fewstep engine folder "
                        "(export one with python -m export.onnx)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); export the engine again") from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{path} has no format_version; export the engine again")
    if version > ENGINE_FORMAT_VERSION:
        raise UserError(f"{engine_dir} was written by a newer fewstep (engine format {version}); this runtime reads "
                        f"format {ENGINE_FORMAT_VERSION} and older: upgrade fewstep")
    for key in ("prediction_type", "inputs", "outputs", "files", "image", "conditioning"):
        if key not in manifest:
            raise UserError(f"{path} lacks {key!r}; export the engine again")
    schedules = manifest.get("schedules") or {}
    if "schedule" in manifest:  # engines that serve one NFE
        schedules = {str(manifest["schedule"]["nfe"]): manifest["schedule"], **schedules}
    if not schedules:
        raise UserError(f"{path} has no sampling schedule; export the engine again")
    manifest["schedules"] = {str(k): v for k, v in schedules.items()}
    return manifest
