"""sglang 0.5.23's own FastAPI app (entrypoints/http_server.py) served by uvicorn in this process, with a
stand-in TokenizerManager behind it: the routes, request parsing, JSON contract and responses are
sglang's; below the tokenizer manager (scheduler, model) the fake server's toy bigram model answers.

The stand-in gets the request objects sglang built from our JSON, refuses a request id already in
flight as TokenizerManager does ("Duplicate request ID detected"), and loads weight payloads with
sglang's own MultiprocessingSerializer and flattened-bucket path.
"""
import threading
import time
from types import SimpleNamespace

import uvicorn

from tests.rollout.fake_sglang_server import FakeSGLangServer


class StandInTokenizerManager:
    is_generation = True
    gracefully_exit = False

    def __init__(self, sglang, model_path: str, tp_size: int = 1):
        self.sglang = sglang
        self.server_status = sglang.http_server.ServerStatus.Up
        # not started: only its model, weights and session rules are used
        self.model = FakeSGLangServer(model_path, tp_size, deterministic_inference=True)
        self.requests = []  # the parsed request objects, for the tests

    async def generate_request(self, obj, request=None):
        self.requests.append(obj)
        body = {"rid": obj.rid, "input_ids": obj.input_ids, "image_data": obj.image_data,
                "sampling_params": obj.sampling_params}
        try:
            yield self.model.route_generate(body)
        except Exception as error:  # the fake's BadRequest: TokenizerManager raises ValueError, the route answers 400
            raise ValueError(str(error)) from error

    def _session(self, route):
        try:
            getattr(self.model, route)({})
        except Exception as error:
            return False, str(error)
        return True, "ok"

    async def begin_weight_update(self, obj, request=None):
        return self._session("route_begin_weight_update")

    async def end_weight_update(self, obj, request=None):
        return self._session("route_end_weight_update")

    async def update_weights_from_tensor(self, obj, request=None):
        self.requests.append(obj)
        try:
            self.model._require_session()
            per_rank = []
            for entry in obj.serialized_named_tensors:  # bytes: the route decoded our base64
                loaded = []
                runner = SimpleNamespace(get_model=lambda: SimpleNamespace(load_weights=loaded.extend))
                data = self.sglang.utils.MultiprocessingSerializer.deserialize(entry)
                self.sglang.weight_updater.WeightUpdater._update_weights_from_flattened_bucket(runner, data)
                per_rank.append(loaded)
            self.model._load(per_rank[0])
            self.model._set_version({"weight_version": obj.weight_version})
        except Exception as error:
            return False, str(error)
        return True, "Success"

    async def flush_cache(self, timeout_s: float = 0.0):
        return SimpleNamespace(success=not self.model.in_flight, message="")

    async def release_memory_occupation(self, obj, request=None):
        self.model.route_release_memory_occupation({"tags": obj.tags})

    async def resume_memory_occupation(self, obj, request=None):
        self.model.route_resume_memory_occupation({"tags": obj.tags})


class SGLangAppServer:
    """start() serves http_server.app on a free loopback port; stop() ends it."""

    def __init__(self, sglang, model_path: str, tp_size: int = 1):
        self.sglang = sglang
        self.tokenizer_manager = StandInTokenizerManager(sglang, model_path, tp_size)
        http_server = sglang.http_server
        http_server.set_global_state(http_server._GlobalState(
            tokenizer_manager=self.tokenizer_manager, template_manager=None, scheduler_info={}))
        self.server = uvicorn.Server(uvicorn.Config(http_server.app, host="127.0.0.1", port=0, lifespan="off", loop="asyncio",
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("sglang's app did not start under uvicorn")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
