"""Entry point of one answer-reward worker process (started by workers.FunctionWorkers, not by users).

    python -m mmrl_megatron.rewards.worker_main REQUEST_FD RESULT_FD FUNCTION_SPEC
"""
import sys
from multiprocessing.connection import Connection

from mmrl_megatron.rewards.errors import RewardError
from mmrl_megatron.rewards.functions import call_function, load_function, score_and_accuracy


def serve(requests: Connection, results: Connection, spec: str) -> None:
    """Say ("ready",) once the function is loaded, then answer (number, keyword arguments) requests with
    (number, (score, accuracy, extras) or None, error or None, whether the error is a wrong result type)."""
    function = load_function(spec)
    results.send(("ready",))
    while True:
        try:
            number, arguments = requests.recv()
        except EOFError:  # the trainer closed the pipe: shut down
            return
        try:
            results.send((number, score_and_accuracy(call_function(function, arguments), spec), None, False))
        except RewardError as error:
            results.send((number, None, str(error), True))
        except Exception as error:  # the user's function may raise anything; the trainer scores it 0
            results.send((number, None, f"{type(error).__name__}: {error}", False))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False), sys.argv[3])
