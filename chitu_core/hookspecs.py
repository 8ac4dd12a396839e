"""The Chitu hook contract: every hook a backend plugin may implement.

A backend is a module (or object) whose functions are marked with
``pluggy.HookimplMarker("chitu")`` and named like the specs below. It is found
through the entry-point group ``chitu.backends``. Exactly one backend is active
per process; the engine resolves every hook once at start-up into a plain
``Ops`` object (see ``chitu_core/backend.py``) and calls it directly on the hot
path. An implementation may accept a subset of a spec's arguments (pluggy
checks the names at registration).

Required hooks: ``chitu_backend_info`` and ``chitu_check_available``. Every
other hook is optional: the generic pure-torch implementation in
``chitu_core/ops`` is used where a backend has none. Two pairs are bound
together because they share an opaque object: ``chitu_prepare_weight`` with
``chitu_linear``/``chitu_fused_moe`` (a backend that implements
``prepare_weight`` must implement both consumers), and ``chitu_new_group`` with
the collectives. ``chitu_configure`` is no op: it is called once when the backend
is bound, with the user's compute choices (``--fp8-compute``), and answers which
path each affected op takes.

Conventions used in every docstring:

* Shapes are written ``[M, K]``; ``T`` is the number of tokens in a batch,
  ``B`` the number of sequences, ``E`` experts, ``H*`` head counts.
* "compute dtype" is the activation dtype of the run (``BackendInfo.compute_dtype``):
  bf16 on GPUs, fp32 on the reference backend. Outputs have the dtype of the
  activation input unless stated.
* Every tensor a hook receives is on the backend's device; a hook never moves
  data to the host unless stated (no host syncs on the hot path).
* Every dimension may be 0 (an empty batch) and the hook must then return an
  empty tensor of the right shape.
* Tolerance class: "exact" (bit-equal to the reference), "accumulate" (compared
  with the fp32/fp64 reference within the per-dtype bounds of
  ``conformance/tolerances.py``).

Versioning: ``CONTRACT_VERSION`` (semver) names this contract. A plugin declares
the versions it was written for in ``BackendInfo.contract`` (a version specifier
such as ``">=1.0,<2"``); a plugin whose range excludes ``CONTRACT_VERSION`` is
refused at load time with ``ContractVersionError``, which lists the hooks
changed since (``CONTRACT_HISTORY``). MAJOR: a hook removed, or an existing
implementation would break (an argument renamed, removed or reordered, a return
value or semantics changed, a hook made required). MINOR: a new optional hook, a
new argument an implementation may omit, a new ``BackendInfo`` field with a
default. PATCH: wording only. ``tests/test_contract_version.py`` fails when a
signature changes without a bump.

This module imports nothing but pluggy and typing so that vendors can read it
alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import pluggy

if TYPE_CHECKING:  # pragma: no cover - names for annotations only
    import torch

    from chitu_core.backend_info import BackendInfo, BackendOptions, OpPath

hookspec = pluggy.HookspecMarker("chitu")
hookimpl = pluggy.HookimplMarker("chitu")


class ContractChange(NamedTuple):
    """One release of the contract: its version, the hooks it changed, and how."""

    version: str
    hooks: tuple[str, ...]
    summary: str


# Newest last; the last entry's version is CONTRACT_VERSION. docs/writing-a-backend.md
# ("Contract history") shows the same lines; ContractVersionError quotes them.
CONTRACT_HISTORY: tuple[ContractChange, ...] = (
    ContractChange(
        "1.0.0",
        ("chitu_backend_info",),
        "first versioned contract: the hooks of this file; BackendInfo gains `contract` "
        "(the versions a plugin was written for) and `batch_invariant`",
    ),
    ContractChange(
        "1.1.0",
        ("chitu_configure",),
        "new optional hook: the user's compute choices (`BackendOptions`: `--fp8-compute`) "
        "once at bind time; it answers which path each op takes (`OpPath`)",
    ),
)
CONTRACT_VERSION = CONTRACT_HISTORY[-1].version


# --------------------------------------------------------------------------------------
# describe
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def chitu_backend_info() -> BackendInfo:
    """Describe the backend. Required.

    Returns a ``chitu_core.backend_info.BackendInfo``: name, torch device type,
    torch.distributed backend, auto-selection priority, compute dtype and
    capabilities. Must be cheap and must not touch the device (it is called
    by ``chitu plugins`` on machines without the hardware).
    """


@hookspec(firstresult=True)
def chitu_check_available() -> str | None:
    """Probe whether the backend can run in this process. Required.

    Returns ``None`` when usable, otherwise a one-line human-readable reason
    that tells the user what is missing (e.g. ``"no CUDA device: torch was
    built without CUDA"``, ``"torch_npu is not installed"``). Must not raise
    and must not allocate device memory.
    """


@hookspec(firstresult=True)
def chitu_configure(options: BackendOptions) -> dict[str, OpPath] | None:
    """Take the user's compute choices once, when the backend is bound. Optional.

    ``options`` is a ``chitu_core.backend_info.BackendOptions`` (``--fp8-compute``...).
    Called by ``bind_ops`` before any weight is prepared; the backend keeps what it
    needs (e.g. folds the choice into the handles ``chitu_prepare_weight`` returns) so
    that the hot path stays plain calls with no per-call lookups. Raises ``ValueError``
    for a choice this device cannot honour (e.g. ``native`` FP8 on a GPU without FP8
    arithmetic), with a message naming the alternatives.

    Returns, per op name whose computation depends on ``options``, an ``OpPath``
    saying which path it takes (shown by ``chitu plugins`` and the start-up log, and
    read by conformance: an op with ``fp8_activations`` is checked in that tolerance
    class). Ops it does not name compute as their spec says, activations unquantized.
    Not an op: it is never bound into ``Ops``.
    """


# --------------------------------------------------------------------------------------
# memory and device
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def chitu_device(local_rank: int) -> torch.device:
    """Select and return the device this process computes on.

    ``local_rank`` is the process's rank within its node (0 without torchrun).
    The backend sets it current (e.g. ``torch.cuda.set_device``) and returns
    ``torch.device``. Called once at start-up.
    """


@hookspec(firstresult=True)
def chitu_memory_info(device: torch.device) -> tuple[int, int]:
    """Return ``(free_bytes, total_bytes)`` of the device's memory.

    Used once at start-up to size the KV cache. On host memory backends the
    figures are those of the machine's RAM.
    """


@hookspec(firstresult=True)
def chitu_allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Allocate one layer's paged cache for keys (or values, or MLA latents).

    Returns a zero-initialised tensor ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` of ``dtype`` on ``device``, contiguous. Block ``b``, offset ``o``
    holds the token with slot ``b * block_size + o``. A backend may pad the
    allocation for alignment but must return a view of exactly this shape and
    row-major strides.
    """


@hookspec(firstresult=True)
def chitu_synchronize(device: torch.device) -> None:
    """Block the host until all work queued on ``device`` is done (timing, tests)."""


@hookspec(firstresult=True)
def chitu_empty_cache(device: torch.device) -> None:
    """Return cached, unused device memory to the driver (after loading, profiling)."""


@hookspec(firstresult=True)
def chitu_capture_graph(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """Capture ``fn`` (a decode step over static input buffers) as a device graph.

    ``fn`` takes no arguments, reads only tensors it closes over and returns a
    tensor (or tuple of tensors) whose storage stays valid. The hook may run
    ``fn`` several times to warm up, then captures it and returns ``replay``: a
    callable that re-executes the captured work on the current contents of the
    same input buffers and returns the same output tensors (updated in place).
    Graphs of one device may share a memory pool: the engine replays one graph
    at a time and consumes its outputs before the next replay of any graph, in
    the device's stream order (the work that reads a replay's outputs is queued
    before the next replay, possibly before the host has seen the results).
    Only implemented where ``BackendInfo.supports_graphs``; the generic
    fallback returns ``fn`` itself (eager execution, same results).
    """


# --------------------------------------------------------------------------------------
# weights and quantized GeMM
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def chitu_prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> Any:
    """Repack a loaded weight once, at load time, into the backend's layout.

    Args:
        weight: ``[N, K]`` (a linear layer, ``y = x @ W^T``) or ``[E, N, K]``
            (``E`` stacked MoE experts), on the backend's device. dtype by ``fmt``:
            ``"unquantized"``: bf16/fp16/fp32; ``"fp8_block128"`` and
            ``"fp8_channel"``: ``torch.float8_e4m3fn`` (or its ``uint8`` bit view on
            devices without a float8 dtype).
        scale: ``"fp8_block128"``: ``weight_scale_inv`` fp32 ``[ceil(N/128),
            ceil(K/128)]`` (``[E, ...]`` for experts) in DeepSeek-V3's layout:
            ``W[n, k] = e4m3(weight[n, k]) * scale[n // 128, k // 128]``.
            ``"fp8_channel"``: fp32 ``[N]`` (``[E, N]``), ``W[n, k] = e4m3(weight[n, k])
            * scale[n]``. ``None`` for ``"unquantized"``.
        fmt: one of ``chitu_core.quant.WEIGHT_FORMATS``.

    Returns an opaque handle that only this backend's ``chitu_linear`` and
    ``chitu_fused_moe`` consume. The generic implementation returns a
    ``chitu_core.quant.QuantizedWeight(weight, scale, fmt)`` unchanged; a backend
    that does not implement this hook receives such objects. The handle must
    keep the weight in no more bytes than the checkpoint format (FP8 stays
    1 byte per element).
    """


@hookspec(firstresult=True)
def chitu_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for every weight format.

    Args:
        x: ``[M, K]`` activations in the compute dtype, contiguous; ``M`` is 1 for
            single-sequence decode and up to thousands for prefill; may be 0.
        weight: a handle from ``chitu_prepare_weight`` for a ``[N, K]`` weight
            (any of the formats; FP8 is dequantized exactly as described there:
            the e4m3 value times its block or channel scale).
        bias: ``[N]`` in the compute dtype, or ``None``.

    Returns ``[M, N]`` in ``x.dtype``. Accumulation in at least fp32. Not in
    place. Tolerance class: accumulate.
    """


# --------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def chitu_moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    num_groups: int,
    topk_groups: int,
    correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token and their mixing weights.

    Args:
        router_logits: ``[T, E]`` fp32 (gate output, before any activation).
        top_k: experts per token, ``1 <= top_k <= E``.
        scoring: ``"softmax"`` (Mixtral/Qwen-MoE: ``s = softmax(logits)``) or
            ``"sigmoid"`` (DeepSeek-V3: ``s = sigmoid(logits)``).
        renormalize: divide the chosen weights by their sum (DeepSeek's
            ``norm_topk_prob``; for sigmoid a 1e-20 guard is added to the sum).
        num_groups, topk_groups: group-limited routing (DeepSeek-V3: 8 and 4).
            The ``E`` experts form ``num_groups`` contiguous groups; a group's
            score is the sum of the two largest selection scores in it; only the
            experts of the ``topk_groups`` best groups are eligible. ``num_groups
            == 1`` disables grouping (``topk_groups`` must then be 1).
        correction_bias: ``[E]`` fp32 ``e_score_correction_bias`` or ``None``.
            It is added to ``s`` for *selection only* (group scores and top-k);
            the returned weights are taken from ``s`` without it.
        routed_scaling_factor: multiplies the final weights (1.0 for none).

    Returns ``(topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32)``. The
    order of the ``top_k`` entries within a row is unspecified, but weights
    and ids correspond. Ties are broken towards the lower expert id. No host
    sync. Tolerance: ids exact (unless scores tie within fp32 rounding),
    weights accumulate.
    """


@hookspec(firstresult=True)
def chitu_fused_moe(
    x: torch.Tensor,
    w13: Any,
    w2: Any,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Mixture of experts with SwiGLU experts, for the routed experts only.

    Args:
        x: ``[T, H]`` compute dtype.
        w13: handle from ``chitu_prepare_weight`` for stacked ``[E, 2*I, H]``
            weights; rows ``[0, I)`` of each expert are the gate projection
            (``w1``), rows ``[I, 2I)`` the up projection (``w3``).
        w2: handle for stacked ``[E, H, I]`` down projections.
        topk_weights: ``[T, top_k]`` fp32, from ``chitu_moe_route``.
        topk_ids: ``[T, top_k]`` int32 expert ids in ``[0, E)``.

    Returns ``[T, H]`` in ``x.dtype``::

        out[t] = sum_j topk_weights[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t])),
        e = topk_ids[t, j]

    The intermediate ``silu(..) * (..)`` is rounded to the compute dtype before
    the down projection (as an unfused model would). No host sync. Tolerance:
    accumulate.
    """


# --------------------------------------------------------------------------------------
# attention over the paged KV cache
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def chitu_store_kv(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new tokens' keys (and values) into the paged cache, in place.

    Args:
        key: ``[T, Hkv, D]``; for MLA the latent ``[T, 1, kv_lora_rank + rope_dim]``
            (normalised ``c_kv`` then the rotated rope key).
        value: ``[T, Hkv, Dv]`` or ``None`` (MLA caches only the latent).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` from
            ``chitu_allocate_kv_cache``; ``value_cache`` is ``None`` iff ``value``
            is.
        slot_mapping: ``[T]`` int64; token ``t`` goes to block
            ``slot // block_size``, offset ``slot % block_size``. Every slot is
            valid: engines point padding tokens at a reserved scratch block.

    Values are cast to the cache dtype. Tolerance: exact.
    """


@hookspec(firstresult=True)
def chitu_paged_attention_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a batch of new tokens over the paged cache (MHA/GQA).

    The keys/values of the new tokens have already been written with
    ``chitu_store_kv``, so the cache holds each sequence's whole context.

    Args:
        q: ``[T, Hq, D]`` compute dtype, the queries of all sequences packed.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` / ``[..., Dv]``;
            ``Hq % Hkv == 0`` and query head ``h`` reads kv head
            ``h // (Hq // Hkv)`` (GQA).
        block_tables: ``[B, max_blocks]`` int32; entry ``[b, i]`` is the block
            holding positions ``[i*block_size, (i+1)*block_size)`` of sequence
            ``b``; entries past the sequence's length are ignored.
        cu_seqlens_q: ``[B + 1]`` int32 prefix sums of query lengths
            (``cu_seqlens_q[0] == 0``, ``cu_seqlens_q[B] == T``).
        context_lens: ``[B]`` int32, tokens in the cache per sequence, new ones
            included (so ``context_lens[b] >= q_len[b]``; a cached prefix or a
            chunked prefill has ``context_lens[b] > q_len[b]``).
        scale: softmax scale, usually ``D ** -0.5``.

    Query ``i`` of sequence ``b`` sits at position ``context_lens[b] - q_len[b]
    + i`` and attends to cache positions ``0..`` that position inclusive.
    Softmax in fp32. Returns ``[T, Hq, Dv]`` in ``q.dtype``. Tolerance:
    accumulate.
    """


@hookspec(firstresult=True)
def chitu_paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its whole paged context (MHA/GQA).

    Args:
        q: ``[B, Hq, D]`` compute dtype.
        key_cache, value_cache, block_tables, scale: as in
            ``chitu_paged_attention_prefill``.
        context_lens: ``[B]`` int32, ``>= 1``, the current token included.

    Returns ``[B, Hq, Dv]`` in ``q.dtype``: for every sequence and head, softmax
    (fp32) over its ``context_lens[b]`` cached keys, times the values. No host
    sync (``max(context_lens)`` must not be read on the host by the kernel;
    the ``block_tables`` width bounds it). Tolerance: accumulate.
    """


@hookspec(firstresult=True)
def chitu_mla_prefill(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal multi-head latent attention (DeepSeek-V3 MLA), absorbed form, varlen.

    With ``R = kv_lora_rank`` and ``P = qk_rope_head_dim``, the cache holds per
    token the latent ``c = latent_cache[..., 0, :R]`` and the rotated rope key
    ``k_pe = latent_cache[..., 0, R:R+P]`` (written by ``chitu_store_kv``).

    Args:
        q_latent: ``[T, Hq, R]`` the no-rope query part already multiplied by
            ``W_UK`` (absorbed).
        q_rope: ``[T, Hq, P]`` rotated rope query part.
        latent_cache: ``[num_blocks, block_size, 1, R + P]``.
        block_tables, cu_seqlens_q, context_lens: as in
            ``chitu_paged_attention_prefill`` (same causal positions).
        scale: softmax scale (DeepSeek: ``(qk_nope_dim + qk_rope_dim) ** -0.5``
            times the YaRN mscale squared).

    ``score[t, h, j] = scale * (q_latent[t, h] . c_j + q_rope[t, h] . k_pe_j)``;
    returns ``[T, Hq, R]`` in ``q_latent.dtype``: ``softmax_j(score) @ c``, still in
    latent space (the caller applies ``W_UV``). Softmax in fp32. Tolerance:
    accumulate.
    """


@hookspec(firstresult=True)
def chitu_mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """MLA absorbed decode: one query token per sequence.

    ``q_latent [B, Hq, R]``, ``q_rope [B, Hq, P]``, the rest as in
    ``chitu_mla_prefill`` and ``chitu_paged_attention_decode``. Returns ``[B, Hq,
    R]`` in ``q_latent.dtype``. No host sync. Tolerance: accumulate.
    """


# --------------------------------------------------------------------------------------
# collectives (torch.distributed must be initialised with BackendInfo.dist_backend)
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def chitu_new_group(ranks: list[int], timeout_s: float) -> Any:
    """Create a process group over the global ``ranks`` (sorted, unique).

    Called by every process of the world with the same arguments, in the same
    order (``torch.distributed.new_group`` semantics). Collectives on the group
    fail with an error rather than hang after ``timeout_s`` seconds. Returns an
    opaque group handle passed to the collective hooks below.
    """


@hookspec(firstresult=True)
def chitu_all_reduce(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``tensor`` (any shape, compute dtype or fp32) over ``group``, in place.

    Returns ``tensor``. Tolerance: accumulate (the summation order may differ).
    """


@hookspec(firstresult=True)
def chitu_all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chitu_all_reduce`` of ``x`` over ``group``, then ``chitu_add_rms_norm`` of the sum
    with ``residual``: what a tensor-parallel decoder layer runs after each row-parallel
    block, twice a layer.

    ``x [M, D]`` (this rank's partial sums) and ``residual [M, D]`` in the compute dtype,
    ``weight [D]``. Returns ``(normed, summed)`` as ``chitu_add_rms_norm`` returns them for
    the all-reduced ``x``; ``x`` itself may be overwritten. Every rank of the group must
    get the same bits (the ranks go on from them as one model). Optional: a backend
    without it gets its own ``all_reduce`` followed by its own ``add_rms_norm``; one
    kernel can exchange, add and normalise in a single launch. Tolerance: accumulate.
    """


@hookspec(firstresult=True)
def chitu_all_gather(tensor: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim``, in group-rank order.

    Every rank passes the same shape; returns a new tensor whose ``dim`` is
    ``group size`` times larger. Tolerance: exact.
    """


@hookspec(firstresult=True)
def chitu_reduce_scatter(tensor: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """Sum over ``group``, then keep this rank's slice of ``dim``.

    ``tensor.shape[dim]`` must be divisible by the group size ``G``; group rank
    ``r`` returns the sum's ``r``-th of ``G`` equal chunks along ``dim`` (a new
    tensor). Tolerance: accumulate.
    """


@hookspec(firstresult=True)
def chitu_send(tensor: torch.Tensor, dst: int, group: Any) -> None:
    """Send ``tensor`` (contiguous) to global rank ``dst``; blocks until it is handed off."""


@hookspec(firstresult=True)
def chitu_recv(tensor: torch.Tensor, src: int, group: Any) -> torch.Tensor:
    """Receive into ``tensor`` (preallocated, same shape/dtype as sent) from global rank ``src``.

    Returns ``tensor``.
    """


# --------------------------------------------------------------------------------------
# small ops (optional overrides of the generic torch versions)
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def chitu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: ``x / sqrt(mean(x^2, -1) + eps) * weight``, computed in fp32.

    ``x [M, D]`` compute dtype, ``weight [D]``; returns ``[M, D]`` in ``x.dtype``
    (the normalised fp32 value is rounded to ``x.dtype`` *before* multiplying by
    the weight, as HF Llama does). Tolerance: accumulate.
    """


@hookspec(firstresult=True)
def chitu_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm, the pair every decoder layer runs twice.

    ``x [M, D]`` (a sublayer's output) and ``residual [M, D]``, both the compute
    dtype; ``weight [D]``. Returns ``(normed, summed)``, both ``[M, D]`` in
    ``x.dtype``: ``summed = residual + x`` rounded to ``x.dtype``, and ``normed``
    exactly ``chitu_rms_norm(summed, weight, eps)``. One fused kernel saves a
    launch and a read of the sum per call. Tolerance: accumulate.
    """


@hookspec(firstresult=True)
def chitu_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding on the leading ``R`` channels of q and k.

    Args:
        q: ``[T, Hq, Dq]``, k: ``[T, Hk, Dk]`` compute dtype, ``R <= Dq, Dk``;
            channels ``>= R`` pass through unchanged.
        positions: ``[T]`` int64 token positions.
        cos_sin_cache: ``[max_position, R]`` fp32; row ``p`` is ``cos(p*f_0..f_{R/2-1})``
            followed by ``sin(p*f_0..f_{R/2-1})`` (frequency scaling such as llama3
            or YaRN is already folded in).
        is_neox_style: True pairs channel ``i`` with ``i + R/2`` (HF Llama
            ``rotate_half``); False pairs ``2i`` with ``2i+1`` (GPT-J / the original
            DeepSeek-V3 layout).

    Pair ``(a, b)`` at frequency ``i`` becomes ``(a cos - b sin, b cos + a sin)``,
    computed in fp32. Returns new ``(q, k)`` in their input dtypes (not in
    place). Tolerance: accumulate.
    """


@hookspec(firstresult=True)
def chitu_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: ``x [M, 2I] -> silu(x[:, :I]) * x[:, I:]``, ``[M, I]``.

    Computed in fp32, returned in ``x.dtype``. Tolerance: accumulate.
    """


@hookspec(firstresult=True)
def chitu_sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    top_ks: torch.Tensor,
    generators: list,
) -> torch.Tensor:
    """Pick the next token of every sequence.

    Args:
        logits: ``[B, V]`` fp32.
        temperatures: ``[B]`` fp32; ``0`` means greedy (argmax, lowest id on ties).
        top_ps: ``[B]`` fp32 in ``(0, 1]``: keep the smallest set of most likely
            tokens whose probability reaches ``top_p`` (``1`` keeps all).
        top_ks: ``[B]`` int32: keep the ``top_k`` most likely tokens; ``top_k
            <= 0`` keeps all.
        generators: ``B`` entries, each a ``torch.Generator`` on the logits'
            device (a request with a ``seed``) or ``None`` (the default RNG).

    Returns ``[B]`` int64 token ids. Sampling draws from
    ``softmax(logits / temperature)`` restricted by top-k then top-p. A seeded
    request draws its randomness only from its own generator, so its tokens do
    not depend on what else is in the batch. Tolerance: greedy rows exact;
    sampled rows checked statistically.
    """
