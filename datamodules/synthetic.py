"""The synthetic perception task: the embedded default data set of the CPU demo and of the tests.

Each example is an image of a few flat-coloured shapes (plus optional grey clutter that is not a shape) and
a question that cannot be answered without looking at it, with a short verifiable answer:

==================== ============================================================ ===============
family               question                                                      answer
==================== ============================================================ ===============
``count_colour``     How many red shapes are in the image?                         digits, "0" too
``count_kind``       How many triangles are in the image?                          digits
``colour_of``        What colour is the triangle?  (only if the kind is unique)    colour name
``relative_position`` Is the red circle to the left of the blue square?             "yes" / "no"
``presence``         Is there a green triangle in the image?                       "yes" / "no"
==================== ============================================================ ===============

Relative-position questions name shapes whose (colour, kind) is unique and are only asked when the two
shapes' extents are disjoint along the asked axis; yes/no families are balanced by drawing the answer first.

Everything is a pure function of ``(config, split, index, seed)``. Splits never share an image: a layout
(background + shapes, clutter excluded) belongs to exactly one split, decided by a hash of the layout that
does not depend on the seed, and each split only keeps layouts of its own (rejection sampling).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "FAMILIES",
    "FEATURES",
    "SHAPE_KINDS",
    "SPLITS",
    "ClutterMark",
    "Scene",
    "Shape",
    "SyntheticExample",
    "SyntheticTaskConfig",
    "example_id",
    "export_synthetic_dataset",
    "generate_example",
    "generate_split",
    "render_scene",
    "split_of_layout",
    "to_hf_dataset",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 225),
    "yellow": (245, 205, 25),
    "purple": (145, 65, 185),
    "orange": (245, 135, 30),
}
"""Shape colours by name. Clutter is grey, so it never has one of these colours."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (222, 222, 222),
    "beige": (240, 232, 208),
    "dark grey": (55, 55, 55),
}

SHAPE_KINDS = ("circle", "square", "triangle", "diamond", "star")
FAMILIES = ("count_colour", "count_kind", "colour_of", "relative_position", "presence")
SPLITS = ("train", "validation", "test")

FEATURES = Features(
    {
        "id": Value("string"),
        "image": ImageFeature(),
        "question": Value("string"),
        "answer": Value("string"),
        "family": Value("string"),
    }
)
"""Columns of the exported data set."""

_RELATIONS = {  # relation -> (axis, True if the first shape must have the smaller coordinate)
    "to the left of": (0, True),
    "to the right of": (0, False),
    "above": (1, True),
    "below": (1, False),
}
_MAX_SCENE_ATTEMPTS = 2000
_MAX_PLACEMENT_ATTEMPTS = 100


