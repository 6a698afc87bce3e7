"""Triton kernels against their PyTorch references: in Triton's interpreter on the CPU (CI, where
conftest sets TRITON_INTERPRET=1), compiled on the GPU where CUDA is present and TRITON_INTERPRET=0
(``infra/gpu_check.sh``).

Tolerances (float32): forward values 1e-5 absolute and relative; gradients 1e-4 relative (atomic
accumulation order differs from the reference's).
"""

import pytest
import torch

from dreamfusion.encoding import HashGridEncoding
from dreamfusion.errors import UserInputError
from dreamfusion.trainer import Trainer
from tests.conftest import tiny_config
from triton_kernels import BackendUnavailable, resolve
from triton_kernels.backend import triton_interpreted
from triton_kernels.composite import STOP_TRANSMITTANCE, composite_reference, composite_triton
from triton_kernels.hashgrid import hash_encode_reference, hash_encode_triton
from triton_kernels.march import (
    march_rays_reference,
    march_rays_triton,
    occupancy_update_reference,
    occupancy_update_triton,
)

pytest.importorskip("triton")
FORWARD = {"rtol": 1e-5, "atol": 1e-5}
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_interpreted() else "cpu")
pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and not triton_interpreted(),
                                reason="compiled Triton kernels need CUDA; on the CPU set TRITON_INTERPRET=1")


def grad_close(a, b):
    scale = max(float(b.abs().max()), 1.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


def layout(levels=6, log2=12, base=4, top=128, features=2):
    encoder = HashGridEncoding(levels, features, log2, base, top, backend="torch").to(DEVICE)
    encoder.table.data.normal_()
    return encoder, (encoder.resolutions, encoder.level_offsets, encoder.level_sizes, encoder.dense_count)


@pytest.mark.parametrize("count", [1, 129, 300])
def test_hash_encode_matches_reference(count):
    torch.manual_seed(count)
    encoder, args = layout()
    assert 0 < encoder.dense_count < encoder.levels  # dense and hashed levels both covered
    points = torch.rand(count, 3)
    points[: min(count, 4)] = torch.tensor([0.0, 0.25, 1.0])  # cell boundaries, the far corner
    points = points.to(DEVICE)
    outputs, grads = [], []
    for fn in (hash_encode_reference, hash_encode_triton):
        p = points.clone().requires_grad_(True)
        table = encoder.table.detach().clone().requires_grad_(True)
        out = fn(p, table, *args)
        out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).reshape(out.shape))
        outputs.append(out.detach())
        grads.append((p.grad, table.grad))
    torch.testing.assert_close(outputs[1], outputs[0], **FORWARD)
    grad_close(grads[1][0], grads[0][0])
    grad_close(grads[1][1], grads[0][1])


def test_hash_encode_second_derivative_for_normals():
    torch.manual_seed(3)
    encoder, args = layout(levels=3, log2=10)
    points = torch.rand(40, 3).to(DEVICE)
    results = []
    for fn in (hash_encode_reference, hash_encode_triton):
        p = points.clone().requires_grad_(True)
        table = encoder.table.detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(fn(p, table, *args).sum(), p, create_graph=True)
        gradient.square().sum().backward()
        results.append(table.grad)
    grad_close(results[1], results[0])


def packed_case(rays=70, samples=33, channels=3):
    """Packed samples with ragged counts: a ray with no sample, a fully opaque ray that terminates after its
    first sample, a ray of empty space."""
    torch.manual_seed(rays)
    count = torch.randint(1, samples + 1, (rays,))
    if rays > 2:
        count[0] = 0
        count[1:3] = samples
    start = torch.cumsum(count, 0) - count
    total = int(count.sum())
    sigma = torch.rand(total) * 5
    if rays > 2:
        sigma[start[1]] = 1e4
        sigma[start[2]:start[2] + samples] = 0.0
    colour = torch.rand(total, channels)
    delta = torch.rand(total) * 0.1
    t = torch.rand(total)
    return tuple(x.to(DEVICE) for x in (sigma, colour, delta, t, start, count))


