"""An in-process fake of vLLM's OpenAI completions server, backed by a local Hugging Face model (an
``httpx.MockTransport`` handler), for the default suite's tests of the served base. The real server is
tests/test_remote_server.py (marker ``vllm``); this fake answers the subset proxytune asks, the way vLLM does:

* ``GET /v1/models``: one model (``max_model_len`` listed);
* ``POST /tokenize``: the tokenizer's ids (404 when built without a tokenizer);
* ``POST /v1/completions``: token-id prompts; ``max_tokens`` tokens drawn at ``temperature`` 0 (argmax) or 1
  (from the model's softmax, by a generator seeded with the request's ``seed``); ``logprobs=k`` (``-1``: the
  whole vocabulary): per token its ``token_id:N`` key, its log-prob and the top-k (``k + 1`` entries where the
  drawn token is outside them), raw log-probs (``log_softmax`` of the logits at temperature 1);
  ``prompt_logprobs=k``; ``ignore_eos`` is implied (the fake never stops early); a ``logprobs`` above
  ``max_logprobs`` is vLLM's 400.
"""

from __future__ import annotations

import json
import threading

import httpx
import torch


class FakeCompletions:
    """``FakeCompletions(model, tokenizer=None, name="base", max_logprobs=20, max_model_len=512)``: the handler;
    ``transport()`` an ``httpx.MockTransport``; ``log`` the completion bodies received."""

    def __init__(self, model, tokenizer=None, name: str = "base", max_logprobs: int = 20, max_model_len: int = 512):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.log: list[dict] = []
        self._lock = threading.Lock()  # one forward at a time (requests arrive from the client's threads)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        with self._lock, torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)  # [len(ids), V]

    @staticmethod
    def _top(row: torch.Tensor, k: int, extra: int) -> dict:
        ids = range(row.shape[0]) if k < 0 else row.topk(k).indices.tolist()
        top = {f"token_id:{i}": float(row[i]) for i in ids}
        top.setdefault(f"token_id:{extra}", float(row[extra]))
        return top

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": self.name, "object": "model", "max_model_len": self.max_model_len}]})  # fmt: skip
        body = json.loads(request.content or b"{}")
        if path == "/tokenize":
            if self.tokenizer is None:
                return httpx.Response(404, json={"detail": "Not Found"})
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)).input_ids
            return httpx.Response(200, json={"tokens": list(ids), "count": len(ids)})
        if path != "/v1/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        if body.get("model") != self.name:
            return httpx.Response(404, json={"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        for field in ("logprobs", "prompt_logprobs"):
            k = body.get(field)
            if k is not None and self.max_logprobs >= 0 and (k < 0 or k > self.max_logprobs):
                msg = f"Requested sample logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"
                return httpx.Response(400, json={"error": {"message": msg, "type": "BadRequestError"}})
        with self._lock:
            self.log.append(body)
        ids, k = list(body["prompt"]), body.get("logprobs")
        n = body["max_tokens"]
        if len(ids) + n > self.max_model_len:
            msg = f"This model's maximum context length is {self.max_model_len} tokens."
            return httpx.Response(400, json={"error": {"message": msg, "type": "BadRequestError"}})
        gen = torch.Generator().manual_seed(int(body["seed"])) if body.get("seed") is not None else torch.Generator()
        prompt_len, tokens, tops, lps = len(ids), [], [], []
        first = self._logprobs(ids) if body.get("prompt_logprobs") is not None else None
        for _ in range(n):
            row = self._logprobs(ids)[-1]
            if body.get("temperature", 1.0) == 0:
                t = int(row.argmax())
            else:
                t = int(torch.multinomial(row.double().exp(), 1, generator=gen))
            tokens.append(f"token_id:{t}")
            lps.append(float(row[t]))
            tops.append(self._top(row, k, t) if k else {f"token_id:{t}": float(row[t])})
            ids.append(t)
        choice = {"index": 0, "text": "", "finish_reason": "length",
                  "logprobs": {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                               "text_offset": list(range(n))}}  # fmt: skip
        if first is not None:
            pk = body["prompt_logprobs"]
            plp = [None] + [{str(i): {"logprob": v} for i, v in
                             ((int(key.split(":")[1]), v) for key, v in self._top(first[p - 1], pk, ids[p]).items())}
                            for p in range(1, prompt_len)]  # fmt: skip
            choice["prompt_logprobs"] = plp
        return httpx.Response(200, json={"id": "cmpl-fake", "object": "text_completion", "model": self.name,
                                         "choices": [choice]})  # fmt: skip


class Loopback:
    """An HTTP server on a free loopback port answering every request with ``handler(httpx.Request)``: an
    ``httpx.Response``, or None to drop the connection without an answer (fault injection). For the command
    line and lm-eval, which make their own clients, and for proxies in front of a real server. ``url``;
    :meth:`close` stops it; a context manager."""

    def __init__(self, handler):
        import http.server
        import socket

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method):
                body = self.rfile.read(int(self.headers.get("content-length") or 0)) if method == "POST" else b""
                r = handler(httpx.Request(method, f"http://loopback{self.path}", content=body,
                                          headers={"content-type": "application/json"}))  # fmt: skip
                if r is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(r.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
