"""On a CUDA machine: whole runs on the GPU and the memory options that only mean something there.

Skipped elsewhere (CI has no GPU). ``infra/gpu_check.sh`` runs these with TRITON_INTERPRET=0, so the
Triton kernels are compiled rather than interpreted; ``tests/test_triton_kernels.py`` then checks the
compiled kernels against their references on CUDA tensors.
"""

import gc
import math

import pytest
import torch

from dreamfusion.pipeline import compute_metrics, finish_run, load_run, mesh_if_any
from dreamfusion.trainer import Trainer
from tests.conftest import tiny_config
from triton_kernels import resolve
from triton_kernels.backend import triton_interpreted

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or triton_interpreted(),
                                reason="needs CUDA, with TRITON_INTERPRET=0 (infra/gpu_check.sh)")

CUDA = torch.device("cuda")
LAMBERTIAN = ["render.shading_ratios=0,1,0", "render.albedo_warmup_fraction=0"]


@pytest.mark.parametrize("refine", [[], ["refine.iterations=3", "refine.resolution=16", "refine.grid_resolution=24"]],
                         ids=["stage-1", "refined"])
def test_whole_run_on_the_gpu_exports_and_reloads(tmp_path, refine):
    assert resolve("auto", CUDA) == "triton"
    trainer = Trainer(tiny_config(iterations=30, extra=["device=cuda", *refine]))
    assert all(p.is_cuda for p in trainer.field.parameters())
    trainer.train()
    summary = finish_run(trainer, tmp_path / "run", wall_seconds=0.0)
    assert summary["skipped_steps"] == 0
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    for name in summary["artifacts"].values():
        assert (tmp_path / "run" / name).stat().st_size > 0
    reloaded, _ = load_run(tmp_path / "run")
    for (name, a), b in zip(trainer.field.state_dict().items(), reloaded.field.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name)


def table_gradient(extra: list[str]) -> torch.Tensor:
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(iterations=4, extra=["device=cuda", *LAMBERTIAN, *extra]))
    trainer.train_step()
    assert trainer.skipped_steps == 0
    return trainer.field.encoder.table.grad.clone()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_gives_nearly_the_float32_gradient(dtype):
    exact, reduced = table_gradient([]), table_gradient([f"render.autocast={dtype}"])
    cosine = torch.nn.functional.cosine_similarity(exact.flatten(), reduced.flatten(), dim=0)
    assert float(cosine) > 0.95


def test_field_checkpointing_gives_the_same_gradient_with_less_memory():
    # Large enough that the MLP's activations, not the hash table, dominate the peak.
    size = ["render.resolution=64", "render.samples_per_ray=96", "render.batch_size=4", "field.hidden_dim=64",
            "field.hidden_layers=2", "render.occupancy_grid=false"]
    gradients, peaks = [], []
    for checkpointing in ("false", "true"):
        gc.collect()  # the previous trainer's tensors must not count towards this peak
        torch.cuda.reset_peak_memory_stats()
        gradients.append(table_gradient([*size, f"field.checkpointing={checkpointing}"]))
        peaks.append(torch.cuda.max_memory_allocated())
    scale = max(float(gradients[0].abs().max()), 1e-12)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-4 * scale)
    assert peaks[1] < peaks[0]



def test_refinement_on_the_gpu_uses_the_torch_zbuffer_and_matches_embree():
    from dreamfusion.evaluate import held_out_cameras
    from dreamfusion.rasterizer import embree_visibility, resolve_visibility, zbuffer

    trainer = Trainer(tiny_config(iterations=10, extra=["device=cuda", "refine.iterations=3", "refine.resolution=16",
                                                        "refine.grid_resolution=24"]))
    trainer.train()
    mesh = trainer.refiner.mesh()
    assert resolve_visibility("auto", mesh.vertices.device) == "torch" and mesh.vertices.is_cuda
    cameras = held_out_cameras()
    on_gpu = zbuffer(mesh.vertices.detach(), mesh.faces, cameras, 64).cpu()
    on_cpu = embree_visibility(mesh.vertices.detach().cpu(), mesh.faces.cpu(), cameras, 64)
    assert (on_gpu == on_cpu).float().mean() > 0.995
    # The refined run's metrics on the GPU: its renders reach the CPU's ground truth and geometry code.
    metrics = compute_metrics(trainer, mesh=mesh_if_any(trainer))
    assert 0.0 <= metrics["silhouette_iou"] <= 1.0 and metrics["chamfer"] > 0
