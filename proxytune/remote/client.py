"""An OpenAI-compatible completions server (vLLM, SGLang, TGI) as a source of a base's log-probabilities.

:class:`CompletionsClient` speaks ``/v1/models``, ``/v1/completions`` (token-id prompts, ``logprobs``, vLLM's
``return_tokens_as_token_ids`` and ``prompt_logprobs``) and vLLM's ``/tokenize`` over one ``httpx.Client``
(a keep-alive connection pool). Rows of a batch are concurrent requests (:meth:`CompletionsClient.complete_many`):
a thread pool over the shared client, because the engine that calls it is synchronous (no event loop to own
or to clash with a notebook's or lm-eval's), ``httpx.Client`` is thread-safe, and the threads wait on sockets
with the GIL released; the server batches the concurrent requests itself.

Faults: 429, 500, 502, 503, 504, dropped or refused connections, timeouts and unreadable bodies are retried
``max_retries`` times with exponential backoff (``backoff * 2**attempt`` seconds, at most 8, or the server's
``Retry-After`` up to 30); a retry sends the same whole request again and only a whole response is ever used,
so no token is duplicated or lost (a seeded request asked twice gives the same tokens: vLLM seeds each request's
generator from its ``seed``). Every failure is one :class:`RemoteError` naming the URL and what failed; a
4xx carries the server's own message (for example vLLM's ``logprobs`` cap). The API key (argument, else
``PROXYTUNE_API_KEY``, else ``OPENAI_API_KEY``) is sent as a bearer token and never appears in a repr or a
message.

Needs ``httpx`` (the ``remote`` extra: ``pip install proxytune[remote]``), imported when a client is made.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

__all__ = ["RemoteError", "RemoteUnreachable", "Completion", "Scored", "CompletionsClient", "check_url",
           "parse_token_key", "check_same_tokenizer", "PROBE_TEXTS"]

RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_BACKOFF_S, MAX_RETRY_AFTER_S = 8.0, 30.0
VLLM_LOGPROB_FLOOR = -9999.0  # vLLM writes -inf log-probs as -9999.0 (JSON has no infinity): read back as -inf
LOGPROB_ROUNDING = 1e-3  # a returned log-prob above 0 by at most this is rounding (clamped to 0); above it, an error
MISSING_STATUSES = (404, 405, 422)  # an endpoint this server does not have (422: TGI's /tokenize takes another body)
_TOKEN_ID_PREFIX = "token_id:"


def check_url(url: Any, name: str = "url") -> str:
    """The rule for a server's address: a text ``http://HOST[:PORT][/PATH]`` or ``https://...``; ``ValueError``
    naming ``name`` otherwise."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number or out of range, a broken [IPv6] address
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an http:// or https:// address with a host (http://HOST:PORT), got {url!r}")
    return url


def _api_key(given: Optional[str]) -> Optional[str]:
    """The key: ``given``, else ``PROXYTUNE_API_KEY``, else ``OPENAI_API_KEY`` (surrounding whitespace, such as
    a file's newline, dropped); None when none is set. A key with other characters than printable ASCII is a
    ``ValueError`` naming its source, never showing the key."""
    for source, key in (("api_key", given), ("PROXYTUNE_API_KEY", os.environ.get("PROXYTUNE_API_KEY")),
                        ("OPENAI_API_KEY", os.environ.get("OPENAI_API_KEY"))):  # fmt: skip
        if key is None or (isinstance(key, str) and not key.strip()):
            continue
        if not isinstance(key, str):
            raise ValueError(f"{source} must be a string, got {type(key).__name__}")
        key = key.strip()
        if not all(33 <= ord(c) <= 126 for c in key):
            raise ValueError(f"{source}: an API key must be printable ASCII without spaces (the key given has "
                             f"other characters; it is not shown)")  # fmt: skip
        return key
    return None


class RemoteError(RuntimeError):
    """A served model failed or refused a request. ``url`` the endpoint, ``status`` the HTTP status (None
    when no response came), ``server_message`` the server's own words (None when it said nothing)."""

    def __init__(self, message: str, *, url: str, status: Optional[int] = None, server_message: Optional[str] = None):
        super().__init__(message)
        self.url, self.status, self.server_message = url, status, server_message


