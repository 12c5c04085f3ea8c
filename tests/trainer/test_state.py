"""TrainerState round-trips through its state_dict, and a saved state that predates a field keeps its default."""
from mmrl_megatron.trainer.state import TrainerState


def test_state_round_trips_and_missing_fields_keep_their_defaults():
    """Invariant: load_state_dict(state_dict()) restores every field; keys a checkpoint lacks (older runs had no
    warmup_done) leave the default; the checkpoint's other common keys (schedulers, layout) are ignored."""
    saved = TrainerState(step=7, nonfinite_skips=2, consecutive_nonfinite=1, warmup_done=True)
    restored = TrainerState()
    restored.load_state_dict(dict(saved.state_dict(), schedulers={}, layout="world=1,tp=1,pp=1"))
    assert restored == saved
    older = TrainerState()
    older.load_state_dict({"step": 4, "nonfinite_skips": 0, "consecutive_nonfinite": 0})
    assert older == TrainerState(step=4)
