"""The interface a multi-turn rollout talks to: an environment answers each assistant turn of one trajectory
with text and/or images (the next user or tool turn), or says the conversation is done.

rollout.multi_turn.environment names the class ("path/to/file.py:ClassName", or a built-in name); the driver
(rollout/multi_turn.py) makes one instance per trajectory, with that sample's Task, and calls step() after
every assistant turn but the last the turn budget allows.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Union

from PIL import Image

ROLES = ("user", "tool")  # the chat-template roles an environment turn may take


@dataclass(frozen=True)
class Task:
    """The sample a trajectory answers, as the dataset row gave it."""

    data_source: str
    ground_truth: Any
    extra_info: Dict[str, Any]
    messages: List[Dict[str, Any]]  # the prompt chat: {"role", "content": [{"type": "image"} | {"type": "text", ...}]}
    images: List[bytes]  # the prompt's images, encoded as the model sees them (after augmentation)


@dataclass
class Conversation:
    """The trajectory so far: the prompt's messages, then each assistant turn ({"role": "assistant", "content":
    [{"type": "text", "text": decoded}]}) and each environment turn, and every image shown, in order."""

    messages: List[Dict[str, Any]]
    images: List[bytes]  # the prompt's images first, then the environment's

    @property
    def last_assistant_text(self) -> str:
        """The text of the newest assistant turn (what step() answers)."""
        last = next(message for message in reversed(self.messages) if message["role"] == "assistant")
        return "".join(part["text"] for part in last["content"] if part["type"] == "text")


@dataclass
class EnvironmentReply:
    """What step() returns. done: the conversation ends after the assistant turn just generated (text and images
    are then ignored: no assistant turn would follow them). Otherwise the reply becomes the next `role` turn,
    its text first and then its images (encoded bytes or PIL images)."""

    text: str = ""
    images: List[Union[bytes, Image.Image]] = field(default_factory=list)
    done: bool = False
    role: str = "user"


class Environment(ABC):
    """One instance per trajectory. Subclasses implement step(); close() runs when the trajectory ends."""

    def __init__(self, task: Task):
        self.task = task

    @abstractmethod
    def step(self, conversation: Conversation) -> EnvironmentReply:
        """The reply to conversation's last assistant turn."""

    def close(self) -> None:
        """Release what the instance holds (a sandbox, a connection); nothing by default."""
