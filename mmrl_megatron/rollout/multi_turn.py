"""Multi-turn rollouts: the engine generates one assistant turn of every trajectory at a time, an environment
(rollout/environments/) answers each with text and/or images, and the answer's tokens (chat-template markup,
image pads for new images; data/turns.py) are appended before the next turn is generated from the whole
conversation. Both engines serve it unchanged: each later turn is a request whose prompt is the conversation so
far and whose images are all of its images in order.

A trajectory ends when the environment says done, after rollout.multi_turn.max_turns assistant turns, when a
turn does not end by a stop (cut at max_new_tokens: "length"), when the next environment turn would leave no
room under max_total_tokens (prompt + every turn; "length"), or when an assistant turn holds one of the family's
image tokens (the next request would read it as an image). It always ends on an assistant turn. Every call makes
exactly max_turns engine.generate calls (later ones possibly empty), so engines whose generate is collective
over several ranks (SGLang at rollout TP > 1) stay in step whatever each rank's trajectories do.

The embedded engine prefills the whole conversation again at each turn (no prefix reuse across turns); SGLang's
radix cache reuses the shared prefix on its own.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..config.errors import ConfigError
from ..data.errors import DataError
from ..data.turns import EncodedTurn, TurnEncoder
from .environments import ROLES, Conversation, EnvironmentReply, Task, load_environment
from .errors import RolloutError
from .sampling import sequence_seeds
from .types import RolloutRequest, RolloutResult, SamplingParams

LENGTH, STOP = "length", "stop"
_TURN_STREAM = 0x7E57  # mixed with the turn number into a later turn's seed


def _cat(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    present = [tensor for tensor in tensors if tensor is not None]
    return torch.cat(present) if present else None


@dataclass
class TurnRecord:
    """How a multi-turn response is laid out: assistant turn 0, environment turn 0, assistant turn 1, ...,
    ending on an assistant turn (one environment turn fewer than assistant turns)."""

    generated_lengths: List[int] = field(default_factory=list)
    environment_turns: List[EncodedTurn] = field(default_factory=list)

    @property
    def loss_mask(self) -> List[int]:
        """Per response token: 1 where the policy generated it, 0 where the environment wrote it."""
        mask: List[int] = []
        for index, length in enumerate(self.generated_lengths):
            if index:
                mask += [0] * len(self.environment_turns[index - 1].ids)
            mask += [1] * length
        return mask

    def given_parts(self, prompt_ids: List[int], prompt_grid) -> List[Tuple[List[int], object, int]]:
        """(ids the model was given, their images' image_grid_thw, the assistant turn's length after them): the
        prompt, then each environment turn."""
        given = [(list(prompt_ids), prompt_grid)] + [(turn.ids, turn.image_grid_thw) for turn in self.environment_turns]
        return [(ids, grid, length) for (ids, grid), length in zip(given, self.generated_lengths)]

    def conversation_images(self, prompt_pixel_values: Optional[torch.Tensor], prompt_grid: Optional[torch.Tensor]
                            ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(pixel_values, image_grid_thw) of every image of the conversation: the prompt's, then the environment's."""
        return (_cat([prompt_pixel_values] + [turn.pixel_values for turn in self.environment_turns]),
                _cat([prompt_grid] + [turn.image_grid_thw for turn in self.environment_turns]))

    @property
    def images(self) -> List[bytes]:
        """The environment's encoded images, in order."""
        return [image for turn in self.environment_turns for image in turn.images]


@dataclass
class _Trajectory:
    request_index: int
    sample_index: int
    prompt: RolloutRequest
    environment: object
    conversation: Conversation
    record: TurnRecord = field(default_factory=TurnRecord)
    response_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    finish_reason: str = STOP
    open: bool = True

    @property
    def length(self) -> int:
        return len(self.prompt.prompt_ids) + len(self.response_ids)

    def next_request(self) -> RolloutRequest:
        """The conversation so far as a prompt, with every image in order."""
        pixel_values, grid = self.record.conversation_images(self.prompt.pixel_values, self.prompt.image_grid_thw)
        return RolloutRequest(prompt_ids=list(self.prompt.prompt_ids) + self.response_ids, pixel_values=pixel_values,
                              image_grid_thw=grid, images=list(self.prompt.images) + self.record.images)

    def result(self) -> RolloutResult:
        return RolloutResult(self.request_index, self.sample_index, self.response_ids, self.logprobs,
                             self.finish_reason, turns=self.record)


def turn_seed(seed: Optional[int], turn: int) -> Optional[int]:
    """Turn 0 keeps the call's seed (so first turns are what a single-turn rollout draws); each later turn its own
    stream, since its requests are numbered from 0 again."""
    if seed is None or turn == 0:
        return seed
    return int(sequence_seeds(seed, torch.tensor([turn]), torch.tensor([_TURN_STREAM]))[0])


