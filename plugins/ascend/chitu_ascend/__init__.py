"""Chitu backend for Huawei Ascend NPUs through torch_npu (entry point ``ascend``).

Device ``npu`` and the ``torch.npu`` namespace come from torch_npu, collectives
from HCCL (``dist_backend="hccl"``, the generic torch.distributed collectives).
The ops map onto documented torch_npu fused operators; each call site cites the
operator's documented signature and its page. Where the documented semantics
cannot express the hook's contract the hook falls back to the generic op of
``chitu_core/ops`` for that call, with the reason in a comment at the test.

torch_npu is NOT a dependency of this distribution: it must match the CANN
toolkit installed on the machine (``pip install torch-npu==<version for your
torch and CANN>``). Without it the backend reports itself unavailable with the
reason "torch_npu is not installed ...".

FP8 checkpoints: the Ascend 910B has no FP8 arithmetic. At load time
``chitu_prepare_weight`` converts FP8 weights (block-128 and per-channel) to what
``torch_npu.npu_weight_quant_batchmatmul`` takes: int8 with one antiquant scale
per (output channel, group of 128 along K). Set ``CHITU_ASCEND_FP8_WEIGHTS=bf16``
to widen them to bf16 instead (exact FP8 values, twice the bytes). See
``chitu_ascend.weight`` and the README for the measured numerics loss.

Not implemented, on purpose: ``chitu_capture_graph``. torch_npu documents
``torch_npu.npu.NPUGraph`` (docs/zh/developer_notes/npugraph.md in
gitcode.com/Ascend/pytorch), but its replay keeps host-side operator
parameters fixed; the attention operator takes the sequence lengths as host
integers (``actual_seq_lengths_kv: SymInt[]``) and needs NPUGraph's per-op
update mechanism, which a replay-on-current-buffers hook cannot drive. Until a
decode step is shown to replay correctly on hardware the backend declares
``supports_graphs=False`` and decode runs eagerly.

Everything here has been run only against the fake torch_npu module of
``plugins/ascend/tests`` (documented semantics in plain torch on the CPU), not
on an NPU; see README.md for what is unverified on hardware.
"""

__version__ = "0.2.0"
