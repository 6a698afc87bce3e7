"""How far the synthetic prior's photos depict each object from its SDF (docs/synthetic-prior.md, "The photos'
object is larger than the SDF's"): the IoU of the exact (sphere-traced) silhouette against the photos' at the
16 held-out cameras, and the 3D accuracy of the photos' own field meshed at the export's density threshold.

    python3 infra/prior_silhouette_bias.py
"""

from dreamfusion.config import ExportConfig
from dreamfusion.evaluate import truth_silhouette_iou
from dreamfusion.geometry import mesh_accuracy
from dreamfusion.mesh import extract_mesh
from dreamfusion.prior.shapes import OBJECTS, SDFField


def main() -> None:
    print("| object | IoU of the exact silhouette against the photos' | Chamfer of the photos' field meshed at "
          f"density {ExportConfig.density_threshold:g} | F-score @2% |")
    print("|---|---|---|---|")
    for obj in OBJECTS:
        mesh = extract_mesh(SDFField(obj), ExportConfig.mesh_resolution, ExportConfig.density_threshold)
        accuracy = mesh_accuracy(obj.prompt, mesh)
        print(f"| {obj.prompt} | {truth_silhouette_iou(obj.prompt):.3f} | {accuracy['chamfer']:.4f} | "
              f"{accuracy['fscore']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
