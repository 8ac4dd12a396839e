"""What a backend says about itself (returned by the ``chitu_backend_info`` hook)."""

from __future__ import annotations

from dataclasses import dataclass


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
    """

    name: str
    device_type: str
    dist_backend: str
    priority: int = 0
    compute_dtype: str = "bfloat16"
    has_native_fp8: bool = False
    supports_graphs: bool = False
    needs_certificate: bool = True

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(
                f"backend name must be alphanumeric with '_' or '-', got {self.name!r}"
            )
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(
                f"compute_dtype must be bfloat16, float16 or float32, got {self.compute_dtype!r}"
            )
