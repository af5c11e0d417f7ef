"""The 3D track scene built from a Track as a few merged Panda3D meshes, shared by renderer and `rrp play`.

Scene coordinates follow ursina (`coordinate-system y-up-left`): simulation (x, y) maps to scene (x, z) and
scene y is up. Everything here is plain `panda3d.core` (importing it starts no ursina app); the offscreen
renderer wraps these nodes in ursina Entities and `rrp play` attaches them to its window's scene, so both
draw the very same nodes and frames look like the game.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from panda3d.core import (
    AmbientLight,
    DirectionalLight,
    Geom,
    GeomNode,
    GeomTriangles,
    GeomTristrips,
    GeomVertexArrayFormat,
    GeomVertexData,
    GeomVertexFormat,
    LColor,
    LVector3,
    Mat4,
    NodePath,
)

from game_server.core.state import CarState, Gate
from game_server.core.track import Track

RGB = tuple[float, float, float]

CAMERA_FOV_DEG = 75.0  # horizontal, as ursina's `camera.fov`
CAMERA_NEAR_M = 0.3
CAMERA_FAR_M = 600.0
CHASE_BACK_M = 7.5  # camera distance behind the car
CHASE_UP_M = 2.8  # camera height
LOOK_AHEAD_M = 6.0  # the camera aims this far ahead of the car...
LOOK_UP_M = 0.6  # ...at this height, so the road ahead fills the lower half of the frame

WALL_HEIGHT_M = 0.8
_GROUND_TILE_M = 20.0
_GROUND_MARGIN_M = 80.0  # checker tiles this far around the track, a plain plane beyond
_PROP_SPACING_M = 11.0
_CAR_DRAW_ORDER = 100  # after the track's depth-tested parts


@dataclass(frozen=True)
class Appearance:
    """Everything a frame's look depends on besides geometry and pose; randomised for domain randomisation."""

    sky: RGB = (0.55, 0.72, 0.92)
    ground: RGB = (0.32, 0.56, 0.26)
    road: RGB = (0.36, 0.36, 0.39)
    # The direction cue: the left barrier's stripes are red, the right one's blue (both alternate with white), so
    # a car facing the wrong way, or across the road, sees which way the lap goes, as kerbs show on a circuit.
    wall_a: RGB = (0.86, 0.14, 0.12)
    wall_b: RGB = (0.93, 0.93, 0.93)
    props: RGB = (1.0, 1.0, 1.0)
    light_dir: tuple[float, float, float] = (-0.4, -0.8, 0.45)  # direction the light travels, scene axes
    light: float = 0.75
    ambient: float = 0.45
    wall_c: RGB = (0.14, 0.3, 0.86)


DEFAULT_APPEARANCE = Appearance()

# Node names under a track root whose colour the appearance sets (vertex colours are white or patterns).
_TINTED = ("ground", "road", "wall_a", "wall_b", "wall_c", "props")


def _vertex_format() -> GeomVertexFormat:
    array = GeomVertexArrayFormat()
    array.addColumn("vertex", 3, Geom.NTFloat32, Geom.CPoint)
    array.addColumn("normal", 3, Geom.NTFloat32, Geom.CVector)
    array.addColumn("color", 4, Geom.NTUint8, Geom.CColor)
    return GeomVertexFormat.registerFormat(GeomVertexFormat(array))


_VERTEX_DTYPE = np.dtype([("pos", "<f4", 3), ("normal", "<f4", 3), ("color", "u1", 4)])


class MeshBuilder:
    """Accumulates flat-shaded triangles and quads as numpy arrays and emits one Geom (one draw call)."""

    def __init__(self) -> None:
        self._verts: list[np.ndarray] = []
        self._indices: list[np.ndarray] = []
        self._count = 0

    def _add(self, pos: np.ndarray, color: np.ndarray, corners: int, pattern: list[int]) -> None:
        """Adds M polygons; pos (M, corners, 3) wound so the right-handed normal points out; color (M, 3).

        Under y-up-left a face is front-facing when that normal points away from the viewer, so `pattern`
        emits each polygon's triangles in reverse order; the lighting normal stays the outward one.
        """
        m = pos.shape[0]
        if m == 0:
            return
        normal = np.cross(pos[:, 1] - pos[:, 0], pos[:, 2] - pos[:, 0])
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
        verts = np.zeros((m, corners), _VERTEX_DTYPE)
        verts["pos"] = pos
        verts["normal"] = normal[:, None, :]
        rgba = np.concatenate([np.clip(color, 0.0, 1.0), np.ones((m, 1))], axis=1)
        verts["color"] = np.round(rgba * 255.0).astype(np.uint8)[:, None, :]
        base = self._count + np.arange(m)[:, None] * corners
        self._indices.append((base + np.asarray(pattern)).reshape(-1))
        self._verts.append(verts.reshape(-1))
        self._count += m * corners

    def add_quads(self, pos: np.ndarray, color: np.ndarray) -> None:
        """pos (M, 4, 3), counter-clockwise (right-handed) seen from the visible side; color (M, 3)."""
        self._add(pos, np.broadcast_to(color, (pos.shape[0], 3)), 4, [0, 2, 1, 0, 3, 2])

    def add_triangles(self, pos: np.ndarray, color: np.ndarray) -> None:
        """pos (M, 3, 3); color (M, 3) or (3,)."""
        self._add(pos, np.broadcast_to(color, (pos.shape[0], 3)), 3, [0, 2, 1])

    def add_boxes(self, center: np.ndarray, size: np.ndarray, yaw: np.ndarray, color: np.ndarray) -> None:
        """Axis-aligned-in-yaw boxes: center (M, 3) of the bottom face, size (M, 3), yaw (M,) rad."""
        signs = np.array(
            [
                [[-1, 0, -1], [-1, 0, 1], [-1, 1, 1], [-1, 1, -1]],  # -x
                [[1, 0, 1], [1, 0, -1], [1, 1, -1], [1, 1, 1]],  # +x
                [[1, 0, -1], [-1, 0, -1], [-1, 1, -1], [1, 1, -1]],  # -z
                [[-1, 0, 1], [1, 0, 1], [1, 1, 1], [-1, 1, 1]],  # +z
                [[-1, 1, 1], [1, 1, 1], [1, 1, -1], [-1, 1, -1]],  # top
                [[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]],  # bottom
            ],
            dtype=np.float64,
        )
        half = np.asarray(size, dtype=np.float64) * np.array([0.5, 1.0, 0.5])
        local = signs[None] * half[:, None, None, :]  # (M, 6, 4, 3)
        c, s = np.cos(yaw)[:, None, None], np.sin(yaw)[:, None, None]
        # Yaw is a heading in the ground plane: rotate (x, z) like simulation (x, y).
        x = local[..., 0] * c - local[..., 2] * s
        z = local[..., 0] * s + local[..., 2] * c
        world = np.stack([x, local[..., 1], z], axis=-1) + np.asarray(center)[:, None, None, :]
        colors = np.repeat(np.broadcast_to(color, (len(center), 3)), 6, axis=0)
        self.add_quads(world.reshape(-1, 4, 3), colors)

    def add_pyramids(self, center: np.ndarray, radius: np.ndarray, height: np.ndarray, color: np.ndarray) -> None:
        """Four-sided pyramids (tree crowns, cones): base centre (M, 3), base half-size and height (M,)."""
        m = len(center)
        corner = np.array([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], dtype=np.float64)
        base = np.asarray(center)[:, None, :] + corner[None] * np.asarray(radius)[:, None, None]
        apex = np.asarray(center) + np.stack([np.zeros(m), height, np.zeros(m)], axis=1)
        sides = [np.stack([base[:, (k + 1) % 4], base[:, k], apex], axis=1) for k in range(4)]
        colors = np.repeat(np.broadcast_to(color, (m, 3))[None], 4, axis=0).reshape(-1, 3)
        self.add_triangles(np.concatenate(sides), colors)

    def build(self, name: str) -> NodePath:
        geom_node = GeomNode(name)
        if self._count:
            geom_node.addGeom(_make_geom(np.concatenate(self._verts), np.concatenate(self._indices)))
        return NodePath(geom_node)


