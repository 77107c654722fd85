"""The wire format: pydantic models of the OpenAI-style requests and responses the server speaks.

Request models ignore unknown fields (clients send many we do not use) but are strict about the ones they
declare: a wrong type, an out-of-range number or a NaN is a validation error that the app turns into a 400
naming the field. Response models exist so the OpenAPI schema describes what the server really returns.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# Largest seed accepted: torch.Generator.manual_seed takes a 64-bit value.
MAX_SEED = 2**63 - 1
# Most alternatives per token that logprobs / top_logprobs may ask for (the OpenAI API's own limit).
MAX_TOP_LOGPROBS = 20
# Stop strings one request may give, and their length (OpenAI's API takes 4; each costs work per token).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

TokenIds = list[int]
PromptInput = Union[str, list[str], TokenIds, list[TokenIds]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Parameters shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate per choice")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1 = off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} strings of up to "
                                                               f"{MAX_STOP_CHARS} characters")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="keep generating past end-of-text tokens (as vLLM's)")
    # constrained output (serve/guided.py), named as vLLM and llama.cpp name them; at most one per request
    guided_json: dict[str, Any] | str | None = Field(None, description="a JSON schema the output follows")
    guided_regex: str | None = Field(None, description="a regular expression the output matches")
    guided_grammar: str | None = Field(None, description="a Lark (or GBNF) grammar the output follows")
    grammar: str | None = Field(None, description="a GBNF grammar (llama.cpp's) the output follows")


class CompletionRequest(SamplingFields):
    prompt: PromptInput = Field(..., description="text, a list of texts, token ids, or a list of token-id lists")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token")
    echo: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="may be left out by an assistant message "
                                                                   "with tool_calls")
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls (checked in serve/tools.py)
    tool_call_id: str | None = None  # a tool result: the call it answers


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = Field(None, description='{"type": "text" | "json_object" | '
                                                                     '"json_schema", "json_schema": {...}}')
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(None, description="accepted; an answer holds at most one call")


class TokenizeRequest(_Request):
    content: str
    add_special: bool = True


class DetokenizeRequest(_Request):
    tokens: TokenIds


# -- responses --------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose K/V the server had from an earlier request


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    token_ids: list[int] = Field(description="the generated token ids (a pybitnet extension)")
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object's text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    token_ids: list[int] = Field(description="the generated token ids (a pybitnet extension)")
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pybitnet"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    content: str


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "draining", "failed"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
