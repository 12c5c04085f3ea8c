"""The loop's own progress, one of the Stateful parts the Checkpointer saves and restores (checkpoint.py)."""
from dataclasses import asdict, dataclass, fields
from typing import Dict


@dataclass
class TrainerState:
    step: int = 0  # the last finished RL step
    nonfinite_skips: int = 0  # updates skipped for a non-finite loss or gradient norm, all told
    consecutive_nonfinite: int = 0  # the same, since the last update that stepped (trainer.max_nonfinite_skips)
    warmup_done: bool = False  # the supervised warm-up ran (it runs once per run, not once per launch)

    def state_dict(self) -> Dict:
        """Plain values under the field names: the keys checkpoints held before this class, so those load."""
        return asdict(self)

    def load_state_dict(self, state: Dict) -> None:
        """Take the saved fields; one a checkpoint predates keeps its default."""
        for field in fields(self):
            if field.name in state:
                setattr(self, field.name, type(field.default)(state[field.name]))
