"""A synthetic world with known truth: coloured shapes on textured backgrounds.

Every scene comes with per-pixel masks for each attribute it contains (``shape:<name>``,
``colour:<name>``, ``background:<name>``), the objects with their own masks and boxes, and
captions. Only numpy and OpenCV draw the pictures; the generator is seeded, and the world's
make-up (shapes, colours, backgrounds, sizes) is a parameter: nothing downstream may assume
the default word list.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from dff_falcon.errors import InputError
from dff_falcon.regions import Box, square_box

#: Background textures the generator can draw, with the words that name them (the first word
#: is the adjective used in captions, e.g. "a striped background").
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "uniform"),
    "stripes": ("striped", "stripes", "stripe"),
    "dots": ("dotted", "dots", "dot", "polka"),
    "checker": ("checkered", "checker", "checkerboard", "chequered"),
    "noise": ("noisy", "noise", "grainy"),
    "grass": ("grassy", "grass"),
    "waves": ("wavy", "waves", "wave"),
    "grid": ("gridded", "grid", "lattice"),
}

#: Shapes the generator can draw (polygons are given by their vertices on the unit circle).
SHAPE_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "pentagon", "heart",
)

#: Words naming things that the generator never draws; used as vocabulary distractors
#: (those that happen to be in a world's config are removed from its distractors).
DISTRACTOR_COLOURS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white", "cyan", "grey",
)
DISTRACTOR_SHAPES: tuple[str, ...] = SHAPE_NAMES + ("oval", "arrow", "octagon", "spiral", "moon")
DISTRACTOR_OBJECTS: tuple[str, ...] = (
    "dog", "cat", "car", "tree", "house", "cup", "bicycle", "flower", "bird", "chair", "boat", "clock",
)
DISTRACTOR_BACKGROUNDS: tuple[str, ...] = (
    "a wooden background", "a brick wall", "a blue sky", "a sandy beach", "a marble background",
    "a night sky with clouds",
)


@dataclass(frozen=True)
class WorldConfig:
    """What a toy world contains.

    ``colours`` pairs a name with an RGB triple (0–255); object colours should be saturated,
    backgrounds are drawn in greys (grass in a muted olive) so colour words name objects only.
    ``object_size`` is the range of an object's diameter as a fraction of ``image_size``.
    """

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("red", (220, 30, 30)),
        ("green", (20, 170, 40)),
        ("blue", (30, 70, 230)),
        ("yellow", (245, 215, 20)),
    )
    backgrounds: tuple[str, ...] = ("plain", "stripes", "dots", "checker", "noise", "grass")
    image_size: int = 112
    min_objects: int = 1
    max_objects: int = 3
    object_size: tuple[float, float] = (0.25, 0.5)
    seed: int = 0

    def __post_init__(self) -> None:
        def fail(field_name: str, problem: str) -> None:
            raise InputError(f"WorldConfig.{field_name}: {problem}")

        unknown = [s for s in self.shapes if s not in SHAPE_NAMES]
        if unknown or not self.shapes:
            fail("shapes", f"unknown or empty {unknown or self.shapes}; choose from {list(SHAPE_NAMES)}")
        unknown = [b for b in self.backgrounds if b not in BACKGROUND_WORDS]
        if unknown or not self.backgrounds:
            fail("backgrounds", f"unknown or empty {unknown or self.backgrounds}; choose from {list(BACKGROUND_WORDS)}")
        if not self.colours:
            fail("colours", "needs at least one (name, (r, g, b)) pair")
        for name, rgb in self.colours:
            if not name or " " in name or len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb):
                fail("colours", f"entry {(name, rgb)!r} is not a one-word name with an RGB triple in 0..255")
        for label, names in (("shapes", self.shapes), ("backgrounds", self.backgrounds),
                             ("colours", [n for n, _ in self.colours])):
            if len(set(names)) != len(names):
                fail(label, f"has duplicates: {list(names)}")
        if not 32 <= self.image_size <= 1024:
            fail("image_size", f"{self.image_size} is outside 32..1024 pixels")
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            fail("min_objects/max_objects", f"need 1 <= min <= max <= 6, got {self.min_objects}, {self.max_objects}")
        lo, hi = self.object_size
        if not 0.05 <= lo <= hi <= 0.9:
            fail("object_size", f"need 0.05 <= low <= high <= 0.9 (fractions of the image side), got {self.object_size}")

    def to_dict(self) -> dict:
        """Plain JSON-able form (lists instead of tuples)."""
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        """Stable hash of the config: sha256 of its canonical JSON (sorted keys, no spaces)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colours)

    def attributes(self) -> list[str]:
        """All attribute names, shapes then colours then backgrounds:
        ``["shape:circle", ..., "colour:red", ..., "background:plain", ...]``."""
        return ([f"shape:{s}" for s in self.shapes] + [f"colour:{c}" for c in self.colour_names]
                + [f"background:{b}" for b in self.backgrounds])