def _make_geom(verts: np.ndarray, indices: np.ndarray | None) -> Geom:
    """One Geom from packed vertices: indexed triangles, or a single strip of all vertices if no indices."""
    vdata = GeomVertexData("mesh", _vertex_format(), Geom.UHStatic)
    vdata.uncleanSetNumRows(len(verts))
    memoryview(vdata.modifyArray(0)).cast("B")[:] = verts.tobytes()
    if indices is None:
        prim: GeomTristrips | GeomTriangles = GeomTristrips(Geom.UHStatic)
        prim.addConsecutiveVertices(0, len(verts))
        prim.closePrimitive()
    else:
        prim = GeomTriangles(Geom.UHStatic)
        prim.setIndexType(Geom.NTUint32)
        handle = prim.modifyVertices()
        handle.uncleanSetNumRows(len(indices))
        memoryview(handle).cast("B")[:] = indices.astype("<u4").tobytes()
    geom = Geom(vdata)
    geom.addPrimitive(prim)
    return geom


def _ground_plane(points: np.ndarray) -> np.ndarray:
    """Simulation (N, 2) -> scene (N, 3) on the ground."""
    return np.stack([points[:, 0], np.zeros(len(points)), points[:, 1]], axis=1)


def _ground(track: Track) -> NodePath:
    lo = track.centerline.min(axis=0) - _GROUND_MARGIN_M
    hi = track.centerline.max(axis=0) + _GROUND_MARGIN_M
    mesh = MeshBuilder()
    far = 4 * CAMERA_FAR_M
    centre = (lo + hi) / 2
    plane = np.array([[[-far, 0, -far], [-far, 0, far], [far, 0, far], [far, 0, -far]]], dtype=np.float64)
    plane[..., 0] += centre[0]
    plane[..., 2] += centre[1]
    mesh.add_quads(plane, np.ones(3))
    # Darker tiles on a checkerboard: motion cues on the grass without textures.
    nx, ny = np.ceil((hi - lo) / _GROUND_TILE_M).astype(int)
    ix, iy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    keep = (ix + iy) % 2 == 0
    x0 = lo[0] + ix[keep] * _GROUND_TILE_M
    z0 = lo[1] + iy[keep] * _GROUND_TILE_M
    x1, z1 = x0 + _GROUND_TILE_M, z0 + _GROUND_TILE_M
    zero = np.zeros_like(x0)
    tiles = np.stack(
        [
            np.stack([x0, zero, z0], 1),
            np.stack([x0, zero, z1], 1),
            np.stack([x1, zero, z1], 1),
            np.stack([x1, zero, z0], 1),
        ],
        axis=1,
    )
    mesh.add_quads(tiles, np.full(3, 0.88))
    return mesh.build("ground")


def _road(track: Track) -> NodePath:
    """One closed triangle strip between the barriers, slightly lighter every other segment."""
    n = track.n_points
    order = np.r_[np.arange(n), 0]
    right = _ground_plane(track.right_wall)[order]
    left = _ground_plane(track.left_wall)[order]
    verts = np.zeros(2 * (n + 1), _VERTEX_DTYPE)
    verts["pos"][0::2] = left  # left first: the strip's triangles then face up under y-up-left
    verts["pos"][1::2] = right
    verts["normal"] = (0.0, 1.0, 0.0)
    shade = np.where(np.arange(n + 1) % 2 == 0, 255, 240).astype(np.uint8)
    verts["color"][:, :3] = np.repeat(shade, 2)[:, None]
    verts["color"][:, 3] = 255
    geom_node = GeomNode("road")
    geom_node.addGeom(_make_geom(verts, None))
    return NodePath(geom_node)


