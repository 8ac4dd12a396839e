"""Chitu backend for Huawei Ascend NPUs through torch_npu."""

__version__ = "0.1.0"
