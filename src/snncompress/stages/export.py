"""The ``export`` stage: write the previous spiking model as a NIR graph (``model.nir``) in the stage folder.

The mapping and its conventions are :mod:`snncompress.deploy.nir`'s. The stage
writes no checkpoint (the model passes on unchanged); it reads the file back,
checks that the imported model gives the same logits bit for bit on
``verify_images`` validation images, and reports that in its metrics.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from ..errors import UserError
from .base import StageContext, StageOptions, StageResult, calibration_images, register_stage

NIR_FILE = "model.nir"


class ExportOptions(StageOptions):
    """Export to NIR (the Neuromorphic Intermediate Representation) for other simulators and chips."""

    needs = "snn"

    kind: Literal["export"] = "export"
    format: Literal["nir"] = Field("nir", description="file format (NIR graph, HDF5)")
    dt: float = Field(1e-4, gt=0, le=1, description="simulation step the consumer must use (s): tau = dt / (1 - leak)")
    soft_reset: Literal["annotate", "refuse"] = Field(
        "annotate", description="soft reset: keep as node metadata reset='subtract', or refuse the model")
    leak_one: Literal["if", "lif"] = Field(
        "if", description="neurons with leak 1: IF nodes (r = 1/dt), or LIF nodes with tau = 1e8 dt (snnTorch)")
    verify_images: int = Field(8, ge=0, description="validation images on which the re-imported model must give "
                                                   "the same logits (0: skip)")


@register_stage("export", ExportOptions)
def export(ctx: StageContext, opts: ExportOptions) -> StageResult:
    """Write the previous spiking model as a NIR graph (model.nir) and check its round trip; no new checkpoint."""
    from ..deploy.nir import export_notes, load_nir, write_nir

    model = ctx.require_model("export")
    path = ctx.stage_dir / NIR_FILE
    graph = write_nir(model, path, dt=opts.dt, soft_reset=opts.soft_reset, leak_one=opts.leak_one)
    metrics = {"nir_file": ctx.relative(path), "nir_bytes": path.stat().st_size if path.exists() else None,
               "nir_nodes": len(graph.nodes), "nir_dt": opts.dt, "nir_notes": export_notes(graph)}
    if opts.verify_images and path.exists() and ctx.val_loader is not None:
        images = calibration_images(ctx.val_loader, opts.verify_images)
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
