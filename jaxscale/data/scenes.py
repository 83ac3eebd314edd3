"""A synthetic, embedded image/clip question-answering dataset whose answers need the image.

Each example is a tiny scene: 1-3 non-overlapping coloured shapes on a black background, drawn with
numpy masks, either a still image (`frames=1`) or a clip in which every object moves with the same
constant velocity in one of four directions. It comes with a question, a one-word answer and a
caption of the whole scene (for contrastive, CLIP-style training).

The questions cannot be answered from their text. Every example first draws a question kind and its
answer uniformly at random, then builds a scene that makes that answer true: the question names only
attributes that are independent of the answer (e.g. "what colour is the circle?" is asked with every
colour equally often), so a model that ignores the pixels is at chance: about 1/5, 1/3, 1/3, 1/2 and
1/4 for the colour, shape, count, left/right and motion questions. Each example `i` is generated from
`np.random.default_rng((seed, i))` alone, so datasets are reproducible and prefixes of each other.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from jaxscale.data.tokenizer import Tokenizer
from jaxscale.errors import UserError

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0)}
COUNTS = ("one", "two", "three")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *COUNTS, *DIRECTIONS)

STILL_KINDS = ("colour", "shape", "count", "side")
CLIP_KINDS = (*STILL_KINDS, "motion")
MIN_OFF_CENTRE = 3  # pixels between a left/right object's centre and the image centre


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    """One example: the frames, a question about them, its one-word answer and a scene caption."""

    images: np.ndarray  # float32 [T, H, W, 3] in [0, 1]
    question: str
    answer: str
    caption: str


@dataclasses.dataclass
class _Object:
    shape: str
    colour: str
    size: int
    x: int = 0  # top-left corner of the size x size box in the first frame
    y: int = 0


@functools.cache
def _sprite(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of `shape` filling its box (the triangle points up)."""
    c = np.arange(size) + 0.5 - size / 2  # pixel-centre offsets from the box centre
    dy, dx = np.abs(c)[:, None], np.abs(c)[None, :]
    if shape == "square":
        mask = np.ones((size, size), bool)
    elif shape == "circle":
        mask = dy**2 + dx**2 <= (size / 2 - 0.25) ** 2
    else:
        mask = dx <= (np.arange(size)[:, None] + 1) / 2
    mask.flags.writeable = False
    return mask


def _size_range(image_size: int) -> tuple[int, int]:
    low = max(3, image_size // 6)
    return low, max(low, image_size // 3)


def _pick(rng: np.random.Generator, options: Sequence[str], exclude: str | None = None) -> str:
    options = [o for o in options if o != exclude]
    return options[rng.integers(len(options))]


def _where(obj: _Object, image_size: int) -> str:
    """Coarse 3x3-grid position of the object's centre, as a phrase."""
    third = image_size / 3
    col = int((obj.x + obj.size / 2) // third)
    row = int((obj.y + obj.size / 2) // third)
    vertical, horizontal = ("top", "", "bottom")[min(row, 2)], ("left", "", "right")[min(col, 2)]
    if vertical and horizontal:
        return f"at the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    return f"on the {horizontal}" if horizontal else "in the centre"


def _caption(objects: list[_Object], image_size: int, direction: str | None) -> str:
    """E.g. "a red square on the left and a blue circle at the top right, all moving up."

    Objects are listed left to right, at their first-frame positions.
    """
    ordered = sorted(objects, key=lambda o: (o.x + o.size / 2, o.y))
    parts = [f"a {o.colour} {o.shape} {_where(o, image_size)}" for o in ordered]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if direction is not None:
        text += f", {'all ' if len(parts) > 1 else ''}moving {direction}"
    return text + "."


def _place(rng: np.random.Generator, objects: list[_Object], image_size: int,
           offsets: np.ndarray, side: str | None) -> bool:
    """Give the objects non-touching first-frame boxes that stay inside the image on every frame.

    `offsets` [T, 2] is the shared integer (dx, dy) displacement of every frame; object 0 must keep
    its centre at least MIN_OFF_CENTRE pixels on `side` of the image centre in every frame if `side`
    is set. Returns False if a random placement attempt failed.
    """
    lo, hi = -offsets.min(axis=0), image_size - offsets.max(axis=0)  # box range, per axis
    boxes: list[tuple[int, int, int]] = []
    for k, obj in enumerate(objects):
        x_lo, x_hi = lo[0], hi[0] - obj.size  # inclusive range of the top-left x
        if k == 0 and side == "right":  # 2 * centre >= image_size + 2 * MIN_OFF_CENTRE
            x_lo = max(x_lo, -(-(image_size + 2 * MIN_OFF_CENTRE - obj.size) // 2) - offsets[:, 0].min())
        elif k == 0 and side == "left":
            x_hi = min(x_hi, (image_size - 2 * MIN_OFF_CENTRE - obj.size) // 2 - offsets[:, 0].max())
        y_lo, y_hi = lo[1], hi[1] - obj.size
        if x_lo > x_hi or y_lo > y_hi:
            return False
        for _ in range(20):
            x, y = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
            # Boxes keep a blank pixel between them, so objects never touch (8-connectivity).
            if all(x + obj.size < bx or bx + bs < x or y + obj.size < by or by + bs < y
                   for bx, by, bs in boxes):
                break
        else:
            return False
        obj.x, obj.y = x, y
        boxes.append((x, y, obj.size))
    return True


def _draw(objects: list[_Object], image_size: int, offsets: np.ndarray) -> np.ndarray:
    frames = len(offsets)
    images = np.zeros((frames, image_size, image_size, 3), np.float32)
    t = np.arange(frames)[:, None]
    for obj in objects:
        ys, xs = np.nonzero(_sprite(obj.shape, obj.size))
        images[t, obj.y + ys + offsets[:, 1:], obj.x + xs + offsets[:, :1]] = COLOURS[obj.colour]
    return images


def _make_scene(rng: np.random.Generator, image_size: int, frames: int) -> Scene:
    kind = _pick(rng, CLIP_KINDS if frames > 1 else STILL_KINDS)
    n_objects = int(rng.integers(1, 4))
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    side = _pick(rng, ("left", "right")) if kind == "side" else None
    direction = _pick(rng, list(DIRECTIONS)) if frames > 1 else None

    def others() -> list[_Object]:
        """The objects besides object 0, which never share the attribute the question names."""
        objs = []
        for _ in range(n_objects - 1):
            s = _pick(rng, SHAPES, exclude=shape if kind in ("colour", "motion") else None)
            c = _pick(rng, list(COLOURS), exclude=colour if kind == "shape" else None)
            if kind == "side":
                while (s, c) == (shape, colour):
                    s, c = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
            objs.append(_Object(s, c, 0))
        return objs

    objects = [_Object(shape, colour, 0), *others()]
    size_lo, size_hi = _size_range(image_size)
    for attempt in range(1000):
        shrink = attempt // 10  # after repeated failures use smaller objects and shorter moves
        for obj in objects:
            obj.size = int(rng.integers(size_lo, max(size_lo, size_hi - shrink) + 1))
        offsets = np.zeros((frames, 2), np.int64)
        if direction is not None:
            travel = min(rng.uniform(1.5, 3.0) * (frames - 1), image_size / 4 * 0.8**shrink)
            steps = np.rint(np.linspace(0.0, max(travel, 1.0), frames)).astype(np.int64)
            offsets = steps[:, None] * np.array(DIRECTIONS[direction])
        if _place(rng, objects, image_size, offsets, side):
            break
    else:  # pragma: no cover - placement of the smallest objects always succeeds
        raise RuntimeError("could not place the scene's objects")

    if kind == "colour":
        question, answer = f"what colour is the {shape}?", colour
    elif kind == "shape":
        question, answer = f"what shape is the {colour} object?", shape
    elif kind == "count":
        question, answer = "how many objects are there?", COUNTS[n_objects - 1]
    elif kind == "side":
        question, answer = f"is the {colour} {shape} on the left or the right?", side
    else:
        question, answer = f"which way does the {shape} move?", direction
    rng.shuffle(objects)  # so that the asked-about object is not always drawn first
    return Scene(_draw(objects, image_size, offsets), question, answer,
                 _caption(objects, image_size, direction))


def make_scenes(n: int, seed: int, *, image_size: int = 32, frames: int = 1) -> list[Scene]:
    """Return `n` scenes; example `i` depends only on (`seed`, `i`, `image_size`, `frames`)."""
    if n < 1:
        raise UserError(f"the number of scenes must be at least 1, got {n}")
    if image_size < 16:
        raise UserError(f"scene image_size must be at least 16 pixels, got {image_size}")
    if not 1 <= frames <= 16:
        raise UserError(f"scene frames must be between 1 and 16, got {frames}")
    return [_make_scene(np.random.default_rng((seed, i)), image_size, frames) for i in range(n)]


class SceneExamples:
    """Scenes as training rows for `DataIterator`: images, a question-answer token row, a caption.

    Row `i` tokenizes `"question: <question> answer:"`, then `" <answer>"` and eos (encoded
    separately, so the answer's tokens are exact), right-padded with eos to `seq_len + 1` tokens and
    shifted into `inputs`/`targets`. The loss is on the answer and eos targets only.
    """

    def __init__(self, scenes: Sequence[Scene], tokenizer: Tokenizer, seq_len: int, caption_len: int):
        if not scenes:
            raise UserError("the scene dataset is empty; generate at least one scene")
        if caption_len < 1:
            raise UserError(f"the caption length must be at least 1, got {caption_len}")
        self.scenes = tuple(scenes)
        self.seq_len = seq_len
        self.caption_len = caption_len
        eos = tokenizer.eos_id
        prompts = [tokenizer.encode(f"question: {s.question} answer:") for s in scenes]
        answers = [tokenizer.encode(f" {s.answer}") + [eos] for s in scenes]
        needed = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        if needed > seq_len + 1:
            raise UserError(f"the longest question+answer needs data.seq_len >= {needed - 1} (it is "
                            f"{needed} tokens with eos), got data.seq_len={seq_len}")
        n = len(scenes)
        self._tokens = np.full((n, seq_len + 1), eos, np.int32)
        self._lengths = np.zeros(n, np.int32)
        self._answer_start = np.zeros(n, np.int32)
        self._answer_len = np.zeros(n, np.int32)
        self._answer_id = np.array([ANSWERS.index(s.answer) for s in scenes], np.int32)
        self._captions = np.full((n, caption_len), eos, np.int32)
        self._caption_lengths = np.zeros(n, np.int32)
        for i, (scene, prompt, answer) in enumerate(zip(scenes, prompts, answers, strict=True)):
            row = prompt + answer
            self._tokens[i, :len(row)] = row
            self._lengths[i], self._answer_len[i] = len(row), len(answer)
            self._answer_start[i] = len(prompt) - 1
            caption = tokenizer.encode(scene.caption)[:caption_len]
            self._captions[i, :len(caption)] = caption
            self._caption_lengths[i] = len(caption)

    def max_documents_per_row(self) -> int:
        """2 where a row is padded (its tokens and the padding are two segments), else 1."""
        return 1 + int(np.any(self._lengths < self.seq_len))

    @property
    def num_rows(self) -> int:
        """Number of examples."""
        return len(self.scenes)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Return examples `indices` as a batch of `b = len(indices)` rows.

        Keys: float32 `images` [b, T, H, W, 3]; int32 `inputs`, `targets`, `positions` and
        `segment_ids` (1 on real input tokens, 0 on padding) and float32 `loss_mask` (1 on answer
        and eos targets), each [b, seq_len]; int32 `answer_start` [b], the first answer target, and
        `answer_id` [b], the answer's index in `ANSWERS`;
        int32 `captions` [b, caption_len] padded with eos and float32 `caption_mask` marking them.
        """
        indices = np.asarray(indices, dtype=np.int64)
        tokens = self._tokens[indices]
        col = np.arange(self.seq_len, dtype=np.int32)
        start, length = self._answer_start[indices, None], self._answer_len[indices, None]
        return {
            "images": np.stack([self.scenes[i].images for i in indices]).astype(np.float32, copy=False),
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "loss_mask": ((col >= start) & (col < start + length)).astype(np.float32),
            "positions": np.broadcast_to(col, tokens[:, 1:].shape).copy(),
            "segment_ids": (col < self._lengths[indices, None]).astype(np.int32),
            "answer_start": self._answer_start[indices],
            "answer_id": self._answer_id[indices],
            "captions": self._captions[indices],
            "caption_mask": (np.arange(self.caption_len) < self._caption_lengths[indices, None]
                             ).astype(np.float32),
        }


def answer_accuracy(predicted_targets: np.ndarray, batch: dict[str, np.ndarray]) -> float:
    """Fraction of rows whose predicted target ids match `targets` at every `loss_mask` position."""
    scored = np.asarray(batch["loss_mask"]) > 0
    wrong = (np.asarray(predicted_targets) != np.asarray(batch["targets"])) & scored
    return float(np.mean(~wrong.any(axis=1)))