def _markings(track: Track) -> NodePath:
    """Dashed centre line and a chequered start/finish line."""
    mesh = MeshBuilder()
    c = track.centerline
    nxt = np.roll(c, -1, axis=0)
    d = nxt - c
    nrm = np.stack([-d[:, 1], d[:, 0]], 1) / np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)[:, None]
    dash = np.arange(track.n_points) % 3 == 0
    w = 0.15
    a, b, na = c[dash], nxt[dash], nrm[dash] * w
    quad = np.stack([a - na, b - na, b + na, a + na], axis=1)
    mesh.add_quads(_quads_to_scene(quad), np.full(3, 0.95))
    for gate in dict.fromkeys((track.start_line, track.finish_line)):  # one band if they coincide
        mesh.add_quads(_quads_to_scene(_checker(gate)), _checker_colors())
    return mesh.build("markings")


_CHECKER_COLUMNS = 10
_CHECKER_ROWS = 2
_CHECKER_CELL_M = 0.8


def _checker(gate: Gate) -> np.ndarray:
    """(M, 4, 2) cells of a chequered band along the gate, centred on it."""
    p0, p1 = np.array([gate.ax, gate.ay]), np.array([gate.bx, gate.by])
    across = (p1 - p0) / _CHECKER_COLUMNS
    along = np.array([across[1], -across[0]]) / max(float(np.hypot(*across)), 1e-9) * _CHECKER_CELL_M
    i, j = np.meshgrid(np.arange(_CHECKER_COLUMNS), np.arange(_CHECKER_ROWS), indexing="ij")
    o = p0 + i.reshape(-1, 1) * across + (j.reshape(-1, 1) - _CHECKER_ROWS / 2) * along
    return np.stack([o, o + along, o + along + across, o + across], axis=1)


def _checker_colors() -> np.ndarray:
    i, j = np.meshgrid(np.arange(_CHECKER_COLUMNS), np.arange(_CHECKER_ROWS), indexing="ij")
    white = ((i + j) % 2 == 0).reshape(-1, 1)
    return np.where(white, 0.97, 0.05) * np.ones((1, 3))


def _quads_to_scene(quads: np.ndarray) -> np.ndarray:
    """(M, 4, 2) simulation quads -> (M, 4, 3) scene quads facing up."""
    out = np.zeros((*quads.shape[:2], 3))
    out[..., 0] = quads[..., 0]
    out[..., 2] = quads[..., 1]
    # Simulation (x, y) -> scene (x, z) flips handedness: reverse so the quads face up.
    return out[:, ::-1]


def _walls(track: Track) -> tuple[NodePath, NodePath, NodePath]:
    """Barrier faces along both walls, alternating a colour and white every segment (the stripes show speed):
    red on the left barrier (wall_a), blue on the right one (wall_c), white on both (wall_b)."""
    stripes: dict[str, list[np.ndarray]] = {"wall_a": [], "wall_b": [], "wall_c": []}
    for wall in (track.left_wall, track.right_wall):
        p0 = _ground_plane(wall)
        p1 = np.roll(p0, -1, axis=0)
        up = np.array([0.0, WALL_HEIGHT_M, 0.0])
        quads = np.stack([p0, p1, p1 + up, p0 + up], axis=1)
        if wall is track.left_wall:  # light the side that faces the road
            quads = quads[:, [1, 0, 3, 2]]
        stripes["wall_a" if wall is track.left_wall else "wall_c"].append(quads[0::2])
        stripes["wall_b"].append(quads[1::2])
    nodes = []
    for name, parts in stripes.items():
        mesh = MeshBuilder()
        mesh.add_quads(np.concatenate(parts), np.ones(3))
        node = mesh.build(name)
        node.setTwoSided(True)  # seen from the road on one wall and from the infield on the other
        nodes.append(node)
    return nodes[0], nodes[1], nodes[2]


