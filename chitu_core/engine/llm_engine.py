"""The inference engine: backend + model + tokenizer + paged cache + scheduler + sampler.

``LLMEngine.step()`` runs one continuous-batching step and reports, per
sequence that produced a token, the token and the text it made final.
``generate()`` drives steps until the given prompts are done (``chitu generate``
and the tests); the server drives ``step()`` from its own loop.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chitu_core.backend import load_backend
from chitu_core.detokenizer import IncrementalDetokenizer
from chitu_core.engine.kv_cache import BlockManager
from chitu_core.engine.runner import ModelRunner, choose_num_blocks
from chitu_core.engine.sampling import Sampler, SamplingParams, TokenLogprobs, make_generator
from chitu_core.engine.scheduler import Scheduler, SchedulerConfig
from chitu_core.engine.sequence import Sequence
from chitu_core.engine.stop import StopChecker
from chitu_core.loader import load_model
from chitu_core.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class StepError(RuntimeError):
    """A step failed (e.g. a backend exception); ``seq_ids`` were aborted, others are intact."""

    def __init__(self, seq_ids: list[int], cause: BaseException) -> None:
        super().__init__(
            f"engine step failed for sequences {seq_ids}: {type(cause).__name__}: {cause}"
        )
        self.seq_ids = seq_ids
        self.cause = cause


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an engine; the CLI maps its options onto this."""

    model: str | Path
    backend: str = "auto"
    dtype: str | None = None  # default: the backend's compute dtype
    quantize: str | None = None  # "fp8": bf16 linear weights -> FP8 block-128 at load
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float | None = None
    memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = (
        None  # default: the model's max_position_embeddings, capped by the cache
    )
    show_progress: bool = True
    # Native ops replaced by the generic torch ones (failed conformance, debugging).
    demote_ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")


@dataclass
class _Request:
    """Per-sequence engine state kept in ``Sequence.request``."""

    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    generator: torch.Generator | None
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one sequence."""

    seq_id: int
    token_id: int
    text: str  # newly final text (may be empty while a stop string or UTF-8 char is pending)
    logprobs: TokenLogprobs | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class Completion:
    """A finished request of ``generate()``."""

    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    logprobs: list[TokenLogprobs]


class LLMEngine:
    """Owns the model on one backend and runs continuous batching over it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.ops = load_backend(config.backend, config.demote_ops)
        self.dtype = getattr(torch, config.dtype or self.ops.info.compute_dtype)
        self.device = self.ops.device(0)
        self.model, self.model_config = load_model(
            config.model, self.ops, self.dtype, config.quantize, config.show_progress
        )
        self.tokenizer = Tokenizer.from_dir(config.model)
        layout = self.model.kv_cache_layout()
        num_blocks = choose_num_blocks(
            self.ops,
            self.device,
            layout,
            self.dtype,
            config.block_size,
            config.num_blocks,
            config.kv_cache_gb,
            config.memory_utilization,
            # +1: block 0 is the scratch block
            max_useful_blocks=config.max_num_seqs * -(-self._model_max_len() // config.block_size)
            + 1,
        )
        self.block_manager = BlockManager(num_blocks, config.block_size)
        capacity = self.block_manager.num_usable_blocks * config.block_size
        model_max = self.model_config.get("max_position_embeddings", capacity)
        self.max_model_len = min(config.max_model_len or model_max, model_max, capacity)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
                max_model_len=self.max_model_len,
            ),
            self.block_manager,
        )
        self.runner = ModelRunner(
            self.model, self.ops, self.device, self.dtype, num_blocks, config.block_size
        )
        self.sampler = Sampler(self.ops, self.device)
        self._seq_ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        logger.info(
            "engine ready: backend %s on %s, %s, %d KV blocks of %d tokens, max_model_len %d",
            self.ops.info.name,
            self.device,
            self.dtype,
            num_blocks,
            config.block_size,
            self.max_model_len,
        )

    def _model_max_len(self) -> int:
        model_max = self.model_config.get("max_position_embeddings", 4096)
        return min(self.config.max_model_len or model_max, model_max)

    # -- requests ----------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Queue a prompt; returns its sequence id. ValueError if it cannot fit the context."""
        self.check_prompt(prompt_token_ids)
        seq_id = next(self._seq_ids)
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        request = _Request(
            params,
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids),
            StopChecker(params, self.tokenizer.eos_token_ids),
            generator,
        )
        seq = Sequence(seq_id, prompt_token_ids, params.max_tokens, request)
        self.scheduler.add(seq)
        self._seqs[seq_id] = seq
        return seq_id

    def check_prompt(self, prompt_token_ids: list[int], max_tokens: int | None = None) -> None:
        """Raise ValueError (with a message for the user) if the prompt cannot be served.

        Reads only configuration, so any thread may call it.
        """
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this engine's context is "
                f"{self.max_model_len} tokens (prompt plus at least one generated token)"
            )
        if max_tokens is not None and len(prompt_token_ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context of {self.max_model_len} tokens"
            )
        vocab = self.model_config["vocab_size"]
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def abort(self, seq_id: int) -> bool:
        """Stop a request and free its KV blocks; False if it was unknown or already done."""
        self._seqs.pop(seq_id, None)
        return self.scheduler.abort(seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduling + forward + sampling step."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        try:
            logits = self.runner.execute(batch.seqs, batch.num_new_tokens)
            self.scheduler.after_step(batch)
            ready = [i for i, is_ready in enumerate(batch.sample_mask) if is_ready]
            if not ready:
                return []
            seqs = [batch.seqs[i] for i in ready]
            requests: list[_Request] = [seq.request for seq in seqs]
            result = self.sampler(
                logits[ready],
                [r.params for r in requests],
                [r.generator for r in requests],
                [seq.output_token_ids for seq in seqs],
                [seq.prompt_token_ids for seq in seqs],
            )
        except Exception as exc:
            # A backend fault fails the sequences of this step only; the engine goes on.
            failed = [seq.seq_id for seq in batch.seqs]
            for seq_id in failed:
                self.abort(seq_id)
            raise StepError(failed, exc) from exc
        outputs = []
        for seq, request, token_id, logprobs in zip(
            seqs, requests, result.token_ids, result.logprobs, strict=True
        ):
            seq.append_token(token_id)
            stop = request.stop.check(token_id, request.detokenizer.add(token_id))
            text, finished, reason = stop.text_to_emit, stop.finished, stop.reason
            if not finished and seq.num_tokens >= self.max_model_len:
                text += request.stop.flush() + request.detokenizer.flush()
                finished, reason = True, "length"
            elif finished and reason == "length":
                text += request.detokenizer.flush()
            request.text.append(text)
            if logprobs is not None:
                request.logprobs.append(logprobs)
            if finished:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.seq_id, None)
            outputs.append(
                StepOutput(
                    seq.seq_id,
                    token_id,
                    text,
                    logprobs,
                    finished,
                    reason,
                    seq.num_prompt_tokens,
                    seq.num_output_tokens,
                )
            )
        return outputs

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Run ``prompts`` (text or token ids) to completion, batched; results in input order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for prompt, p in zip(prompts, all_params, strict=True):
            tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            ids.append(self.add_request(tokens, p))
        seqs = {i: self._seqs[i] for i in ids}
        while any(not seqs[i].is_finished for i in ids):
            self.step()
        return [
            Completion(
                text="".join(seqs[i].request.text),
                token_ids=list(seqs[i].output_token_ids),
                finish_reason=seqs[i].finish_reason,
                num_prompt_tokens=seqs[i].num_prompt_tokens,
                logprobs=seqs[i].request.logprobs,
            )
            for i in ids
        ]
