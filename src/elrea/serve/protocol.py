"""The OpenAI API shapes the server accepts and returns, and its errors.

Requests are pydantic models that ignore fields they do not know (clients send many), refuse
values elrea cannot honour with a 400 naming the field (n > 1, best_of, echo, logprobs, tools,
response_format other than text, penalties, logit_bias, ...) rather than answering without
them, and numbers that are not finite
(JSON parsers accept NaN and Infinity), and carry elrea's extension
field `"elrea": {"weights": [...], "router": "gradient" | "uniform" | ..., "top_k": k,
"tau": tau}` ("temperature" is tau's old name, still accepted). Errors are OpenAI's JSON `{"error": {"message", "type", "param",
"code"}}` with a 4xx status.
"""

from __future__ import annotations

import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """A request the server refuses; becomes OpenAI's error JSON with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Extension(BaseModel):
    """`"elrea": {...}`: override the routing of this request."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weights: list[float] | None = Field(None, description="weights over [base, expert_1, ...]; sum to 1")
    router: str | None = Field(None, description="a router name (see elrea.registry.ROUTERS)")
    top_k: int | None = Field(None, ge=0, description="keep the k largest routing weights")
    tau: float | None = Field(None, gt=0, description="routing temperature")
    temperature: float | None = Field(None, gt=0, description="deprecated: tau's old name")

    def routing_tau(self) -> float | None:
        return self.tau if self.tau is not None else self.temperature


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)  # what torch's generator takes
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    elrea: Extension | None = None
    # vLLM's extension for benchmarks: decode max_tokens tokens whatever the model says
    ignore_eos: bool = False
    # accepted so that they can be refused unless they ask for nothing (unknown fields are dropped)
    best_of: int | None = None
    logprobs: bool | int | None = None     # an int for completions, a bool for chat
    top_logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None

    # field -> the values that ask for nothing elrea lacks; any other value is refused (400)
    NEUTRAL: ClassVar[dict] = {"best_of": (None, 1), "logprobs": (None, False, 0), "echo": (None, False),
               "top_logprobs": (None, 0), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "tools": (None, []),
               "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
               "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,)}

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4 or not all(isinstance(x, str) and x for x in s):
            raise OpenAIError("stop: up to 4 non-empty strings", param="stop")
        return s

    def check_supported(self) -> None:
        if self.n != 1:
            raise OpenAIError(f"n: only 1 choice per request is supported, got {self.n}", param="n")
        for name, neutral in self.NEUTRAL.items():
            if getattr(self, name) not in neutral:
                raise OpenAIError(f"{name}: not supported by elrea serve (it answers with plain text only); "
                                  f"leave {name} out of the request", param=name)


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise OpenAIError("prompt: one prompt per request (a string, or a list of one)", param="prompt")
            return self.prompt[0]
        return self.prompt


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [p.get("text") for p in self.content if p.get("type") == "text"]
        if len(parts) != len(self.content) or not all(isinstance(t, str) for t in parts):
            raise OpenAIError('messages: only text content parts ({"type": "text", "text": "..."}) are supported',
                              param="messages")
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def chat(self) -> list[dict]:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        if msgs[-1]["role"] != "user":
            raise OpenAIError("messages: the last message must be the user's", param="messages")
        return msgs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
