"""EC router selection: the Triton kernel and the topk twin against the stable-sort twin, and
the twin against ecserve.routing.expert_choice (the engine's own path)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton runs on the CPU only interpreted; set before jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ecserve_kernels as K

from ecserve.routing import expert_choice

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
gpu = pytest.mark.gpu
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_scores(g: int, n: int, e: int, seed: int, ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = torch.softmax(torch.randn(g, n, e, generator=gen) * 2, dim=-1)  # [G, n, E]
    if ties:  # few distinct values: most comparisons are ties, broken by token index
        s = (s * 4).round() / 4
    return s.to(DEV)


# (G, n, E, k): n = 1; k = 1; k = n; small and large groups; E not a power of two
SHAPES = [(1, 1, 4, 1), (3, 1, 8, 1), (2, 8, 4, 1), (2, 8, 4, 8), (4, 16, 8, 4),
          (2, 37, 6, 13), (1, 200, 8, 50), (1, 130, 3, 130)]


def assert_same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    assert a[0].dtype == b[0].dtype == torch.int64 and a[1].dtype == b[1].dtype == torch.float32
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])


@needs_triton
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("g", "n", "e", "k"), SHAPES)
def test_triton_matches_twin(g: int, n: int, e: int, k: int, ties: bool):
    s = make_scores(g, n, e, seed=n * 31 + k, ties=ties)
    assert_same(K.ec_select(s, k), K.ec_select_reference(s, k))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("g", "n", "e", "k"), SHAPES)
def test_topk_twin_matches_sort_twin(g: int, n: int, e: int, k: int, ties: bool):
    s = make_scores(g, n, e, seed=n * 7 + k, ties=ties)
    assert_same(K.ec_select_topk(s, k), K.ec_select_reference(s, k))


def test_all_ties_pick_lowest_tokens():
    s = torch.full((2, 9, 3), 0.25, device=DEV)
    idx, gate = K.ec_select_reference(s, 4)
    assert idx.tolist() == [[[0, 1, 2, 3]] * 3] * 2
    assert torch.all(gate == 0.25)
    assert_same(K.ec_select_topk(s, 4), (idx, gate))
    if K.HAS_TRITON:
        assert_same(K.ec_select(s, 4), (idx, gate))


@pytest.mark.parametrize("impl", ["triton", "topk"])
def test_ragged_groups_padding_and_group_k(impl: str):
    """Groups of 5, 2 and 7 tokens padded to 7 with -inf; each group's own k."""
    if impl == "triton" and not K.HAS_TRITON:
        pytest.skip("triton is not installed")
    sizes, ks = [5, 2, 7], [3, 2, 4]
    s = make_scores(3, 7, 4, seed=3, ties=True)
    for g, size in enumerate(sizes):
        s[g, size:] = float("-inf")
    group_k = torch.tensor(ks, device=DEV)
    fn = K.ec_select if impl == "triton" else K.ec_select_topk
    idx, gate = fn(s, 4, group_k)
    assert_same((idx, gate), K.ec_select_reference(s, 4, group_k))
    for g, (size, k) in enumerate(zip(sizes, ks, strict=True)):
        want_idx, want_gate = expert_choice(s[g, :size].cpu(), k)
        assert torch.equal(idx[g, :, :k].cpu(), want_idx)
        assert torch.equal(gate[g, :, :k].cpu(), want_gate)
        assert torch.all(idx[g, :, k:] == -1) and torch.all(gate[g, :, k:] == 0)


def test_padding_beyond_real_tokens_is_empty():
    s = make_scores(1, 4, 2, seed=1, ties=False)
    s[0, 2:] = float("-inf")  # 2 real tokens, k = 3: the third slot is empty
    idx, gate = K.ec_select_reference(s, 3)
    assert torch.all(idx[0, :, 2] == -1) and torch.all(gate[0, :, 2] == 0)
    assert_same(K.ec_select_topk(s, 3), (idx, gate))
    if K.HAS_TRITON:
        assert_same(K.ec_select(s, 3), (idx, gate))


@pytest.mark.parametrize(("n", "e", "k"), [(1, 4, 1), (8, 4, 4), (37, 8, 10), (64, 16, 64)])
def test_twin_matches_ecserve_expert_choice(n: int, e: int, k: int):
    s = make_scores(3, n, e, seed=k, ties=True)
    idx, gate = K.ec_select_reference(s, k)
    for g in range(3):
        want_idx, want_gate = expert_choice(s[g].cpu(), k)
        assert torch.equal(idx[g].cpu(), want_idx)
        assert torch.equal(gate[g].cpu(), want_gate)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        K.ec_select_reference(torch.zeros(1, 4, 2, dtype=torch.float16), 1)
    with pytest.raises(ValueError, match="k must be"):
        K.ec_select_topk(torch.zeros(1, 4, 2), 5)


@gpu
@on_gpu
@pytest.mark.parametrize(("g", "n", "e", "k"), [(1, 2048, 64, 64), (8, 256, 64, 8),
                                                (64, 16, 64, 1), (4, 4096, 8, 1024)])
def test_gpu_real_shapes(g: int, n: int, e: int, k: int):
    for ties in (False, True):
        s = make_scores(g, n, e, seed=k, ties=ties)
        want = K.ec_select_reference(s, k)
        assert_same(K.ec_select(s, k), want)
        assert_same(K.ec_select_topk(s, k), want)