def _props(track: Track) -> NodePath:
    """Trees and cones off the road, placed by a generator seeded from the track's name and shape."""
    seed = zlib.crc32(track.name.encode() + track.centerline.tobytes())
    rng = np.random.default_rng(seed)
    c, hw = track.centerline, track.half_width
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(c, axis=0).T))])
    idx = np.searchsorted(arc, np.arange(0.0, arc[-1], _PROP_SPACING_M)).clip(0, len(c) - 1)
    nxt = c[(idx + 1) % len(c)] - c[idx]
    nrm = np.stack([-nxt[:, 1], nxt[:, 0]], 1) / np.maximum(np.hypot(nxt[:, 0], nxt[:, 1]), 1e-9)[:, None]
    side = np.where(np.arange(len(idx)) % 2 == 0, 1.0, -1.0)[:, None]
    near = c[idx] + side * nrm * (hw[idx, None] + rng.uniform(2.0, 4.0, (len(idx), 1)))
    far = c[idx] - side * nrm * (hw[idx, None] + rng.uniform(6.0, 30.0, (len(idx), 1)))
    lo, hi = c.min(axis=0) - _GROUND_MARGIN_M, c.max(axis=0) + _GROUND_MARGIN_M
    scatter = rng.uniform(lo, hi, (len(idx), 2))
    points = np.concatenate([near, far, scatter])
    is_cone = np.arange(len(points)) < len(near)
    clear = _distance_to_road(points, c) > hw.max() + 1.5
    points, is_cone = points[clear], is_cone[clear]
    mesh = MeshBuilder()
    cones, trees = _ground_plane(points[is_cone]), _ground_plane(points[~is_cone])
    mesh.add_pyramids(cones, np.full(len(cones), 0.35), np.full(len(cones), 0.9), np.array([1.0, 0.45, 0.05]))
    m = len(trees)
    height = rng.uniform(3.0, 7.0, m)
    trunk = np.stack([np.full(m, 0.5), height * 0.3, np.full(m, 0.5)], 1)
    mesh.add_boxes(trees, trunk, rng.uniform(0, math.pi, m), np.array([0.42, 0.27, 0.13]))
    crown_base = trees + np.stack([np.zeros(m), height * 0.3, np.zeros(m)], 1)
    green = np.array([0.12, 0.42, 0.16]) * rng.uniform(0.8, 1.2, (m, 1))
    mesh.add_pyramids(crown_base, height * 0.3, height * 0.7, green)
    return mesh.build("props")


def _distance_to_road(points: np.ndarray, centerline: np.ndarray) -> np.ndarray:
    """Distance from each point to the nearest centre-line segment."""
    a = centerline
    ab = np.roll(a, -1, axis=0) - a
    ap = points[:, None, :] - a[None]
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.asarray(np.hypot(*(points[:, None, :] - closest).transpose(2, 0, 1)).min(axis=1))


def build_track_scene(track: Track) -> NodePath:
    """The static scene of a track: ground, road, markings, barriers and props under one root."""
    root = NodePath(f"track:{track.name}")
    # Ground, road and markings are coplanar: draw them in this order without depth instead of fighting.
    for order, node in enumerate((_ground(track), _road(track), _markings(track))):
        node.setBin("background", order)
        node.setDepthTest(False)
        node.setDepthWrite(False)
        node.reparentTo(root)
    # The rest is depth-tested, in a fixed order too: Panda's default opaque bin sorts by state pointer,
    # which differs between processes and decides ties of the 16-bit depth buffer near the horizon.
    for order, node in enumerate((*_walls(track), _props(track))):
        node.setBin("fixed", order)
        node.reparentTo(root)
    return root