class RemoteUnreachable(RemoteError, ConnectionError):
    """No response at all: the server refused or dropped every connection, or timed out, through every retry."""


def parse_token_key(key: Any, url: str = "", plain_ok: bool = False) -> int:
    """A top-k key as a token id: ``"token_id:N"`` (vLLM's ``return_tokens_as_token_ids``), or, with
    ``plain_ok`` (``prompt_logprobs`` keys, which are ids), an int or a decimal string. Anything else is a token
    *string* (a completion's ``"7"`` may be the text "7"), which cannot be mapped to an id safely (byte-level
    strings collide): a :class:`RemoteError`."""
    if plain_ok and isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str):
        s = key[len(_TOKEN_ID_PREFIX):] if key.startswith(_TOKEN_ID_PREFIX) else key if plain_ok else ""
        if s.isascii() and s.isdigit():
            return int(s)
    raise RemoteError(
        f"{url} returned the token {key!r} as a string, not an id: token strings collide for byte-level tokens, "
        "so proxytune needs ids (vLLM: return_tokens_as_token_ids; this server does not seem to support it)",
        url=url,
    )


def _logprob(x: Any) -> float:
    """A returned log-prob: a number <= 0 (up to rounding, clamped), or vLLM's -9999 for -inf; ``ValueError``
    for NaN, +inf or a clearly positive value (the caller names the server)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"a log-prob must be a number, got {x!r}")
    v = float(x)
    if math.isnan(v) or v > LOGPROB_ROUNDING:
        raise ValueError(f"a log-prob must be <= 0, got {x!r}")
    return -math.inf if v <= VLLM_LOGPROB_FLOOR else min(v, 0.0)


def _top_set(entries: Any, url: str, plain_ok: bool = False) -> dict[int, float]:
    """One position's ``{token_id: logprob}`` from a server's mapping (``prompt_logprobs`` values may be
    ``{"logprob": ...}`` records); two keys for one id are an error."""
    top: dict[int, float] = {}
    for key, v in entries.items():
        tid = parse_token_key(key, url, plain_ok)
        if tid in top:
            raise ValueError(f"the token id {tid} is listed twice at one position")
        top[tid] = _logprob(v["logprob"] if isinstance(v, dict) else v)
    return top


def _unexpected(url: str, data: Any, e: Exception) -> "RemoteError":
    """A 2xx answer of the wrong shape: the server's own error text where the body carries one."""
    said = _error_text(data)
    if said is not None:
        return RemoteError(f"{url}: the server answered with an error: {said}", url=url, server_message=said)
    return RemoteError(f"{url}: unexpected answer ({type(e).__name__}: {e})", url=url)


@dataclass
class Completion:
    """One completion: per generated token its id, its own log-prob and the top-k set ``K`` of its position
    as ``{token_id: logprob}`` (the sampled token removed where the server listed it beyond the top k; the
    whole vocabulary for ``logprobs=-1``; empty dicts when no top-k was asked). ``finish_reason``: the server's
    (``"length"``, ``"stop"``, ...)."""

    tokens: list[int]
    logprobs: list[float]
    top: list[dict[int, float]]
    finish_reason: Optional[str] = None


@dataclass
class Scored:
    """Given tokens scored after a prompt: per given token its log-prob and its position's top-k set ``K``
    (the given token removed where the server listed it beyond the top k)."""

    logprobs: list[float]
    top: list[dict[int, float]] = field(default_factory=list)


def _strip_extra(top: dict[int, float], extra: int, k: int) -> dict[int, float]:
    """``K``: the top-k dict without the sampled / given token ``extra`` when the server listed ``k + 1``."""
    if k > 0 and len(top) > k and extra in top:
        top = dict(top)
        del top[extra]
    return top


