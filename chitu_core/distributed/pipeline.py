"""The executor of a TP x PP run: rank 0 drives, every rank runs its stage.

Within a stage the TP ranks run in lockstep (their all-reduces meet); between
stages a batch's header, payload and hidden states ``[T, D]`` go by
``send``/``recv`` from a rank to the rank of the same TP index in the next
stage (``step_sync``); the last stage's TP rank 0 sends the logits ``[B, V]``
fp32 back to rank 0, which samples.

Overlap (PP > 1). The engine keeps ``pp`` *virtual engines*: its running
sequences are split into ``pp`` groups, each with its own scheduler over the
shared KV-block pool, so the decode batch is cut into ``pp`` micro-batches
that advance independently. Rank 0 ``submit``s a group's batch (stage 0 runs
it, then it enters the pipeline) while up to ``pp - 1`` other groups' batches
are in later stages, and ``drain``s the oldest when there is nothing new to
submit. In the steady state every stage works on a different group at the
same time, and each stage reads its weights once per micro-batch of
``B / pp`` sequences: unlike splitting one step into micro-batches, no weight
read is added, which is what matters for weight-bound decode.

Deadlock freedom with blocking send/recv: every hand-off flows forward, and
rank 0 takes the oldest logits off the last stage *before* it sends a new
batch into a full pipeline (``pp - 1`` batches past stage 0), so the last
stage is never blocked on rank 0 while rank 0 is blocked on stage 1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from chitu_core.distributed import DistributedError
from chitu_core.distributed.step_sync import (
    CMD_PING,
    CMD_STEP,
    CMD_STOP,
    StepChannel,
    header,
    unpack,
)

logger = logging.getLogger(__name__)


class DistributedExecutor:
    """Runs engine steps across the ranks of ``state`` (a ``ParallelState``) with ``runner``
    (this rank's ``ModelRunner``)."""

    def __init__(self, state: Any, runner: Any) -> None:
        self.state, self.runner = state, runner
        self.layout = state.layout
        self.channel = StepChannel(state)
        self._lock = threading.Lock()  # one command on the wire at a time (steps, pings)
        self._in_pipeline: deque[tuple[int, int]] = deque()  # (group, B) past stage 0, oldest first
        self._last_sent = time.monotonic()
        self._closed = False
        self._heartbeat: threading.Thread | None = None
        self._stop_heartbeat = threading.Event()

    # -- rank 0 ------------------------------------------------------------------------
    def execute(
        self,
        seqs: list[Any],
        num_new_tokens: list[int],
        input_ids_on_device: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rank 0, PP=1: one step on every TP rank; returns logits ``[B, vocab]`` fp32
        (``input_ids_on_device``: see ``ModelRunner.build_batch``; the other TP ranks get
        them by an all-gather on the device)."""
        step = self._prepare(seqs, num_new_tokens, input_ids_on_device)
        return self._guarded(lambda: self._start(*step))

    def submit(
        self, group: int, seqs: list[Any], num_new_tokens: list[int]
    ) -> list[tuple[int, torch.Tensor]]:
        """Rank 0, PP>1: run stage 0 of ``group``'s batch and send it down the pipeline.

        Returns the ``(group, logits [B, vocab])`` of a batch that left the pipeline
        meanwhile (at most one), oldest first.
        """
        step = self._prepare(seqs, num_new_tokens, None)

        def run() -> list[tuple[int, torch.Tensor]]:
            hidden = self._start(*step)
            head, _, batch, _ = step
            done = []
            if len(self._in_pipeline) == self.layout.pp - 1:  # full: make room first
                done.append(self._receive_logits())
            self.channel.send_next(head, batch.payload, hidden)
            self._in_pipeline.append((group, batch.num_seqs))
            return done

        return self._guarded(run)

    def drain(self) -> tuple[int, torch.Tensor]:
        """Rank 0, PP>1: wait for the oldest batch in the pipeline: ``(group, logits)``."""
        if not self._in_pipeline:
            raise RuntimeError("drain() with no batch in the pipeline")
        return self._guarded(self._receive_logits)

    @property
    def num_in_pipeline(self) -> int:
        return len(self._in_pipeline)

    def _prepare(self, seqs, num_new_tokens, input_ids):
        """The step's header and host payload, and its batch on this rank's device."""
        runner = self.runner
        payload, sizes = runner.host_payload(seqs, num_new_tokens, input_ids is not None)
        batch = runner.batch_from_payload(payload, sizes, input_ids)
        head = header(CMD_STEP, payload, sizes, ids_on_device=input_ids is not None)
        return head, payload, batch, input_ids

    def _start(self, head, payload, batch, input_ids):
        """Announce the step to stage 0's other ranks and run stage 0 on it."""
        self.channel.share_in_stage(head, payload, input_ids)
        self._last_sent = time.monotonic()
        return self.runner.forward(batch)

    def _receive_logits(self) -> tuple[int, torch.Tensor]:
        group, num_seqs = self._in_pipeline.popleft()
        logits = torch.empty(
            (num_seqs, self.runner.model.vocab_size), dtype=torch.float32, device=self.state.device
        )
        self.state.recv_from_stage(logits, self.layout.pp - 1)
        return group, logits

    def _guarded(self, work: Callable[[], Any]) -> Any:
        with self._lock:
            if self._closed:
                raise DistributedError("the distributed engine is closed (a rank failed)")
            try:
                return work()
            except Exception as exc:
                self._closed = True  # the ranks are out of step: later steps fail at once
                raise DistributedError(
                    f"rank 0: a step across {self.layout.world_size} ranks failed "
                    f"({type(exc).__name__}: {exc}); a rank has died or timed out"
                ) from exc

    def _announce(self, command: int) -> None:
        """Rank 0: send a payload-less command (PING, STOP) to every rank."""
        head = header(command, None)
        self.channel.share_in_stage(head, None)
        if self.layout.pp > 1:
            self.channel.send_next(head, None, None)
        self._last_sent = time.monotonic()

    def start_heartbeat(self, on_failure: Callable[[DistributedError], None]) -> None:
        """Rank 0: while no batch is on the way for a quarter of the collective timeout, ping
        the other ranks; ``on_failure`` is called (from this thread) if one does not answer."""
        interval = max(0.5, self.state.timeout_s / 4)

        def beat() -> None:
            while not self._stop_heartbeat.wait(interval / 4):
                with self._lock:
                    idle = time.monotonic() - self._last_sent >= interval
                    if self._closed or self._in_pipeline or not idle:
                        continue
                    try:
                        self._announce(CMD_PING)
                    except Exception as exc:
                        self._closed = True
                        on_failure(
                            DistributedError(
                                f"rank 0: the other ranks stopped answering "
                                f"({type(exc).__name__}: {exc}); a rank has died"
                            )
                        )
                        return

        self._heartbeat = threading.Thread(target=beat, name="chitu-dist-heartbeat", daemon=True)
        self._heartbeat.start()

    def close(self) -> None:
        """Rank 0: tell the other ranks to stop (once; quietly if they are gone already)."""
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with self._lock:
            closed, self._closed = self._closed, True
            if closed or not self.state.is_driver:
                return
            try:
                while self._in_pipeline:  # batches of aborted requests: take them off first
                    self._receive_logits()
                self._announce(CMD_STOP)
            except Exception as exc:
                logger.warning("could not tell the other ranks to stop: %s", exc)

    # -- the other ranks ---------------------------------------------------------------
    def follow(self) -> None:
        """Ranks other than 0: run rank 0's steps until it says stop."""
        layout, runner, channel = self.layout, self.runner, self.channel
        stage, last = layout.pp_rank, layout.pp - 1
        while True:
            try:
                if stage == 0:
                    head, info, payload = channel.receive_in_stage()
                    hidden = None
                else:
                    head, info, payload, hidden = channel.receive_prev(
                        runner.model.hidden_size, runner.dtype
                    )
            except Exception as exc:
                raise DistributedError(
                    f"rank {layout.rank}: lost contact with rank 0 ({type(exc).__name__}: {exc}); "
                    "a rank died or stopped answering within the collective timeout"
                ) from exc
            command = info[0]
            try:
                if command != CMD_STEP:
                    if stage < last:
                        channel.send_next(head, None, None)
                    if command == CMD_STOP:
                        logger.info("rank %d: stop", layout.rank)
                        return
                    continue
                [batch] = unpack(payload, 1, sizes=tuple(info[3:7]))
                out = runner.forward(batch, hidden)
                if stage < last:
                    channel.send_next(head, payload, out)
                elif layout.pp > 1 and layout.tp_rank == 0:
                    self.state.send_to_stage(out, 0)  # the logits, to rank 0
            except Exception as exc:
                raise DistributedError(
                    f"rank {layout.rank}: step failed ({type(exc).__name__}: {exc})"
                ) from exc


__all__ = ["CMD_PING", "CMD_STOP", "DistributedExecutor"]