def dense_composite(sigma, colour, delta, t, stop_transmittance=STOP_TRANSMITTANCE):
    """Compositing of ``[R, S]`` samples, the layout before packing; an absent sample has zero density."""
    optical = sigma * delta
    before = torch.exp(-(torch.cumsum(optical, dim=1) - optical))
    weights = torch.where(before >= stop_transmittance, (1.0 - torch.exp(-optical)) * before, 0.0)
    return weights, (weights[..., None] * colour).sum(1), weights.sum(1), (weights * t).sum(1)


def run_composite(fn, case):
    sigma, colour, delta, t, start, count = case
    s = sigma.clone().requires_grad_(True)
    c = colour.clone().requires_grad_(True)
    outs = fn(s, c, delta, t, start, count)
    generator = torch.Generator().manual_seed(1)
    sum((o * torch.randn(o.shape, generator=generator).to(o.device)).sum() for o in outs).backward()
    return [o.detach() for o in outs], s.grad, c.grad


@pytest.mark.parametrize("rays, samples, channels", [(70, 33, 3), (1, 5, 3), (65, 8, 1)])
def test_composite_matches_reference(rays, samples, channels):
    case = packed_case(rays, samples, channels)
    want, got = run_composite(composite_reference, case), run_composite(composite_triton, case)
    for a, b in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(a, b, **FORWARD)
    grad_close(got[1], want[1])
    grad_close(got[2], want[2])
    weights, start, count = got[0][0], case[4], case[5]
    if rays > 2:
        assert float(got[0][2][0]) == 0.0  # no sample: no opacity
        first = int(start[1])
        assert float(weights[first]) == pytest.approx(1.0)
        assert float(weights[first + 1:first + int(count[1])].abs().max()) == 0.0  # terminated
        assert float(got[1][first + 1:first + int(count[1])].abs().max()) == 0.0  # and no gradient behind
        assert float(got[0][2][2]) == 0.0


def test_packed_compositing_matches_the_dense_layout_and_its_gradients():
    sigma, colour, delta, t, start, count = packed_case(70, 33, 3)
    rays, samples = count.shape[0], 33
    slot = torch.arange(samples, device=DEVICE)[None, :]
    present = slot < count[:, None]  # each ray's samples first, absent ones after them
    packed_outs, packed_sigma_grad, packed_colour_grad = run_composite(composite_reference, (
        sigma, colour, delta, t, start, count))

    def dense(values):
        out = torch.zeros((rays, samples) + values.shape[1:], device=DEVICE)
        out[present] = values
        return out

    s = dense(sigma).requires_grad_(True)
    c = dense(colour).requires_grad_(True)
    outs = dense_composite(s, c, dense(delta), dense(t))
    generator = torch.Generator().manual_seed(1)
    weights_grad = torch.randn(int(count.sum()), generator=generator).to(DEVICE)
    per_ray = [torch.randn(o.shape, generator=generator).to(DEVICE) for o in outs[1:]]
    (dense(weights_grad) * outs[0]).sum().backward(retain_graph=True)
    sum((o * g).sum() for o, g in zip(outs[1:], per_ray, strict=True)).backward()
    torch.testing.assert_close(packed_outs[0], outs[0].detach()[present], **FORWARD)
    for a, b in zip(packed_outs[1:], outs[1:], strict=True):
        torch.testing.assert_close(a, b.detach(), **FORWARD)
    grad_close(packed_sigma_grad, s.grad[present])
    grad_close(packed_colour_grad, c.grad[present])


def march_case(rays=50, samples=17):
    torch.manual_seed(0)
    origins = torch.randn(rays, 3)
    origins = 2 * origins / origins.norm(dim=-1, keepdim=True)
    directions = -origins / 2 + 0.1 * torch.randn(rays, 3)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    near = torch.rand(rays)
    far = near + torch.rand(rays) * 2
    far[:5] = near[:5]  # rays that miss the bounds
    offsets = torch.rand(rays, samples)
    return tuple(x.to(DEVICE) for x in (origins, directions, near, far, offsets))


