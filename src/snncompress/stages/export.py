"""The ``export`` stage: write the previous spiking model as a NIR graph (``model.nir``) or as a C99
engine folder (``c/``, :mod:`snncompress.deploy.c`) in the stage folder.

The NIR mapping and its conventions are :mod:`snncompress.deploy.nir`'s: the stage reads the
file back and checks that the imported model gives the same logits bit for bit on
``verify_images`` validation images. For ``format: c`` it runs the engine's numpy reference
(the C build's arithmetic, bit for bit) on those images and reports how many predictions
agree with the PyTorch model. The stage writes no checkpoint (the model passes on unchanged).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from ..data import calibration_batch
from ..errors import UserError
from .base import StageContext, StageOptions, StageResult, register_stage

NIR_FILE = "model.nir"
C_FOLDER = "c"


class ExportOptions(StageOptions):
    """Export to NIR (the Neuromorphic Intermediate Representation) for other simulators and chips."""

    needs = "snn"

    kind: Literal["export"] = "export"
    format: Literal["nir", "c"] = Field("nir", description="nir: NIR graph (HDF5); c: C99 engine folder")
    dt: float = Field(1e-4, gt=0, le=1, description="simulation step the consumer must use (s): tau = dt / (1 - leak)")
    soft_reset: Literal["annotate", "refuse"] = Field(
        "annotate", description="soft reset: keep as node metadata reset='subtract', or refuse the model")
    leak_one: Literal["if", "lif"] = Field(
        "if", description="neurons with leak 1: IF nodes (r = 1/dt), or LIF nodes with tau = 1e8 dt (snnTorch)")
    pack_weights: bool = Field(False, description="format c: store integer weight codes as a bit stream of their "
                                                  "width (flash = footprint; each run unpacked at inference)")
    verify_images: int = Field(8, ge=0, description="validation images on which the re-imported model must give "
                                                   "the same logits (0: skip)")


@register_stage("export", ExportOptions)
def export(ctx: StageContext, opts: ExportOptions) -> StageResult:
    """Write the previous spiking model as a NIR graph (model.nir) and check its round trip; no new checkpoint."""
    from ..deploy.nir import export_notes, load_nir, write_nir

    model = ctx.require_model("export")
    if opts.format == "c":
        return _export_c(ctx, opts, model)
    path = ctx.stage_dir / NIR_FILE
    graph = write_nir(model, path, dt=opts.dt, soft_reset=opts.soft_reset, leak_one=opts.leak_one)
    metrics = {"nir_file": ctx.relative(path), "nir_bytes": path.stat().st_size if path.exists() else None,
               "nir_nodes": len(graph.nodes), "nir_dt": opts.dt, "nir_notes": export_notes(graph)}
    if opts.verify_images and path.exists() and ctx.val_loader is not None:
        images = calibration_batch(ctx.val_loader, opts.verify_images)
        reference, back = copy.deepcopy(model).cpu().eval(), load_nir(path)  # both on the CPU: bit for bit
        with torch.no_grad():
            before, after = reference(images.cpu()), back(images.cpu())
        if not torch.equal(before, after):
            raise UserError(f"stage {opts.name}: the model read back from {NIR_FILE} computes different logits "
                            f"(max |diff| {float((before - after).abs().max()):.3g})")
        metrics["nir_roundtrip_images"] = int(images.shape[0])
        metrics["nir_roundtrip_identical"] = True
    for note in metrics["nir_notes"]:
        print(f"[{opts.name}] note: {note}", flush=True)
    return StageResult(None, metrics)


def _export_c(ctx: StageContext, opts: ExportOptions, model) -> StageResult:
    """Write the C engine folder; compare the reference engine's predictions with the model's."""
    import numpy as np

    from ..deploy.c import run_reference, write_c_folder

    folder = ctx.stage_dir / C_FOLDER
    reference = copy.deepcopy(model).cpu().eval()
    engine = write_c_folder(reference, folder, ctx.info.mean, ctx.info.std,
                            f"{model.spec.get('arch')}, T = {model.timesteps}, stage {opts.name}",
                            pack_weights=opts.pack_weights)
    metrics = {"c_folder": ctx.relative(folder), "c_integer": engine.integer,
               "c_bytes": sum(p.stat().st_size for p in folder.iterdir())}
    if opts.verify_images and ctx.val_loader is not None:
        images = calibration_batch(ctx.val_loader, opts.verify_images).cpu()
        mean = torch.tensor(ctx.info.mean).view(1, -1, 1, 1)
        std = torch.tensor(ctx.info.std).view(1, -1, 1, 1)
        pixels = torch.round((images * std + mean) * 255).clamp(0, 255).to(torch.uint8).numpy()
        with torch.no_grad():
            expected = reference(images).argmax(1).numpy()
        got = np.array([run_reference(engine, image).prediction for image in pixels])
        metrics["c_verify_images"] = int(len(got))
        metrics["c_agreeing_predictions"] = int((got == expected).sum())
    return StageResult(None, metrics)
