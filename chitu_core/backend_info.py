"""What a backend says about itself (returned by the ``chitu_backend_info`` hook)."""

from __future__ import annotations

from dataclasses import dataclass

from chitu_core.contract import parse_range

DEFAULT_CONTRACT = ">=1.0,<2"


@dataclass(frozen=True)
class BackendInfo:
    """Static description of a backend plugin.

    Attributes:
        name: backend name used with ``--backend`` (e.g. ``"nvidia"``); equals the
            entry-point name under which the plugin is registered.
        device_type: torch device type the backend computes on (``"cuda"``, ``"npu"``,
            ``"cpu"``...).
        dist_backend: ``torch.distributed`` backend for its process groups
            (``"nccl"``, ``"hccl"``, ``"gloo"``...).
        priority: higher wins when ``--backend auto`` picks among available backends.
        compute_dtype: the activation dtype the models should run in on this backend,
            as a torch dtype name (``"bfloat16"``, ``"float32"``...).
        has_native_fp8: the device multiplies e4m3 in hardware (sm_89+, ...).
        supports_graphs: ``chitu_capture_graph`` is implemented and usable.
        needs_certificate: serving requires a conformance certificate first
            (False only for the reference backend, which is the oracle).
        contract: the versions of the hook contract (``chitu_core/hookspecs.py``
            ``CONTRACT_VERSION``) the plugin was written for, as a version specifier
            (``">=1.0,<2"``); loading fails with ``ContractVersionError`` outside it.
            The default is the 1.x contract, which every plugin written before the
            contract was versioned implements.
        batch_invariant: the backend claims a sequence's outputs do not depend on the
            batch it runs in (same tokens and logits alone and among 15 others). The
            conformance suite always measures it; only a claimed one must hold.
    """

    name: str
    device_type: str
    dist_backend: str
    priority: int = 0
    compute_dtype: str = "bfloat16"
    has_native_fp8: bool = False
    supports_graphs: bool = False
    needs_certificate: bool = True
    # A literal, not derived from CONTRACT_VERSION: a 2.0 contract must refuse plugins
    # that never declared a range (they were written for 1.x).
    contract: str = DEFAULT_CONTRACT
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(
                f"backend name must be alphanumeric with '_' or '-', got {self.name!r}"
            )
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(
                f"compute_dtype must be bfloat16, float16 or float32, got {self.compute_dtype!r}"
            )
        parse_range(self.contract)  # ValueError for a malformed range


# ``--fp8-compute``: how FP8 weights meet the activations (see ``BackendOptions``).
FP8_COMPUTE_MODES = ("auto", "soft", "native")
FP8_COMPUTE_HELP = (
    "how FP8 weights are multiplied: 'soft' widens them to bf16 inside the GEMM (W8A16, "
    "any GPU); 'native' quantizes activations to e4m3 in 1x128 groups and uses FP8 tensor "
    "cores (W8A8, sm_89+); 'auto' (default) picks per GEMM shape and token count from the "
    "backend's measured table"
)


@dataclass(frozen=True)
class BackendOptions:
    """User choices that change how a backend computes, handed to it once at bind time
    (``chitu_configure``), never looked up per call.

    Attributes:
        fp8_compute: how an FP8-weight GEMM runs. ``"soft"``: weights widened to the
            compute dtype inside the kernel, activations untouched (W8A16; the only path
            on GPUs without FP8 arithmetic). ``"native"``: activations quantized to e4m3
            with 1x128 group scales and multiplied on FP8 hardware (W8A8) wherever the
            device has it. ``"auto"`` (default): per GEMM shape and token count, whichever
            the backend's measured table says is faster.
    """

    fp8_compute: str = "auto"

    def __post_init__(self) -> None:
        if self.fp8_compute not in FP8_COMPUTE_MODES:
            raise ValueError(
                f"fp8_compute must be one of {', '.join(FP8_COMPUTE_MODES)}, "
                f"got {self.fp8_compute!r}"
            )


@dataclass(frozen=True)
class OpPath:
    """How one op computes under the bound ``BackendOptions`` (``chitu_configure``'s answer).

    Attributes:
        description: one line for ``chitu plugins`` and the start-up log, e.g. ``"soft
            W8A16 for M < 128 tokens, native W8A8 from 128"``.
        fp8_activations: some calls quantize the activations to e4m3 with 1x128 group
            scales: conformance then holds the op's FP8-weight cases (and the whole-model
            check) to the ``fp8_act`` tolerance class of ``conformance/tolerances.py``
            instead of the compute dtype's; an op that does so without declaring it
            fails the stricter class.
    """

    description: str
    fp8_activations: bool = False