@dataclass
class SyntheticTaskConfig:
    """Difficulty knobs of the synthetic perception task.

    Args:
        image_size: Side of the square images in pixels.
        min_shapes: Fewest shapes per image.
        max_shapes: Most shapes per image.
        shape_size_range: Range of a shape's diameter (of its circumscribed circle), as a fraction of
            ``image_size``.
        clutter: Number of grey specks and short lines drawn behind the shapes (0 = clean images).
        families: Question families to ask, out of ``FAMILIES``.
        family_weights: Relative frequency of each entry of ``families``; ``None`` = equal.
        shape_kinds: Shape kinds to draw, out of ``SHAPE_KINDS``.
        colours: Shape colours to draw, out of ``COLOURS``.
        backgrounds: Background colours, out of ``BACKGROUNDS``.
    """

    image_size: int = 224
    min_shapes: int = 2
    max_shapes: int = 6
    shape_size_range: tuple[float, float] = (0.12, 0.22)
    clutter: int = 8
    families: tuple[str, ...] = FAMILIES
    family_weights: tuple[float, ...] | None = None
    shape_kinds: tuple[str, ...] = SHAPE_KINDS
    colours: tuple[str, ...] = tuple(COLOURS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)

    def __post_init__(self) -> None:
        # YAML and JSON give lists: tuples keep configs comparable with the defaults.
        for field in dataclasses.fields(self):
            if isinstance(getattr(self, field.name), list):
                setattr(self, field.name, tuple(getattr(self, field.name)))
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {self.min_shapes}, {self.max_shapes}")
        low, high = self.shape_size_range
        if not 0 < low <= high <= 0.5 or round(low * self.image_size) < 8:
            raise ValueError(
                "shape_size_range must satisfy 0 < low <= high <= 0.5 with shapes of at least 8 px, "
                f"got {(low, high)}"
            )
        if self.clutter < 0:
            raise ValueError(f"clutter must be >= 0, got {self.clutter}")
        for name, known in (
            ("families", FAMILIES),
            ("shape_kinds", SHAPE_KINDS),
            ("colours", tuple(COLOURS)),
            ("backgrounds", tuple(BACKGROUNDS)),
        ):
            values = getattr(self, name)
            unknown = [v for v in values if v not in known]
            if not values or unknown or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct, non-empty values out of {known}, got {values}")
        if "relative_position" in self.families and self.max_shapes < 2:
            raise ValueError("relative_position questions need max_shapes >= 2")
        weights = self.family_weights
        if weights is not None and (
            len(weights) != len(self.families) or min(weights) < 0 or sum(weights) <= 0
        ):
            raise ValueError(
                f"family_weights must give one non-negative weight per family {self.families}, got {weights}"
            )
        # Rough packing bound: every shape with its gap as a square must fit in half the free area.
        side = self._max_diameter() + self._gap()
        if self.max_shapes * side**2 > 0.5 * (self.image_size - 2 * self._margin()) ** 2:
            raise ValueError(
                f"{self.max_shapes} shapes of up to {self._max_diameter()} px do not fit reliably in "
                f"{self.image_size} px images; lower max_shapes or shape_size_range"
            )

    def _min_diameter(self) -> int:
        return max(8, round(self.shape_size_range[0] * self.image_size))

    def _max_diameter(self) -> int:
        return max(self._min_diameter(), round(self.shape_size_range[1] * self.image_size))

    def _gap(self) -> int:
        return max(2, round(0.02 * self.image_size))

    def _margin(self) -> int:
        return max(1, round(0.01 * self.image_size))


@dataclass(frozen=True)
class Shape:
    """One shape: ``kind``, ``colour``, centre ``(x, y)`` and diameter of its circumscribed circle (px)."""

    kind: str
    colour: str
    x: int
    y: int
    diameter: int

    @property
    def radius(self) -> float:
        """Radius of the circumscribed circle: the shape lies inside it."""
        return self.diameter / 2

    def extent(self, axis: int) -> tuple[float, float]:
        """``(low, high)`` coordinates covered along ``axis`` (0 = x, 1 = y)."""
        centre = self.x if axis == 0 else self.y
        return centre - self.radius, centre + self.radius


@dataclass(frozen=True)
class ClutterMark:
    """A grey speck (``points`` = one centre, ``width`` = radius) or line (``points`` = two ends)."""

    kind: str
    points: tuple[tuple[int, int], ...]
    width: int
    grey: int


@dataclass(frozen=True)
class Scene:
    """Everything that is drawn: the image is ``render_scene(scene)``."""

    image_size: int
    background: str
    shapes: tuple[Shape, ...]
    clutter: tuple[ClutterMark, ...]

    def layout_key(self) -> str:
        """Canonical text of what a viewer can tell apart (background and shapes, not clutter, not order)."""
        shapes = sorted((s.kind, s.colour, s.x, s.y, s.diameter) for s in self.shapes)
        return json.dumps([self.image_size, self.background, shapes], separators=(",", ":"))


@dataclass(frozen=True)
class SyntheticExample:
    """One generated example with the scene it was drawn from."""

    id: str
    scene: Scene
    image: Image.Image
    question: str
    answer: str
    family: str

    def to_dict(self) -> dict[str, Any]:
        """The data set's columns: ``id``, ``image`` (PIL RGB), ``question``, ``answer``, ``family``."""
        return {
            "id": self.id,
            "image": self.image,
            "question": self.question,
            "answer": self.answer,
            "family": self.family,
        }


