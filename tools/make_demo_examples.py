"""Write the regression examples of the demo policies to policies/demo/examples/.

python tools/make_demo_examples.py
moderator policies test policies/demo policies/demo/examples --demo
"""

from __future__ import annotations

from pathlib import Path

from moderator.config import DEMO_POLICIES_DIR
from moderator.demo.shapes import render_shape

# policy id -> kind -> (file stem, colour, shape, width, height, scale, centre, rotation)
Shape = tuple[str, str, str, int, int, float, tuple[float, float], float]
EXAMPLES: dict[str, dict[str, list[Shape]]] = {
    "red": {
        "violating": [
            ("red-circle", "red", "circle", 160, 160, 0.6, (0.5, 0.5), 0.0),
            ("red-triangle-small-corner", "red", "triangle", 200, 160, 0.35, (0.3, 0.35), 0.0),
            ("red-star-wide", "red", "star", 240, 130, 0.7, (0.7, 0.5), 12.0),
        ],
        "benign": [
            ("orange-circle", "orange", "circle", 160, 160, 0.6, (0.5, 0.5), 0.0),
            ("purple-square", "purple", "square", 160, 200, 0.5, (0.5, 0.6), 0.0),
            ("blue-star", "blue", "star", 160, 160, 0.6, (0.5, 0.5), 0.0),
        ],
    },
    "stars": {
        "violating": [
            ("yellow-star", "yellow", "star", 160, 160, 0.6, (0.5, 0.5), 0.0),
            ("green-star-small", "green", "star", 180, 180, 0.4, (0.4, 0.6), 0.0),
            ("purple-star-tall", "purple", "star", 130, 240, 0.7, (0.5, 0.35), -10.0),
        ],
        "benign": [
            ("yellow-circle", "yellow", "circle", 160, 160, 0.6, (0.5, 0.5), 0.0),
            ("red-triangle", "red", "triangle", 160, 160, 0.6, (0.5, 0.5), 0.0),
            ("green-square", "green", "square", 160, 160, 0.6, (0.5, 0.5), 0.0),
        ],
    },
    "green_squares": {
        "violating": [
            ("green-square", "green", "square", 160, 160, 0.6, (0.5, 0.5), 0.0),
            ("green-square-small", "green", "square", 200, 150, 0.4, (0.65, 0.45), 8.0),
        ],
        "benign": [
            ("blue-square", "blue", "square", 160, 160, 0.6, (0.5, 0.5), 0.0),
            ("green-circle", "green", "circle", 160, 160, 0.6, (0.5, 0.5), 0.0),
            ("yellow-square", "yellow", "square", 160, 160, 0.6, (0.5, 0.5), 0.0),
        ],
    },
}


def main(out: Path = DEMO_POLICIES_DIR / "examples") -> None:
    for policy_id, kinds in EXAMPLES.items():
        for kind, shapes in kinds.items():
            directory = out / policy_id / kind
            directory.mkdir(parents=True, exist_ok=True)
            for stem, colour, shape, width, height, scale, centre, rotation in shapes:
                image = render_shape(
                    colour, shape, width, height, scale=scale, center=centre, rotation=rotation
                )
                image.save(directory / f"{stem}.png", optimize=True)
    print(f"wrote examples for {len(EXAMPLES)} policies to {out}")


if __name__ == "__main__":
    main()
