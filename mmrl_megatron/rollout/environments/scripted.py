"""An environment that replies from a script stored with the sample: for tests, and for checking a multi-turn
set-up end to end before a real tool exists.

The script is the row's extra_info["scripted_replies"], a list of {"text": str, "images": [encoded bytes], "role":
"user" | "tool"} (every key optional); reply k answers assistant turn k, and the conversation is done when the
script runs out.
"""
from .base import Environment, EnvironmentReply

SCRIPT_KEY = "scripted_replies"


class ScriptedEnvironment(Environment):
    def __init__(self, task):
        super().__init__(task)
        self.script = list(task.extra_info.get(SCRIPT_KEY) or [])
        self.replied = 0

    def step(self, conversation) -> EnvironmentReply:
        if self.replied >= len(self.script):
            return EnvironmentReply(done=True)
        reply = self.script[self.replied]
        self.replied += 1
        return EnvironmentReply(text=reply.get("text") or "", images=list(reply.get("images") or []),
                                role=reply.get("role") or "user")