class CompletionsClient:
    """A client of one OpenAI-compatible completions server.

    Parameters
    ----------
    url : ``http(s)://host:port`` (a trailing ``/v1`` is accepted and dropped)
    model : the served model's name; None: the one the server serves (:meth:`check_model`)
    api_key : sent as ``Authorization: Bearer``; None: ``PROXYTUNE_API_KEY``, else ``OPENAI_API_KEY``, else none
    timeout : seconds per request (connecting: at most 10)
    max_retries : retries of a failed request (429/5xx/connection/timeout), so at most ``max_retries + 1`` tries
    backoff : the first retry's wait in seconds, doubling per retry (at most 8 s)
    max_concurrency : the most requests in flight at once (:meth:`complete_many`) and pooled connections
    """

    def __init__(self, url: str, model: Optional[str] = None, api_key: Optional[str] = None, *, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, max_concurrency: int = 16,
                 transport: Any = None, sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        try:
            import httpx
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("a served base needs httpx: pip install 'proxytune[remote]'") from e
        base = check_url(url).rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        checks = (("timeout", timeout, timeout > 0), ("max_retries", max_retries, max_retries >= 0),
                  ("backoff", backoff, backoff >= 0), ("max_concurrency", max_concurrency, max_concurrency >= 1))
        for name, value, ok in checks:
            if isinstance(value, bool) or not ok:
                raise ValueError(f"{name} out of range: {value!r}")
        self.url, self.model = base, model
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.max_concurrency = int(max_concurrency)
        self._key = _api_key(api_key)
        self._sleep = sleep
        self.requests = 0  # completed HTTP exchanges (for tests and measurements)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._http = httpx.Client(
            base_url=base, headers=headers, transport=transport,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            limits=httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency),
        )  # fmt: skip
        self._httpx = httpx

    def __repr__(self) -> str:
        key = "<set>" if self._key else None
        return (f"CompletionsClient(url={self.url!r}, model={self.model!r}, api_key={key}, "
                f"timeout={self.timeout}, max_retries={self.max_retries})")  # fmt: skip

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transport ------------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "<api key>") if self._key and text else text

    def _request(self, method: str, path: str, what: str, body: Optional[dict] = None, *, missing_ok: bool = False):
        """The JSON of a whole 2xx response, after at most ``max_retries`` retries; None for a 404 when
        ``missing_ok``. Raises :class:`RemoteError` (no response at all: :class:`RemoteUnreachable`)."""
        httpx = self._httpx
        endpoint = self.url + path
        last, status, server_msg, answered = "", None, None, False
        for attempt in range(self.max_retries + 1):
            wait = min(MAX_BACKOFF_S, self.backoff * 2**attempt)
            try:
                r = self._http.request(method, path, json=body)
            except httpx.TimeoutException as e:
                last, status = f"timed out after {self.timeout:g} s ({type(e).__name__})", None
            except httpx.ConnectError as e:
                last, status = f"cannot connect ({self._scrub(str(e)) or type(e).__name__})", None
            except httpx.TransportError as e:  # dropped connection, protocol error, read/write error
                last, status = f"the connection failed ({type(e).__name__}: {self._scrub(str(e))})", None
            except httpx.DecodingError as e:  # an answer came, in an encoding it says it is not in
                last, status, answered = f"the answer could not be decoded ({self._scrub(str(e))})", None, True
            except httpx.RequestError as e:  # anything else httpx raises for a request (redirect loops, ...)
                last, status, answered = f"the request failed ({type(e).__name__}: {self._scrub(str(e))})", None, True
            else:
                answered = True
                status = r.status_code
                if status in RETRY_STATUSES:
                    server_msg = self._scrub(_server_message(r))
                    last = f"HTTP {status}" + (f": the server says: {server_msg}" if server_msg else "")
                    retry_after = r.headers.get("retry-after", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        wait = min(MAX_RETRY_AFTER_S, float(retry_after))
                elif status in MISSING_STATUSES and missing_ok:
                    return None
                elif status >= 400:
                    server_msg = self._scrub(_server_message(r))
                    raise RemoteError(
                        f"{endpoint}: {what} was refused (HTTP {status})"
                        + (f"; the server says: {server_msg}" if server_msg else ""),
                        url=endpoint, status=status, server_message=server_msg,
                    )  # fmt: skip
                else:
                    try:
                        data = r.json()
                    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                        last = f"HTTP {status} with a body that is not JSON"
                    else:
                        self.requests += 1
                        return data
            if attempt < self.max_retries:
                self._sleep(wait)
        tries = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        cls = RemoteError if answered else RemoteUnreachable
        raise cls(f"{endpoint}: {what} failed after {tries}: {last}", url=endpoint, status=status,
                  server_message=server_msg)  # fmt: skip

    # -- endpoints ------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The names the server serves (``GET /v1/models``)."""
        data = self._request("GET", "/v1/models", "listing the served models")
        try:
            return [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError) as e:
            raise RemoteError(f"{self.url}/v1/models: unexpected answer ({e!r})", url=self.url + "/v1/models") from e

    def check_model(self) -> str:
        """The model name to send: ``model`` if the server serves it; with ``model=None`` the only served one.
        Otherwise a :class:`RemoteError` listing what it serves."""
        served = self.models()
        if self.model is None:
            if len(served) != 1:
                raise RemoteError(f"{self.url} serves {len(served)} models ({', '.join(served) or 'none'}): "
                                  "name one (model=...)", url=self.url + "/v1/models")  # fmt: skip
            self.model = served[0]
        elif self.model not in served:
            listed = ", ".join(served) or "nothing"
            raise RemoteError(f"{self.url} does not serve the model {self.model!r}; it serves: {listed}",
                              url=self.url + "/v1/models")  # fmt: skip
        return self.model

    def _model(self) -> str:
        return self.model if self.model is not None else self.check_model()

    def max_model_len(self) -> Optional[int]:
        """The most positions (prompt and generated tokens) the served model takes, as ``/v1/models`` lists it
        (vLLM's ``max_model_len``); None where the server does not say."""
        name = self._model()
        data = self._request("GET", "/v1/models", "listing the served models")
        for m in (data or {}).get("data") or []:
            value = m.get("max_model_len") if isinstance(m, dict) and m.get("id") == name else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> Optional[list[int]]:
        """The server's token ids for ``text`` (vLLM's ``POST /tokenize``); None where the server has no such
        endpoint (HTTP 404, 405, or 422 for this body)."""
        data = self._request("POST", "/tokenize", "tokenizing",
                             {"model": self._model(), "prompt": text, "add_special_tokens": add_special_tokens},
                             missing_ok=True)  # fmt: skip
        if data is None:
            return None
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _unexpected(self.url + "/tokenize", data, ValueError("no list of token ids under 'tokens'"))
        return tokens

    def _body(self, prompt_ids: Sequence[int], max_tokens: int, logprobs: Optional[int], temperature: float,
              seed: Optional[int], extra: Optional[dict]) -> dict:  # fmt: skip
        if not prompt_ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of token ids (integers >= 0)")
        body = {"model": self._model(), "prompt": list(prompt_ids), "max_tokens": int(max_tokens),
                "temperature": float(temperature), "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                # no penalties: a server fills what a request leaves out from the model's generation_config
                # (vLLM's default), and a penalised draw is not the law its raw log-probs give
                "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "return_tokens_as_token_ids": True, "stream": False}  # fmt: skip
        # logprobs=0 when no top-k is wanted: the server then still lists each token, as an id, with its log-prob
        body["logprobs"] = 0 if logprobs is None else int(logprobs)
        if seed is not None:
            body["seed"] = int(seed)
        body.update(extra or {})
        return body

    def complete(self, prompt_ids: Sequence[int], max_tokens: int, *, logprobs: Optional[int] = 20,
                 temperature: float = 1.0, seed: Optional[int] = None,
                 extra: Optional[dict] = None) -> Completion:  # fmt: skip
        """Up to ``max_tokens`` tokens continuing the token ids ``prompt_ids``, sampled by the server at
        ``temperature`` with no top-k/top-p/min-p (so at temperature 1 the returned log-probs are the draw's
        law), with the top ``logprobs`` (``-1``: the whole vocabulary; 0 or None: none) of each position.
        ``extra``: more request fields (e.g. ``{"ignore_eos": True}``)."""
        body = self._body(prompt_ids, max_tokens, logprobs, temperature, seed, extra)
        return self._parse_completion(self._request("POST", "/v1/completions", "a completion", body), logprobs)

    def complete_many(self, requests: Sequence[dict]) -> list[Completion]:
        """:meth:`complete` for each dict of keyword arguments, concurrently (:meth:`map`); results in order."""
        return self.map(lambda r: self.complete(**r), requests)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        """``[fn(x) for x in items]``, concurrently (at most ``max_concurrency`` in flight; ``fn`` makes requests
        with this client); results in order. The first failure is raised after the others end."""
        items = list(items)
        if len(items) <= 1:
            return [fn(x) for x in items]
        self._model()
        with ThreadPoolExecutor(min(len(items), self.max_concurrency), thread_name_prefix="proxytune-remote") as pool:
            futures = [pool.submit(fn, x) for x in items]
            return [f.result() for f in futures]

    def _parse_completion(self, data: dict, k: Optional[int]) -> Completion:
        """The first choice of a completion answer; a :class:`RemoteError` naming the endpoint for any answer
        of another shape, a token not given as an id, a log-prob that is not one, or (``k`` asked) a position
        without its top-k set."""
        endpoint = self.url + "/v1/completions"
        try:
            choice = data["choices"][0]
            lp = choice.get("logprobs") or {}
            tokens = [parse_token_key(t, endpoint) for t in lp.get("tokens") or []]
            logprobs = [_logprob(x) for x in (lp.get("token_logprobs") or [])]
            tops = []
            for tok, entries in zip(tokens, lp.get("top_logprobs") or [None] * len(tokens)):
                if k and not entries:
                    raise RemoteError(f"{endpoint}: asked for the top {k} log-probs of each token, the server "
                                      "returned none (does it support logprobs?)", url=endpoint)  # fmt: skip
                tops.append(_strip_extra(_top_set(entries, endpoint), tok, k) if k else {})  # k = 0: the token only
            finish = choice.get("finish_reason")
        except RemoteError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise _unexpected(endpoint, data, e) from None
        if len(logprobs) != len(tokens) or len(tops) != len(tokens):
            raise RemoteError(f"{endpoint}: the answer has {len(tokens)} tokens but {len(logprobs)} log-probs and "
                              f"{len(tops)} top-k lists", url=endpoint)  # fmt: skip
        return Completion(tokens=tokens, logprobs=logprobs, top=tops, finish_reason=finish)

    def next_tops(self, ids: Sequence[int], count: int, *, logprobs: int = 20) -> list[dict[int, float]]:
        """The top-``logprobs`` sets (``-1``: the whole vocabulary) of the next-token distributions after each
        of the last ``count`` positions of ``ids`` (``1 <= count <= len(ids)``), in one request: the last one
        from a generated token's top-k (greedy, its draw unused), the earlier ones from vLLM's
        ``prompt_logprobs`` (the next given token removed where listed beyond the top k, as for a draw). For a
        row's logits at its last ``count`` positions: speculative verification and scoring."""
        if not 1 <= count <= len(ids):
            raise ValueError(f"count must be in [1, {len(ids)}], got {count}")
        extra = {"ignore_eos": True}
        if count > 1:
            extra["prompt_logprobs"] = int(logprobs)
        body = self._body(list(ids), 1, logprobs, 0.0, None, extra)
        data = self._request("POST", "/v1/completions", "a completion with prompt log-probs", body)
        done = self._parse_completion(data, logprobs)
        if not done.tokens:
            raise RemoteError(f"{self.url}/v1/completions: asked for one token, the server returned none",
                              url=self.url + "/v1/completions")  # fmt: skip
        last = done.top[0]
        if count == 1:
            return [last]
        given = list(ids)[len(ids) - count + 1 :]
        return [top for _, top in self._prompt_tops(data, len(ids), len(ids) - count + 1, given, int(logprobs))] + [last]

    def _prompt_tops(self, data: dict, n_ids: int, first: int, given: Sequence[int], k: int):
        """``(log-prob of the given token, top-k without it)`` at prompt positions ``first ..`` of an answer
        with ``prompt_logprobs`` over ``n_ids`` prompt tokens."""
        endpoint = self.url + "/v1/completions"
        try:
            plp = data["choices"][0].get("prompt_logprobs")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise _unexpected(endpoint, data, e) from None
        if not isinstance(plp, list) or len(plp) != n_ids:
            raise RemoteError(f"{endpoint}: the server gave no prompt_logprobs for {n_ids} prompt tokens, so it "
                              "cannot score given tokens (vLLM can)", url=endpoint)  # fmt: skip
        out = []
        for pos, tok in zip(range(first, n_ids), given):
            try:
                top = _top_set(plp[pos], endpoint, plain_ok=True)
            except RemoteError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise RemoteError(f"{endpoint}: unexpected prompt_logprobs at position {pos} "
                                  f"({type(e).__name__}: {e})", url=endpoint) from None  # fmt: skip
            if tok not in top:
                raise RemoteError(f"{endpoint}: position {pos} lacks the given token {tok}", url=endpoint)
            out.append((top[tok], _strip_extra(top, tok, k)))
        return out

    def score(self, prompt_ids: Sequence[int], given_ids: Sequence[int], *, logprobs: int = 20) -> Scored:
        """The log-prob and the top ``logprobs`` of each of ``given_ids`` after ``prompt_ids`` (vLLM's
        ``prompt_logprobs``, which skips its prefix cache); one generated token is asked for and ignored.
        A server without ``prompt_logprobs`` gives a :class:`RemoteError`."""
        if not given_ids:
            return Scored(logprobs=[], top=[])
        ids = list(prompt_ids) + list(given_ids)
        body = self._body(ids, 1, None, 0.0, None, {"prompt_logprobs": int(logprobs)})
        data = self._request("POST", "/v1/completions", "scoring given tokens", body)
        pairs = self._prompt_tops(data, len(ids), len(prompt_ids), list(given_ids), int(logprobs))
        return Scored(logprobs=[lp for lp, _ in pairs], top=[top for _, top in pairs])


PROBE_TEXTS = ("Hello, world! The quick brown fox jumps over the lazy dog.", " 12345 naïve café ∑ 日本語 🙂\n\tend")


def check_same_tokenizer(client: CompletionsClient, tokenizer, texts: Sequence[str] = PROBE_TEXTS) -> bool:
    """Refuse a server whose tokenizer gives other ids than the local one (``tokenizer``: a Hugging Face
    tokenizer). Each probe text is tokenized by both (the server's ``/tokenize``, special tokens added by each
    side's own rule); any difference is a :class:`RemoteError` naming the first text and both id lists. A server
    without ``/tokenize`` cannot be checked: one ``UserWarning``, and False. True when every probe agrees."""
    import warnings

    for text in texts:
        remote = client.tokenize(text)
        if remote is None:
            warnings.warn(f"{client.url} has no /tokenize endpoint: proxytune cannot check that the served model's "
                          "tokenizer gives the same ids as the local models' (a mismatch would mix unrelated tokens)",
                          UserWarning, stacklevel=2)  # fmt: skip
            return False
        local = list(tokenizer(text).input_ids)
        if remote != local:
            raise RemoteError(
                f"{client.url} tokenizes {text!r} as {remote[:16]}{'...' if len(remote) > 16 else ''} but the local "
                f"models' tokenizer as {local[:16]}{'...' if len(local) > 16 else ''}: the served model needs the "
                "same tokenizer (the same ids) as the expert and the anti-expert", url=client.url + "/tokenize",
            )  # fmt: skip
    return True


def _error_text(data: Any) -> Optional[str]:
    """The error text of a JSON body: OpenAI's ``{"error": {"message": ...}}`` or ``{"error": "..."}``, vLLM's
    older ``{"message": ...}``, FastAPI's ``{"detail": ...}``; None for a body without one."""
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(err, str) and err:
        return err
    for key in ("message", "detail"):
        if data.get(key):
            return str(data[key])
    return None


def _server_message(r) -> Optional[str]:
    """The error text of a response (:func:`_error_text`), else the start of its body."""
    try:
        data = r.json()
    except Exception:
        text = (r.text or "").strip()
        return text[:500] or None
    said = _error_text(data)
    return said if said is not None else json.dumps(data)[:500]
