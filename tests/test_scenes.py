"""Tests for the synthetic image/clip question-answering dataset in jaxscale.data.scenes."""

import collections
import re

import numpy as np
import pytest
from scipy import ndimage

from jaxscale.data import ByteTokenizer, DataIterator
from jaxscale.data.scenes import ANSWERS, Scene, SceneExamples, answer_accuracy, make_scenes
from jaxscale.errors import UserError

PALETTE = {(1.0, 0.0, 0.0): "red", (0.0, 1.0, 0.0): "green", (0.0, 0.0, 1.0): "blue",
           (1.0, 1.0, 0.0): "yellow", (1.0, 1.0, 1.0): "white"}
COUNT_WORDS = ("one", "two", "three")
ROW_KEYS = ("images", "inputs", "targets", "loss_mask", "positions", "segment_ids", "answer_start",
            "answer_id", "captions", "caption_mask")


@pytest.fixture(scope="module")
def stills() -> list[Scene]:
    return make_scenes(200, 0)


@pytest.fixture(scope="module")
def clips() -> list[Scene]:
    return make_scenes(200, 0, frames=4)


def _objects(frame: np.ndarray) -> list[dict]:
    """Recover (colour, shape, centre, size) of every object from the pixels of one frame alone."""
    labels, count = ndimage.label(frame.max(axis=-1) > 0, structure=np.ones((3, 3)))
    objects = []
    for k in range(1, count + 1):
        ys, xs = np.nonzero(labels == k)
        colours = {tuple(float(v) for v in c) for c in frame[ys, xs]}
        assert len(colours) == 1 and next(iter(colours)) in PALETTE, colours
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert h == w, "every shape fills a square box"
        top, bottom = (ys == ys.min()).sum(), (ys == ys.max()).sum()
        shape = "square" if len(ys) == h * w else "triangle" if top < bottom else "circle"
        objects.append({"colour": PALETTE[next(iter(colours))], "shape": shape, "size": int(h),
                        "cx": xs.mean() + 0.5, "cy": ys.mean() + 0.5})
    return objects


def _only(objects: list[dict], **attrs) -> dict:
    found = [o for o in objects if all(o[k] == v for k, v in attrs.items())]
    assert len(found) == 1, f"{attrs} should name exactly one object, found {found}"
    return found[0]


