"""Exports of a trained field: turntable video (.webm/.gif), previews, progress, the offline HTML viewer
(the mesh files: ``dreamfusion.mesh``)."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, ImageDraw

from dreamfusion.cameras import CameraBatch, cameras_from_angles
from dreamfusion.field import RadianceField
from dreamfusion.mesh import TexturedMesh
from dreamfusion.renderer import OccupancyGrid, RenderOutput, Shading, ViewRenderer, render_batched_shadings


def field_views(field: RadianceField, occupancy: OccupancyGrid | None = None, samples_per_ray: int = 64
                ) -> ViewRenderer:
    """A field marched (with its occupancy grid) and shaded once per pixel."""
    def views(cameras: CameraBatch, resolution: int, shadings: tuple[Shading, ...]) -> list[RenderOutput]:
        return render_batched_shadings(field, cameras, resolution, samples_per_ray, shadings, occupancy,
                                       deferred=True)
    return views


@torch.no_grad()
def render_turntable(views: ViewRenderer, frames: int, resolution: int, shading: Shading,
                     elevation: float = 15.0, radius: float = 2.2, fov: float = 45.0, chunk: int = 8,
                     on_frames: Callable[[int], None] | None = None) -> np.ndarray:
    """``[frames, H, W, 3]`` uint8, the camera circling the object once; ``on_frames(done)`` after each chunk."""
    azimuth = torch.linspace(0.0, 360.0, frames + 1)[:-1]
    cameras = cameras_from_angles(azimuth, torch.full((frames,), elevation), torch.full((frames,), radius),
                                  torch.full((frames,), fov))
    rgb = []
    for start in range(0, frames, chunk):
        rgb.append(views(cameras.slice(start, start + chunk), resolution, (shading,))[0].rgb.cpu())
        if on_frames is not None:
            on_frames(min(start + chunk, frames))
    return (torch.cat(rgb).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def write_videos(frames: np.ndarray, directory: Path, fps: int, stem: str = "turntable") -> dict[str, Path]:
    webm = directory / f"{stem}.webm"
    gif = directory / f"{stem}.gif"
    # VP9 needs even sizes; the MLflow UI previews both formats.
    with imageio.get_writer(webm, format="FFMPEG", fps=fps, codec="libvpx-vp9", quality=8,
                            macro_block_size=2, ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)
    imageio.mimsave(gif, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
    return {"video_webm": webm, "video_gif": gif}


def orbit_cameras(azimuth: torch.Tensor, elevation: torch.Tensor) -> CameraBatch:
    """The export views: 2.2 from the origin, 45° field of view."""
    count = azimuth.shape[0]
    return cameras_from_angles(azimuth, elevation, torch.full((count,), 2.2), torch.full((count,), 45.0))


def image_strip(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] side by side: ``[H, N*W, 3]`` uint8."""
    count, _, height, width = images.shape
    strip = images.clamp(0, 1).permute(2, 0, 3, 1).reshape(height, count * width, 3)
    return (strip * 255).round().to(torch.uint8)


@torch.no_grad()
def render_previews(render_views: ViewRenderer, shading_for, views: int = 4, resolution: int = 96
                    ) -> dict[str, np.ndarray]:
    """Rows of ``views`` views around the object: colour, textureless and normals (``[H, W*views, 3]`` uint8).

    ``shading_for(mode)`` builds the run's shading for a mode, so previews match what training saw.
    """
    azimuth = torch.arange(views) * (360.0 / views)
    cameras = orbit_cameras(azimuth, torch.full((views,), 15.0))

    def row(images: torch.Tensor) -> np.ndarray:
        return image_strip(images).numpy()

    colour, textureless = render_views(cameras, resolution, (shading_for("albedo"), shading_for("textureless")))
    # Normals in [-1, 1] drawn as colour on white where the object is transparent.
    normals = textureless.normals * 0.5 + 0.5
    normals = normals * textureless.opacity + (1 - textureless.opacity)
    return {"renders_colour": row(colour.rgb), "renders_textureless": row(textureless.rgb),
            "renders_normals": row(normals)}


# Where training progress is watched: front, side and back near the horizon, and the front from above.
PROGRESS_AZIMUTHS = (0.0, 90.0, 180.0, 0.0)
PROGRESS_ELEVATIONS = (10.0, 10.0, 10.0, 50.0)


