"""Entry point of one answer-reward worker process (started by workers.FunctionWorkers, not by users).

    python -m mmrl_megatron.rewards.worker_main REQUEST_FD RESULT_FD FUNCTION_SPEC
"""
import sys
from multiprocessing.connection import Connection

from mmrl_megatron.rewards.functions import load_function, score_and_accuracy


def serve(requests: Connection, results: Connection, spec: str) -> None:
    """Say ("ready",) once the function is loaded, then answer (number, arguments) requests with
    (number, (score, accuracy, extras) or None, error or None)."""
    function = load_function(spec)
    results.send(("ready",))
    while True:
        try:
            number, arguments = requests.recv()
        except EOFError:  # the trainer closed the pipe: shut down
            return
        try:
            results.send((number, score_and_accuracy(function(*arguments)), None))
        except Exception as error:  # the user's function may raise anything; the trainer scores it 0
            results.send((number, None, f"{type(error).__name__}: {error}"))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False), sys.argv[3])