def _derive_answer(scene: Scene) -> str:
    """Answer the scene's question from its pixels."""
    frames = [_objects(f) for f in scene.images]
    first, last = frames[0], frames[-1]
    width = scene.images.shape[2]
    if m := re.fullmatch(r"what colour is the (\w+)\?", scene.question):
        return _only(first, shape=m[1])["colour"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", scene.question):
        return _only(first, colour=m[1])["shape"]
    if scene.question == "how many objects are there?":
        return COUNT_WORDS[len(first) - 1]
    if m := re.fullmatch(r"is the (\w+) (\w+) on the left or the right\?", scene.question):
        xs = [_only(objs, colour=m[1], shape=m[2])["cx"] for objs in frames]
        if max(xs) <= width / 2 - 3:
            return "left"
        assert min(xs) >= width / 2 + 3, f"ambiguous left/right object at x={xs}"
        return "right"
    m = re.fullmatch(r"which way does the (\w+) move\?", scene.question)
    assert m, scene.question
    a, b = _only(first, shape=m[1]), _only(last, shape=m[1])
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    assert (dx == 0) != (dy == 0), "an object moves along exactly one axis"
    return ("left" if dx < 0 else "right") if dx else ("up" if dy < 0 else "down")


def test_deterministic_and_independent_of_n():
    a, b, longer = make_scenes(10, 7), make_scenes(10, 7), make_scenes(20, 7)
    other = make_scenes(10, 8)
    for x, y, z in zip(a, b, longer[:10], strict=True):
        assert np.array_equal(x.images, y.images) and np.array_equal(x.images, z.images)
        assert (x.question, x.answer, x.caption) == (y.question, y.answer, y.caption)
        assert (x.question, x.answer, x.caption) == (z.question, z.answer, z.caption)
    assert any(not np.array_equal(x.images, y.images) for x, y in zip(a, other, strict=True))
    c1, c2 = make_scenes(5, 7, frames=3), make_scenes(5, 7, frames=3)
    assert all(np.array_equal(x.images, y.images) for x, y in zip(c1, c2, strict=True))


@pytest.mark.parametrize("image_size,frames", [(32, 1), (32, 4), (16, 16), (48, 2)])
def test_images_shape_range_and_objects(image_size, frames):
    scenes = make_scenes(60, 3, image_size=image_size, frames=frames)
    low, high = max(3, image_size // 6), max(3, image_size // 6, image_size // 3)
    for s in scenes:
        assert s.images.shape == (frames, image_size, image_size, 3)
        assert s.images.dtype == np.float32
        assert s.images.min() == 0.0 and s.images.max() == 1.0
        assert s.answer in ANSWERS
        described = sorted(re.findall(r"\ba (\w+) (\w+) ", s.caption))
        for frame in s.images:
            objects = _objects(frame)  # each object has one palette colour and a clean shape
            assert 1 <= len(objects) <= 3
            assert sorted((o["colour"], o["shape"]) for o in objects) == described
            assert all(low <= o["size"] <= high for o in objects)


def test_object_colours_are_drawn_at_their_pixels(stills):
    for s in stills[:50]:
        for obj in _objects(s.images[0]):
            y, x = int(obj["cy"]), int(obj["cx"])  # box centres are inside every shape
            assert PALETTE[tuple(float(v) for v in s.images[0, y, x])] == obj["colour"]


def test_clips_move_in_the_caption_direction(clips):
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for s in clips:
        direction = re.search(r"moving (\w+)\.$", s.caption)[1]
        for rgb, colour in PALETTE.items():
            mask = np.all(s.images == np.array(rgb, np.float32), axis=-1)  # [T, H, W]
            if not mask[0].any():
                continue
            ys, xs = np.nonzero(mask[0])
            ye, xe = np.nonzero(mask[-1])
            shift = np.array([xe.mean() - xs.mean(), ye.mean() - ys.mean()])
            assert np.all(np.sign(np.round(shift, 6)) == step[direction]), (colour, shift, direction)


@pytest.mark.parametrize("frames", [1, 4])
def test_answers_agree_with_the_pixels(frames, stills, clips):
    scenes = stills if frames == 1 else clips
    for s in scenes:
        assert _derive_answer(s) == s.answer, (s.question, s.answer, s.caption)
    kinds = {s.question.split()[0] + s.question.split()[1] for s in scenes}
    assert len(kinds) == (4 if frames == 1 else 5)


def _blind_accuracy(train: list[Scene], test: list[Scene]) -> float:
    """Accuracy of answering each exact question string with its most common training answer."""
    answers = collections.defaultdict(collections.Counter)
    for s in train:
        answers[s.question][s.answer] += 1
    guess = {q: c.most_common(1)[0][0] for q, c in answers.items()}
    return float(np.mean([guess.get(s.question) == s.answer for s in test]))


@pytest.mark.parametrize("frames", [1, 4])
def test_image_blind_baseline_is_near_chance(frames):
    train, held_out = make_scenes(2048, 0, frames=frames), make_scenes(512, 1, frames=frames)
    assert _blind_accuracy(train, held_out) < 0.6
    assert _blind_accuracy(held_out, held_out) < 0.6  # even fitting the held-out answers themselves


def test_rows_layout(stills):
    tok = ByteTokenizer()
    examples = SceneExamples(stills[:40], tok, seq_len=80, caption_len=64)
    assert (examples.num_rows, examples.seq_len) == (40, 80)
    idx = np.array([3, 0, 17, 39, 3])
    b = examples.rows(idx)
    assert set(b) == set(ROW_KEYS)
    n = len(idx)
    assert b["images"].shape == (n, 1, 32, 32, 3) and b["images"].dtype == np.float32
    for key in ("inputs", "targets", "positions", "segment_ids", "loss_mask"):
        assert b[key].shape == (n, 80), key
        assert b[key].dtype == (np.float32 if key == "loss_mask" else np.int32), key
    assert b["answer_start"].shape == (n,) and b["answer_start"].dtype == np.int32
    assert b["captions"].shape == (n, 64) and b["captions"].dtype == np.int32
    assert b["caption_mask"].shape == (n, 64) and b["caption_mask"].dtype == np.float32
    assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert np.array_equal(b["positions"], np.broadcast_to(np.arange(80), (n, 80)))
    for r, i in enumerate(idx):
        s = stills[i]
        prompt, answer = f"question: {s.question} answer:", f" {s.answer}"
        length = len(prompt) + len(answer) + 1
        mask, start = b["loss_mask"][r], int(b["answer_start"][r])
        assert set(np.unique(mask)) == {0.0, 1.0}
        assert mask.sum() == len(answer) + 1 and start == int(np.argmax(mask))
        assert np.all(mask[start:start + len(answer) + 1] == 1.0)
        assert tok.decode(b["inputs"][r, :start + 1]) == prompt
        assert tok.decode(b["targets"][r, start:start + len(answer)]) == answer
        assert b["targets"][r, start + len(answer)] == tok.eos_id
        assert np.array_equal(b["segment_ids"][r], (np.arange(80) < length).astype(np.int32))
        assert np.all(b["inputs"][r, length:] == tok.eos_id)
        assert np.array_equal(b["images"][r], s.images)
        assert ANSWERS[b["answer_id"][r]] == s.answer
        caption = s.caption.encode()[:64]
        assert b["caption_mask"][r].sum() == len(caption)
        assert bytes(b["captions"][r, :len(caption)].astype(np.uint8)) == caption
        assert np.all(b["captions"][r, len(caption):] == tok.eos_id)


def test_answer_accuracy(stills):
    b = SceneExamples(stills[:32], ByteTokenizer(), seq_len=80, caption_len=128).rows(np.arange(32))
    assert answer_accuracy(b["targets"], b) == 1.0
    assert answer_accuracy(np.roll(b["targets"], 1, axis=1), b) == 0.0
    wrong_outside = np.where(b["loss_mask"] > 0, b["targets"], 0)  # errors off the answer are ignored
    assert answer_accuracy(wrong_outside, b) == 1.0
    one_wrong = b["targets"].copy()
    one_wrong[np.arange(8), b["answer_start"][:8] + 1] += 1  # a wrong first letter in 8 of the 32 answers
    assert answer_accuracy(one_wrong, b) == 0.75


def test_user_errors(stills):
    with pytest.raises(UserError, match=r"data\.seq_len >= \d+.*data\.seq_len=16"):
        SceneExamples(stills[:4], ByteTokenizer(), seq_len=16, caption_len=32)
    with pytest.raises(UserError, match="empty"):
        SceneExamples([], ByteTokenizer(), seq_len=80, caption_len=32)
    with pytest.raises(UserError, match="at least 1, got 0"):
        make_scenes(0, 0)
    with pytest.raises(UserError, match="image_size"):
        make_scenes(4, 0, image_size=8)
    with pytest.raises(UserError, match="frames"):
        make_scenes(4, 0, frames=17)
    with pytest.raises(UserError, match="frames"):
        make_scenes(4, 0, frames=0)


def test_data_iterator_batches_and_resume():
    examples = SceneExamples(make_scenes(40, 2, frames=2), ByteTokenizer(), seq_len=80, caption_len=128)

    def batches(it, k):
        return [next(it) for _ in range(k)]

    it = DataIterator(examples, global_batch_size=8, seed=0)
    first = batches(it, 3)
    assert all(set(b) == set(ROW_KEYS) and b["images"].shape == (8, 2, 32, 32, 3) for b in first)
    state = it.get_state()
    expected = batches(it, 4)  # crosses the epoch boundary (5 batches per epoch)
    resumed = DataIterator(examples, global_batch_size=8, seed=0)
    resumed.set_state(state)
    for a, b in zip(expected, batches(resumed, 4), strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in ROW_KEYS)
