"""An in-process stand-in for an SGLang 0.5.23 HTTP server, for contract tests without GPUs.

It serves the routes and JSON formats of the pinned version and is as strict as that server where
its behaviour is known (tests/rollout/sglang_real/ checks the client against sglang's own code):
unknown request fields ignored but unknown sampling_params keys refused (HTTP 400), a missing
required field refused (HTTP 422), a request id already in
flight refused (HTTP 400, "Duplicate request ID detected"), sampling_seed honoured only under
--enable-deterministic-inference, /get_weights_by_name failing (HTTP 400) as it does for 0.5.23's
Qwen2.5-VL and Kimi-VL models, weight updates only inside a begin/end session, one serialized payload
per TP rank, unknown non-stacked names skipped silently (as SGLang's load_weights does), memory
release only with --enable-memory-saver, no generation while memory is released, and log-probs after
temperature scaling. Its own additions are for fault injection: crashes after k answers, and a delay
per answer. Behind it sits a toy bigram language model over the checkpoint's own
embedding matrix (logits of the next token = lm_head @ embed[last token]), so weight updates change
what it generates and the tests can recompute every log-prob.

`python -m tests.rollout.fake_sglang_server --model-path DIR --port P ...` runs it as a process with
sglang.launch_server's flags, for the launcher tests.
"""
import argparse
import base64
import io
import json
import os
import threading
import time
import zlib
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file

from mmrl_megatron.rollout.errors import RolloutError
from mmrl_megatron.rollout.sglang.protocol import MEMORY_TAGS, PINNED_SGLANG_VERSION, REQUEST_FIELDS
from mmrl_megatron.rollout.sglang.serialization import deserialize_bucket

EOS_TOKEN_ID = 256  # tiny checkpoint's <|endoftext|>
VISION_START_TOKEN_ID = 259
# the /generate JSON contract's SamplingParams keys (sglang/api/v1/api_types.py; unknown keys are a 400
# there); tests/rollout/sglang_real/test_contract.py checks this list against the wheel
CONTRACT_SAMPLING_KEYS = frozenset({
    "beam_width", "choice", "custom_params", "ebnf", "frequency_penalty", "ignore_eos", "json_schema", "logit_bias",
    "max_new_tokens", "min_new_tokens", "min_p", "n", "no_stop_trim", "presence_penalty", "regex",
    "repetition_penalty", "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens", "stop",
    "stop_regex", "stop_token_ids", "stream_interval", "structural_tag", "temperature", "top_k", "top_p", "watermark",
})
STACKED_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")


class BadRequest(Exception):
    pass


class MissingField(Exception):
    """FastAPI's validation error (HTTP 422) for a body without a required field."""


def checkpoint_tensors(model_path: str) -> Dict[str, torch.Tensor]:
    tensors = {}
    for file_name in sorted(os.listdir(model_path)):
        if file_name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model_path, file_name)))
    return tensors


def _decode_image(item: str) -> Image.Image:
    if item.startswith("data:"):
        raw = base64.b64decode(item.split(",", 1)[1])
    elif os.path.exists(item):
        raw = open(item, "rb").read()
    else:
        raw = base64.b64decode(item)
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


class ToyBigramModel:
    """Next-token logits = W_out @ embed[last token]; W_out is lm_head, or embed when tied."""

    def __init__(self, weights: Dict[str, torch.Tensor]):
        self.weights = weights

    def logits(self, last_token: int) -> torch.Tensor:
        embed = self.weights["model.embed_tokens.weight"].float()
        output = self.weights.get("lm_head.weight", self.weights["model.embed_tokens.weight"]).float()
        return output @ embed[last_token]

    def sample(self, prompt_ids: List[int], params: dict, stream_seed: int) -> Tuple[List[int], List[float], dict]:
        temperature, top_k = float(params.get("temperature", 1.0)), int(params.get("top_k", -1))
        if temperature < 1e-6:  # SGLang turns greedy into temperature 1, top_k 1
            temperature, top_k = 1.0, 1
        stop_ids = set(params.get("stop_token_ids") or []) | {EOS_TOKEN_ID}
        generator = torch.Generator().manual_seed(stream_seed)
        tokens, logprobs, last = [], [], prompt_ids[-1]
        for _ in range(int(params.get("max_new_tokens", 128))):
            scaled = torch.log_softmax(self.logits(last) / temperature, dim=-1)
            if top_k == 1:
                token = int(scaled.argmax())
            else:
                token = int(torch.multinomial(scaled.exp(), 1, generator=generator))
            tokens.append(token)
            logprobs.append(float(scaled[token]))
            if token in stop_ids:
                return tokens, logprobs, {"type": "stop", "matched": token}
            last = token
        return tokens, logprobs, {"type": "length", "length": len(tokens)}


class FakeSGLangServer:
    def __init__(self, model_path: str, tp_size: int = 1, enable_memory_saver: bool = True,
                 host: str = "127.0.0.1", port: int = 0, crash_after_generates: Optional[int] = None,
                 deterministic_inference: bool = False, generate_delay_s: float = 0.0):
        self.model_path = model_path
        self.deterministic_inference = deterministic_inference
        self.generate_delay_s = generate_delay_s
        self.rids_in_flight: set = set()
        self.unseeded = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        self.tp_size = tp_size
        self.enable_memory_saver = enable_memory_saver
        self.weights = checkpoint_tensors(model_path)
        self.model = ToyBigramModel(self.weights)
        self.weight_version = "default"
        self.session_open = False
        self.released: set = set()
        self.update_groups: Dict[str, list] = {}
        self.calls: List[Tuple[str, dict]] = []  # (route, body) of every request, for payload checks
        self.generates_received = 0
        self.generates_served = 0
        self.crash_after_generates = crash_after_generates
        self.in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.crashed = False
        self.thread: Optional[threading.Thread] = None

    # ---- lifecycle ----
    def start(self) -> "FakeSGLangServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def crash(self) -> None:
        """Die like a killed process: stop answering and refuse new connections."""
        self.crashed = True
        threading.Thread(target=self.httpd.shutdown, daemon=True).start()
        self.httpd.socket.close()

    def stop(self) -> None:
        if not self.crashed:
            self.crashed = True
            self.httpd.shutdown()
            self.httpd.server_close()

    # ---- routing ----
    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str):
                route = self.path.split("?", 1)[0]
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null") if length else None
                if route == "/generate" and server._should_crash():
                    server.crash()
                    self.close_connection = True
                    return  # no answer: the client sees the connection drop mid-request
                status, answer = server.handle(method, route, body)
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def log_message(self, *args):
                pass

        return Handler

    def _should_crash(self) -> bool:
        """True for the generate requests that arrive after the first crash_after_generates."""
        with self.lock:
            self.generates_received += 1
            return self.crash_after_generates is not None and self.generates_received > self.crash_after_generates

    def handle(self, method: str, route: str, body) -> Tuple[int, object]:
        if method == "GET" and route in ("/health", "/health_generate"):
            return 200, None
        if method == "GET" and route == "/get_model_info":
            return 200, {"model_path": self.model_path, "is_generation": True, "weight_version": self.weight_version}
        if method == "GET" and route == "/get_server_info":
            return 200, {"tp_size": self.tp_size, "version": PINNED_SGLANG_VERSION}
        body = body or {}
        handler = getattr(self, "route_" + route.strip("/"), None)
        if handler is None:
            return 404, {"detail": "Not Found"}
        try:
            missing = sorted(REQUEST_FIELDS[route].required - set(body)) if route in REQUEST_FIELDS else []
            if missing:
                raise MissingField(f"missing fields {missing}")
            with self.lock:
                self.calls.append((route, body))
            answer = handler(body)
        except MissingField as error:
            return 422, {"detail": str(error)}
        except (BadRequest, RolloutError) as error:
            # update routes answer {success, message}; others the generic error envelope
            if route.startswith("/update_weights") or route.endswith("_weight_update") or route.endswith("_group"):
                return 400, {"success": False, "message": str(error)}
            return 400, {"error": {"message": str(error)}}
        return 200, answer

    # ---- generation ----
    def route_generate(self, body: dict):
        if self.released:
            raise BadRequest(f"memory released ({sorted(self.released)}); resume before generating")
        prompt_ids = body.get("input_ids")
        if not prompt_ids or not isinstance(prompt_ids[0], int):
            raise BadRequest("this fake takes one request with 1-D input_ids")
        images = body.get("image_data") or []
        if prompt_ids.count(VISION_START_TOKEN_ID) != len(images):
            raise BadRequest(f"{prompt_ids.count(VISION_START_TOKEN_ID)} image placeholders but {len(images)} images")
        image_key = 0
        for item in images:
            image = _decode_image(item)
            image_key = zlib.crc32(image.tobytes(), image_key)
        params = body.get("sampling_params") or {}
        unknown = sorted(set(params) - CONTRACT_SAMPLING_KEYS)
        if unknown:
            raise BadRequest(f"unknown field `{unknown[0]}` in sampling_params")
        with self.lock:
            if self.deterministic_inference:
                seed = params.get("sampling_seed", 42)  # SamplingParams' default seed
                base_seed = zlib.crc32(json.dumps([prompt_ids, image_key, seed]).encode())
            else:  # SGLang draws from its own generator and ignores sampling_seed
                base_seed = int(torch.randint(0, 2**31, (1,), generator=self.unseeded))
            rid = body.get("rid")
            if rid is not None and rid in self.rids_in_flight:
                raise BadRequest(f"Duplicate request ID detected: {rid}")
            if rid is not None:
                self.rids_in_flight.add(rid)
            self.in_flight += 1
        try:
            time.sleep(self.generate_delay_s)
            answers = []
            for sample_index in range(int(params.get("n", 1))):
                tokens, logprobs, finish = self.model.sample(prompt_ids, params, base_seed + sample_index)
                answers.append({
                    "text": "",
                    "output_ids": tokens,
                    "meta_info": {
                        "id": f"{body.get('rid')}-{sample_index}",
                        "finish_reason": finish,
                        "prompt_tokens": len(prompt_ids),
                        "completion_tokens": len(tokens),
                        "output_token_logprobs": [[lp, token, None] for lp, token in zip(logprobs, tokens)],
                        "weight_version": self.weight_version,
                    },
                })
        finally:
            with self.lock:
                self.rids_in_flight.discard(rid)
                self.in_flight -= 1
                self.generates_served += 1
        return answers[0] if len(answers) == 1 else answers

    # ---- weight updates ----
    def _require_session(self):
        if not self.session_open:
            raise BadRequest("weight updates must be inside /begin_weight_update ... /end_weight_update")
        if "weights" in self.released:
            raise BadRequest("weights are released; resume them before updating")

    def _load(self, named_tensors) -> None:
        for name, tensor in named_tensors:
            if name not in self.weights:
                if name.endswith(STACKED_SUFFIXES):
                    raise BadRequest(f"KeyError: {name}")
                continue  # SGLang skips unknown non-stacked names without a word
            if tuple(tensor.shape) != tuple(self.weights[name].shape):
                raise BadRequest(f"{name}: shape {tuple(tensor.shape)} != {tuple(self.weights[name].shape)}")
            self.weights[name] = tensor.detach().clone().to(self.weights[name].dtype)

    def route_begin_weight_update(self, body):
        if self.session_open:
            raise BadRequest("a weight-update session is already open")
        self.session_open = True
        return {"success": True, "message": "begun"}

    def route_end_weight_update(self, body):
        if not self.session_open:
            raise BadRequest("no weight-update session is open")
        self.session_open = False
        return {"success": True, "message": "ended"}

    def _set_version(self, body):
        if body.get("weight_version") is not None:
            self.weight_version = body["weight_version"]

    def route_update_weights_from_tensor(self, body):
        self._require_session()
        payloads = body["serialized_named_tensors"]
        if len(payloads) != self.tp_size:
            raise BadRequest(f"{len(payloads)} serialized payloads for {self.tp_size} TP ranks")
        if body.get("load_format") != "flattened_bucket":
            raise BadRequest("this fake reads load_format='flattened_bucket' only")
        per_rank = [deserialize_bucket(payload) for payload in payloads]  # each TP rank reads its own entry
        self.received_per_rank = [dict(rank_tensors) for rank_tensors in per_rank]
        for rank_tensors in per_rank[1:]:
            if [name for name, _ in rank_tensors] != [name for name, _ in per_rank[0]]:
                raise BadRequest("TP ranks received different tensor lists")
        self._load(per_rank[0])
        self._set_version(body)
        return {"success": True, "message": "Succeeded to update model weights."}

    def route_init_weights_update_group(self, body):
        if body.get("backend") != "gloo":
            raise BadRequest("this fake joins gloo groups only")
        name = body.get("group_name", "weight_update_group")
        if body["world_size"] != body["rank_offset"] + self.tp_size:
            raise BadRequest(f"world_size {body['world_size']} != rank_offset + tp_size")
        timeout = timedelta(seconds=60)
        groups: list = [None] * self.tp_size
        stores: list = [None] * self.tp_size

        def join(tp_rank):  # each TP rank is its own process in SGLang, with its own store connection
            stores[tp_rank] = dist.TCPStore(
                body["master_address"], body["master_port"], body["world_size"], is_master=False, timeout=timeout
            )
            # the key layout torch's _new_process_group_helper uses under sglang's PrefixStore(group_name)
            prefixed = dist.PrefixStore("cpu/", dist.PrefixStore(f"{name}/", dist.PrefixStore(name, stores[tp_rank])))
            groups[tp_rank] = dist.ProcessGroupGloo(prefixed, body["rank_offset"] + tp_rank, body["world_size"], timeout)

        threads = [threading.Thread(target=join, args=(rank,)) for rank in range(self.tp_size)]
        [thread.start() for thread in threads]
        [thread.join() for thread in threads]
        self.update_groups[name] = [stores] + groups
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def route_update_weights_from_distributed(self, body):
        self._require_session()
        name = body.get("group_name", "weight_update_group")
        if name not in self.update_groups:
            raise BadRequest(f"no weight update group {name}")
        groups = self.update_groups[name][1:]
        received = []
        for tensor_name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            buffers = [torch.empty(shape, dtype=getattr(torch, dtype)) for _ in groups]

            def receive(tp_rank):
                options = dist.BroadcastOptions()
                options.rootRank = 0
                groups[tp_rank].broadcast([buffers[tp_rank]], options).wait()

            threads = [threading.Thread(target=receive, args=(rank,)) for rank in range(len(groups))]
            [thread.start() for thread in threads]
            [thread.join() for thread in threads]
            received.append((tensor_name, buffers[0]))
        self._load(received)
        self._set_version(body)
        return {"success": True, "message": "Succeeded to update parameter online."}

    def route_destroy_weights_update_group(self, body):
        self.update_groups.pop(body.get("group_name", "weight_update_group"), None)
        return {"success": True, "message": "destroyed"}

    def route_get_weights_by_name(self, body):
        # 0.5.23's Qwen2_5_VLForConditionalGeneration has no get_weights_by_name: the exporter logs the
        # AttributeError and the route answers this
        raise BadRequest("Get parameter by name failed")

    # ---- cache and memory ----
    def route_flush_cache(self, body):
        if self.in_flight:
            raise BadRequest("requests running")
        return None

    def route_release_memory_occupation(self, body):
        if not self.enable_memory_saver:
            raise BadRequest("release_memory_occupation needs --enable-memory-saver")
        if self.in_flight:
            raise BadRequest("server is not idle")
        tags = body.get("tags") or list(MEMORY_TAGS)
        if set(tags) - set(MEMORY_TAGS):
            raise BadRequest(f"unknown tags {tags}")
        self.released |= set(tags)
        return None

    def route_resume_memory_occupation(self, body):
        tags = body.get("tags") or list(MEMORY_TAGS)
        self.released -= set(tags)
        return None