# --------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------


def split_of_layout(scene: Scene) -> str:
    """The only split that may contain this layout (a seed-independent hash of :meth:`Scene.layout_key`)."""
    digest = hashlib.blake2b(scene.layout_key().encode("utf-8"), digest_size=8, person=b"cppo-split").digest()
    return SPLITS[int.from_bytes(digest, "little") % len(SPLITS)]


def _sample_shapes(config: SyntheticTaskConfig, rng: random.Random) -> tuple[Shape, ...] | None:
    """Place shapes whose circumscribed circles are ``gap`` apart; ``None`` if one does not fit."""
    size, gap, margin = config.image_size, config._gap(), config._margin()
    shapes: list[Shape] = []
    for _ in range(rng.randint(config.min_shapes, config.max_shapes)):
        for _ in range(_MAX_PLACEMENT_ATTEMPTS):
            diameter = rng.randint(config._min_diameter(), config._max_diameter())
            half = math.ceil(diameter / 2)
            x = rng.randint(margin + half, size - 1 - margin - half)
            y = rng.randint(margin + half, size - 1 - margin - half)
            if all(math.hypot(x - s.x, y - s.y) >= diameter / 2 + s.radius + gap for s in shapes):
                kind, colour = rng.choice(config.shape_kinds), rng.choice(config.colours)
                shapes.append(Shape(kind, colour, x, y, diameter))
                break
        else:
            return None
    return tuple(shapes)


def _sample_clutter(config: SyntheticTaskConfig, rng: random.Random) -> tuple[ClutterMark, ...]:
    size = config.image_size
    marks = []
    for _ in range(config.clutter):
        grey = rng.randint(90, 170)
        if rng.random() < 0.5:
            centre = (rng.randrange(size), rng.randrange(size))
            marks.append(ClutterMark("speck", (centre,), rng.randint(1, 2), grey))
        else:
            x, y = rng.randrange(size), rng.randrange(size)
            length = rng.uniform(0.04, 0.1) * size
            angle = rng.uniform(0, math.pi)
            end = (round(x + length * math.cos(angle)), round(y + length * math.sin(angle)))
            marks.append(ClutterMark("line", ((x, y), end), 1, grey))
    return tuple(marks)


def _shape_polygon(shape: Shape) -> list[tuple[float, float]]:
    r, cx, cy = shape.radius, shape.x, shape.y
    if shape.kind == "square":
        angles, radii = [45, 135, 225, 315], [r] * 4
    elif shape.kind == "diamond":
        angles, radii = [0, 90, 180, 270], [r] * 4
    elif shape.kind == "triangle":
        angles, radii = [-90, 30, 150], [r] * 3
    elif shape.kind == "star":
        angles = [-90 + 36 * i for i in range(10)]
        radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    else:
        raise ValueError(f"no polygon for {shape.kind!r}")
    return [
        (cx + rad * math.cos(math.radians(a)), cy + rad * math.sin(math.radians(a)))
        for a, rad in zip(angles, radii, strict=True)
    ]


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` (no anti-aliasing: every shape pixel has exactly its palette colour).

    Returns:
        PIL RGB image of ``scene.image_size`` x ``scene.image_size``.
    """
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for mark in scene.clutter:  # behind the shapes, so shapes stay whole
        fill = (mark.grey, mark.grey, mark.grey)
        if mark.kind == "speck":
            (x, y), r = mark.points[0], mark.width
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.line(mark.points, fill=fill, width=mark.width)
    for shape in scene.shapes:
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            r = shape.radius
            draw.ellipse((shape.x - r, shape.y - r, shape.x + r, shape.y + r), fill=colour)
        else:
            draw.polygon(_shape_polygon(shape), fill=colour)
    return image


# --------------------------------------------------------------------------------------------------------
# Questions: each returns (question, answer) or None when the family does not apply to the scene.
# --------------------------------------------------------------------------------------------------------


def _plural(kind: str) -> str:
    return kind + "s"


def _pick_mostly_present(rng: random.Random, present: Sequence[str], pool: Sequence[str]) -> str:
    # Mostly ask about what is there (interesting counts); sometimes about anything (answer may be 0).
    return rng.choice(sorted(set(present))) if present and rng.random() < 0.75 else rng.choice(pool)


def _count_colour(scene: Scene, config: SyntheticTaskConfig, rng: random.Random) -> tuple[str, str]:
    colour = _pick_mostly_present(rng, [s.colour for s in scene.shapes], config.colours)
    count = sum(s.colour == colour for s in scene.shapes)
    return f"How many {colour} shapes are in the image?", str(count)


def _count_kind(scene: Scene, config: SyntheticTaskConfig, rng: random.Random) -> tuple[str, str]:
    kind = _pick_mostly_present(rng, [s.kind for s in scene.shapes], config.shape_kinds)
    count = sum(s.kind == kind for s in scene.shapes)
    return f"How many {_plural(kind)} are in the image?", str(count)


def _colour_of(scene: Scene, config: SyntheticTaskConfig, rng: random.Random) -> tuple[str, str] | None:
    counts = Counter(s.kind for s in scene.shapes)
    unique = sorted(kind for kind, n in counts.items() if n == 1)
    if not unique:
        return None
    kind = rng.choice(unique)
    shape = next(s for s in scene.shapes if s.kind == kind)
    return f"What colour is the {kind}?", shape.colour


def _relative_position(
    scene: Scene, config: SyntheticTaskConfig, rng: random.Random
) -> tuple[str, str] | None:
    counts = Counter((s.colour, s.kind) for s in scene.shapes)
    named = [s for s in scene.shapes if counts[s.colour, s.kind] == 1]
    named.sort(key=lambda s: (s.colour, s.kind))
    candidates: dict[str, list[tuple[Shape, str, Shape]]] = {"yes": [], "no": []}
    for a in named:
        for b in named:
            if a is b:
                continue
            for relation, (axis, a_first) in _RELATIONS.items():
                a_low, a_high = a.extent(axis)
                b_low, b_high = b.extent(axis)
                if a_high < b_low:
                    holds = a_first
                elif b_high < a_low:
                    holds = not a_first
                else:  # extents overlap along this axis: ambiguous, never asked
                    continue
                candidates["yes" if holds else "no"].append((a, relation, b))
    available = [answer for answer in ("yes", "no") if candidates[answer]]
    if not available:
        return None
    # Every disjoint pair gives both a true and a false question, so both lists fill together: 50/50.
    answer = rng.choice(available)
    a, relation, b = rng.choice(candidates[answer])
    return f"Is the {a.colour} {a.kind} {relation} the {b.colour} {b.kind}?", answer


def _presence(scene: Scene, config: SyntheticTaskConfig, rng: random.Random) -> tuple[str, str] | None:
    present = {(s.colour, s.kind) for s in scene.shapes}
    absent = [(c, k) for c in config.colours for k in config.shape_kinds if (c, k) not in present]
    if not absent:
        return None
    if rng.random() < 0.5:
        colour, kind = rng.choice(sorted(present))
        return f"Is there a {colour} {kind} in the image?", "yes"
    colours = {c for c, _ in present}
    kinds = {k for _, k in present}
    # Prefer near misses (right colour or right kind) so that "no" needs a look at the pairing.
    near = [(c, k) for c, k in absent if c in colours or k in kinds]
    colour, kind = rng.choice(near or absent)
    return f"Is there a {colour} {kind} in the image?", "no"


_FAMILY_FUNCTIONS = {
    "count_colour": _count_colour,
    "count_kind": _count_kind,
    "colour_of": _colour_of,
    "relative_position": _relative_position,
    "presence": _presence,
}


# --------------------------------------------------------------------------------------------------------
# Examples, splits, data sets
# --------------------------------------------------------------------------------------------------------


def example_id(split: str, index: int) -> str:
    """Stable example id, e.g. ``"synthetic-train-000042"``."""
    return f"synthetic-{split}-{index:06d}"


def _example_rng(seed: int, split: str, index: int) -> random.Random:
    key = f"{int(seed)}\x1f{split}\x1f{int(index)}".encode("utf-8")
    digest = hashlib.blake2b(key, digest_size=16, person=b"cppo-synth").digest()
    return random.Random(int.from_bytes(digest, "little"))


def generate_example(config: SyntheticTaskConfig, split: str, index: int, seed: int) -> SyntheticExample:
    """Example ``index`` of ``split``: a pure function of its arguments, independent of other examples.

    Args:
        config: Task configuration.
        split: One of ``SPLITS``.
        index: Position in the split, ``>= 0``.
        seed: Base seed of the data set.

    Returns:
        The example with its scene description.

    Raises:
        ValueError: Unknown split, or no suitable scene found (configuration too tight).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    rng = _example_rng(seed, split, index)
    # The family is drawn first and scenes are resampled until it applies, so the family mix is exact.
    family = rng.choices(config.families, weights=config.family_weights)[0]
    ask = _FAMILY_FUNCTIONS[family]
    for _ in range(_MAX_SCENE_ATTEMPTS):
        shapes = _sample_shapes(config, rng)
        if shapes is None:
            continue
        background = rng.choice(config.backgrounds)
        scene = Scene(config.image_size, background, shapes, ())
        if split_of_layout(scene) != split:
            continue
        qa = ask(scene, config, rng)
        if qa is None:
            continue
        scene = dataclasses.replace(scene, clutter=_sample_clutter(config, rng))
        question, answer = qa
        image = render_scene(scene)
        return SyntheticExample(example_id(split, index), scene, image, question, answer, family)
    raise ValueError(
        f"no scene for family {family!r} in {split!r} after {_MAX_SCENE_ATTEMPTS} attempts; the "
        f"configuration is too restrictive: {config}"
    )


def generate_split(
    config: SyntheticTaskConfig, split: str, num_examples: int, seed: int
) -> list[dict[str, Any]]:
    """Examples ``0 .. num_examples - 1`` of ``split``.

    Args:
        config: Task configuration.
        split: One of ``SPLITS``.
        num_examples: Number of examples.
        seed: Base seed (the same for all splits of one data set; splits differ by name).

    Returns:
        Dicts with ``id``, ``image`` (PIL RGB), ``question``, ``answer``, ``family``.
    """
    return [generate_example(config, split, i, seed).to_dict() for i in range(num_examples)]


def to_hf_dataset(examples: Sequence[Mapping[str, Any]]) -> Dataset:
    """A ``datasets.Dataset`` with the columns of :data:`FEATURES` (images PNG-encoded, lossless).

    Args:
        examples: Output of :func:`generate_split`.

    Returns:
        ``datasets.Dataset``; pixels round-trip exactly through ``save_to_disk`` / ``load_from_disk``.
    """
    columns = {name: [example[name] for example in examples] for name in FEATURES}
    return Dataset.from_dict(columns, features=FEATURES)


def export_synthetic_dataset(
    folder: str | Path,
    config: SyntheticTaskConfig | None = None,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Generate the splits and write them with ``DatasetDict.save_to_disk``; works offline.

    Also writes ``synthetic_task.json`` (config, sizes, seed) next to the data: the folder says how it was
    made.

    Args:
        folder: Output folder (created; existing split folders are overwritten).
        config: Task configuration; ``None`` = defaults.
        sizes: Examples per split, e.g. ``{"train": 1000, "validation": 200, "test": 200}`` (the default).
        seed: Base seed.

    Returns:
        The ``datasets.DatasetDict`` that was saved.
    """
    config = config if config is not None else SyntheticTaskConfig()
    sizes = dict(sizes) if sizes is not None else {"train": 1000, "validation": 200, "test": 200}
    folder = Path(folder)
    dataset = DatasetDict(
        {split: to_hf_dataset(generate_split(config, split, n, seed)) for split, n in sizes.items()}
    )
    dataset.save_to_disk(str(folder))
    provenance = {"config": dataclasses.asdict(config), "sizes": sizes, "seed": seed}
    (folder / "synthetic_task.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return dataset