class MultiTurnRollout:
    """Drives `engine` through up to max_turns assistant turns per trajectory, one `environment_class` instance
    per trajectory; `decode` turns an assistant turn's ids into the text the environment reads."""

    def __init__(self, engine, environment_class: type, encoder: TurnEncoder, decode: Callable[[List[int]], str],
                 max_turns: int, max_total_tokens: int, name: str):
        self.engine = engine
        self.environment_class = environment_class
        self.encoder = encoder
        self.decode = decode
        self.max_turns = max_turns
        self.max_total_tokens = max_total_tokens
        self.name = name

    def generate(self, prompts: Sequence, requests: Sequence[RolloutRequest],
                 sampling: SamplingParams) -> List[RolloutResult]:
        """n trajectories per request (prompts[i] is request i's data.PromptSample), ordered by (request, sample);
        each result's `turns` is its TurnRecord."""
        first = dataclasses.replace(sampling, max_new_tokens=self._first_turn_budget(requests, sampling))
        trajectories = [self._start(prompts[result.request_index], requests[result.request_index], result)
                        for result in self.engine.generate(requests, first)]
        for turn in range(1, self.max_turns):
            live = [trajectory for trajectory in trajectories if trajectory.open]
            room = max((self.max_total_tokens - trajectory.length for trajectory in live), default=1)
            params = dataclasses.replace(sampling, n=1, max_new_tokens=min(sampling.max_new_tokens, room),
                                         seed=turn_seed(sampling.seed, turn))
            for result in self.engine.generate([trajectory.next_request() for trajectory in live], params):
                self._take_turn(live[result.request_index], result)
        for trajectory in trajectories:
            self._close(trajectory)
        return [trajectory.result() for trajectory in trajectories]

    def _first_turn_budget(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> int:
        shortest = min((len(request.prompt_ids) for request in requests), default=0)
        return max(1, min(sampling.max_new_tokens, self.max_total_tokens - shortest))

    def _start(self, prompt, request: RolloutRequest, result: RolloutResult) -> _Trajectory:
        task = Task(prompt.data_source, prompt.ground_truth, dict(prompt.extra_info or {}), list(prompt.messages),
                    list(request.images))
        try:
            environment = self.environment_class(task)
        except Exception as error:
            raise RolloutError(f"rollout.multi_turn.environment {self.name!r} could not be made for request "
                               f"{result.request_index} ({prompt.data_source}): {error!r}") from error
        conversation = Conversation([dict(message) for message in prompt.messages], list(request.images))
        trajectory = _Trajectory(result.request_index, result.sample_index, request, environment, conversation)
        self._take_turn(trajectory, result)
        return trajectory

    def _take_turn(self, trajectory: _Trajectory, result: RolloutResult) -> None:
        """Append one assistant turn (cut to the token budget), then the environment's answer if a turn follows."""
        room = self.max_total_tokens - trajectory.length
        ids, logprobs = list(result.response_ids[:room]), list(result.logprobs[:room])
        trajectory.finish_reason = result.finish_reason if len(result.response_ids) <= room else LENGTH
        trajectory.response_ids += ids
        trajectory.logprobs += logprobs
        trajectory.record.generated_lengths.append(len(ids))
        trajectory.conversation.messages.append({"role": "assistant",
                                                 "content": [{"type": "text", "text": self.decode(ids)}]})
        if (trajectory.finish_reason != STOP or len(trajectory.record.generated_lengths) >= self.max_turns
                or self.encoder.image_token_ids.intersection(ids)):
            trajectory.open = False
            return
        reply = self._reply(trajectory)
        if reply.done:
            trajectory.open = False
            return
        encoded = self._encode(trajectory, reply, ids)
        if trajectory.length + len(encoded.ids) >= self.max_total_tokens:  # no room left for an assistant token
            trajectory.finish_reason, trajectory.open = LENGTH, False
            return
        trajectory.response_ids += encoded.ids
        trajectory.logprobs += [0.0] * len(encoded.ids)
        trajectory.record.environment_turns.append(encoded)
        text = [{"type": "text", "text": reply.text}] if reply.text else []
        trajectory.conversation.messages.append({"role": reply.role,
                                                 "content": text + [{"type": "image"}] * len(encoded.images)})
        trajectory.conversation.images += encoded.images

    def _where(self, trajectory: _Trajectory) -> str:
        return (f"request {trajectory.request_index} sample {trajectory.sample_index}, after assistant turn "
                f"{len(trajectory.record.generated_lengths)}")

    def _reply(self, trajectory: _Trajectory) -> EnvironmentReply:
        try:
            reply = trajectory.environment.step(trajectory.conversation)
        except Exception as error:
            raise RolloutError(f"environment {self.name!r} raised at {self._where(trajectory)}: {error!r}") from error
        if not isinstance(reply, EnvironmentReply) or (not reply.done and reply.role not in ROLES):
            raise RolloutError(f"environment {self.name!r} returned {reply!r} at {self._where(trajectory)}; step() "
                               f"must return an EnvironmentReply whose role is one of {ROLES}")
        return reply

    def _encode(self, trajectory: _Trajectory, reply: EnvironmentReply, after: List[int]) -> EncodedTurn:
        try:
            return self.encoder.encode(reply.role, reply.text, reply.images, after)
        except DataError as error:
            raise RolloutError(f"environment {self.name!r} at {self._where(trajectory)}: {error}") from error

    def _close(self, trajectory: _Trajectory) -> None:
        try:
            trajectory.environment.close()
        except Exception as error:
            raise RolloutError(f"environment {self.name!r}: close() raised at {self._where(trajectory)}: "
                               f"{error!r}") from error


def build_multi_turn(config, engine, processor, decode: Callable[[List[int]], str]) -> Optional[MultiTurnRollout]:
    """The driver rollout.multi_turn asks for (root Config), or None for single-turn rollouts (no environment)."""
    settings = config.rollout.multi_turn
    if not settings.environment:
        return None
    if settings.max_total_tokens <= config.data.max_prompt_length:
        raise ConfigError(f"rollout.multi_turn.max_total_tokens={settings.max_total_tokens} must exceed "
                          f"data.max_prompt_length={config.data.max_prompt_length}: it bounds prompt and turns "
                          "together")
    if config.algorithm.overlong_buffer > 0:
        raise ConfigError("algorithm.overlong_buffer (DAPO's overlong shaping) measures a response against one turn's "
                          "rollout.max_new_tokens; set it to 0 with rollout.multi_turn.environment")
    return MultiTurnRollout(engine, load_environment(settings.environment), TurnEncoder(processor), decode,
                            settings.max_turns, settings.max_total_tokens, settings.environment)