def build_car() -> NodePath:
    """A low-poly car facing scene +z (its local forward), as one mesh."""
    mesh = MeshBuilder()
    body = np.array([[0.0, 0.25, 0.0], [0.0, 0.75, -0.35]])
    sizes = np.array([[1.8, 0.5, 4.0], [1.4, 0.45, 1.9]])
    mesh.add_boxes(body, sizes, np.zeros(2), np.array([[0.95, 0.78, 0.05], [0.15, 0.2, 0.3]]))
    wheels = np.array([[sx * 0.85, 0.0, sz * 1.3] for sx in (-1, 1) for sz in (-1, 1)])
    mesh.add_boxes(wheels, np.tile([0.3, 0.6, 0.7], (4, 1)), np.zeros(4), np.full(3, 0.08))
    spoiler = np.array([[0.0, 0.85, -1.85]])
    mesh.add_boxes(spoiler, np.array([[1.7, 0.1, 0.35]]), np.zeros(1), np.array([0.95, 0.78, 0.05]))
    car = mesh.build("car")
    car.setBin("fixed", _CAR_DRAW_ORDER)
    return car


def car_matrix(car: CarState) -> Mat4:
    """Model-to-scene transform: local +z along the heading, local +x to the car's right."""
    c, s = math.cos(car.heading), math.sin(car.heading)
    return Mat4(s, 0, -c, 0, 0, 1, 0, 0, c, 0, s, 0, car.x, 0, car.y, 1)


@dataclass(frozen=True)
class ChaseRig:
    """Where a chase camera sits behind the car and where it aims (m), and its horizontal FOV (degrees)."""

    back_m: float = CHASE_BACK_M
    up_m: float = CHASE_UP_M
    look_ahead_m: float = LOOK_AHEAD_M
    look_up_m: float = LOOK_UP_M
    fov_deg: float = CAMERA_FOV_DEG


# The game's camera: the model's frames and `rrp play` see the track through it.
DRIVER_RIG = ChaseRig()
# A broadcast view, higher and further back, so that a watcher sees the next corner and the car's line.
TV_RIG = ChaseRig(back_m=14.0, up_m=7.0, look_ahead_m=12.0, look_up_m=0.0, fov_deg=70.0)


def chase_camera(
    car: CarState, jitter: tuple[float, float, float] = (0.0, 0.0, 0.0), rig: ChaseRig = DRIVER_RIG
) -> tuple[LVector3, LVector3]:
    """Camera position and look-at target behind and above the car; jitter offsets (right, up, back) in m."""
    c, s = math.cos(car.heading), math.sin(car.heading)
    right, up, back = jitter
    dist = rig.back_m + back
    pos = LVector3(car.x - c * dist + s * right, rig.up_m + up, car.y - s * dist - c * right)
    target = LVector3(car.x + c * rig.look_ahead_m, rig.look_up_m, car.y + s * rig.look_ahead_m)
    return pos, target


class SceneLights:
    """An ambient and a directional light on a root node, set from an Appearance."""

    def __init__(self, root: NodePath) -> None:
        self._ambient = AmbientLight("ambient")
        self._sun = DirectionalLight("sun")
        self._ambient_np = root.attachNewNode(self._ambient)
        self._sun_np = root.attachNewNode(self._sun)
        root.setLight(self._ambient_np)
        root.setLight(self._sun_np)

    def apply(self, look: Appearance) -> None:
        self._ambient.setColor(LColor(look.ambient, look.ambient, look.ambient, 1))
        self._sun.setColor(LColor(look.light, look.light, look.light, 1))
        self._sun.setDirection(LVector3(*look.light_dir))


def apply_appearance(track_root: NodePath, look: Appearance) -> None:
    """Sets the colour of each tinted part of a track scene (vertex colours carry only the patterns)."""
    for name in _TINTED:
        node = track_root.find(name)
        node.setColorScale(*getattr(look, name), 1.0)