class InProcessLauncher:
    """The engine's launcher interface (start/alive/log_tail/stop) over FakeSGLangServer instances.

    crash_plan[i] is crash_after_generates for the i-th start (None: never crashes).
    """

    def __init__(self, model_path: str, tp_size: int = 1, crash_plan=(), **server_options):
        self.model_path, self.tp_size, self.server_options = model_path, tp_size, server_options
        self.crash_plan = list(crash_plan)
        self.servers: List[FakeSGLangServer] = []

    @property
    def server(self) -> FakeSGLangServer:
        return self.servers[-1]

    def start(self) -> str:
        crash_after = self.crash_plan[len(self.servers)] if len(self.servers) < len(self.crash_plan) else None
        server = FakeSGLangServer(self.model_path, self.tp_size, crash_after_generates=crash_after, **self.server_options)
        self.servers.append(server.start())
        return server.url

    def alive(self) -> bool:
        return bool(self.servers) and not self.server.crashed

    def log_tail(self, lines: int = 40) -> str:
        return f"fake server {self.server.url}: crashed={self.server.crashed}, starts={len(self.servers)}"

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="fake sglang.launch_server for tests")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--tp-size", "--tp", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    parser.add_argument("--crash-after-generates", type=int, default=None)
    args, ignored = parser.parse_known_args()  # --base-gpu-id, --mem-fraction-static, ... mean nothing here
    server = FakeSGLangServer(args.model_path, args.tp_size, args.enable_memory_saver, args.host, args.port,
                              crash_after_generates=args.crash_after_generates,
                              deterministic_inference=args.enable_deterministic_inference)
    print(f"fake sglang {PINNED_SGLANG_VERSION} serving {args.model_path} at {server.url}; ignored {ignored}; "
          f"SGLANG_RETURN_ORIGINAL_LOGPROB={os.environ.get('SGLANG_RETURN_ORIGINAL_LOGPROB')}", flush=True)
    server.start().thread.join()
    if server.crashed:
        print("fake sglang: crashed as planned", flush=True)
        os._exit(1)


if __name__ == "__main__":
    main()
