"""The shipped environments (zoom/crop tool, scripted replies) and how rollout.multi_turn.environment is loaded."""
import io

import pytest
from PIL import Image

from mmrl_megatron.config import ConfigError
from mmrl_megatron.rollout.environments import Conversation, Task, load_environment
from mmrl_megatron.rollout.environments.scripted import ScriptedEnvironment
from mmrl_megatron.rollout.environments.zoom import MIN_SIDE, ZoomEnvironment, parse_region
from tests.rollout.multi_turn_helpers import png

WIDTH, HEIGHT = 200, 100


def _task(images=None, extra_info=None) -> Task:
    return Task("hiyouga/geometry3k", "3", extra_info or {}, [{"role": "user", "content": [{"type": "image"}]}],
                [png(WIDTH, HEIGHT)] if images is None else images)


def _after(text: str) -> Conversation:
    return Conversation([{"role": "user", "content": [{"type": "image"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": text}]}], [])


@pytest.mark.parametrize("request_text, region", [
    ("0.25,0.5,0.75,1", (50, 50, 150, 100)),  # fractions of the width and height
    ("[10, 20, 110, 70]", (10, 20, 110, 70)),  # pixels, with brackets and spaces
    ("150 40 400 90", (150, 40, 200, 90)),  # clipped at the image's edge
    ("100,50,101,51", (87, 37, 115, 65)),  # grown to MIN_SIDE around its centre
    ("0,0,2,2", (0, 0, 28, 28)),  # grown inside the image at a corner
])
def test_zoom_crops_the_requested_region(request_text, region):
    """Invariant: a request in fractions or pixels returns exactly that region of the prompt's first image (clipped
    to it, at least MIN_SIDE a side), with a line naming the pixels; the conversation goes on."""
    reply = ZoomEnvironment(_task()).step(_after(f"I need a closer look. <zoom>{request_text}</zoom>"))
    assert not reply.done and len(reply.images) == 1
    original = Image.open(io.BytesIO(png(WIDTH, HEIGHT))).convert("RGB")
    assert reply.images[0].tobytes() == original.crop(region).tobytes()
    left, top, right, bottom = region
    assert f"x {left}-{right}, y {top}-{bottom}" in reply.text
    assert min(right - left, bottom - top) >= MIN_SIDE


@pytest.mark.parametrize("request_text, message", [
    ("1,2,3", "expected four numbers"), ("a,b,c,d", "expected four numbers"), ("0.5,0.5,0.2,0.9", "x1 < x2"),
    ("250,10,300,50", "outside the 200x100 image"), ("-5,0,10,10", "not negative"), ("nan,0,1,1", "finite"),
])
def test_an_invalid_zoom_request_gets_a_text_reply(request_text, message):
    """Invariant: a request naming no usable region is answered in text (saying what was wrong), not by a crash
    or the end of the conversation."""
    reply = ZoomEnvironment(_task()).step(_after(f"<zoom>{request_text}</zoom>"))
    assert not reply.done and not reply.images and message in reply.text and "<zoom>x1,y1,x2,y2</zoom>" in reply.text


def test_zoom_ends_on_an_answer_or_without_a_request():
    """Invariant: a turn with a \\boxed{} answer, or without a zoom request, ends the conversation; a problem
    without an image is answered in text."""
    assert ZoomEnvironment(_task()).step(_after("<zoom>0,0,1,1</zoom> so \\boxed{3}")).done
    assert ZoomEnvironment(_task()).step(_after("The angle is 30 degrees.")).done
    reply = ZoomEnvironment(_task(images=[])).step(_after("<zoom>0,0,1,1</zoom>"))
    assert not reply.done and "no image" in reply.text


def test_parse_region_reads_the_last_numbers_as_corners():
    """Invariant: the four numbers are the top-left and bottom-right corners, right and bottom exclusive."""
    assert parse_region(" 0, 0, 1, 1 ", 300, 60) == (0, 0, 300, 60)


def test_scripted_environment_replays_the_rows_script_then_ends():
    """Invariant: reply k answers assistant turn k with the scripted text, images and role; then done."""
    script = [{"text": "first", "images": [png(30, 30)]}, {"text": "second", "role": "tool"}]
    environment = ScriptedEnvironment(_task(extra_info={"scripted_replies": script}))
    first, second, third = (environment.step(_after("x")) for _ in range(3))
    assert (first.text, first.images, first.role, first.done) == ("first", script[0]["images"], "user", False)
    assert (second.text, second.role, second.done) == ("second", "tool", False) and third.done


def test_environment_specs_load_built_ins_and_files_or_say_what_is_wrong(tmp_path):
    """Invariant: built-in names and path.py:Class load the class; a missing file, a missing name or something
    that is not an environment class is one ConfigError naming the key."""
    assert load_environment("zoom") is ZoomEnvironment and load_environment("scripted") is ScriptedEnvironment
    (tmp_path / "mine.py").write_text("from mmrl_megatron.rollout.environments import Environment, EnvironmentReply\n"
                                      "class Mine(Environment):\n    def step(self, conversation):\n"
                                      "        return EnvironmentReply(done=True)\n"
                                      "def not_a_class():\n    pass\n")
    assert load_environment(f"{tmp_path}/mine.py:Mine").__name__ == "Mine"
    for spec, message in ((f"{tmp_path}/missing.py:Mine", "does not exist"), (f"{tmp_path}/mine.py:Other", "has no"),
                          (f"{tmp_path}/mine.py:not_a_class", "not a class"), ("zoomm", "expected one of")):
        with pytest.raises(ConfigError, match=f"rollout.multi_turn.environment.*{message}"):
            load_environment(spec)
