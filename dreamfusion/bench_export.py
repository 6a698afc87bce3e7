"""``dreamfusion bench export``: what the exported mesh costs and how close it is to the field, per synthetic
object, at the synthetic prior's export defaults, at the real backends' (``REAL_MODEL_EXPORT``) and decimated
to 2,000 faces (where a vertex colour has to stand for a large patch of surface and a texture does not).

The fields are the objects' analytic shapes (``SDFField``), so the table measures the exporter alone: the
faces and texture it writes, the seconds from density grid to files, and ``mesh_psnr`` /
``mesh_silhouette_iou`` of the textured mesh and, beside them, of the same mesh with vertex colours (what
the texture buys).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dreamfusion.benchmarks import _machine, _write
from dreamfusion.config import REAL_MODEL_EXPORT, ExportConfig
from dreamfusion.evaluate import held_out_cameras
from dreamfusion.export import write_viewer
from dreamfusion.mesh import bake_texture, extract_mesh, mesh_fidelity, write_textured
from dreamfusion.prior.shapes import OBJECTS, SDFField

LOG = logging.getLogger(__name__)
SETTINGS = {
    "synthetic": (ExportConfig.mesh_resolution, ExportConfig.max_faces, ExportConfig.texture_size),
    "real": (REAL_MODEL_EXPORT["export.mesh_resolution"], REAL_MODEL_EXPORT["export.max_faces"],
             REAL_MODEL_EXPORT["export.texture_size"]),
    "decimated": (ExportConfig.mesh_resolution, 2000, ExportConfig.texture_size),
}


def _export_one(field: SDFField, resolution: int, max_faces: int, texture_size: int) -> dict[str, Any]:
    started = time.perf_counter()
    mesh = extract_mesh(field, resolution, ExportConfig.density_threshold,
                        min_component_share=ExportConfig.min_component_share, max_faces=max_faces)
    textured = bake_texture(field, mesh, texture_size)
    with tempfile.TemporaryDirectory() as directory:
        write_textured(textured, mesh, Path(directory))
        write_viewer(textured, Path(directory) / "viewer.html", "bench")
    seconds = time.perf_counter() - started
    cameras = held_out_cameras()
    size, samples = ExportConfig.eval_resolution, ExportConfig.eval_samples_per_ray
    texture = mesh_fidelity(field, textured.trimesh(), cameras, size, samples)
    vertex = mesh_fidelity(field, mesh, cameras, size, samples)
    return {"faces": len(textured.faces), "texture_size": texture_size, "export_seconds": seconds,
            "mesh_psnr": texture["mesh_psnr"], "mesh_silhouette_iou": texture["mesh_silhouette_iou"],
            "vertex_colour_psnr": vertex["mesh_psnr"]}


def export(out: Path, settings: tuple[str, ...] = tuple(SETTINGS)) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    results: dict[str, dict[str, Any]] = {}
    for name in settings:
        for obj in OBJECTS:
            LOG.info("export %s at the %s defaults %s", obj.prompt, name, SETTINGS[name])
            results[f"{name}: {obj.prompt}"] = _export_one(SDFField(obj), *SETTINGS[name])
    table = ["| settings: object | faces | texture | export s | mesh PSNR (texture) | mesh PSNR (vertex colours) "
             "| mesh silhouette IoU |", "|---|---|---|---|---|---|---|"]
    for key, row in results.items():
        table.append(f"| {key} | {row['faces']} | {row['texture_size']}² | {row['export_seconds']:.1f} | "
                     f"{row['mesh_psnr']:.1f} | {row['vertex_colour_psnr']:.1f} | {row['mesh_silhouette_iou']:.3f} |")
    payload = {"machine": _machine(torch.device("cpu")), "command": "dreamfusion bench export",
               "settings": {name: dict(zip(("mesh_resolution", "max_faces", "texture_size"), SETTINGS[name],
                                           strict=True)) for name in settings},
               "results": results}
    _write(out, "export", payload, table)
    return payload
