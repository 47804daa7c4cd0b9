"""A small caption grammar over objects, counts, colours, sizes, positions and spatial relations.

Captions must be true of their image and specific enough that retrieval is not trivial: each one picks
a salient subset of the objects (larger objects are picked more often), states attributes with varied
wording (synonyms, optional adjectives) and uses one of several templates, e.g.

    "Two small red triangles left of a blue circle."
    "In the top left corner there is a big yellow handwritten three."
    "Three objects on a striped background, including a purple star."

The same grammar writes the masked-language-modelling corpus from scene layouts that are never drawn.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .render import DIGIT_WORDS

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}

SHAPE_NOUNS: dict[str, list[tuple[str, str]]] = {
    "circle": [("circle", "circles"), ("disc", "discs")],
    "square": [("square", "squares"), ("square tile", "square tiles")],
    "triangle": [("triangle", "triangles"), ("triangular shape", "triangular shapes")],
    "star": [("star", "stars"), ("five-pointed star", "five-pointed stars")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
    "ring": [("ring", "rings"), ("hoop", "hoops"), ("donut shape", "donut shapes")],
    "hexagon": [("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes")],
}


def _digit_nouns(word: str) -> list[tuple[str, str]]:
    plural = word + ("es" if word.endswith("x") else "s")
    return [
        (f"digit {word}", f"digit {plural}"),
        (f"handwritten {word}", f"handwritten {plural}"),
        (f"number {word}", f"number {plural}"),
    ]


NOUNS: dict[str, list[tuple[str, str]]] = {
    **SHAPE_NOUNS,
    **{f"digit {word}": _digit_nouns(word) for word in DIGIT_WORDS.values()},
}

COLOUR_WORDS = {
    "red": ["red"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "orange": ["orange"],
    "purple": ["purple", "violet"],
    "pink": ["pink"],
    "cyan": ["cyan", "turquoise"],
    "white": ["white"],
    "black": ["black"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium-sized"], "large": ["large", "big"]}
BACKGROUND_PHRASES = {
    "gradient": ["a smooth gradient", "a shaded background", "a gradient background"],
    "noise": ["a mottled background", "a noisy texture", "a cloudy background"],
    "stripes": ["a striped background", "a background of stripes", "stripes"],
    "checker": ["a checkered background", "a checkerboard pattern"],
}
GENERIC_NOUNS = [("object", "objects"), ("item", "items"), ("figure", "figures")]

# Relations between two objects (A relative to B), by what the layout says about them.
RELATION_WORDS = {
    "front": ["in front of", "partly covering", "overlapping"],
    "behind": ["behind", "partly hidden behind"],
    "left": ["to the left of", "left of", "on the left of"],
    "right": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
    "near": ["next to", "beside", "near"],
}
# Normalised centroid distance below which two objects are "next to" each other rather than left/right/above/below.
RELATION_MARGIN = 0.15

# Thresholds on the object's nominal size relative to the image side.
SMALL_BELOW, LARGE_FROM = 0.2, 0.33


def size_word(scale_fraction: float) -> str:
    """ "small", "medium" or "large" from the object's nominal size / image side."""
    if scale_fraction < SMALL_BELOW:
        return "small"
    return "large" if scale_fraction >= LARGE_FROM else "medium"


@dataclass(frozen=True)
class ObjectDescription:
    """What the grammar may say about one object.

    x, y: centroid of the visible part, in [0, 1] (image width / height); area: visible area as a
    fraction of the image, used for salience.
    """

    category: str
    colour: str
    size: str
    x: float
    y: float
    area: float


@dataclass
class SceneDescription:
    """Objects in drawing order, the background kind, and (front, back) index pairs that overlap."""

    objects: list[ObjectDescription]
    background: str
    occlusions: set[tuple[int, int]] = field(default_factory=set)


def tokenize(sentence: str) -> list[str]:
    """Karpathy-style tokens: lower case, punctuation dropped, hyphenated words kept whole."""
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", sentence.lower())


def normalize(sentence: str) -> str:
    """The form used to compare sentences (e.g. corpus against held-out captions)."""
    return " ".join(tokenize(sentence))


def _article(phrase: str) -> str:
    first = phrase.split()[0]
    vowel_sound = first[0] in "aeiou" and not first.startswith(("one", "uni", "eu"))
    return ("an " if vowel_sound else "a ") + phrase


