"""Portable Triton kernels shared by GPU plugins (NVIDIA, Hygon): no vendor specifics here.

Importing this package imports nothing heavy; each kernel module imports
triton itself, so a machine without triton can still import chitu_core.
"""