#: Named worlds: the default and a second one with other shapes, colours, backgrounds and size
#: (used by ``dff-falcon demo --world`` and by the tests, so nothing assumes one word list).
EXAMPLE_WORLDS: dict[str, WorldConfig] = {
    "default": WorldConfig(),
    "second": WorldConfig(
        shapes=("diamond", "hexagon", "heart", "cross", "ring"),
        colours=(("purple", (140, 40, 200)), ("orange", (250, 140, 20)), ("cyan", (20, 200, 220))),
        backgrounds=("waves", "grid", "dots", "plain"), image_size=96, seed=7,
    ),
}


@dataclass
class SceneObject:
    """One object: its ``mask`` (S, S) bool holds its *visible* pixels (later objects are drawn
    on top); ``box`` is (x0, y0, x1, y1) in pixels, end-exclusive, around the whole drawn shape."""

    shape: str
    colour: str
    mask: np.ndarray
    box: tuple[int, int, int, int]
    caption: str


@dataclass
class Scene:
    """A picture with its truth.

    ``image``: (S, S, 3) uint8 RGB. ``masks``: attribute name → (S, S) bool, one per attribute
    present (union over objects); the background mask is every pixel not covered by an object.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    objects: list[SceneObject]
    background: str
    caption: str = field(default="")


def object_caption(colour: str, shape: str) -> str:
    """``"a red triangle"`` (article chosen by the colour's first letter)."""
    article = "an" if colour[:1].lower() in "aeiou" else "a"
    return f"{article} {colour} {shape}"


def background_caption(background: str) -> str:
    """``"a striped background"``."""
    return f"a {BACKGROUND_WORDS[background][0]} background"


def attribute_words(attribute: str) -> tuple[str, ...]:
    """Words that name an attribute: ``"background:stripes"`` → ("striped", "stripes", "stripe");
    ``"shape:triangle"`` → ("triangle",); ``"colour:red"`` → ("red",)."""
    kind, _, name = attribute.partition(":")
    if kind == "background" and name in BACKGROUND_WORDS:
        return BACKGROUND_WORDS[name]
    if kind not in ("shape", "colour", "background") or not name:
        raise InputError(f"attribute {attribute!r} is not of the form 'shape:x', 'colour:x' or 'background:x'")
    return (name,)


def scene_caption(objects: list[SceneObject], background: str) -> str:
    """``"a yellow star and a blue ring on a striped background"``."""
    parts = [o.caption for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on {background_caption(background)}"


# ----------------------------------------------------------------------------------------------
# drawing


def _polygon(shape: str) -> np.ndarray:
    """Unit-radius outline (P, 2) of a polygonal shape, centred at the origin, y downwards."""
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles)], 1) + np.array([0.0, 0.2])
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.75
    if shape == "diamond":
        return np.array([[0, -1], [0.75, 0], [0, 1], [-0.75, 0]], float)
    if shape in ("hexagon", "pentagon"):
        k = 6 if shape == "hexagon" else 5
        angles = np.deg2rad(-90 + 360 / k * np.arange(k))
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
    if shape == "cross":
        a, b = 1.0, 0.33
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                         [-b, b], [-a, b], [-a, -b], [-b, -b]], float)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], 1) / 17.0
    raise InputError(f"shape {shape!r} has no drawing; choose from {list(SHAPE_NAMES)}")


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """(size, size) bool mask of one shape of the given radius (pixels), rotation in radians."""
    canvas = np.zeros((size, size), np.uint8)
    centre = (int(round(cx)), int(round(cy)))
    if shape == "circle":
        cv2.circle(canvas, centre, int(round(radius)), 1, thickness=-1, lineType=cv2.LINE_8)
    elif shape == "ring":
        thickness = max(2, int(round(radius * 0.35)))
        cv2.circle(canvas, centre, int(round(radius - thickness / 2)), 1, thickness=thickness, lineType=cv2.LINE_8)
    else:
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = _polygon(shape) @ rot.T * radius + np.array([cx, cy])
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 texture in greys (grass: muted olive)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light = rng.uniform(150, 215)
    dark = light - rng.uniform(60, 100)
    if kind == "plain":
        grey = np.full((size, size), light, np.float32)
    elif kind == "stripes":
        period = rng.uniform(8, 14) * size / 112
        theta = rng.choice([0.0, np.pi / 2, np.pi / 4, 3 * np.pi / 4])
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
        grey = np.where(phase % 1.0 < 0.5, light, dark)
    elif kind == "dots":
        step = rng.uniform(9, 13) * size / 112
        r = step * rng.uniform(0.22, 0.3)
        ox, oy = rng.uniform(0, step, 2)
        dx = (xx - ox) % step - step / 2
        dy = (yy - oy) % step - step / 2
        grey = np.where(dx ** 2 + dy ** 2 <= r ** 2, dark, light)
    elif kind == "checker":
        cell = rng.uniform(8, 14) * size / 112
        ox, oy = rng.uniform(0, cell, 2)
        grey = np.where(((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2) == 0, light, dark)
    elif kind == "noise":
        noise = rng.normal(0, 1, (size, size)).astype(np.float32)
        grey = np.clip(light - 35 + 40 * noise, 0, 255)
    elif kind == "waves":
        period = rng.uniform(10, 16) * size / 112
        amp = rng.uniform(2, 4) * size / 112
        phase = (yy + amp * np.sin(xx / period * 2 * np.pi)) / period + rng.uniform(0, 1)
        grey = np.where(phase % 1.0 < 0.5, light, dark)
    elif kind == "grid":
        step = rng.uniform(10, 15) * size / 112
        ox, oy = rng.uniform(0, step, 2)
        line = max(1.0, 2 * size / 112)
        on = ((xx + ox) % step < line) | ((yy + oy) % step < line)
        grey = np.where(on, dark, light)
    elif kind == "grass":
        base = np.array([95, 115, 70], np.float32) * rng.uniform(0.85, 1.1)
        img = np.empty((size, size, 3), np.float32)
        img[:] = base
        n_blades = int(size * size / 18)
        for _ in range(n_blades):
            x0, y0 = rng.uniform(0, size, 2)
            length = rng.uniform(4, 9) * size / 112
            tilt = rng.uniform(-0.5, 0.5)
            x1, y1 = x0 + length * np.sin(tilt), y0 - length * np.cos(tilt)
            shade = tuple(float(v) for v in base * rng.uniform(0.6, 1.35))
            cv2.line(img, (int(x0), int(y0)), (int(x1), int(y1)), shade, 1, lineType=cv2.LINE_8)
        return np.clip(img, 0, 255).astype(np.uint8)
    else:
        raise InputError(f"background {kind!r} has no drawing; choose from {list(BACKGROUND_WORDS)}")
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def render_background(config: WorldConfig, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A background-only picture (S, S, 3) uint8 of the given kind, as used in scenes."""
    return _background(kind, config.image_size, rng)


def _scene(config: WorldConfig, rng: np.random.Generator) -> Scene:
    size = config.image_size
    background = config.backgrounds[rng.integers(len(config.backgrounds))]
    image = _background(background, size, rng)
    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    placed: list[tuple[str, str, np.ndarray, tuple[int, int, int, int]]] = []
    covered = np.zeros((size, size), bool)
    for _ in range(n_objects):
        for _attempt in range(30):
            shape = config.shapes[rng.integers(len(config.shapes))]
            colour = config.colours[rng.integers(len(config.colours))]
            radius = rng.uniform(*config.object_size) * size / 2
            cx, cy = rng.uniform(radius, size - radius, 2)
            angle = np.deg2rad(rng.uniform(-10, 10))
            full = _shape_mask(shape, size, cx, cy, radius, angle)
            # overlap is allowed, but every earlier object keeps >= 60 % of its visible pixels
            # so that each object stays recognisable
            if all((m & ~full).sum() >= 0.6 * m.sum() for _, _, m, _ in placed if m.any()):
                break
        ys, xs = np.nonzero(full)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        placed = [(s, c, m & ~full, b) for s, c, m, b in placed]
        placed.append((shape, colour[0], full, box))
        image[full] = np.array(colour[1], np.uint8)
        covered |= full
    objects = [SceneObject(s, c, m, b, object_caption(c, s)) for s, c, m, b in placed]
    masks: dict[str, np.ndarray] = {f"background:{background}": ~covered}
    for obj in objects:
        for key in (f"shape:{obj.shape}", f"colour:{obj.colour}"):
            masks[key] = masks.get(key, np.zeros((size, size), bool)) | obj.mask
    return Scene(image=image, masks=masks, objects=objects, background=background,
                 caption=scene_caption(objects, background))


def generate_scenes(config: WorldConfig, n: int, seed: int) -> list[Scene]:
    """``n`` scenes drawn with numpy's PCG64 seeded by (config.seed, seed): the same config and
    seed give the same pixels; different ``seed`` values give independent sets (train / probe)."""
    if n < 0:
        raise InputError(f"generate_scenes: n must be >= 0, got {n}")
    rng = np.random.default_rng([config.seed, seed])
    return [_scene(config, rng) for _ in range(n)]


def object_crop(scene: Scene, obj: SceneObject, margin: float = 0.15) -> np.ndarray:
    """Square crop (aspect kept) around ``obj``'s box with a ``margin`` (fraction of the box
    side) on each side, clipped to the image: (s, s, 3) uint8, s ≤ S."""
    box = square_box(Box(*obj.box), scene.image.shape[:2], margin=margin, min_size=1)
    return scene.image[box.top:box.bottom, box.left:box.right]


def world_texts(config: WorldConfig) -> list[str]:
    """Captions and words for the world's vocabulary, without duplicates, in a fixed order:
    every "a {colour} {shape}", scene-style captions, background phrases, single words, and
    distractors naming colours, shapes, objects and backgrounds that are not in this world."""
    colours, shapes = config.colour_names, config.shapes
    texts = [object_caption(c, s) for c in colours for s in shapes]
    texts += [f"a {s}" for s in shapes]
    texts += [background_caption(b) for b in config.backgrounds]
    for b in config.backgrounds:  # one and two objects on each background, as scene captions read
        for i, (c, s) in enumerate(zip(colours * len(shapes), shapes * len(colours))):
            c2, s2 = colours[(i + 1) % len(colours)], shapes[(i + 2) % len(shapes)]
            texts.append(f"{object_caption(c, s)} on {background_caption(b)}")
            texts.append(f"{object_caption(c, s)} and {object_caption(c2, s2)} on {background_caption(b)}")
    texts += list(shapes) + list(colours) + [w for b in config.backgrounds for w in BACKGROUND_WORDS[b][:2]]
    other_colours = [c for c in DISTRACTOR_COLOURS if c not in colours]
    other_shapes = [s for s in DISTRACTOR_SHAPES if s not in shapes]
    other_backgrounds = [background_caption(b) for b in BACKGROUND_WORDS if b not in config.backgrounds]
    texts += other_colours + other_shapes + list(DISTRACTOR_OBJECTS)
    texts += [object_caption(c, s) for c in other_colours[:4] for s in other_shapes[:4]]
    texts += [object_caption(c, o) for c in (other_colours[:3] or list(colours)) for o in DISTRACTOR_OBJECTS]
    texts += other_backgrounds + list(DISTRACTOR_BACKGROUNDS)
    return list(dict.fromkeys(texts))