@torch.no_grad()
def render_progress_row(views: ViewRenderer, shading: Shading, resolution: int, with_opacity: bool = True
                        ) -> torch.Tensor:
    """One row of ``progress.png`` (``[H, 2*views*W, 3]`` uint8): the views in ``shading``, then their opacity
    (``with_opacity``; without it, ``[H, views*W, 3]``: the strip a sweep logs at each report).

    Rendered without a generator, so recording it never changes the training's random stream.
    """
    cameras = orbit_cameras(torch.tensor(PROGRESS_AZIMUTHS), torch.tensor(PROGRESS_ELEVATIONS))
    [out] = views(cameras, resolution, (shading,))
    out.rgb, out.opacity = out.rgb.cpu(), out.opacity.cpu()
    return image_strip(torch.cat([out.rgb, out.opacity.expand(-1, 3, -1, -1)]) if with_opacity else out.rgb)


def write_progress(rows: list[tuple[int, torch.Tensor]], path: Path) -> Path:
    """Stack the rows, oldest first, each labelled with its training step.

    Rows recorded before a resume with another ``export.progress_resolution`` are scaled to the last one.
    """
    width, height = rows[-1][1].shape[1], rows[-1][1].shape[0]
    strips = [Image.fromarray(row.numpy()).resize((width, height), Image.NEAREST) for _, row in rows]
    image = Image.new("RGB", (width, height * len(strips)))
    draw = ImageDraw.Draw(image)
    for index, ((step, _), strip) in enumerate(zip(rows, strips, strict=True)):
        image.paste(strip, (0, index * height))
        draw.text((2, index * height + 1), f"step {step}", fill=(255, 255, 255))
    image.save(path)
    return path


def write_previews(previews: dict[str, np.ndarray], directory: Path) -> dict[str, Path]:
    paths = {}
    for name, image in previews.items():
        paths[name] = directory / f"{name}.png"
        imageio.imwrite(paths[name], image)
    return paths


