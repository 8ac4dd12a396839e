"""The serving CPU backend: chosen by ``auto`` without an accelerator, and exact where it
differs from the generic ops (decode attention over the blocks in use only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chitu_core.backend import discover_backends, load_backend
from chitu_core.demo_model import write_demo_model
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams

BLOCK = 4


@pytest.fixture(scope="module")
def cpu():
    return load_backend("cpu")


@pytest.fixture(scope="module")
def ref():
    return load_backend("cpu_ref")


def test_auto_picks_cpu_over_the_oracle_without_an_accelerator(cpu):
    backends = discover_backends()
    assert backends["cpu"].info.priority > backends["cpu_ref"].info.priority
    accelerators = [b for b in backends.values() if b.is_available and b.info.device_type != "cpu"]
    if not accelerators:
        assert load_backend("auto").info.name == "cpu"
    assert cpu.info.compute_dtype == "bfloat16" and cpu.info.needs_certificate
    assert set(cpu.native) == {"paged_attention_decode", "mla_decode", "rope"}


def _wide_tables(lens: list[int], width: int, num_blocks: int) -> torch.Tensor:
    """Block tables ``width`` wide (as the engine sizes them for max_model_len): each
    sequence's own blocks, then garbage the spec says is ignored."""
    gen = torch.Generator().manual_seed(1)
    tables = torch.randint(-5, 10_000, (len(lens), width), generator=gen, dtype=torch.int32)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    start = 0
    for b, n in enumerate(lens):
        used = -(-n // BLOCK)
        tables[b, :used] = perm[start : start + used]
        start += used
    return tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[5, 1, 12], [1], [], [16, 3]])
def test_decode_attention_over_wide_tables_matches_the_oracle(cpu, ref, dtype, lens):
    num_blocks, hq, hkv, d, dv = 12, 4, 2, 8, 6
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(num_blocks, BLOCK, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, hkv, dv, generator=gen).to(dtype)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    tables = _wide_tables(lens, 64, num_blocks)
    ctx = torch.tensor(lens, dtype=torch.int32)
    out = cpu.paged_attention_decode(q, k_cache, v_cache, tables, ctx, 0.3)
    # The oracle reads only each sequence's own blocks: give it tables cut to those.
    used = max(1, -(-max(lens, default=0) // BLOCK))
    expected = ref.paged_attention_decode(q, k_cache, v_cache, tables[:, :used], ctx, 0.3)
    assert out.shape == (len(lens), hq, dv) and out.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
    torch.testing.assert_close(out, expected, **tol)


def test_mla_decode_over_wide_tables_matches_the_oracle(cpu, ref):
    lens = [7, 1, 10]
    gen = torch.Generator().manual_seed(2)
    latent = torch.randn(12, BLOCK, 1, 16 + 4, generator=gen)
    q_latent, q_rope = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 4, 4, generator=gen)
    tables = _wide_tables(lens, 40, 12)
    ctx = torch.tensor(lens, dtype=torch.int32)
    out = cpu.mla_decode(q_latent, q_rope, latent, tables, ctx, 0.2)
    expected = ref.mla_decode(q_latent, q_rope, latent, tables[:, :3], ctx, 0.2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_greedy_tokens_match_the_oracle_in_fp32(tmp_path: Path, arch: str):
    model = write_demo_model(tmp_path / arch, arch, "tiny")
    prompts = [[5, 9, 2, 7], [3] * 19]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("cpu", "cpu_ref"):
        config = EngineConfig(model=model, backend=backend, dtype="float32", show_progress=False)
        with LLMEngine(config) as engine:
            tokens[backend] = [c.token_ids for c in engine.generate(prompts, params)]
    assert tokens["cpu"] == tokens["cpu_ref"]


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("shapes", [((3, 9, 64), (3, 3, 64)), ((2, 4, 16), (2, 1, 16))])
def test_rope_equals_the_generic_op_bit_for_bit(cpu, neox, shapes):
    from chitu_core.ops.small import rope

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(*shapes[0], generator=gen).bfloat16()
    k = torch.randn(*shapes[1], generator=gen).bfloat16()
    cache = torch.randn(64, 8, generator=gen)  # rotary dim 8 < head dim: partial rotary
    positions = torch.tensor([5, 63, 0][: q.shape[0]])
    for got, want in zip(
        cpu.rope(q, k, positions, cache, neox), rope(q, k, positions, cache, neox), strict=True
    ):
        assert got.shape == want.shape and torch.equal(got, want)
