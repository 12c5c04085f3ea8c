"""Environment turns as the chat template writes them (data/turns.py), and the M-RoPE positions of a whole
multi-image conversation (trainer.positions.trajectory_positions) against transformers' get_rope_index."""
import pytest
import torch
from transformers import AutoConfig, Qwen2_5_VLModel

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data import PromptProcessor
from mmrl_megatron.data.errors import DataError
from mmrl_megatron.data.format import make_row, parse_row
from mmrl_megatron.data.turns import TurnEncoder
from mmrl_megatron.rollout.multi_turn import TurnRecord
from mmrl_megatron.models.family import position_rule
from mmrl_megatron.trainer.positions import trajectory_positions
from tests.data.images import png


def _processor(model_dir):
    return PromptProcessor(model_dir, DataConfig(max_prompt_length=4096))


ASSISTANT_TEXTS = ("<zoom>0,0,.5,.5</zoom>", "<zoom>10,10,40,40</zoom>", "\\boxed{3}")
REPLIES = [("user", "Region:", [png(84, 56)]), ("tool", "Two views:", [png(56, 56), png(112, 56)])]


def _conversation(processor):
    """A prompt with one image, three assistant turns (ending with the end-of-turn token, as generation stops
    there) and two environment turns with one and two images: (prompt sample, TurnRecord, response ids)."""
    encoder = TurnEncoder(processor)
    prompt = processor.process(parse_row(make_row("Find x.", [png(56, 84)], "3", "geo")), 0)
    end = [processor.end_of_turn_token_id]
    record, response = TurnRecord(), []
    for turn, text in enumerate(ASSISTANT_TEXTS):
        ids = processor.tokenizer.encode(text, add_special_tokens=False) + end
        record.generated_lengths.append(len(ids))
        response += ids
        if turn < len(REPLIES):
            role, reply, images = REPLIES[turn]
            encoded = encoder.encode(role, reply, images, ids)
            record.environment_turns.append(encoded)
            response += encoded.ids
    return prompt, record, response


def test_turn_tokens_are_the_templates_rendering_of_the_whole_conversation(tiny_model_dir):
    """Invariant: prompt + assistant turns + encoded environment turns are, token for token, the chat template's
    rendering of the whole conversation (image pads expanded to each image's count); a turn after a stop string
    (no end-of-turn token generated) first closes the assistant turn."""
    processor = _processor(tiny_model_dir)
    prompt, record, response = _conversation(processor)
    messages = list(prompt.messages)
    for turn, text in enumerate(ASSISTANT_TEXTS):
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        if turn < len(REPLIES):
            role, reply, images = REPLIES[turn]
            parts = [{"type": "text", "text": reply}] + [{"type": "image"}] * len(images)
            messages.append({"role": role, "content": parts})
    rendered = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    rendered = rendered[:rendered.rindex("<|im_end|>") + len("<|im_end|>")]  # generation stops at the last one
    grids = torch.cat([prompt.image_grid_thw] + [turn.image_grid_thw for turn in record.environment_turns])
    counts = (grids.prod(-1) // processor.merge_size ** 2).tolist()
    expected = processor.expand_pads(processor.tokenizer.encode(rendered, add_special_tokens=False), counts)
    assert prompt.prompt_ids + response == expected

    after_stop_string = TurnEncoder(processor).encode("user", "Region:", [], processor.tokenizer.encode("</zoom>"))
    assert processor.tokenizer.decode(after_stop_string.ids).startswith("<|im_end|>\n<|im_start|>user\nRegion:")


def test_positions_of_a_multi_image_conversation_equal_transformers(tiny_model_dir):
    """Invariant: positions over prompt, assistant and environment turns, with an image in the prompt and three
    returned by the environment (different sizes), equal get_rope_index of the whole conversation token for
    token; every image takes 3-D positions."""
    processor = _processor(tiny_model_dir)
    prompt, record, response = _conversation(processor)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    ours = trajectory_positions(position_rule(config.to_dict()), prompt.prompt_ids, prompt.image_grid_thw, record)

    ids = torch.tensor([prompt.prompt_ids + response])
    grids = torch.cat([prompt.image_grid_thw] + [turn.image_grid_thw for turn in record.environment_turns])
    expected, _ = Qwen2_5_VLModel(config).get_rope_index(ids, mm_token_type_ids=(ids == config.image_token_id).int(),
                                                         image_grid_thw=grids)
    assert grids.shape[0] == 4 and ours.shape == (3, ids.shape[1])
    assert torch.equal(ours, expected[:, 0])
    image_tokens = ids[0] == config.image_token_id
    assert not torch.equal(ours[1, image_tokens], ours[2, image_tokens])


def test_kimi_vl_turns_follow_its_template(tiny_kimi_vl_dir):
    """Invariant: the same encoder serves Kimi-VL's template: nothing repeats the generated <|im_end|>, the turn
    opens with the template's user header and ends with its generation prompt, and <|media_pad|> is expanded."""
    processor = _processor(tiny_kimi_vl_dir)
    generated = processor.tokenizer.encode("<zoom>0,0,1,1</zoom>", add_special_tokens=False) + [
        processor.end_of_turn_token_id]
    turn = TurnEncoder(processor).encode("user", "Region:", [png(56, 56)], generated)
    text = processor.tokenizer.decode(turn.ids)
    assert text.startswith("<|im_user|>user<|im_middle|>Region:")
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>")
    pads = turn.ids.count(processor.image_token_id)
    assert pads == int(turn.image_grid_thw.prod(-1).sum()) // processor.merge_size ** 2 > 1


def test_environment_text_with_an_image_token_is_refused(tiny_model_dir):
    """Invariant: text holding the literal image pad would be read as an image; it is refused with DataError."""
    with pytest.raises(DataError, match="literal image token"):
        TurnEncoder(_processor(tiny_model_dir)).encode("user", "see <|vision_start|>", [], [1])
