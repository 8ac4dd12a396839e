"""The inference engine: backend + model + tokenizer + paged cache + scheduler + sampler.

``LLMEngine.step()`` runs one continuous-batching step and reports, per
sequence that produced a token, the token and the text it made final.
``generate()`` drives steps until the given prompts are done (``chitu generate``
and the tests); the server drives ``step()`` from its own loop.

Prefix caching (``EngineConfig.enable_prefix_caching``, on by default) lives in
the block manager: a request starts after the longest run of whole blocks an
earlier request computed for the same tokens. A block is registered once its K/V
is queued on the device, so any later step (queued after it on the same stream,
or after it on every pipeline stage) reads complete K/V.

With ``tp * pp > 1`` (or under torchrun) every rank builds an engine: rank 0
schedules and samples and its steps run on every rank through a
``chitu_core.distributed.pipeline.DistributedExecutor``; the other ranks call
``follow()``. Close the engine (``with LLMEngine(...)``) to release them.
With ``pp > 1`` rank 0 keeps one scheduler per stage over the shared KV pool
(requests go to the least loaded) and keeps up to ``pp`` of their batches in
the pipeline at once, so the stages overlap (see ``distributed/pipeline.py``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chitu_core.backend import OP_NAMES, load_backend
from chitu_core.backend_info import FP8_COMPUTE_MODES, BackendOptions
from chitu_core.detokenizer import IncrementalDetokenizer
from chitu_core.distributed import DistributedError
from chitu_core.distributed.parallel import ParallelState, init_parallel, launched_as_rank
from chitu_core.distributed.pipeline import DistributedExecutor
from chitu_core.engine.host_copy import to_device_async
from chitu_core.engine.kv_cache import BlockManager
from chitu_core.engine.memory_plan import (
    DEFAULT_MAX_NUM_SEQS,
    MemoryPlan,
    choose_max_num_seqs,
    choose_num_blocks,
    profile_prefill,
    tensor_bytes,
)
from chitu_core.engine.runner import ModelRunner
from chitu_core.engine.sampling import (
    PendingSample,
    Sampler,
    SamplingParams,
    TokenLogprobs,
    make_generator,
)
from chitu_core.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from chitu_core.engine.sequence import Sequence
from chitu_core.engine.stop import StopChecker
from chitu_core.loader import checkpoint_dtype, load_model
from chitu_core.tokenizer import load_tokenizer

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
    # default: the backend's compute dtype; "auto": the checkpoint's own (falling back to it)
    dtype: str | None = None
    quantize: str | None = None  # "fp8": bf16 linear weights -> FP8 block-128 at load
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float | None = None
    memory_utilization: float = 0.9
    # None: up to DEFAULT_MAX_NUM_SEQS (256), as many as the KV cache holds (memory plan)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = (
        None  # default: the model's max_position_embeddings, capped by the cache
    )
    show_progress: bool = True
    # Native ops replaced by the generic torch ones (failed conformance, debugging).
    demote_ops: tuple[str, ...] = ()
    tp: int = 1  # tensor-parallel ranks per pipeline stage
    pp: int = 1  # pipeline stages
    dist_timeout_s: float = 300.0  # a collective that waits longer fails (a rank died)
    # Decode without device graphs even where the backend supports them (debugging).
    enforce_eager: bool = False
    # Queue each decode step on the device before the previous step's tokens reach the
    # host, so the device does not wait for the host between steps (``LLMEngine.step``).
    overlap_steps: bool = True
    # How FP8 weights meet the activations (``BackendOptions.fp8_compute``): auto | soft | native.
    fp8_compute: str = "auto"
    # Reuse the K/V of cached prompt prefixes (whole blocks) across requests.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.fp8_compute not in FP8_COMPUTE_MODES:
            raise ValueError(
                f"fp8_compute (--fp8-compute) must be one of {', '.join(FP8_COMPUTE_MODES)}, "
                f"got {self.fp8_compute!r}"
            )
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s must be positive, got {self.dist_timeout_s}")
        if self.dtype not in (None, "auto", "bfloat16", "float16", "float32"):
            raise ValueError(
                f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}"
            )
        if (
            self.block_size < 1
            or (self.max_num_seqs is not None and self.max_num_seqs < 1)
            or self.max_num_batched_tokens < 1
        ):
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(
                f"memory_utilization (--gpu-memory-utilization) must be in (0, 1], got "
                f"{self.memory_utilization}"
            )


@dataclass
class _Launched:
    """A step whose forward and draw are queued on the device, its tokens not yet read.

    ``ready``: the rows of ``seqs`` that were sampled (the draw's rows, in order).
    """

    seqs: list[Sequence]
    ready: list[int]
    sample: PendingSample | None
    # Queuing the step failed: raised (as a StepError) when the step is due.
    error: Exception | None = None


@dataclass
class _Request:
    """Per-sequence engine state kept in ``Sequence.request``."""

    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    generator: torch.Generator | None
    scheduler: Scheduler
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class SchedulerGroup:
    """The per-stage schedulers of a pipeline-parallel engine, counted as one."""

    def __init__(self, schedulers: list[Scheduler]) -> None:
        self.schedulers = schedulers

    @property
    def num_running(self) -> int:
        return sum(s.num_running for s in self.schedulers)

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.schedulers)

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.schedulers)

    def least_loaded(self) -> Scheduler:
        return min(self.schedulers, key=lambda s: s.num_running + s.num_waiting)


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
        self.ops = load_backend(config.backend, config.demote_ops, self.backend_options)
        dtype = config.dtype
        if dtype == "auto":
            dtype = checkpoint_dtype(config.model)
        self.dtype = getattr(torch, dtype or self.ops.info.compute_dtype)
        # Called with the DistributedError when a distributed step fails (the server exits).
        self.on_fatal: Callable[[DistributedError], None] | None = None
        self.dist = self._init_distributed()
        self.device = self.dist.device if self.dist else self.ops.device(0)
        self.model, self.model_config = load_model(
            config.model,
            self.ops,
            self.dtype,
            config.quantize,
            config.show_progress and (self.dist is None or self.dist.is_driver),
            device=self.device,
            parallel=self.dist.model_parallel() if self.dist else None,
        )
        self.tokenizer = load_tokenizer(config.model)
        layout = self.model.kv_cache_layout()
        activation_bytes = 0
        if self.device.type != "cpu" and config.num_blocks is None and config.kv_cache_gb is None:
            activation_bytes = profile_prefill(
                self.model,
                self.ops,
                self.device,
                self.dtype,
                layout,
                config.block_size,
                min(config.max_num_batched_tokens, self._model_max_len()),
            )
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
            max_useful_blocks=(config.max_num_seqs or DEFAULT_MAX_NUM_SEQS)
            * -(-self._model_max_len() // config.block_size)
            + 1,
        )
        if self.dist:  # rank 0's block ids are used on every rank
            num_blocks = self.dist.agree_min(num_blocks)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        capacity = self.block_manager.num_usable_blocks * config.block_size
        model_max = self.model_config.get("max_position_embeddings", capacity)
        self.max_model_len = min(config.max_model_len or model_max, model_max, capacity)
        self.max_num_seqs, seqs_reason = choose_max_num_seqs(
            config.max_num_seqs, num_blocks, config.block_size, self.max_model_len
        )
        # PP: one scheduler per stage (sequence groups whose batches overlap in the pipeline).
        num_groups = config.pp if self.dist else 1
        scheduler_config = SchedulerConfig(
            max_num_seqs=-(-self.max_num_seqs // num_groups),
            max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
            max_model_len=self.max_model_len,
        )
        self.schedulers = [
            Scheduler(scheduler_config, self.block_manager) for _ in range(num_groups)
        ]
        self.scheduler: Scheduler | SchedulerGroup = (
            self.schedulers[0] if num_groups == 1 else SchedulerGroup(self.schedulers)
        )
        self._in_flight: dict[int, ScheduledBatch] = {}  # group -> its batch in the pipeline
        self._pending: _Launched | None = None  # a decode step queued ahead (overlap_steps)
        # Settable between steps (a tool whose sampler needs each step's tokens on the host).
        self.overlap_steps = config.overlap_steps
        self._next_group = 0
        self.runner = ModelRunner(
            self.model, self.ops, self.device, self.dtype, num_blocks, config.block_size
        )
        self.memory = MemoryPlan(
            tensor_bytes(self.model),
            activation_bytes,
            num_blocks * config.block_size * layout.bytes_per_token(self.dtype),
            num_blocks,
            config.block_size,
            self.max_model_len,
            self.max_num_seqs,
            seqs_reason,
        )
        logger.info("memory: %s", self.memory.describe())
        if self.ops.info.supports_graphs and not config.enforce_eager:
            try:
                self.runner.capture_decode_graphs(scheduler_config.max_num_seqs, self.max_model_len)
            except Exception as exc:  # e.g. an op that syncs with the host cannot be captured
                self.runner.graphs = None
                logger.warning(
                    "decode graphs off (capture failed: %s: %s)", type(exc).__name__, exc
                )
        self.executor: ModelRunner | DistributedExecutor = self.runner
        if self.dist:
            self.executor = DistributedExecutor(self.dist, self.runner)
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

    def _init_distributed(self) -> ParallelState | None:
        """Join the TP x PP world when there is one; rank 0's op demotions hold everywhere."""
        config = self.config
        if config.tp * config.pp == 1 and not launched_as_rank():
            return None
        state = init_parallel(self.ops, config.tp, config.pp, config.dist_timeout_s)
        demote = state.driver_choice(tuple(config.demote_ops), OP_NAMES)
        if set(demote) != set(config.demote_ops):
            self.ops = load_backend(config.backend, demote, self.backend_options)
            state.ops = self.ops
        logger.info(
            "rank %d of %d: tp rank %d/%d, pipeline stage %d/%d on %s",
            state.rank,
            state.layout.world_size,
            state.layout.tp_rank,
            config.tp,
            state.layout.pp_rank,
            config.pp,
            state.device,
        )
        return state

    @property
    def backend_options(self) -> BackendOptions:
        """The compute choices handed to the backend when it is bound."""
        return BackendOptions(fp8_compute=self.config.fp8_compute)

    @property
    def is_distributed(self) -> bool:
        return self.dist is not None

    def follow(self) -> None:
        """Ranks other than 0: run rank 0's steps until it closes its engine."""
        if self.dist is None or self.dist.is_driver:
            raise RuntimeError("follow() is for the ranks other than 0 of a distributed engine")
        self.executor.follow()

    def start_heartbeat(self) -> None:
        """Rank 0 of a server: keep idle ranks within the collective timeout, and notice a
        rank that died while idle (``on_fatal`` is called)."""
        if self.dist is not None and self.dist.is_driver:
            self.executor.start_heartbeat(self._fatal)

    def _fatal(self, error: DistributedError) -> None:
        logger.critical("%s", error)
        if self.on_fatal is not None:
            self.on_fatal(error)

    def close(self) -> None:
        """Release the other ranks (rank 0 of a distributed engine); a no-op in one process."""
        if self.dist is not None and self.dist.is_driver:
            self.executor.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _model_max_len(self) -> int:
        model_max = self.model_config.get("max_position_embeddings", 4096)
        return min(self.config.max_model_len or model_max, model_max)

    # -- requests ----------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Queue a prompt; returns its sequence id. ValueError if it cannot fit the context."""
        self.check_prompt(prompt_token_ids)
        seq_id = next(self._seq_ids)
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        scheduler = (
            self.scheduler.least_loaded()
            if isinstance(self.scheduler, SchedulerGroup)
            else self.scheduler
        )
        request = _Request(
            params,
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids),
            StopChecker(params, self.tokenizer.eos_token_ids),
            generator,
            scheduler,
        )
        seq = Sequence(seq_id, prompt_token_ids, params.max_tokens, request)
        scheduler.add(seq)
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
        seq = self._seqs.pop(seq_id, None)
        return seq is not None and seq.request.scheduler.abort(seq_id)

    def has_unfinished(self) -> bool:
        # A batch in the pipeline must come out even if all its sequences were aborted.
        return self.scheduler.has_unfinished() or bool(self._in_flight) or self._pending is not None

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduling + forward + sampling step: the outputs of one step.

        With ``overlap_steps`` a decode step whose successor is known in advance (the same
        sequences, one more token each: nothing waiting to be admitted, no preemption)
        has that successor queued on the device, fed by this step's draw on the device,
        before this step's tokens are read back. The host then detokenizes, checks stops
        and schedules while the device computes; the next call returns the queued step.
        A sequence that stops meanwhile (eos, stop string, abort) has its queued row
        dropped. With PP: one batch into the pipeline, and the outputs of the batch that
        left it, if any.
        """
        if len(self.schedulers) > 1:
            return self._pipelined_step()
        launched, self._pending = self._pending, None
        if launched is not None and launched.error is not None:
            live = [seq for seq in launched.seqs if not seq.is_finished]
            if live:  # else every sequence of the failed step had stopped before it
                self._fail(live, launched.error)
            launched = None
        if launched is None:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                return []
            logits = self._execute(batch.seqs, batch.num_new_tokens)
            launched = self._launch_sample(
                batch.seqs, batch.num_new_tokens, batch.sample_mask, logits, self.scheduler
            )
        if self.overlap_steps:
            self._pending = self._launch_next_decode(launched)
        return self._finish(launched)

    def _execute(
        self, seqs: list[Sequence], num_new_tokens: list[int], input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The forward of one step on every rank: logits ``[B, V]`` fp32."""
        try:
            return self.executor.execute(seqs, num_new_tokens, input_ids)
        except DistributedError as exc:  # the ranks are out of step: nothing can go on
            self._fatal(exc)
            raise
        except Exception as exc:
            self._fail(seqs, exc)

    def _launch_next_decode(self, launched: _Launched) -> _Launched | None:
        """Queue the decode step that follows ``launched`` (see ``step``), or None where the
        scheduler may pick another batch."""
        seqs = [launched.seqs[i] for i in launched.ready]
        if launched.sample is None or len(seqs) != len(launched.seqs):
            return None  # a prefill chunk: not every sequence got a token
        if any(seq.request.params.uses_penalties for seq in seqs):
            return None  # the penalties need this step's tokens on the host
        scheduler = seqs[0].request.scheduler
        if not scheduler.reserve_next_decode(seqs):
            return None
        # Sequences this step finishes for length are left out (their rows would be dropped).
        rows = [
            k
            for k, seq in enumerate(seqs)
            if seq.num_output_tokens + 1 < seq.max_tokens
            and seq.num_tokens + 1 < self.max_model_len
        ]
        if not rows:
            return None
        tokens = launched.sample.token_ids
        if len(rows) != len(seqs):
            tokens = tokens[to_device_async(torch.tensor(rows), tokens.device)]
            seqs = [seqs[k] for k in rows]
        ones = [1] * len(seqs)
        try:
            logits = self.executor.execute(seqs, ones, tokens)
        except DistributedError as exc:
            self._fatal(exc)
            raise
        except Exception as exc:  # fails this step's sequences when the step is due
            return _Launched(seqs, [], None, error=exc)
        return self._launch_sample(seqs, ones, [True] * len(seqs), logits, scheduler)

    def _pipelined_step(self) -> list[StepOutput]:
        """Submit the next group's batch (round robin over groups not in the pipeline), or if
        none has work, wait for the oldest batch in the pipeline; sample what came out."""
        num_groups = len(self.schedulers)
        try:
            for _ in range(num_groups):
                group = self._next_group
                self._next_group = (group + 1) % num_groups
                if group in self._in_flight:
                    continue
                batch = self.schedulers[group].schedule()
                if batch.seqs:
                    self._in_flight[group] = batch
                    done = self.executor.submit(group, batch.seqs, batch.num_new_tokens)
                    break
            else:
                done = [self.executor.drain()] if self._in_flight else []
        except DistributedError as exc:
            self._fatal(exc)
            raise
        outputs = []
        for group, logits in done:
            batch = self._in_flight.pop(group)
            launched = self._launch_sample(
                batch.seqs, batch.num_new_tokens, batch.sample_mask, logits, self.schedulers[group]
            )
            outputs += self._finish(launched)
        return outputs

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        """A backend fault fails the sequences of this step only; the engine goes on."""
        failed = [seq.seq_id for seq in seqs]
        for seq_id in failed:
            self.abort(seq_id)
        raise StepError(failed, exc) from exc

    def _launch_sample(
        self,
        seqs: list[Sequence],
        num_new_tokens: list[int],
        sample_mask: list[bool],
        logits: torch.Tensor,
        scheduler: Scheduler,
    ) -> _Launched:
        """Record the step's K/V as computed and queue the draw of the sequences it made
        ready (logits ``[B, V]``)."""
        try:
            scheduler.record_computed(seqs, num_new_tokens)
            ready = [
                i
                for i, is_ready in enumerate(sample_mask)
                if is_ready and not seqs[i].is_finished  # aborted while in the pipeline
            ]
            if not ready:
                return _Launched(seqs, ready, None)
            requests: list[_Request] = [seqs[i].request for i in ready]
            if len(ready) != logits.shape[0]:
                logits = logits[to_device_async(torch.tensor(ready), logits.device)]
            sample = self.sampler.launch(
                logits,
                [r.params for r in requests],
                [r.generator for r in requests],
                [seqs[i].output_token_ids for i in ready],
                [seqs[i].prompt_token_ids for i in ready],
            )
        except Exception as exc:
            self._fail(seqs, exc)
        return _Launched(seqs, ready, sample)

    def _finish(self, launched: _Launched) -> list[StepOutput]:
        """Read a launched step's tokens back and apply them: stops, text, outputs."""
        if launched.sample is None:
            return []
        try:
            result = launched.sample.result()
        except Exception as exc:
            self._fail(launched.seqs, exc)
        outputs = []
        for i, token_id, logprobs in zip(
            launched.ready, result.token_ids, result.logprobs, strict=True
        ):
            seq = launched.seqs[i]
            if seq.is_finished:  # aborted, or stopped by the step before (queued ahead)
                continue
            request: _Request = seq.request
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
                request.scheduler.finish(seq, reason)
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
