"""An OpenAI-compatible chat server: one base model in llama.cpp, any number of profiles.

``POST /v1/chat/completions`` with ``model`` = a profile name (``base`` for none) and
``GET /v1/models``. Each profile's adapter is loaded once. A request activates exactly its own
adapter with llama_set_adapters_lora (none for ``base``), and an adapter switch clears the cached
prompt state, so nothing computed under one profile's adapter reaches another profile's request.
Requests run one at a time behind a lock because they share one llama.cpp context.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .chat import HistoryTurns, load_llama, load_lora, set_loras, verify_applied
from .derived import ensure_adapter
from .errors import MtaError, ProfileError
from .models import BaseModel, resolve_base_model
from .profile import list_profiles, load_profile, profile_path
from .templates import render_messages

logger = logging.getLogger(__name__)

BASE_MODEL_ID = "base"  # the request's model field that selects no adapter
MAX_BODY_BYTES = 1 << 20


class RequestError(MtaError):
    """A request the server rejects (HTTP 4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ServedProfile:
    name: str
    adapter: object  # llama.cpp adapter handle
    turns: HistoryTurns


class ProfileServer:
    """The loaded base model and profile adapters; ``complete`` runs one chat completion."""

    def __init__(self, profiles: list[str] | None = None, n_ctx: int = 2048, threads: int | None = None):
        names = list_profiles() if profiles is None else profiles
        loaded = [load_profile(name) for name in names]
        bases = {p.recipe["base_model"]["sha256"]: p.recipe["base_model"]["path"] for p in loaded}
        if len(bases) > 1:
            raise ProfileError(f"profiles {', '.join(names)} were enrolled on {len(bases)} different base models; "
                               "serve one base model at a time with --profiles.")
        self.base: BaseModel = resolve_base_model(next(iter(bases.values()), None))
        self.llm = load_llama(self.base, n_ctx=n_ctx, threads=threads)
        self.lock = threading.Lock()
        self.active: str | None = None
        self.profiles: dict[str, ServedProfile] = {}
        for profile in loaded:
            if profile.name == BASE_MODEL_ID:
                raise ProfileError(f"a profile named {BASE_MODEL_ID!r} clashes with the base model's id; rename it.")
            served = ServedProfile(profile.name, load_lora(self.llm, ensure_adapter(profile, self.base)), HistoryTurns(profile))
            self.profiles[profile.name] = served
            self._activate(profile.name)
            verify_applied(self.llm, profile, self.base)
        self._activate(BASE_MODEL_ID)
        logger.info("serving %s on %s", ", ".join([BASE_MODEL_ID, *self.profiles]), self.base.path.name)

    @property
    def model_ids(self) -> list[str]:
        return [BASE_MODEL_ID, *self.profiles]

    def _activate(self, name: str) -> None:
        """Make ``name``'s adapter the only active one and drop all cached prompt state."""
        handles = [] if name == BASE_MODEL_ID else [self.profiles[name].adapter]
        set_loras(self.llm, handles)
        self.active = name
        logger.debug("active adapter: %s", name)

    def prompt_messages(self, name: str, messages: list[dict]) -> list[dict]:
        """Return the messages as the model receives them: each user turn with the profile's history items above it."""
        if name == BASE_MODEL_ID:
            return [dict(m) for m in messages]
        return self.profiles[name].turns.messages(messages)

    def count_tokens(self, text: str) -> int:
        """Return the number of base-model tokens in ``text`` (chat template markers included)."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def prompt_text(self, name: str, messages: list[dict]) -> str:
        return render_messages(self.base, self.prompt_messages(name, messages))

    def complete(self, name: str, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None):
        """Return a generator of the reply's text pieces; it holds the lock until it finishes or is closed."""
        if name not in self.model_ids:
            if profile_path(name).is_dir():
                raise RequestError(f"profile {name!r} is enrolled but not served by this server; available: "
                                   f"{', '.join(self.model_ids)}. Restart serve with --profiles including it.", 404)
            raise RequestError(f"model {name!r} not found; available: {', '.join(self.model_ids)}.", 404)
        return self._generate(name, self.prompt_messages(name, messages), max_tokens, temperature, seed)

    def _generate(self, name: str, prompt: list[dict], max_tokens: int, temperature: float, seed: int | None):
        with self.lock:
            if name != self.active:
                self._activate(name)
            if seed is not None:
                self.llm.set_seed(seed)
            stream = self.llm.create_chat_completion(messages=prompt, max_tokens=max_tokens,
                                                     temperature=temperature, stream=True)
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece


# ---------------------------------------------------------------------------------------------
# HTTP

def parse_request(body: bytes) -> dict:
    """Validate a chat completion request body; return model, messages, max_tokens, temperature, stream, seed."""
    try:
        data = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise RequestError(f"invalid JSON body ({exc.msg}); send a chat completion request object.") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object.")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise RequestError("'messages' must be a non-empty list of {role, content} objects with string values.")
    if not isinstance(data.get("model"), str):
        raise RequestError(f"'model' is missing; pass a profile name or {BASE_MODEL_ID!r}.")
    max_tokens = data.get("max_tokens", data.get("max_completion_tokens", 256))
    temperature = data.get("temperature", 0.0)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 8192:
        raise RequestError("'max_tokens' must be an integer from 1 to 8192.")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 5:
        raise RequestError("'temperature' must be a number from 0 to 5.")
    seed = data.get("seed")
    return {"model": data["model"], "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_tokens": max_tokens, "temperature": float(temperature), "stream": bool(data.get("stream", False)),
            "seed": seed if isinstance(seed, int) else None}


def make_handler(server: ProfileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # http.server writes to stderr; route it through logging
            logger.debug("%s %s", self.address_string(), format % args)

        def _json(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            logger.info("%s %s -> %d: %s", self.command, self.path, status, message)
            self._json(status, {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "mta-local"} for name in server.model_ids]})
            else:
                self._error(404, f"no route {self.path}; use /v1/models or /v1/chat/completions.")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}; use POST /v1/chat/completions.")
                return
            request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise RequestError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES} bytes.", 413)
                request = parse_request(self.rfile.read(length))
                pieces = server.complete(request["model"], request["messages"], request["max_tokens"],
                                         request["temperature"], request["seed"])
                logger.info("%s start: model %s, %d messages, stream %s", request_id, request["model"],
                            len(request["messages"]), request["stream"])
                started = time.perf_counter()
                if request["stream"]:
                    self._stream(request_id, request["model"], pieces)
                else:
                    text = "".join(pieces)
                    usage = (server.count_tokens(server.prompt_text(request["model"], request["messages"])),
                             server.count_tokens(text))
                    self._json(200, completion_object(request_id, request["model"], text, usage))
                logger.info("%s stop: %.2f s", request_id, time.perf_counter() - started)
            except RequestError as exc:
                self._error(exc.status, f"{exc}")
            except (BrokenPipeError, ConnectionResetError):
                logger.warning("%s: client disconnected", request_id)
            except Exception as exc:  # noqa: BLE001 - one failed request must not stop the server
                logger.exception("%s failed: %s", request_id, exc)
                self._error(500, f"generation failed: {exc}")

        def _stream(self, request_id: str, model: str, pieces) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for piece in pieces:
                    self._event(chunk_object(request_id, model, {"content": piece}, None))
                self._event(chunk_object(request_id, model, {}, "stop"))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            finally:
                pieces.close()  # releases the model lock if the client went away mid-stream

        def _event(self, payload: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n")
            self.wfile.flush()

    return Handler


def completion_object(request_id: str, model: str, text: str, usage: tuple[int, int]) -> dict:
    """Build a chat.completion response; ``usage`` is (prompt tokens, completion tokens)."""
    prompt_tokens, completion_tokens = usage
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk_object(request_id: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def make_http_server(server: ProfileServer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """Bind the HTTP server (port 0 picks a free one); call serve_forever() to run it."""
    httpd = ThreadingHTTPServer((host, port), make_handler(server))
    httpd.daemon_threads = True
    return httpd