class _Writer:
    """Draws word choices for one scene from a numpy generator."""

    def __init__(self, scene: SceneDescription, rng: np.random.Generator):
        self.scene = scene
        self.rng = rng

    def pick(self, options: list):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def noun(self, category: str, plural: bool = False) -> str:
        options = NOUNS[category]
        # The canonical name (the class name the model is asked about) is the most frequent wording.
        choice = options[0] if self.chance(0.55) else self.pick(options)
        return choice[1] if plural else choice[0]

    def adjectives(self, obj: ObjectDescription, colour_p: float = 0.9, size_p: float = 0.5) -> list[str]:
        words = []
        # "medium" is rarely worth saying; small and large often are.
        if self.chance(size_p if obj.size != "medium" else 0.1):
            words.append(self.pick(SIZE_WORDS[obj.size]))
        if self.chance(colour_p):
            words.append(self.pick(COLOUR_WORDS[obj.colour]))
        return words

    def noun_phrase(self, index: int, definite: bool = False) -> str:
        obj = self.scene.objects[index]
        phrase = " ".join([*self.adjectives(obj), self.noun(obj.category)])
        return f"the {phrase}" if definite else _article(phrase)

    def group_phrase(self, indices: list[int]) -> str:
        """Objects of one category and colour: "two red triangles" / "a small red triangle"."""
        if len(indices) == 1:
            return self.noun_phrase(indices[0])
        obj = self.scene.objects[indices[0]]
        sizes = {self.scene.objects[i].size for i in indices}
        words = [NUMBER_WORDS[len(indices)]]
        if len(sizes) == 1 and obj.size != "medium" and self.chance(0.4):
            words.append(self.pick(SIZE_WORDS[obj.size]))
        words += [self.pick(COLOUR_WORDS[obj.colour]), self.noun(obj.category, plural=True)]
        return " ".join(words)

    def background(self) -> str:
        return self.pick(BACKGROUND_PHRASES[self.scene.background])

    def salient(self, exclude: tuple[int, ...] = ()) -> int | None:
        """An object index drawn with probability proportional to its visible area."""
        candidates = [i for i in range(len(self.scene.objects)) if i not in exclude]
        if not candidates:
            return None
        weights = np.array([self.scene.objects[i].area for i in candidates], dtype=np.float64) + 1e-3
        return candidates[int(self.rng.choice(len(candidates), p=weights / weights.sum()))]

    def relation(self, a: int, b: int) -> str:
        """The spatial relation of object a to object b (a key of ``RELATION_WORDS``)."""
        if (a, b) in self.scene.occlusions:
            return "front"
        if (b, a) in self.scene.occlusions:
            return "behind"
        return layout_relation(self.scene.objects[a], self.scene.objects[b])

    def position(self, index: int) -> str:
        obj = self.scene.objects[index]
        column = "left" if obj.x < 0.36 else "right" if obj.x > 0.64 else "center"
        row = "top" if obj.y < 0.36 else "bottom" if obj.y > 0.64 else "middle"
        vertical = {"top": ["top", "upper"], "bottom": ["bottom", "lower"]}
        if row != "middle" and column != "center":
            v = self.pick(vertical[row])
            return self.pick([f"in the {v} {column} corner", f"at the {v} {column}"])
        if row != "middle":
            return self.pick([f"at the {row}", f"near the {row} edge", f"along the {row}"])
        if column != "center":
            return self.pick([f"on the {column}", f"on the {column} side"])
        return self.pick(["in the center", "in the middle of the image", "in the middle"])

    def groups(self) -> list[list[int]]:
        """Object indices grouped by (category, colour), largest group first, then by first appearance."""
        by_key: dict[tuple[str, str], list[int]] = {}
        for i, obj in enumerate(self.scene.objects):
            by_key.setdefault((obj.category, obj.colour), []).append(i)
        return sorted(by_key.values(), key=lambda g: (-len(g), g[0]))


