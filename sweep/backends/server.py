"""`server` backend: a serving engine driven through its OpenAI-compatible HTTP API.

vLLM, SGLang, TGI, TensorRT-LLM (`trtllm-serve`), llama.cpp's server and `transformers
serve` all speak `/v1/completions`. The worker either starts the engine itself, on its
own GPUs (`server.command`, with a free port), or attaches to one already running
(`server.url`). Each request is the prompt rendered by sweep's own template (the same
text the other backends generate from, so rows compare), streamed back: the first
streamed text is the first token (`ttft_s`), the server's `usage` gives the response's
tokens (else, and where sweep had to cut a stop string the engine left in the text, the
model's tokenizer counts them; `tokens_from` says which), and `finish_reason` the stop
reason ("stop": a stop token or string, "length"). Settings the server refuses are found at load, by a
probe request with every setting, and named in the error; none is dropped.

A started server's output goes to a log file (its last lines are in every error it
causes); it is stopped with its process group when the backend closes, and killed by
the kernel if its worker dies (PR_SET_PDEATHSIG), so no engine outlives its worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sweep.backends.base import Backend, BackendError, Effective, Generation
from sweep.backends.server_command import fill
from sweep.checkpoints import ensure_random_checkpoint, is_random
from sweep.templates import resolve

LOG_TAIL_LINES = 20
PROBE_TOKENS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: its own process group (stopped as one), and SIGKILL when
    the process that started it dies."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the group is still stopped on close
        pass


class EngineProcess:
    """A serving engine the worker started: its process group and its log."""

    def __init__(self, words: list[str], log_path: Path) -> None:
        self.words, self.log_path = words, log_path
        self._log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(words, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        except OSError as exc:
            self._log.close()
            raise BackendError(f"server.command {' '.join(words)!r} did not start: {exc.strerror or exc}") from None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_bytes().decode("utf-8", "replace").rstrip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.alive():
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()


class ServerBackend(Backend):
    name = "server"

    def __init__(self, spec, settings, device: str) -> None:
        import httpx
        from transformers import AutoTokenizer, GenerationConfig

        self.spec, self.settings = spec, settings
        server = spec.server
        source = str(ensure_random_checkpoint(spec.path)) if is_random(spec.path) else spec.path
        kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        try:
            generation_config = GenerationConfig.from_pretrained(source, **kwargs)
        except (OSError, ValueError):
            generation_config = None
        self.template = resolve(spec.path, spec.conv_template, self.tokenizer, generation_config)
        _check_positions(source, kwargs, settings, spec.path)
        self.params_b = spec.params_b or _count_params_b(source)
        self.dtype_name = spec.dtype
        self.effective = Effective(cache_implementation="engine's own", compiled=False)
        self.client = httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0))
        self.process = None
        if server.url:
            self.base = server.url.rstrip("/").removesuffix("/v1")
            self.engine_command = f"attached to {server.url} (its GPUs must be this worker's)"
        else:
            port = free_port()
            words = fill(server.command, path=source, port=port, dtype=spec.dtype,
                         context_length=settings.context_length, max_new_tokens=settings.max_new_tokens,
                         gpus=spec.gpus, concurrency=max(spec.concurrency or settings.concurrency))
            log = Path(tempfile.mkdtemp(prefix="sweep-server-")) / "server.log"
            self.process = EngineProcess(words, log)
            self.base = f"http://127.0.0.1:{port}"
            self.engine_command = " ".join(words)
        try:
            self.model_id = self._wait_ready(server.ready_timeout_s)
            self.engine = self._engine_name(server)
            self._body_extra = self._probe()
        except BaseException:
            self.close()
            raise
        self.tokens_from = None  # set by the first response: "server usage" or "tokenizer"

    # -- set-up ---------------------------------------------------------------------------
    def _fail(self, what: str) -> BackendError:
        tail = self.process.tail() if self.process is not None else ""
        return BackendError(what + (f"; the server's log ends:\n{tail}" if tail else ""))

    def _wait_ready(self, timeout_s: float) -> str:
        """The served model's id, once the server answers; BackendError if it dies or never does."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and not self.process.alive():
                raise self._fail(f"the server exited with status {self.process.proc.returncode} before it was ready "
                                 f"({self.engine_command})")
            try:
                r = self.client.get(f"{self.base}/v1/models", timeout=5.0)
                if r.status_code == 200:
                    models = r.json().get("data") or []
                    if models:
                        return str(models[0]["id"])
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise self._fail(f"the server was not ready after {timeout_s:g} s (server.ready_timeout_s) at "
                                 f"{self.base}")
            time.sleep(0.5)

    def _engine_name(self, server) -> str:
        """What serves the model: the server's /version where it has one, else server.engine,
        else the command's program."""
        try:
            r = self.client.get(f"{self.base}/version", timeout=5.0)
            if r.status_code == 200 and isinstance(r.json(), dict) and r.json().get("version"):
                return f"{server.engine or self.engine_command.split()[0]} {r.json()['version']}"
        except Exception:  # no such endpoint
            pass
        if server.engine:
            return server.engine
        program = Path(self.engine_command.split()[0]).name if self.process is not None else "attached server"
        if program == "transformers":
            import transformers

            return f"transformers serve {transformers.__version__}"
        return program

    def _probe(self) -> dict:
        """A short request with every setting; a setting the server refuses is named. Returns
        the extra fields every request carries (repetition_penalty where it is not 1)."""
        s = self.settings
        extra = {} if s.repetition_penalty == 1.0 else {"repetition_penalty": s.repetition_penalty}
        body = self._body("Hello", seed=0, extra=extra) | {"max_tokens": PROBE_TOKENS, "stream": False}
        body.pop("stream_options")
        r = self.client.post(f"{self.base}/v1/completions", json=body)
        if r.status_code >= 400:
            raise self._fail(f"the server refused the sweep's settings (HTTP {r.status_code}: {r.text[:300]}); "
                             f"sent: {', '.join(sorted(body))}")
        return extra

    # -- requests -------------------------------------------------------------------------
    def _body(self, prompt: str, seed: int, extra: dict | None = None) -> dict:
        s = self.settings
        body = {"model": self.model_id, "prompt": prompt, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
        if self.template.stop_strings:
            body["stop"] = list(self.template.stop_strings)
        return body | (self._body_extra if extra is None else extra)

    def _prompt(self, system_prompt: str, user_text: str) -> tuple[str, int, bool]:
        """The rendered prompt (its last tokens where it is too long), its tokens, and whether it was cut."""
        s = self.settings
        text = self.template.render(system_prompt, user_text)
        ids = self.tokenizer(text, add_special_tokens=self.template.add_special_tokens).input_ids
        budget = s.context_length - s.max_new_tokens
        if len(ids) <= budget:
            return text, len(ids), False
        return self.tokenizer.decode(ids[-budget:]), budget, True

    def generate(self, system_prompt: str, user_text: str, seed: int, token_times: list | None = None) -> Generation:
        """One streamed completion. `token_times`: a list the arrival time (monotonic) of each
        streamed piece of text is appended to, as it arrives (requests in flight at once
        share the counter's increments by them, sweep/concurrent.py)."""
        import httpx

        prompt, prompt_tokens, truncated = self._prompt(system_prompt, user_text)
        body = self._body(prompt, seed)
        text, first, finish, usage = [], None, None, None
        started_s, t0 = time.monotonic(), time.perf_counter()
        try:
            with self.client.stream("POST", f"{self.base}/v1/completions", json=body) as r:
                if r.status_code >= 400:
                    raise self._fail(f"the server answered HTTP {r.status_code}: {r.read()[:300]!r}")
                for line in r.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        if choice.get("text"):
                            if token_times is not None:
                                token_times.append(time.monotonic())
                            if first is None:
                                first = time.perf_counter() - t0
                            text.append(choice["text"])
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            alive = self.process is None or self.process.alive()
            raise self._fail(f"the request to the server failed ({type(exc).__name__}: {exc})"
                             + ("" if alive else f"; the server exited with status {self.process.proc.returncode}"))
        latency_s = time.perf_counter() - t0
        response = "".join(text)
        hits = [response.find(x) for x in self.template.stop_strings if x in response]
        if hits:  # an engine that leaves the stop string in the text (the API says it should not)
            response, usage, finish = response[:min(hits)], None, "stop"
        if usage and usage.get("completion_tokens") is not None:
            n, self.tokens_from = int(usage["completion_tokens"]), "server usage"
        else:
            n, self.tokens_from = len(self.tokenizer(response, add_special_tokens=False).input_ids), "tokenizer"
        reason = {"length": "length", "stop": "stop"}.get(finish, finish or "unknown")
        return Generation(prompt_tokens=prompt_tokens, prompt_truncated=truncated, response_tokens=n,
                          response=response, latency_s=latency_s, ttft_s=first, stop_reason=reason,
                          steps_past_stop=0, started_s=started_s)

    def log_text(self) -> str:
        """The started server's whole log ('' when attached)."""
        if self.process is None:
            return ""
        try:
            return self.process.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.client.close()


def _count_params_b(source: str) -> float | None:
    """Parameters (billions) from the checkpoint's safetensors headers, where it is a local
    folder; None where it cannot be told without loading the weights."""
    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total / 1e9


def _check_positions(source: str, kwargs: dict, settings, path: str) -> None:
    """The same refusal as the in-process backends': a context the model has no positions for."""
    from transformers import AutoConfig

    from sweep.backends.base import max_positions

    try:
        positions = max_positions(AutoConfig.from_pretrained(source, **kwargs))
    except (OSError, ValueError):  # no config to read (a GGUF, say): the server decides
        return
    if positions is not None and settings.context_length > positions:
        raise BackendError(f"generation.context_length {settings.context_length} (prompt + max_new_tokens) exceeds the "
                           f"{positions} positions of {path}; lower context_length or max_new_tokens in tasks.yaml")
