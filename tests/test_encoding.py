import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamfusion.encoding import HashGridEncoding, level_resolutions

PRIMES = (1, 2654435761, 805459861)


def reference_encoding(encoder: HashGridEncoding, points: torch.Tensor) -> torch.Tensor:
    """Level by level, corner by corner, in int64 with uint32 wrap-around: the textbook definition."""
    outputs = []
    for level in range(encoder.levels):
        resolution = int(encoder.resolutions[level])
        size = int(encoder.level_sizes[level])
        offset = int(encoder.level_offsets[level])
        scaled = points * resolution
        cell = torch.minimum(scaled.floor(), torch.tensor(resolution - 1.0))
        frac = scaled - cell
        cell = cell.long()
        value = torch.zeros(points.shape[0], encoder.features_per_level, dtype=encoder.table.dtype)
        for corner in range(8):
            bits = torch.tensor([(corner >> d) & 1 for d in range(3)])
            vertex = cell + bits
            if (resolution + 1) ** 3 <= encoder.table_size:
                index = vertex[:, 0] + (resolution + 1) * (vertex[:, 1] + (resolution + 1) * vertex[:, 2])
            else:
                hashed = torch.zeros_like(vertex[:, 0])
                for d in range(3):
                    hashed ^= (vertex[:, d] * PRIMES[d]) & 0xFFFFFFFF
                index = hashed % size
            weight = torch.where(bits.bool(), frac, 1 - frac).prod(-1)
            value = value + weight[:, None] * encoder.table[offset + index]
        outputs.append(value)
    return torch.cat(outputs, dim=-1)


def test_matches_reference_on_dense_and_hashed_levels():
    torch.manual_seed(0)
    encoder = HashGridEncoding(levels=6, features_per_level=2, log2_table_size=12, base_resolution=4,
                               max_resolution=128)
    assert encoder.dense_count not in (0, encoder.levels), "test must cover both kinds of level"
    encoder.table.data.normal_()
    points = torch.rand(500, 3)
    points[:7] = torch.tensor([0.0, 0.5, 1.0])  # cell boundaries and the far corner
    torch.testing.assert_close(encoder(points), reference_encoding(encoder, points), rtol=1e-5, atol=1e-5)


def test_gradients_reach_table_and_points():
    torch.manual_seed(1)
    encoder = HashGridEncoding(levels=3, features_per_level=2, log2_table_size=10, base_resolution=4,
                               max_resolution=32).double()
    encoder.table.data.normal_()
    points = (torch.rand(20, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: encoder(p), (points,))
    encoder(points).sum().backward()
    assert encoder.table.grad is not None and encoder.table.grad.abs().sum() > 0


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 8), st.integers(2, 32), st.integers(1, 4))
def test_level_resolutions_grow_from_base_to_max(levels, base, factor):
    resolutions = level_resolutions(levels, base, base * factor)
    assert resolutions[0] == base
    assert all(b >= a for a, b in zip(resolutions, resolutions[1:], strict=False))
    assert resolutions[-1] <= base * factor


def test_dense_level_indexes_every_vertex_once():
    encoder = HashGridEncoding(levels=2, features_per_level=1, log2_table_size=12, base_resolution=4,
                               max_resolution=8)
    encoder.table.data = torch.arange(encoder.table.shape[0], dtype=torch.float32)[:, None]
    axis = torch.arange(5) / 4.0  # the 5 vertices per axis of level 0: all weight on one table row
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    rows = encoder(vertices)[:, 0].round().long()
    assert rows.unique().numel() == 125 and int(rows.min()) == 0 and int(rows.max()) == 124


def test_forward_with_jacobian_matches_autograd_on_dense_and_hashed_levels():
    torch.manual_seed(2)
    encoder = HashGridEncoding(levels=6, features_per_level=2, log2_table_size=12, base_resolution=4,
                               max_resolution=128).double()
    assert encoder.dense_count not in (0, encoder.levels)
    encoder.table.data.normal_()
    points = torch.rand(300, 3, dtype=torch.float64) * 1.2 - 0.1  # some outside [0, 1]: clamped, zero derivative
    with torch.no_grad():
        features, jacobian = encoder.forward_with_jacobian(points)
        torch.testing.assert_close(features, encoder(points))
    expected = torch.autograd.functional.jacobian(lambda p: encoder(p).sum(0), points, vectorize=True)
    torch.testing.assert_close(jacobian, expected.permute(1, 2, 0))  # [N, 3, D] from [D, N, 3]
    outside = (points < 0) | (points > 1)
    assert outside.any() and float(jacobian.permute(0, 2, 1)[outside[:, None, :].expand(-1, 12, -1)].abs().max()) == 0


def test_forward_with_jacobian_backpropagates_like_the_double_backward():
    torch.manual_seed(3)
    encoder = HashGridEncoding(levels=3, features_per_level=2, log2_table_size=10, base_resolution=4,
                               max_resolution=32).double()
    encoder.table.data.normal_()
    points = torch.rand(50, 3, dtype=torch.float64)
    direction = torch.randn(50, 3, 6, dtype=torch.float64)
    _, jacobian = encoder.forward_with_jacobian(points)
    (jacobian * direction).sum().backward()
    analytic = encoder.table.grad.clone()
    encoder.table.grad = None
    tracked = points.clone().requires_grad_(True)
    features = encoder(tracked)
    rows = [torch.autograd.grad(features[:, k].sum(), tracked, create_graph=True)[0] for k in range(6)]
    (torch.stack(rows, -1) * direction).sum().backward()
    torch.testing.assert_close(analytic, encoder.table.grad)
