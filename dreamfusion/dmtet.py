"""DMTet (Shen et al. 2021): a deformable tetrahedral grid carrying a signed distance, turned into a triangle
mesh by marching tetrahedra, differentiably in the SDF values and the vertex offsets.

The grid is generated here: a cube lattice, each cube split into six tetrahedra around its main diagonal
(the Kuhn/Freudenthal split, which is face-conforming across neighbouring cubes, so the extracted surface is
closed and watertight wherever the SDF's zero set does not leave the grid).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

# The six tetrahedra of a unit cube, as paths from corner 000 to corner 111 along the axes in each order;
# corners are numbered x + 2y + 4z.
_AXIS_BITS = (1, 2, 4)
CUBE_TETS = tuple(
    (0, first, first + second, 7)
    for first, second, _ in (tuple(_AXIS_BITS[i] for i in order) for order in itertools.permutations(range(3)))
)
# A tetrahedron's six edges as pairs of its corners.
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _triangle_table() -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the 16 inside/outside patterns of a tet's corners (bit i: corner i inside), up to two
    triangles as triples of edge indices (-1: none), and how many. The winding is fixed later, from the
    undeformed grid, so the table only has to pick the right edges in cyclic order."""
    table = torch.full((16, 6), -1, dtype=torch.long)
    counts = torch.zeros(16, dtype=torch.long)
    edge_index = {pair: k for k, pair in enumerate(TET_EDGES)}

    def edge(a: int, b: int) -> int:
        return edge_index[(min(a, b), max(a, b))]

    for pattern in range(1, 15):
        inside = [i for i in range(4) if pattern >> i & 1]
        outside = [i for i in range(4) if not pattern >> i & 1]
        if len(inside) == 1 or len(outside) == 1:
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            table[pattern, :3] = torch.tensor([edge(lone, o) for o in others])
            counts[pattern] = 1
        else:  # a quad through the four edges between the two pairs, in cyclic order
            (i, j), (k, l) = inside, outside
            quad = [edge(i, k), edge(i, l), edge(j, l), edge(j, k)]
            table[pattern] = torch.tensor([quad[0], quad[1], quad[2], quad[0], quad[2], quad[3]])
            counts[pattern] = 2
    return table, counts


TRIANGLE_TABLE, TRIANGLE_COUNT = _triangle_table()


@dataclass
class TetGrid:
    """Vertices ``[V, 3]`` of a lattice with ``resolution`` cubes a side over ``[-scale, scale]^3`` and its
    tetrahedra ``[T, 4]`` (vertex indices)."""

    vertices: torch.Tensor
    tets: torch.Tensor
    resolution: int
    scale: float

    def to(self, device: torch.device | str) -> TetGrid:
        return TetGrid(self.vertices.to(device), self.tets.to(device), self.resolution, self.scale)


def tet_grid(resolution: int, scale: float = 1.0) -> TetGrid:
    """The lattice's ``(resolution + 1)^3`` vertices and ``6 · resolution^3`` tetrahedra."""
    n = resolution + 1
    axis = torch.linspace(-scale, scale, n)
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    cube = torch.arange(resolution)
    x, y, z = (c.reshape(-1) for c in torch.meshgrid(cube, cube, cube, indexing="ij"))
    base = (x * n + y) * n + z
    # corner number c = bx + 2 by + 4 bz, offset in the flattened lattice (x major, z minor)
    offsets = torch.tensor([(c & 1) * n * n + (c >> 1 & 1) * n + (c >> 2 & 1) for c in range(8)])
    corners = base[:, None] + offsets[None]  # [C, 8]
    tets = corners[:, torch.tensor(CUBE_TETS)].reshape(-1, 4)
    return TetGrid(vertices, tets, resolution, scale)


@dataclass
class TetMesh:
    """A triangle mesh from marching tetrahedra: ``vertices`` ``[M, 3]`` (differentiable), ``faces`` ``[F, 3]``
    wound outwards, and for each mesh vertex the grid edge it lies on (``edges`` ``[M, 2]``)."""

    vertices: torch.Tensor
    faces: torch.Tensor
    edges: torch.Tensor


