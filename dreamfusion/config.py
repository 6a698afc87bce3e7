"""Typed, validated configuration for one SDS optimisation.

Every leaf is addressable as ``section.key`` (``sds.guidance_scale``, ``optim.lr``), which is what
``--set`` on the command line and the platform's search spaces use.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

import torch

from dreamfusion.errors import UserInputError


@dataclass
class FieldConfig:
    levels: int = 8
    features_per_level: int = 2
    log2_table_size: int = 15
    base_resolution: int = 16
    max_resolution: int = 256
    hidden_dim: int = 32
    hidden_layers: int = 2
    blob_density: float = 5.0
    blob_radius: float = 0.5
    # The synthetic prior's photos lie on a uniform backdrop (guidance.prior_backdrop, mid-grey): a learned
    # background takes the object's colour there (docs/synthetic-prior.md), so its default is that
    # backdrop, fixed. Real backends default to "learned" (BACKEND_DEFAULTS).
    background: str = "fixed"
    background_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    backend: str = "auto"
    checkpointing: bool = False  # recompute the MLP's activations in the backward pass (less memory)
    # Normals (the density's gradient) for shaded steps: "analytic" carries the derivative forward
    # through the encoding and the MLP; "autograd" differentiates a backward pass (create_graph), as
    # most NeRF code does. The same values; analytic skips the double backward. (tiny-cuda-nn
    # encodings expose no derivative: field.backend=tcnn always uses autograd.)
    normals: str = "analytic"

    def validate(self) -> None:
        _positive(self, "levels", "features_per_level", "base_resolution", "hidden_dim", "hidden_layers")
        _in_range(self, "log2_table_size", 8, 24)
        if self.max_resolution < self.base_resolution:
            raise UserInputError(
                f"field.max_resolution ({self.max_resolution}) must be >= field.base_resolution "
                f"({self.base_resolution})"
            )
        _non_negative(self, "blob_density")
        _positive(self, "blob_radius")
        _choice(self, "background", ("learned", "fixed"))
        _choice(self, "backend", ("auto", "torch", "triton", "tcnn"))
        _choice(self, "normals", ("analytic", "autograd"))
        for channel in self.background_color:
            if not 0.0 <= channel <= 1.0:
                raise UserInputError("field.background_color channels must lie in [0, 1], e.g. 1,1,1")


@dataclass
class CameraConfig:
    radius_range: tuple[float, float] = (2.1, 2.3)
    elevation_range: tuple[float, float] = (-10.0, 70.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    fov_range: tuple[float, float] = (44.0, 46.0)
    light_jitter_degrees: float = 30.0
    front_angle: float = 90.0
    overhead_elevation: float = 60.0

    def validate(self) -> None:
        for name in ("radius_range", "elevation_range", "azimuth_range", "fov_range"):
            low, high = getattr(self, name)
            if low > high:
                raise UserInputError(f"camera.{name}: low ({low}) > high ({high}); write it as low,high")
        if self.radius_range[0] <= 1.0:
            raise UserInputError("camera.radius_range must stay outside the unit bounding sphere (> 1.0)")
        if not (-90.0 <= self.elevation_range[0] and self.elevation_range[1] <= 90.0):
            raise UserInputError("camera.elevation_range must lie within [-90, 90] degrees")
        if not (0.0 < self.fov_range[0] and self.fov_range[1] < 180.0):
            raise UserInputError("camera.fov_range must lie within (0, 180) degrees")
        _in_range(self, "front_angle", 1.0, 359.0)
        _in_range(self, "light_jitter_degrees", 0.0, 90.0)


@dataclass
class RenderConfig:
    resolution: int = 32
    samples_per_ray: int = 48
    batch_size: int = 4
    occupancy_grid: bool = True
    occupancy_resolution: int = 32
    occupancy_update_every: int = 16
    # A cell is empty when its density, over one march step (2 / samples_per_ray), would dim a ray by
    # less than this optical thickness, or when it is below the grid's mean density (see OccupancyGrid).
    occupancy_threshold: float = 0.01
    occupancy_warmup_steps: int = 64  # steps before the grid skips anything (it is updated from step 0)
    shading_ratios: tuple[float, float, float] = (0.2, 0.5, 0.3)
    albedo_warmup_fraction: float = 0.1
    ambient: float = 0.3
    diffuse: float = 0.7
    textureless_albedo: float = 0.75
    autocast: str = "off"  # the field's forward under torch.autocast: off, bf16, fp16 (CUDA only)

    def validate(self) -> None:
        _in_range(self, "resolution", 8, 1024)
        _in_range(self, "samples_per_ray", 4, 1024)
        _in_range(self, "batch_size", 1, 256)
        _in_range(self, "occupancy_resolution", 4, 256)
        _positive(self, "occupancy_update_every")
        _non_negative(self, "occupancy_threshold", "occupancy_warmup_steps")
        if len(self.shading_ratios) != 3 or min(self.shading_ratios) < 0 or sum(self.shading_ratios) <= 0:
            raise UserInputError(
                "render.shading_ratios needs three non-negative weights (albedo, lambertian, textureless) "
                "with a positive sum, e.g. 0.2,0.5,0.3"
            )
        _in_range(self, "albedo_warmup_fraction", 0.0, 1.0)
        _in_range(self, "ambient", 0.0, 1.0)
        _in_range(self, "diffuse", 0.0, 1.0)
        _in_range(self, "textureless_albedo", 0.0, 1.0)
        _choice(self, "autocast", ("off", "bf16", "fp16"))


@dataclass
class SDSConfig:
    # 1 (the conditional alone) for the synthetic prior, whose denoiser is the exact conditional: guidance
    # only extrapolates from one whole photo to another object's. Real backends default to the paper's
    # 100 (BACKEND_DEFAULTS); DreamFusion's mode-seeking Janus problem appears here at 7.5.
    guidance_scale: float = 1.0
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_final: float = 0.3
    weighting: str = "sds"
    view_dependent: bool = True
    lambda_orientation: float = 0.001
    lambda_opacity: float = 0.001
    lambda_entropy: float = 0.0
    # Janus controls. A negative prompt takes the place of the unconditional branch of guidance ("{prompt}" in
    # it stands for the run's prompt); Perp-Neg (Armandpour et al. 2023) subtracts, per render, the part of
    # the front / side / back views' guidance directions perpendicular to the render's own, weighted by
    # azimuth as stable-dreamfusion does: weight perp_neg_weight × guidance_scale, decaying as
    # exp(-r × decay) with the render's nearness r to that view (defaults: 2, 2 for the front, 10 for the
    # side). view_embedding=interpolated blends the front/side/back conditions by azimuth (and overhead by
    # elevation) instead of the nearest label.
    negative_prompt: str = ""
    perp_neg: bool = False
    perp_neg_weight: float = 2.0
    perp_neg_front_decay: float = 2.0
    perp_neg_side_decay: float = 10.0
    view_embedding: str = "labels"

    def validate(self) -> None:
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise UserInputError(
                f"sds.guidance_scale must be a finite number >= 0, got {self.guidance_scale}"
            )
        for name in ("t_min", "t_max", "t_max_final"):
            _in_range(self, name, 0.0, 1.0, open_low=True)
        if not self.t_min < self.t_max:
            raise UserInputError(f"sds.t_min ({self.t_min}) must be < sds.t_max ({self.t_max})")
        if not self.t_min < self.t_max_final <= self.t_max:
            raise UserInputError(
                f"sds.t_max_final ({self.t_max_final}) must lie in (sds.t_min, sds.t_max]"
                f" = ({self.t_min}, {self.t_max}]"
            )
        _choice(self, "weighting", ("sds", "uniform", "sqrt"))
        _non_negative(self, "lambda_orientation", "lambda_opacity", "lambda_entropy")
        _non_negative(self, "perp_neg_weight", "perp_neg_front_decay", "perp_neg_side_decay")
        _choice(self, "view_embedding", ("labels", "interpolated"))
        if len(self.negative_prompt) > MAX_PROMPT_CHARS or any(ord(c) < 32 for c in self.negative_prompt):
            raise UserInputError(f"sds.negative_prompt must be one line of at most {MAX_PROMPT_CHARS} characters")
        if self.view_embedding == "interpolated" and not self.view_dependent:
            raise UserInputError("sds.view_embedding=interpolated is a kind of view-dependent conditioning: set "
                                 "sds.view_dependent=true, or sds.view_embedding=labels")


@dataclass
class OptimConfig:
    lr: float = 0.02
    mlp_lr_ratio: float = 0.5
    lr_final_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)

    def validate(self) -> None:
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise UserInputError(f"optim.lr must be a positive number, got {self.lr}")
        _positive(self, "mlp_lr_ratio", "lr_final_ratio")
        _non_negative(self, "weight_decay", "grad_clip")
        for beta in self.betas:
            if not 0.0 <= beta < 1.0:
                raise UserInputError("optim.betas must lie in [0, 1), e.g. 0.9,0.99")


GUIDANCE_BACKENDS = ("synthetic", "stable-diffusion", "deepfloyd-if")
MAX_PROMPT_CHARS = 1000
DEFAULT_MODELS = {"stable-diffusion": "stabilityai/stable-diffusion-2-1-base", "deepfloyd-if": "DeepFloyd/IF-I-XL-v1.0"}
# The assets users of stable-dreamfusion and threestudio get; the synthetic prior's CPU runs keep the
# smaller ExportConfig defaults so the quickstart fits its budget.
REAL_MODEL_EXPORT: dict[str, Any] = {"export.mesh_resolution": 256, "export.max_faces": 50000,
                                     "export.texture_size": 1024, "export.video_resolution": 512,
                                     "export.video_frames": 120, "export.video_fps": 30}
# What a backend changes unless the user sets it: the paper's guidance scale of 100 for real models
# (whose CFG needs it, unlike the synthetic prior's exact denoiser) and 64×64 renders.
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {},
    # Stage 2 as the anchors run it (threestudio's magic3d-refine-sd): 512² renders (Stable Diffusion's VAE
    # input) on a 128 tet grid. IF stage I sees 64² pixels: finer renders would be averaged down before it,
    # so its stage 2 renders 128² (2x supersampled silhouettes) on the same grid.
    "stable-diffusion": {"sds.guidance_scale": 100.0, "render.resolution": 64, "field.background": "learned",
                         "refine.resolution": 512, "refine.grid_resolution": 128, **REAL_MODEL_EXPORT},
    "deepfloyd-if": {"sds.guidance_scale": 100.0, "render.resolution": 64, "field.background": "learned",
                     "refine.resolution": 128, "refine.grid_resolution": 128, **REAL_MODEL_EXPORT},
}


# How the synthetic prior's photos are drawn: "volume", a volume render of the object's soft VolSDF density,
# whose silhouette lies 2-5% of the radius outside the surface (docs/synthetic-prior.md); "surface", the true
# surface sphere-traced and antialiased (dreamfusion.prior.synthetic.render_surface_photos).
PRIOR_PHOTO_KINDS = ("volume", "surface")


@dataclass
class GuidanceConfig:
    backend: str = "synthetic"
    model: str = ""  # stable-diffusion / deepfloyd-if: a local directory or a Hugging Face hub id
    prior_resolution: int = 32
    prior_views: int = 128
    front_bias: float = 0.7
    # Grey level behind the synthetic objects in the prior's photos and the ground truth. Mid-grey: on
    # white, a white or cream object barely differs from its backdrop and its opacity is hardly learned.
    prior_backdrop: float = 0.5
    # How the synthetic prior's photos are drawn (PRIOR_PHOTO_KINDS). Stage 1's stay the volume renders that
    # every figure of docs/benchmarks/quality.md was measured with; the refinement's finer prior has its own
    # key, refine.prior_photos.
    prior_photos: str = "volume"
    # What view-dependent conditioning gives the synthetic prior: "camera" (the render's camera direction:
    # each prompt's prior_camera_neighbours photos nearest it, as a camera-conditioned model such as
    # Zero-1-to-3 or MVDream sees a view) or "view_label" (front/side/back/overhead, as a text-to-image
    # model gets them in the prompt, as in the paper). Camera by default: a finite photo set under a view
    # label answers from viewpoints tens of degrees off the render's, and those targets disagree between
    # steps enough to erase a house's walls (docs/synthetic-prior.md).
    prior_conditioning: str = "camera"
    prior_camera_neighbours: int = 2
    # Share of the steps during which the synthetic prior answers with each condition's mean photo (its
    # posterior at infinite noise) instead of its posterior at the sampled t: see SyntheticGuidance.
    prior_mean_warmup_fraction: float = 0.0
    dtype: str = "auto"  # the diffusion network's precision: auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, fp32
    checkpointing: str = "auto"  # activation checkpointing of the VAE encoder: auto (torch), torch, deepspeed, off
    latent_fraction: float = 0.0  # stable-diffusion: first fraction of steps renders latent colour directly
    compile: bool = False  # torch.compile the diffusion network

    def validate(self) -> None:
        _choice(self, "backend", GUIDANCE_BACKENDS)
        if self.backend != "synthetic" and not self.model.strip():
            raise UserInputError(
                f"guidance.backend {self.backend} needs a model: pass --model PATH_OR_HUB_ID "
                f"(e.g. {DEFAULT_MODELS[self.backend]})"
            )
        _choice(self, "dtype", ("auto", "fp16", "bf16", "fp32"))
        _choice(self, "checkpointing", ("auto", "deepspeed", "torch", "off"))
        _in_range(self, "latent_fraction", 0.0, 1.0)
        _in_range(self, "prior_resolution", 8, 256)
        _in_range(self, "prior_views", 8, 4096)
        _in_range(self, "front_bias", 0.0, 1.0)
        _in_range(self, "prior_backdrop", 0.0, 1.0)
        _choice(self, "prior_photos", PRIOR_PHOTO_KINDS)
        _choice(self, "prior_conditioning", ("view_label", "camera"))
        _in_range(self, "prior_mean_warmup_fraction", 0.0, 1.0)
        if not 1 <= self.prior_camera_neighbours <= self.prior_views:
            raise UserInputError(
                f"guidance.prior_camera_neighbours must lie in [1, guidance.prior_views = {self.prior_views}],"
                f" got {self.prior_camera_neighbours}"
            )


@dataclass
class ExportConfig:
    mesh_resolution: int = 96
    # Connected components with fewer faces than this share of the largest are floaters, dropped.
    min_component_share: float = 0.05
    max_faces: int = 20000  # decimated to at most this many faces (0: as marching cubes made it)
    texture_size: int = 512  # the baked albedo texture's side in texels
    video_frames: int = 24
    video_resolution: int = 64
    video_fps: int = 12
    # The mesh's iso-level. Trained fields have soft edges: at 10 the surface sits inside the rendered
    # silhouette (the quickstart's cube: mesh_silhouette_iou 0.66), at 3 it matches it (0.94-0.98).
    density_threshold: float = 3.0
    preview_resolution: int = 96
    # progress.png: renders at fixed cameras at this many evenly spaced steps of training, and at the
    # end; the way to see how a shape formed (or collapsed). 0: none.
    progress_snapshots: int = 12
    progress_resolution: int = 48
    # Quality metrics (synthetic prompts): renders at held-out cameras. Lower them only for quick
    # checks; published numbers use the defaults.
    eval_resolution: int = 64
    eval_samples_per_ray: int = 96

    def validate(self) -> None:
        _positive(self, "density_threshold")
        _in_range(self, "mesh_resolution", 16, 512)
        _in_range(self, "min_component_share", 0.0, 1.0)
        _in_range(self, "max_faces", 0, 10_000_000)
        if 0 < self.max_faces < 100:
            raise UserInputError(f"export.max_faces must be 0 (no decimation) or at least 100, got {self.max_faces}")
        _in_range(self, "texture_size", 16, 8192)
        _in_range(self, "video_frames", 2, 720)
        _in_range(self, "video_resolution", 16, 1024)
        _in_range(self, "video_fps", 1, 120)
        _in_range(self, "preview_resolution", 16, 1024)
        _in_range(self, "progress_snapshots", 0, 1000)
        _in_range(self, "progress_resolution", 16, 512)
        _in_range(self, "eval_resolution", 8, 512)
        _in_range(self, "eval_samples_per_ray", 4, 1024)


@dataclass
class RefineConfig:
    """Stage 2, the mesh (DMTet, as Magic3D's fine stage): after ``iterations`` NeRF steps, ``refine.iterations``
    steps optimise a deformable tetrahedral grid's SDF and vertex offsets, and the field's texture, by SDS on
    rasterized renders at ``refine.resolution``. 0 steps: stage 1 alone."""

    iterations: int = 0
    resolution: int = 64  # the rendered side in pixels (and, on the synthetic prior, its photos')
    # The synthetic prior's photos for this stage (as guidance.prior_photos): the true surface, sphere-traced,
    # so that a mesh can learn where the surface is rather than the soft volume's grown silhouette.
    prior_photos: str = "surface"
    batch_size: int = 4
    grid_resolution: int = 64  # cubes a side of the tetrahedral grid (six tetrahedra each)
    # The surface the refinement starts from. 0: where the stage-1 field's renders show it (their depth maps
    # fused: dreamfusion.refine.fit_grid); above 0: the stage-1 density's isosurface at that level, as the
    # anchors start (stable-dreamfusion 10, threestudio 25).
    sdf_threshold: float = 0.0
    # The SDF is a distance in grid cells (``dreamfusion.refine.signed_distance_in_cells``): 0.1 moves the
    # surface up to a tenth of a cell a step. At 0.2 with normal consistency 0.01 the house's silhouette
    # follows its photos further but the ball's surface roughens (docs/benchmarks/quality_refine.md).
    lr_sdf: float = 0.1
    lr_deform: float = 0.01
    lr_texture: float = 0.002  # the field's hash grid and MLPs, which carry on as the texture
    # At 0.1 the SDS steps roughen a curved face that starts smooth from the fused surface (the red ball).
    lambda_normal_consistency: float = 1.0
    lambda_laplacian: float = 0.0
    t_min: float = 0.02
    t_max: float = 0.5
    visibility: str = "auto"  # auto (Embree on the CPU, the torch z-buffer elsewhere), embree, torch

    def validate(self) -> None:
        _in_range(self, "iterations", 0, 10_000_000)
        _in_range(self, "resolution", 16, 2048)
        _in_range(self, "batch_size", 1, 256)
        _in_range(self, "grid_resolution", 8, 256)
        _positive(self, "lr_sdf", "lr_deform")
        _non_negative(self, "sdf_threshold", "lr_texture", "lambda_normal_consistency", "lambda_laplacian")
        _in_range(self, "t_min", 0.0, 1.0)
        _in_range(self, "t_max", 0.0, 1.0)
        if self.t_min >= self.t_max:
            raise UserInputError(f"refine.t_min ({self.t_min}) must be below refine.t_max ({self.t_max})")
        _choice(self, "visibility", ("auto", "embree", "torch"))
        _choice(self, "prior_photos", PRIOR_PHOTO_KINDS)


@dataclass
class EvalConfig:
    # CLIP as the judge of any run (DreamFusion's Table 1): a local folder or a hub id; empty: off.
    clip_model: str = ""
    clip_views: int = 8  # evenly spaced azimuths of the CLIP renders
    clip_elevation: float = 15.0  # degrees; the turntable's and the previews' elevation
    # Distractor prompts for CLIP R-precision (a text file, one prompt per line), beside a sweep's prompts.
    clip_prompt_set: str = ""

    def validate(self) -> None:
        _in_range(self, "clip_views", 1, 64)
        _in_range(self, "clip_elevation", -89.0, 89.0)
        if self.clip_prompt_set.strip() and not self.clip_model.strip():
            raise UserInputError("eval.clip_prompt_set needs a CLIP model to rank with: set eval.clip_model too "
                                 "(a local folder or a hub id such as openai/clip-vit-base-patch32)")


@dataclass
class Config:
    prompt: str = "a red ball"
    iterations: int = 300
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)
    render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
    sds: SDSConfig = dataclasses.field(default_factory=SDSConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    refine: RefineConfig = dataclasses.field(default_factory=RefineConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> Config:
        if not self.prompt.strip():
            raise UserInputError("the prompt is empty: give a text prompt, e.g. 'a red ball'")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise UserInputError(f"the prompt has {len(self.prompt)} characters; shorten it to {MAX_PROMPT_CHARS}")
        if any(ord(c) < 32 or ord(c) == 127 for c in self.prompt):
            raise UserInputError("the prompt contains control characters (newline, NUL, ...); remove them")
        if self.iterations < 1:
            raise UserInputError(f"iterations must be >= 1, got {self.iterations}")
        if self.seed < 0:
            raise UserInputError(f"seed must be >= 0, got {self.seed}")
        parse_device(self.device)  # syntax only: a sweep's driver may have no GPU while its workers do
        for section in _sections(self):
            getattr(self, section).validate()
        janus_controls = [name for name, on in (("sds.negative_prompt", bool(self.sds.negative_prompt)),
                                                ("sds.perp_neg", self.sds.perp_neg),
                                                ("sds.view_embedding=interpolated",
                                                 self.sds.view_embedding == "interpolated")) if on]
        if janus_controls and self.guidance.backend == "synthetic" and self.guidance.prior_conditioning != "view_label":
            raise UserInputError(f"{janus_controls[0]} acts on view labels, which the synthetic prior takes only "
                                 "with guidance.prior_conditioning=view_label; set it (a camera-conditioned prior "
                                 "has no text to negate or blend)")
        backdrop = (self.guidance.prior_backdrop,) * 3
        if self.guidance.backend == "synthetic" and self.field.background == "fixed" and \
                tuple(self.field.background_color) != backdrop:
            raise UserInputError(
                f"field.background_color {','.join(map(str, self.field.background_color))} differs from the"
                f" synthetic prior's backdrop (guidance.prior_backdrop={self.guidance.prior_backdrop}): set"
                f" field.background_color={','.join(map(str, backdrop))} or field.background=learned"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"sds.guidance_scale": 20.0, ...}``: the form logged as parameters."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{inner}": v for inner, v in value.items()})
            else:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        config = cls()
        for key, value in flatten_keys(data).items():
            set_value(config, key, value)
        return config.validate()


def parse_device(name: str) -> torch.device | None:
    """The device a name stands for (None for auto), without asking whether this machine has it."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_device(name: str) -> torch.device:
    """The device to run on, here: ``auto`` is CUDA when this machine has it."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device '{name}' asked for, but this torch sees no CUDA GPU; use --set device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserInputError(f"device '{name}' does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return device


def _sections(config: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))]


def flatten_keys(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_keys(value, name + "."))
        else:
            out[name] = value
    return out


def known_keys() -> list[str]:
    return sorted(Config().flat())


def _resolve(config: Config, key: str) -> tuple[Any, str, Any]:
    parts = key.split(".")
    target: Any = config
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            break
        target = getattr(target, part)
    leaf = parts[-1]
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    if leaf not in fields or dataclasses.is_dataclass(getattr(target, leaf)) or len(parts) > 2:
        raise UserInputError(f"unknown config key '{key}'; known keys: {', '.join(known_keys())}")
    hints = typing.get_type_hints(type(target))
    return target, leaf, hints[leaf]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    try:
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            types_ = typing.get_args(annotation)
            if len(items) != len(types_):
                raise ValueError(f"expected {len(types_)} comma-separated values")
            return tuple(_coerce(key, item, t) for t, item in zip(types_, items, strict=True))
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            try:
                return int(str(value).strip()) if isinstance(value, str) else int(value)
            except ValueError:
                raise ValueError("expected an integer") from None
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if annotation is str:
            if not isinstance(value, str | int | float):
                raise ValueError("expected text")
            return str(value)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"bad value {value!r} for config key '{key}': {exc}") from None
    raise AssertionError(f"unsupported annotation {annotation!r} for {key}")


def set_value(config: Config, key: str, value: Any) -> None:
    target, leaf, annotation = _resolve(config, key)
    setattr(target, leaf, _coerce(key, value, annotation))


def apply_backend_defaults(config: Config, explicit: set[str]) -> Config:
    """Set the guidance backend's defaults for every key the user did not set (``explicit``)."""
    for key, value in BACKEND_DEFAULTS[config.guidance.backend].items():
        if key not in explicit:
            set_value(config, key, value)
    return config


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings (the CLI's ``--set``) and validate the result."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--set expects key=value, got '{override}' (e.g. --set sds.guidance_scale=30)")
        set_value(config, key.strip(), value.strip())
    return config.validate()


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise UserInputError(f"{_prefix(section)}{name} must be > 0, got {value}")


def _non_negative(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not (math.isfinite(value) and value >= 0):
            raise UserInputError(f"{_prefix(section)}{name} must be >= 0, got {value}")


def _in_range(section: Any, name: str, low: float, high: float, open_low: bool = False) -> None:
    value = getattr(section, name)
    ok = math.isfinite(value) and (low < value if open_low else low <= value) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise UserInputError(f"{_prefix(section)}{name} must lie in {bracket}{low}, {high}], got {value}")


def _choice(section: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in choices:
        raise UserInputError(f"{_prefix(section)}{name} must be one of {', '.join(choices)}; got '{value}'")


_SECTION_NAMES = {
    FieldConfig: "field.",
    CameraConfig: "camera.",
    RenderConfig: "render.",
    SDSConfig: "sds.",
    OptimConfig: "optim.",
    GuidanceConfig: "guidance.",
    ExportConfig: "export.",
    RefineConfig: "refine.",
    EvalConfig: "eval.",
}


def _prefix(section: Any) -> str:
    return _SECTION_NAMES.get(type(section), "")