def layout_relation(a: ObjectDescription, b: ObjectDescription) -> str:
    """left / right / above / below / near from the centroids (the dominant axis wins)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy) and abs(dx) > RELATION_MARGIN:
        return "left" if dx < 0 else "right"
    if abs(dy) > abs(dx) and abs(dy) > RELATION_MARGIN:
        return "above" if dy < 0 else "below"
    return "near"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# --- templates: each returns a caption or None when it does not apply to the scene -----------------


def _list_all(w: _Writer) -> str | None:
    groups = w.groups()
    if len(groups) > 4:
        return None
    text = _join([w.group_phrase(g) for g in groups])
    return f"{text} on {w.background()}" if w.chance(0.4) else text


def _relation(w: _Writer) -> str | None:
    a = w.salient()
    b = w.salient(exclude=(a,))
    if b is None:
        return None
    return f"{w.noun_phrase(a)} {w.pick(RELATION_WORDS[w.relation(a, b)])} {w.noun_phrase(b)}"


def _group_relation(w: _Writer) -> str | None:
    groups = [g for g in w.groups() if len(g) > 1]
    if not groups:
        return None
    group = w.pick(groups)
    b = w.salient(exclude=tuple(group))
    if b is None:
        return None
    relations = {layout_relation(w.scene.objects[i], w.scene.objects[b]) for i in group}
    if len(relations) != 1 or any((i, b) in w.scene.occlusions or (b, i) in w.scene.occlusions for i in group):
        return None
    return f"{w.group_phrase(group)} {w.pick(RELATION_WORDS[relations.pop()])} {w.noun_phrase(b)}"


def _position(w: _Writer) -> str | None:
    a = w.salient()
    if w.chance(0.5):
        return f"{w.noun_phrase(a)} {w.position(a)}"
    return f"{w.position(a)} there is {w.noun_phrase(a)}"


def _count_total(w: _Writer) -> str | None:
    count = len(w.scene.objects)
    a = w.salient()
    if count == 1:
        obj = w.scene.objects[a]
        return f"a single {' '.join([*w.adjectives(obj, colour_p=1.0), w.noun(obj.category)])} on {w.background()}"
    generic = w.pick(GENERIC_NOUNS)[1]
    return f"{NUMBER_WORDS[count]} {generic} on {w.background()}, including {w.noun_phrase(a)}"


def _background_with(w: _Writer) -> str | None:
    a = w.salient()
    b = w.salient(exclude=(a,))
    things = [w.noun_phrase(a)] + ([w.noun_phrase(b)] if b is not None else [])
    return f"{w.background()} with {_join(things)}"


def _colour_count(w: _Writer) -> str | None:
    if len(w.scene.objects) < 2:  # "one red item" would fit too many images
        return None
    by_colour: dict[str, int] = {}
    for obj in w.scene.objects:
        by_colour[obj.colour] = by_colour.get(obj.colour, 0) + 1
    if len(by_colour) > 3:
        return None
    noun = w.pick(GENERIC_NOUNS)
    parts = [
        f"{NUMBER_WORDS[n]} {w.pick(COLOUR_WORDS[c])} {noun[1] if n > 1 else noun[0]}" for c, n in by_colour.items()
    ]
    return _join(parts)


def _largest(w: _Writer) -> str | None:
    areas = [obj.area for obj in w.scene.objects]
    order = np.argsort(areas)[::-1]
    # Only claim "the largest" when there is a comparison and it clearly wins.
    if len(order) < 2 or areas[order[0]] < 1.5 * areas[order[1]]:
        return None
    return w.pick(
        [
            f"the largest object is {w.noun_phrase(int(order[0]))}",
            f"a picture dominated by {w.noun_phrase(int(order[0]))}",
        ]
    )


TEMPLATES: list[Callable[[_Writer], str | None]] = [
    _list_all,
    _relation,
    _group_relation,
    _position,
    _count_total,
    _background_with,
    _colour_count,
    _largest,
]


def _finish(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def describe(scene: SceneDescription, rng: np.random.Generator, count: int = 5, max_attempts: int = 400) -> list[str]:
    """``count`` distinct captions of ``scene`` (as raw sentences: capitalised, with a full stop).

    Templates are cycled in a random order so one image's captions use different constructions.
    """
    if not scene.objects:
        raise ValueError("describe() needs a scene with at least one object")
    writer = _Writer(scene, rng)
    captions: list[str] = []
    seen: set[str] = set()
    order = [TEMPLATES[i] for i in rng.permutation(len(TEMPLATES))]
    for attempt in range(max_attempts):
        text = order[attempt % len(order)](writer)
        if text is None:
            continue
        key = normalize(text)
        if key not in seen:
            seen.add(key)
            captions.append(_finish(text))
            if len(captions) == count:
                return captions
    raise RuntimeError(f"could only write {len(captions)} distinct captions for {scene}")