def marching_tetrahedra(positions: torch.Tensor, sdf: torch.Tensor, tets: torch.Tensor,
                        rest_positions: torch.Tensor | None = None) -> TetMesh:
    """The zero set of ``sdf`` (negative inside) over the tetrahedra: one mesh vertex on each grid edge whose
    ends differ in sign, at the linear zero crossing between the (deformed) ``positions`` of its ends, shared
    by every tetrahedron around the edge. Faces are wound so their normals point from inside to outside, as
    judged on ``rest_positions`` (the undeformed grid, where no tetrahedron is inverted; default
    ``positions``)."""
    device = positions.device
    inside = sdf < 0
    corner_inside = inside[tets]  # [T, 4]
    count_inside = corner_inside.sum(-1)
    crossing = (count_inside > 0) & (count_inside < 4)
    tets = tets[crossing]
    corner_inside = corner_inside[crossing]
    if tets.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return TetMesh(positions.new_zeros(0, 3), empty.reshape(0, 3), empty.reshape(0, 2))

    pair = torch.tensor(TET_EDGES, device=device)
    tet_edges = tets[:, pair]  # [T, 6, 2]
    tet_edges = torch.sort(tet_edges, dim=-1).values
    stride = positions.shape[0]
    keys = tet_edges[..., 0] * stride + tet_edges[..., 1]  # [T, 6]
    edge_crosses = inside[tet_edges[..., 0]] != inside[tet_edges[..., 1]]
    unique_keys, key_index = torch.unique(keys[edge_crosses], return_inverse=True)
    vertex_of_edge = torch.full(keys.shape, -1, dtype=torch.long, device=device)
    vertex_of_edge[edge_crosses] = key_index
    edges = torch.stack([unique_keys // stride, unique_keys % stride], dim=-1)

    a, b = edges[:, 0], edges[:, 1]
    sdf_a, sdf_b = sdf[a][:, None], sdf[b][:, None]
    # The zero of the linear interpolation: a + (b - a) · sdf_a / (sdf_a - sdf_b).
    vertices = (positions[a] * sdf_b - positions[b] * sdf_a) / (sdf_b - sdf_a)

    pattern = (corner_inside.long() * torch.tensor([1, 2, 4, 8], device=device)).sum(-1)
    table, counts = TRIANGLE_TABLE.to(device), TRIANGLE_COUNT.to(device)
    per_tet = counts[pattern]
    first = torch.gather(vertex_of_edge, 1, table[pattern, :3])
    second = torch.gather(vertex_of_edge, 1, table[pattern, 3:].clamp_min(0))
    faces = torch.cat([first, second[per_tet == 2]], dim=0)
    owner = torch.cat([torch.arange(len(tets), device=device), torch.nonzero(per_tet == 2).squeeze(1)])

    # Orientation on the undeformed grid: the face normal should point from the tet's inside corners to its
    # outside ones.
    rest = positions if rest_positions is None else rest_positions
    with torch.no_grad():
        rest_sdf = sdf.detach()
        ra, rb = rest[edges[:, 0]], rest[edges[:, 1]]
        sa, sb = rest_sdf[edges[:, 0]][:, None], rest_sdf[edges[:, 1]][:, None]
        rest_vertices = (ra * sb - rb * sa) / (sb - sa)
        corners = rest[tets[owner]]  # [F, 4, 3]
        mask = corner_inside[owner].float()[..., None]
        inner = (corners * mask).sum(1) / mask.sum(1)
        outer = (corners * (1 - mask)).sum(1) / (1 - mask).sum(1)
        p0, p1, p2 = (rest_vertices[faces[:, i]] for i in range(3))
        normal = torch.cross(p1 - p0, p2 - p0, dim=-1)
        flip = (normal * (outer - inner)).sum(-1) < 0
    faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    return TetMesh(vertices, faces, edges)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (differentiable)."""
    p0, p1, p2 = (vertices[faces[:, i]] for i in range(3))
    face_normal = torch.cross(p1 - p0, p2 - p0, dim=-1)  # length: twice the area
    summed = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), face_normal.repeat_interleave(3, dim=0))
    return summed / summed.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    p0, p1, p2 = (vertices[faces[:, i]] for i in range(3))
    normal = torch.cross(p1 - p0, p2 - p0, dim=-1)
    return normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def face_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """For each face and each of its edges (``(0, 1)``, ``(1, 2)``, ``(2, 0)``), the face across that edge,
    ``[F, 3]``; -1 on a boundary edge (or a non-manifold one)."""
    device = faces.device
    count = faces.shape[0]
    neighbours = torch.full((count, 3), -1, dtype=torch.long, device=device)
    if count == 0:
        return neighbours
    edges = torch.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], dim=1).reshape(-1, 2)
    slot = torch.arange(count * 3, device=device)
    ordered = torch.sort(edges, dim=-1).values
    stride = int(faces.max()) + 1
    keys = ordered[:, 0] * stride + ordered[:, 1]
    order = torch.argsort(keys)
    keys, slot = keys[order], slot[order]
    same = keys[1:] == keys[:-1]
    before = torch.cat([torch.tensor([False], device=device), same[:-1]])
    after = torch.cat([same[1:], torch.tensor([False], device=device)])
    index = torch.nonzero(same & ~before & ~after).squeeze(1)
    first, second = slot[index], slot[index + 1]
    flat = neighbours.reshape(-1)
    flat[first] = second // 3
    flat[second] = first // 3
    return neighbours


def face_adjacency(neighbours: torch.Tensor) -> torch.Tensor:
    """Each pair of faces sharing an edge once, ``[P, 2]``, from ``face_neighbours``."""
    face = torch.arange(neighbours.shape[0], device=neighbours.device)[:, None].expand_as(neighbours)
    once = neighbours > face  # also drops boundary edges (-1)
    return torch.stack([face[once], neighbours[once]], dim=-1)


def normal_consistency(vertices: torch.Tensor, faces: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """Mean ``1 − cos`` between the normals of faces that share an edge: small on a smooth surface."""
    if adjacency.shape[0] == 0:
        return vertices.sum() * 0.0
    normals = face_normals(vertices, faces)
    return (1.0 - (normals[adjacency[:, 0]] * normals[adjacency[:, 1]]).sum(-1)).mean()


def laplacian_smoothness(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each vertex from its neighbours' centroid (the uniform Laplacian), in units of
    the mesh's own mean edge length squared, so that it does not depend on the grid's cell size."""
    if faces.shape[0] == 0:
        return vertices.sum() * 0.0
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], dim=0)
    edges = torch.cat([edges, edges.flip(1)], dim=0)
    total = torch.zeros_like(vertices).index_add(0, edges[:, 0], vertices[edges[:, 1]])
    degree = torch.zeros(vertices.shape[0], device=vertices.device).index_add(
        0, edges[:, 0], torch.ones(edges.shape[0], device=vertices.device))
    used = degree > 0
    offset = vertices[used] - total[used] / degree[used, None]
    scale = (vertices[edges[:, 0]] - vertices[edges[:, 1]]).detach().norm(dim=-1).mean().clamp_min(1e-12)
    return (offset**2).sum(-1).mean() / scale**2
