"""OpenAI request bodies (pydantic), with a limit on every field.

Unknown fields are ignored, as vLLM does, so clients that send newer OpenAI
parameters keep working; known fields are type-checked and range-checked.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

MAX_N = 16
MAX_STOP = 4
MAX_STOP_LEN = 200
MAX_MESSAGES = 1024
MAX_TOP_LOGPROBS = 20

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]
TokenId = Annotated[int, Field(ge=0)]
# Backends hold top_k in an int32 tensor; a larger value failed the whole step (500).
MAX_TOP_K = 2**31 - 1
# float32 overflow: logits / penalty is inf (NaN probabilities, a failed step) for tiny penalties.
MIN_REPETITION_PENALTY = 0.01


def _encodable(value: str) -> str:
    """Reject lone surrogates ("\\ud800" in JSON): the tokenizer raised TypeError on them (500)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=10.0)] = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: Annotated[str, Field(max_length=256)] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One chat message. As OpenAI: every message needs ``content`` (a string or text parts),
    except an assistant message that carries ``tool_calls`` (a turn made only of calls)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: Annotated[list[dict], Field(max_length=128)] | None = None
    # Declared after role and tool_calls: its validator reads them.
    content: Annotated[Text | list[TextPart] | None, Field(validate_default=True)] = None

    @field_validator("content")
    @classmethod
    def _content_present(cls, value, info: ValidationInfo):
        role = info.data.get("role")
        if value is None and not (role == "assistant" and info.data.get("tool_calls")):
            hint = "; an assistant message may omit it only with 'tool_calls'"
            raise ValueError(
                f"content is required for role {role!r} (a string or a list of text parts)"
                + (hint if role == "assistant" else "")
            )
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        if value:
            raise ValueError("tool calling is not supported by this server")
        return value

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_N)
        ]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_N),
        ]
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = 16

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list (OpenAI accepts one prompt or a batch)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def output_limit(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs
