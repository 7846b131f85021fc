"""The OpenAI-compatible API's wire format: request bodies (pydantic), error bodies, log-probability shapes.

Choices that clients depend on:

- Request bodies are pydantic models with `extra="forbid"`: a parameter we do
  not implement (suffix, audio, ...) is a 400 that names it, never
  silently ignored. Wrong types or out-of-range values are 400s naming the
  parameter too, as OpenAI answers them (app.py turns pydantic's errors into
  those); only a body that is not JSON at all is a 422.
- Every error body is OpenAI's `{"error": {message, type, param, code}}`; an
  `APIError` raised anywhere below a route becomes one with its status.
- Completions log-probs are the legacy shape (`tokens`, `token_logprobs`,
  `top_logprobs`, `text_offset`) with the sampled token always in
  `top_logprobs`, so lm-evaluation-harness's log-likelihood and greedy checks
  work; chat log-probs are the `content` list with bytes.

- Every number has a range (an integer at most `MAX_INT`, the 32-bit bound
  OpenAI's own schema uses, where nothing smaller is natural), so no value can
  overflow the engine's tensors; `top_k` is checked against the vocabulary
  where the vocabulary is known (serving.py). Lists a client could make huge
  (messages, logit_bias) have a length bound; the text in them is bounded by
  limits.py's limits.
- Text must be valid Unicode: a lone surrogate (JSON's `"\\ud800"`, which
  Python's JSON parser accepts) anywhere in a body is a 400 naming where it
  is (`invalid_text`), checked once over the whole body before any field is.

Extensions beyond OpenAI's parameters are marked so in their descriptions
(they show in /openapi.json).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from glassforge.serve.types import TokenLogprob


class APIError(Exception):
    """An OpenAI-shaped error answer: raised by a route or its helpers, rendered by app.py's handler."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --- request bodies ----------------------------------------------------------------------

MAX_INT = 2**31 - 1
MAX_MESSAGES = 2048
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def invalid_text_at(value: Any) -> str | None:
    """Where in a parsed JSON body a string is not valid Unicode (a lone surrogate), as a dotted path
    ("messages.0.content"); None when every string is valid. Iterative: a body may nest deeply."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return path
        elif isinstance(item, dict):
            for k, v in item.items():  # a bad key is reported at its dict: the path must be valid text itself
                stack += [(v, f"{path}.{k}" if path else str(k)), (k, path)]  # the key is looked at first
        elif isinstance(item, list):
            stack += [(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(item)]
    return None


class Body(Strict):
    """A request body: its text is checked for invalid Unicode before its fields are validated."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        where = invalid_text_at(data)
        if where is not None:
            raise PydanticCustomError("invalid_text", "'{param}' is not valid Unicode text (it holds a lone "
                                      "surrogate, such as \\ud800)", {"param": where or "body"})
        return data


class StreamOptions(Strict):
    include_usage: bool | None = False


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Prompt = Union[str, list[str], list[int], list[list[int]]]
Stop = Union[str, list[str], None]


class SamplingFields(Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT,
                              description="extension: sample from the k most likely tokens (0 or -1: all; at most "
                                          "the vocabulary)")
    min_p: float | None = Field(None, ge=0, le=1,
                                description="extension: drop tokens below min_p times the top token's probability")
    repetition_penalty: float | None = Field(None, gt=0, le=2,
                                             description="extension: CTRL's penalty on tokens already generated (a "
                                                         "positive logit divided by it, a negative one multiplied; "
                                                         "1: none)")
    n: int | None = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Stop = Field(None, description="a string or a list of strings, excluded from the output")
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = Field(False, description="extension: keep generating past end-of-text tokens")
    trace: bool | None = Field(False, description="extension: add the training-data spans found in each choice")

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (and carries `usage: null` on every other chunk)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0, le=MAX_INT)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=16)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class CalledFunction(Strict):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = None
    refusal: str | None = None


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for a function's name


class FunctionDefinition(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice, None]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None


class EmbeddingRequest(Body):
    input: Prompt
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1, le=MAX_INT)
    user: str | None = None


class TokenizeRequest(Body):
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = False
    add_generation_prompt: bool | None = True
    model: str | None = None


class DetokenizeRequest(Body):
    tokens: list[int]
    model: str | None = None


class TraceRequest(Body):
    text: str
    min_tokens: int | None = Field(8, ge=1, le=4096)
    max_docs: int | None = Field(5, ge=1, le=100)
    model: str | None = None


# --- log-probabilities as the two APIs return them ------------------------------------------

def legacy_logprobs(entries: list[TokenLogprob], base_offset: int = 0) -> dict:
    """Completions' log-probs; the sampled token is always among `top_logprobs`."""
    top = []
    for e in entries:
        if e.top is None:
            top.append(None)
            continue
        d = {tok: lp for _, tok, lp in e.top}
        d.setdefault(e.token, e.logprob)  # the sampled token is always reported
        top.append(d)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top,
            "text_offset": [base_offset + e.offset for e in entries]}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """Chat completions' log-probs: one item per token with its UTF-8 bytes and the top alternatives."""
    def item(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    content = []
    for e in entries:
        d = item(e.token, e.logprob)
        d["top_logprobs"] = [item(t, lp) for _, t, lp in (e.top or [])]
        content.append(d)
    return {"content": content, "refusal": None}


# --- the Responses API (stateless) -----------------------------------------------------------


class InputText(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # an earlier answer's output_text, sent back as input, carries them


class InputMessage(Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Strict):
    """An earlier answer's function call, sent back as input."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(Strict):
    """What a function call returned."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class FunctionTool(FunctionDefinition):
    """A Responses API tool: a function, described flat (chat's has it under `function`)."""

    type: Literal["function"]


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(Body):
    model: str | None = None
    input: str | list[Union[InputMessage, FunctionCallItem, FunctionCallOutput]] = Field(
        ..., description="a text, or messages (with function calls and their outputs)")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    stream: bool | None = False
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunction, None] = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="extension: reproducible sampling")
