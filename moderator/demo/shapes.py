"""Synthetic coloured shapes: the images the demo CLIP model is trained and tested on.

Every image is one flat-coloured shape on a light background. `render_shape` draws exactly the
shape asked for (deterministic: tests and the demo use it); `random_shape_image` draws a random
one with the variation the model is trained for: size, position, canvas aspect ratio, background
tint, colour jitter and a slight rotation.

Shapes are drawn as polygons (a circle is a 96-gon) at 4x resolution and box-filtered down, so
edges are anti-aliased while the inside keeps the exact fill colour.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Point = tuple[float, float]

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (40, 160, 50),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 45, 175),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star")

DEFAULT_BACKGROUND: RGB = (235, 235, 235)

_SUPERSAMPLE = 4
_CIRCLE_VERTICES = 96
_STAR_POINTS = 5
_STAR_INNER_RATIO = 0.45
# Distance from the centre to the farthest point of each shape, per unit of its nominal size
# (scale x shorter canvas side), at any rotation: chosen so all four shapes look about as big.
_OUTER_RADIUS = {
    "circle": 0.5,
    "square": 0.85 * math.sqrt(2) / 2,
    "triangle": 0.6,
    "star": 0.56,
}

# Ranges random_shape_image draws from.
_LONG_SIDE = (96, 256)
_MAX_ASPECT = 2.0
_SCALE = (0.3, 0.75)
_MAX_ROTATION = 15.0
_COLOUR_JITTER = 15
_BACKGROUND_LEVEL = (212, 250)
_BACKGROUND_TINT = 8
_EDGE_MARGIN = 2.0  # pixels kept free between the shape and the canvas edge


def render_shape(
    colour: str,
    shape: str,
    width: int = 160,
    height: int = 160,
    *,
    scale: float = 0.6,
    center: tuple[float, float] = (0.5, 0.5),
    background: RGB = DEFAULT_BACKGROUND,
    rotation: float = 0.0,
) -> Image.Image:
    """One `colour` `shape` on a plain `background`, as an RGB image of `width` x `height`.

    `scale` is the shape's size relative to the shorter canvas side, `center` its centre as
    fractions of the width and height, `rotation` in degrees, counter-clockwise.
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    return draw_shape(
        COLOURS[colour],
        shape,
        width,
        height,
        scale=scale,
        center=center,
        background=background,
        rotation=rotation,
    )


def draw_shape(
    fill: RGB,
    shape: str,
    width: int,
    height: int,
    *,
    scale: float,
    center: tuple[float, float],
    background: RGB,
    rotation: float,
) -> Image.Image:
    """Like `render_shape`, with the fill given as an RGB triple instead of a colour name."""
    if width <= 0 or height <= 0:
        raise ValueError(f"canvas must be at least 1x1, got {width}x{height}")
    size = scale * min(width, height) * _SUPERSAMPLE
    centre = (center[0] * width * _SUPERSAMPLE, center[1] * height * _SUPERSAMPLE)
    canvas = Image.new("RGB", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), background)
    ImageDraw.Draw(canvas).polygon(shape_outline(shape, centre, size, rotation), fill=fill)
    return canvas.resize((width, height), Image.Resampling.BOX)


def shape_outline(shape: str, centre: Point, size: float, rotation: float) -> list[Point]:
    """The polygon of `shape` with nominal `size` (in pixels) around `centre`, rotated."""
    if shape not in _OUTER_RADIUS:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    outer = _OUTER_RADIUS[shape] * size
    if shape == "circle":
        return regular_polygon(centre, [outer], _CIRCLE_VERTICES, rotation)
    if shape == "square":
        return regular_polygon(centre, [outer], 4, rotation + 45.0)
    if shape == "triangle":
        return regular_polygon(centre, [outer], 3, rotation)
    return regular_polygon(centre, [outer, outer * _STAR_INNER_RATIO], _STAR_POINTS * 2, rotation)


def regular_polygon(centre: Point, radii: list[float], count: int, rotation: float) -> list[Point]:
    """`count` vertices evenly spaced around `centre`, the first pointing up (before rotation).

    Vertex k lies at radius radii[k % len(radii)]: two radii make a star.
    """
    start = -math.pi / 2 - math.radians(rotation)
    points: list[Point] = []
    for k in range(count):
        angle = start + 2 * math.pi * k / count
        radius = radii[k % len(radii)]
        points.append((centre[0] + radius * math.cos(angle), centre[1] + radius * math.sin(angle)))
    return points


def outer_radius(shape: str, size: float) -> float:
    """How far `shape` of nominal `size` reaches from its centre, at any rotation."""
    return _OUTER_RADIUS[shape] * size


def random_shape_image(rng: random.Random) -> tuple[Image.Image, str, str]:
    """A random shape image and its (colour, shape) labels, drawn only from `rng`."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    width, height = random_canvas_size(rng)
    scale = rng.uniform(*_SCALE)
    image = draw_shape(
        jitter_colour(rng, COLOURS[colour]),
        shape,
        width,
        height,
        scale=scale,
        center=random_center(rng, shape, scale, width, height),
        background=random_background(rng),
        rotation=rng.uniform(-_MAX_ROTATION, _MAX_ROTATION),
    )
    return image, colour, shape


def random_canvas_size(rng: random.Random) -> tuple[int, int]:
    """Width and height with an aspect ratio between 1:2 and 2:1, the long side 96..256 px."""
    long_side = rng.randint(*_LONG_SIDE)
    aspect = math.exp(rng.uniform(0.0, math.log(_MAX_ASPECT)))
    short_side = round(long_side / aspect)
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def random_center(
    rng: random.Random, shape: str, scale: float, width: int, height: int
) -> tuple[float, float]:
    """A centre (as fractions of the canvas) that keeps the whole shape inside the canvas."""
    reach = outer_radius(shape, scale * min(width, height)) + _EDGE_MARGIN
    x = rng.uniform(reach, max(reach, width - reach))
    y = rng.uniform(reach, max(reach, height - reach))
    return x / width, y / height


def random_background(rng: random.Random) -> RGB:
    """A light grey with a slight random tint."""
    level = rng.randint(*_BACKGROUND_LEVEL)
    r, g, b = (min(255, level + rng.randint(-_BACKGROUND_TINT, _BACKGROUND_TINT)) for _ in range(3))
    return r, g, b


def jitter_colour(rng: random.Random, colour: RGB) -> RGB:
    """`colour` with each channel moved by a small random amount."""
    r, g, b = (
        min(255, max(0, channel + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER)))
        for channel in colour
    )
    return r, g, b