def test_march_packs_exactly_the_samples_in_occupied_cells():
    origins, directions, near, far, offsets = march_case()
    rays, samples = offsets.shape
    every = march_rays_reference(origins, directions, near, far, offsets, None)
    assert every.count.tolist() == [0] * 5 + [samples] * (rays - 5)
    occupied = (torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).to(DEVICE)
    cell = ((every.points + 1.0) * 0.5 * 8).long().clamp(0, 7)
    inside = occupied[cell[:, 0], cell[:, 1], cell[:, 2]]
    kept = march_rays_reference(origins, directions, near, far, offsets, occupied)
    assert 0 < len(kept) < len(every)
    torch.testing.assert_close(kept.points, every.points[inside])
    torch.testing.assert_close(kept.t, every.t[inside])
    assert torch.equal(kept.ray, every.ray[inside])
    assert torch.equal(kept.count, torch.bincount(every.ray[inside], minlength=rays))
    assert torch.equal(kept.start, torch.cumsum(kept.count, 0) - kept.count)
    assert torch.equal(kept.select(kept.t > 0.5).t, kept.t[kept.t > 0.5])


def test_march_and_occupancy_update_match_reference():
    origins, directions, near, far, offsets = march_case()
    empty = torch.zeros(8, 8, 8, dtype=torch.bool, device=DEVICE)
    for occupied in ((torch.rand(8, 8, 8) > 0.5).to(DEVICE), None, empty):
        want = march_rays_reference(origins, directions, near, far, offsets, occupied)
        got = march_rays_triton(origins, directions, near, far, offsets, occupied)
        for name in ("points", "t"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **FORWARD)
        for name in ("ray", "start", "count"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    density = torch.rand(4, 4, 4)
    density[0, 0, 0] = float("inf")
    fresh = torch.rand(4, 4, 4)
    density, fresh = density.to(DEVICE), fresh.to(DEVICE)
    for a, b in zip(occupancy_update_triton(density, fresh, 0.95, 0.5),
                    occupancy_update_reference(density, fresh, 0.95, 0.5), strict=True):
        torch.testing.assert_close(a, b)


def test_sds_step_with_triton_backend_matches_torch():
    """Same seed, same step: the loss and every parameter gradient agree between the backends.

    Gradients are compared rather than updated weights: Adam turns a ~1e-12 gradient of either sign
    into a full +-lr step, which says nothing about the kernels.
    """
    runs = []
    for backend in ("torch", "triton"):
        trainer = Trainer(tiny_config(iterations=1, extra=[f"field.backend={backend}", f"device={DEVICE}",
                                                           "render.batch_size=1",
                                                           "render.resolution=12", "render.shading_ratios=0,1,0",
                                                           "render.albedo_warmup_fraction=0",
                                                           # progress rows through the interpreted kernels: minutes
                                                           "export.progress_snapshots=0"]))
        grads = []
        original_step = trainer.optimizer.step

        def capture(*args, trainer=trainer, grads=grads, original_step=original_step, **kwargs):
            grads.append({n: p.grad.clone() for n, p in trainer.field.named_parameters() if p.grad is not None})
            return original_step(*args, **kwargs)

        trainer.optimizer.step = capture
        runs.append((trainer.train_step()["loss"], grads[0]))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    for name, grad in runs[0][1].items():
        grad_close(runs[1][1][name], grad)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve("auto", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        resolve("triton", cpu)
    with pytest.raises(UserInputError, match="runs on CUDA tensors"):
        Trainer(tiny_config(extra=["field.backend=triton", "device=cpu"]))
    with pytest.raises(BackendUnavailable, match="tiny-cuda-nn"):
        resolve("tcnn", cpu)