_VIEWER_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>html,body{margin:0;height:100%;background:#f4f4f4;font-family:sans-serif}
canvas{width:100%;height:100%;display:block;cursor:grab}
#info{position:absolute;left:8px;top:6px;color:#333;font-size:13px}</style></head>
<body><div id="info">__TITLE__ &middot; __FACES__ faces &middot; drag to rotate, wheel to zoom</div>
<canvas id="view"></canvas>
<script id="mesh" type="application/json">__MESH__</script>
<script>
"use strict";
const mesh = JSON.parse(document.getElementById("mesh").textContent);
function decode(b64, Type) {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  return new Type(bytes.buffer);
}
const positions = decode(mesh.positions, Float32Array);
const normals = decode(mesh.normals, Float32Array);
const uvs = decode(mesh.uvs, Float32Array);
const indices = decode(mesh.indices, Uint32Array);
const canvas = document.getElementById("view");
const gl = canvas.getContext("webgl", {preserveDrawingBuffer: true});
if (!gl) { document.getElementById("info").textContent = "WebGL is not available in this browser"; }
gl.getExtension("OES_element_index_uint");
function shader(type, src) {
  const s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s); return s;
}
const program = gl.createProgram();
gl.attachShader(program, shader(gl.VERTEX_SHADER, `
attribute vec3 p; attribute vec3 n; attribute vec2 t;
uniform mat4 mvp; uniform mat4 model; varying vec3 vn; varying vec2 vt;
void main(){ gl_Position = mvp * vec4(p, 1.0); vn = (model * vec4(n, 0.0)).xyz; vt = t; }`));
gl.attachShader(program, shader(gl.FRAGMENT_SHADER, `
precision mediump float; varying vec3 vn; varying vec2 vt; uniform sampler2D albedo;
void main(){ float l = 0.35 + 0.65 * abs(dot(normalize(vn), normalize(vec3(0.3, 0.5, 1.0))));
gl_FragColor = vec4(texture2D(albedo, vec2(vt.x, 1.0 - vt.y)).rgb * l, 1.0); }`));
gl.linkProgram(program); gl.useProgram(program);
function buffer(data, name, size, type, normalized) {
  const b = gl.createBuffer(); gl.bindBuffer(gl.ARRAY_BUFFER, b);
  gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
  const loc = gl.getAttribLocation(program, name);
  gl.enableVertexAttribArray(loc); gl.vertexAttribPointer(loc, size, type, normalized, 0, 0);
}
buffer(positions, "p", 3, gl.FLOAT, false);
buffer(normals, "n", 3, gl.FLOAT, false);
buffer(uvs, "t", 2, gl.FLOAT, false);
// The baked albedo, inlined as a data: URL (no request leaves the page); any size, so no mipmaps.
const texture = gl.createTexture();
gl.bindTexture(gl.TEXTURE_2D, texture);
gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, 1, 1, 0, gl.RGB, gl.UNSIGNED_BYTE, new Uint8Array([200, 200, 200]));
const image = new Image();
image.onload = () => {
  gl.bindTexture(gl.TEXTURE_2D, texture);
  gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, gl.RGB, gl.UNSIGNED_BYTE, image);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
};
image.src = "data:image/png;base64," + mesh.texture;
const ib = gl.createBuffer(); gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, ib);
gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, indices, gl.STATIC_DRAW);
let yaw = 0.6, pitch = 0.3, distance = 3.2, dragging = false, lastX = 0, lastY = 0, auto = true;
canvas.addEventListener("mousedown", e => { dragging = true; auto = false; lastX = e.clientX; lastY = e.clientY; });
window.addEventListener("mouseup", () => { dragging = false; });
window.addEventListener("mousemove", e => {
  if (!dragging) return;
  yaw += (e.clientX - lastX) * 0.01; pitch += (e.clientY - lastY) * 0.01;
  pitch = Math.max(-1.5, Math.min(1.5, pitch)); lastX = e.clientX; lastY = e.clientY;
});
canvas.addEventListener("wheel", e => { e.preventDefault(); distance = Math.max(1.2, Math.min(10, distance * (1 + e.deltaY * 0.001))); });
function multiply(a, b) {
  const o = new Float32Array(16);
  for (let i = 0; i < 4; i++) for (let j = 0; j < 4; j++) {
    let s = 0; for (let k = 0; k < 4; k++) s += a[k * 4 + j] * b[i * 4 + k]; o[i * 4 + j] = s;
  }
  return o;
}
function frame() {
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  if (auto) yaw += 0.01;
  const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
  const rotY = [cy, 0, -sy, 0, 0, 1, 0, 0, sy, 0, cy, 0, 0, 0, 0, 1];
  const rotX = [1, 0, 0, 0, 0, cp, sp, 0, 0, -sp, cp, 0, 0, 0, 0, 1];
  const model = multiply(rotX, rotY);
  const view = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, -distance, 1];
  const f = 1 / Math.tan(0.4), aspect = w / Math.max(h, 1), near = 0.1, far = 50;
  const proj = [f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) / (near - far), -1, 0, 0, 2 * far * near / (near - far), 0];
  const mvp = multiply(proj, multiply(view, model));
  gl.viewport(0, 0, w, h); gl.clearColor(0.96, 0.96, 0.96, 1); gl.enable(gl.DEPTH_TEST);
  gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
  gl.uniformMatrix4fv(gl.getUniformLocation(program, "mvp"), false, mvp);
  gl.uniformMatrix4fv(gl.getUniformLocation(program, "model"), false, model);
  gl.drawElements(gl.TRIANGLES, indices.length, gl.UNSIGNED_INT, 0);
  requestAnimationFrame(frame);
}
requestAnimationFrame(frame);
</script></body></html>
"""


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def write_viewer(mesh: TexturedMesh, path: Path, title: str) -> Path:
    """A single HTML file with the textured mesh inlined; it makes no network request (MLflow shows it)."""
    png = io.BytesIO()
    Image.fromarray(mesh.texture).save(png, format="PNG", optimize=True)
    payload = {
        "positions": _b64(np.asarray(mesh.vertices, dtype=np.float32)),
        "normals": _b64(mesh.normals),
        "uvs": _b64(np.asarray(mesh.uv, dtype=np.float32)),
        "texture": base64.b64encode(png.getvalue()).decode("ascii"),
        "indices": _b64(np.asarray(mesh.faces, dtype=np.uint32)),
    }
    text = (
        _VIEWER_TEMPLATE.replace("__TITLE__", html.escape(title))
        .replace("__FACES__", str(len(mesh.faces)))
        .replace("__MESH__", json.dumps(payload))
    )
    path.write_text(text, encoding="utf-8")
    return path


def write_gallery(runs: list[Path], path: Path, label_width: int = 150) -> Path:
    """One row per finished run: its colour and textureless previews side by side, labelled with its prompt.

    ``runs`` are run directories (each holds ``summary.json``); previews of other sizes are scaled to the
    first run's. Written as an optimised PNG (to a temporary name first: a failure leaves no partial file).
    """
    rows = []
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        images = [Image.open(run / summary["artifacts"][key]).convert("RGB")
                  for key in ("renders_colour", "renders_textureless")]
        rows.append((summary["prompt"], images))
    height = rows[0][1][0].height
    width = sum(image.width for image in rows[0][1])
    gallery = Image.new("RGB", (label_width + width, height * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(gallery)
    for index, (prompt, images) in enumerate(rows):
        left = label_width
        for image in images:
            scaled = image.resize((round(image.width * height / image.height), height), Image.LANCZOS)
            gallery.paste(scaled, (left, index * height))
            left += scaled.width
        draw.text((6, index * height + height // 2 - 6), prompt[:24], fill=(20, 20, 20))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    gallery.save(partial, format="PNG", optimize=True)
    partial.replace(path)
    return path
