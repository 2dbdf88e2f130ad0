"""Selection at video scale: every selection that builds an n x n matrix holds it only within a memory budget
(``matrix_mb``; ``max_matrix_bytes`` here, 0 forcing the blockwise path) and above it works in blocks of rows with
O(n) extra memory, keeping exactly the tokens the dense formula keeps.

Each blockwise path is compared with the dense formula it replaced (written out here, as the code was) and with
the dense path of the code itself, on inputs larger than one block (``BLOCK_ROWS`` rows), with exact ties; then
the peak extra memory of each blockwise path is measured on a large input (the process's peak resident size,
reset before the call: ``/proc/self/clear_refs``) and held to a linear bound, well under one dense matrix."""
import gc
import os

import pytest
import torch

from vtr.bench.synthetic import _reset_peak, _rss
from vtr.kernels import reference as ref
from vtr.kernels.reference import BLOCK_ROWS
from vtr.methods.cdpruner import ConditionalKernel, conditional_kernel, greedy_dpp, quality
from vtr.methods.clustering import dpc_knn
from vtr.methods.visionzip import contextual_assignment
from vtr.methods.vispruner import remove_duplicates


# ------------------------------------------------------------------------------- the dense formulas, as they were
def greedy_maxmin_dense(x, k, dtype=torch.float32):
    n = x.shape[0]
    k = min(k, n)
    dist = ref.cosine_distance(x, dtype)
    nearest_other = dist.masked_fill(torch.eye(n, dtype=torch.bool), float("inf")).amin(0)
    first = int(torch.argmax(nearest_other)) if n > 1 else 0
    picks = [first]
    to_set = dist[first].clone()
    to_set[first] = float("-inf")
    for _ in range(k - 1):
        nxt = int(torch.argmax(to_set))
        picks.append(nxt)
        to_set = torch.minimum(to_set, dist[nxt])
        to_set[picks] = float("-inf")
    return torch.tensor(picks, dtype=torch.long)


def dpc_knn_dense(x, n_clusters, k, generator=None):
    x = x.double()
    n, dim = x.shape
    n_clusters = min(n_clusters, n)
    dist = torch.cdist(x[None], x[None])[0] / dim ** 0.5
    nearest = torch.topk(dist, min(k, n), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    density = density + torch.rand(n, generator=generator).to(density) * 1e-6
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, dist, dist.max()).amin(-1)
    centres = torch.topk(delta * density, n_clusters).indices
    assignment = dist[:, centres].argmin(-1)
    assignment[centres] = torch.arange(n_clusters)
    return centres, assignment


def remove_duplicates_dense(features, residual, target, step=8):
    while True:
        R = len(residual)
        drop = min(step, R - target)
        if drop <= 0:
            return residual
        a, b = residual[0::2], residual[1::2]
        similarity = (features[a] @ features[b].T).amax(-1)
        distinct = torch.sort(similarity, descending=True, stable=True).indices[drop:]
        residual = torch.cat([a[distinct], b])


def with_duplicates(n, d, seed=0):
    """``[n, d]`` features whose cosines are exact in any summation order, with many exact ties: each row has four
    entries of +-1 (norm 2, so unit entries are +-0.5 and dot products are sums of +-0.25), rows repeated and
    scaled (a scaled copy normalises to the same unit row), n larger than two blocks and not a multiple of one."""
    g = torch.Generator().manual_seed(seed)
    m = n // 3 + 1
    base = torch.zeros(m, d)
    cols = torch.rand(m, d, generator=g).argsort(-1)[:, :4]
    signs = torch.randint(0, 2, (m, 4), generator=g).float() * 2 - 1
    base.scatter_(1, cols, signs)
    return torch.cat([base, base * 2, base * 3])[:n]


SIZES = [2 * BLOCK_ROWS + 2, 2 * BLOCK_ROWS + 300]  # a last block of 2 rows (padded product), and of 300


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("n", SIZES)
def test_divprune_blockwise_equals_dense(n):
    x = torch.randn(n, 48, generator=torch.Generator().manual_seed(n))
    for k in (1, 40, n // 8):
        want = greedy_maxmin_dense(x, k)
        assert torch.equal(ref.greedy_maxmin(x, k, max_matrix_bytes=0), want), k  # blockwise
        assert torch.equal(ref.greedy_maxmin(x, k), want), k  # the dense matrix, within the default budget
    ties = with_duplicates(n, 12)
    for k in (1, n // 4):
        want = greedy_maxmin_dense(ties, k)
        assert torch.equal(ref.greedy_maxmin(ties, k, max_matrix_bytes=0), want), k
        assert torch.equal(ref.greedy_maxmin(ties, k), want), k


def test_divprune_blockwise_equals_dense_model_dtype():
    x = torch.randn(BLOCK_ROWS + 40, 32, generator=torch.Generator().manual_seed(1))
    want = greedy_maxmin_dense(x, 30, torch.bfloat16)
    assert torch.equal(ref.greedy_maxmin(x, 30, torch.bfloat16, max_matrix_bytes=0), want)
    assert torch.equal(ref.greedy_maxmin(x, 30, torch.bfloat16), want)


@pytest.mark.parametrize("n,d", [(5, 3), (600, 64), (2 * BLOCK_ROWS + 2, 96), (1500, 4096)])
def test_the_symmetric_gram_matrix_is_the_full_products_floats(n, d):
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(n)), dim=-1)
    assert torch.equal(ref.gram(x), x @ x.T)


def test_the_matrix_budget_decides_the_path():
    assert ref.fits(16384) and not ref.fits(16385)  # 1 GiB of fp32 by default
    assert ref.fits(100, budget=100 * 100 * 4) and not ref.fits(100, budget=100 * 100 * 4 - 1)
    assert ref.maxmin_start(torch.randn(64, 8))[2] is not None
    assert ref.maxmin_start(torch.randn(64, 8), max_matrix_bytes=64 * 64 * 4 - 1)[2] is None


def test_triton_divprune_blockwise_equals_reference_and_dense():
    pytest.importorskip("triton")
    from vtr.kernels import triton_ops
    n = SIZES[0]  # more rows than one block of the distances (1024) and of the Triton program (2048)
    for x in (torch.randn(n, 24, generator=torch.Generator().manual_seed(3)), with_duplicates(n, 12)):
        for k in (1, 2, 25):
            want = greedy_maxmin_dense(x, k)
            for budget in (0, None):  # blockwise, and the dense matrix in one program
                got = triton_ops.greedy_maxmin(x, k, max_matrix_bytes=budget)
                assert torch.equal(got, ref.greedy_maxmin(x, k, max_matrix_bytes=budget)) and torch.equal(got, want)


@pytest.mark.parametrize("n", SIZES)
def test_dpc_knn_blockwise_equals_dense(n):
    x = torch.randn(n, 24, generator=torch.Generator().manual_seed(n))
    x[BLOCK_ROWS: BLOCK_ROWS + 300] = x[:300]  # exact duplicates across blocks
    for clusters in (1, n // 10 + 1):
        want = dpc_knn_dense(x, clusters, clusters, torch.Generator().manual_seed(0))
        for budget in (0, None):  # blockwise, and the matrix computed once within the default budget
            got = dpc_knn(x, clusters, clusters, torch.Generator().manual_seed(0), max_matrix_bytes=budget)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), budget


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_cdpruner_kernel_rows_equal_dense(n, weight):
    g = torch.Generator().manual_seed(n)
    if weight:
        features = torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=-1)
        features[BLOCK_ROWS: BLOCK_ROWS + 500] = features[:500].clone()  # exact duplicates across blocks
    else:  # uniform quality: every diagonal entry is 1 up to rounding, so the first pick is decided by rounding
        # in any implementation; features whose products are exact in any order make it a tie, to the lowest index
        features = torch.nn.functional.normalize(with_duplicates(n, 128), dim=-1)
    relevance = torch.rand(n, generator=g)
    dense = conditional_kernel(features @ features.T, relevance, weight)
    rows = ConditionalKernel(features, quality(relevance, weight))
    torch.testing.assert_close(rows.diagonal(), torch.diagonal(dense), rtol=1e-6, atol=0)  # O(n C), last bits
    # Within the kernel's rank (128): past it the remaining gains are rounding noise in any implementation (the
    # official code takes square roots of negative gains there), so only the dense path (images) is pinned there.
    for k in (1, 20, 100):
        assert torch.equal(greedy_dpp(rows, k), greedy_dpp(dense, k)), k


def test_cdpruner_dense_path_equals_the_row_path_and_the_dense_formula():
    """Within ``matrix_mb`` the kernel is built once (a symmetric Gram product, in place); above it served a row
    per pick: the same picks as each other and as the dense formula."""
    from vtr.methods.cdpruner import CDPruner
    n = SIZES[1]
    g = torch.Generator().manual_seed(7)
    features = torch.nn.functional.normalize(torch.randn(n, 96, generator=g), dim=-1)
    text = torch.randn(1, 96, generator=g)
    relevance = torch.nn.functional.normalize(features @ text.T, dim=0)[:, 0]
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    want = greedy_dpp(conditional_kernel(features @ features.T, relevance, 1.0), 60)
    for budget in (1024, 0):
        got = CDPruner(keep=60, matrix_mb=budget)._select(features, relevance, None, 60)
        assert torch.equal(got, want), budget


def test_cdpruner_uses_the_dense_kernel_within_its_budget(monkeypatch):
    from vtr.methods import cdpruner
    features = torch.nn.functional.normalize(torch.randn(BLOCK_ROWS, 16, generator=torch.Generator().manual_seed(0)),
                                             dim=-1)
    picks = cdpruner.CDPruner(keep=40)._select(features, None, None, 40)  # no text: uniform relevance; rank 16 < 40
    ones = torch.ones(BLOCK_ROWS)
    assert torch.equal(picks, greedy_dpp(conditional_kernel(features @ features.T, ones, 1.0), 40))
    built = []
    monkeypatch.setattr(cdpruner, "ConditionalKernel", lambda *a: built.append(a) or ConditionalKernel(*a))
    cdpruner.CDPruner(keep=40, matrix_mb=4)._select(features, None, None, 40)  # 4 MiB needed
    assert not built
    cdpruner.CDPruner(keep=40, matrix_mb=3)._select(features, None, None, 40)
    assert len(built) == 1


def test_vispruner_blockwise_equals_dense():
    n = 2 * BLOCK_ROWS * 2 + 10  # A and B halves each larger than two blocks
    features = torch.nn.functional.normalize(with_duplicates(n, 16), dim=-1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(remove_duplicates(features, order, n - 20), remove_duplicates_dense(features, order, n - 20))


@pytest.mark.parametrize("n,target", [(576, 32), (1100, 60), (2 * BLOCK_ROWS + 300, 40)])
@pytest.mark.parametrize("neighbours", [64, 2])
def test_vispruner_nearest_neighbour_rounds_equal_the_official_products(n, target, neighbours):
    """Random features (no exact arithmetic): rounds that read each A token's nearest tokens (and, for one none of
    whose ``neighbours`` is in B, its products with B: most of them with 2 neighbours) keep what the rounds that
    multiply A by B keep, round after round, down to a small target."""
    features = torch.nn.functional.normalize(torch.randn(n, 64, generator=torch.Generator().manual_seed(n)), dim=-1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    want = remove_duplicates_dense(features, order, target)
    assert torch.equal(remove_duplicates(features, order, target, neighbours=neighbours), want)


def test_visionzip_blockwise_equals_dense():
    keys = torch.nn.functional.normalize(with_duplicates(2 * BLOCK_ROWS + 500, 16), dim=-1)
    for contextual in (1, 7, 300):
        targets, members, assign = contextual_assignment(keys, contextual)
        assert torch.equal(assign, (keys[members] @ keys[targets].T).argmax(-1))


# ------------------------------------------------------------------------------------------------ memory
def peak_extra_bytes(fn):
    """Peak growth of the process's resident size while ``fn()`` runs (Linux: ``/proc/self/clear_refs`` resets the
    high-water mark; the scaling tool's own measurement)."""
    gc.collect()
    base = _rss("VmRSS")
    _reset_peak()
    fn()
    return _rss("VmHWM") - base


memory = pytest.mark.skipif(not _reset_peak(), reason="needs Linux /proc/self/clear_refs")
N, D = 8192, 64


@memory
def test_divprune_memory_is_linear():
    x = torch.randn(N, D)
    torch.set_num_threads(torch.get_num_threads())
    dense = peak_extra_bytes(lambda: greedy_maxmin_dense(x, 8))
    blockwise = peak_extra_bytes(lambda: ref.greedy_maxmin(x, 8, max_matrix_bytes=0))
    budgeted = peak_extra_bytes(lambda: ref.greedy_maxmin(x, 8))  # the dense path: its one matrix, in place
    # about one matrix: a few pages of it may be ones the process already held resident (freed by an earlier test
    # in the same worker), which its resident size does not count again (measured: 36 kB short of N * N * 4)
    assert 0.9 * N * N * 4 < budgeted < 1.5 * N * N * 4, budgeted
    assert dense > N * N * 4  # the measurement sees the dense matrix
    bound = 3 * BLOCK_ROWS * N * 4 + 4 * N * D * 4  # a block of distances and its temporaries, copies of x
    assert blockwise < bound < N * N * 4, (blockwise, bound)


@memory
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU runs interpreted")
def test_triton_divprune_memory_is_linear():
    pytest.importorskip("triton")
    from vtr.kernels import triton_ops
    x = torch.randn(N, D)
    blockwise = peak_extra_bytes(lambda: triton_ops.greedy_maxmin(x, 3, max_matrix_bytes=0))
    assert blockwise < 3 * BLOCK_ROWS * N * 4 + 4 * N * D * 4 < N * N * 4, blockwise


@memory
def test_dpc_knn_memory_is_linear():
    x = torch.randn(N, D)
    extra = peak_extra_bytes(lambda: dpc_knn(x, 8, 8, torch.Generator().manual_seed(0), max_matrix_bytes=0))
    bound = 4 * BLOCK_ROWS * N * 8 + 4 * N * D * 8  # fp64: blocks of distances and cdist's temporaries
    assert extra < bound < N * N * 8, (extra, bound)


@memory
def test_cdpruner_memory_is_linear_in_tokens():
    features = torch.nn.functional.normalize(torch.randn(N, D), dim=-1)
    k = 16
    extra = peak_extra_bytes(lambda: greedy_dpp(ConditionalKernel(features, torch.rand(N)), k))
    bound = 3 * BLOCK_ROWS * N * 4 + k * N * 4 + 4 * N * D * 4  # blocks, the Cholesky rows (O(N k)), copies
    assert extra < bound < N * N * 4, (extra, bound)


@memory
def test_vispruner_and_visionzip_memory_is_linear():
    features = torch.nn.functional.normalize(torch.randn(2 * N, D), dim=-1)
    order = torch.arange(2 * N)
    extra = peak_extra_bytes(lambda: remove_duplicates(features, order, 2 * N - 8))
    assert extra < 3 * BLOCK_ROWS * N * 4 + 8 * N * D * 4 < N * N * 4, extra
    extra = peak_extra_bytes(lambda: contextual_assignment(features, N))
    assert extra < 3 * BLOCK_ROWS * N * 4 + 8 * N * D * 4 < N * N * 4, extra


def test_cdpruner_refuses_clearly_when_the_cholesky_rows_do_not_fit(monkeypatch):
    features = torch.nn.functional.normalize(torch.randn(64, 8), dim=-1)
    real_zeros = torch.zeros

    def failing_zeros(*shape, **kwargs):
        if shape == (5, 64):
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return real_zeros(*shape, **kwargs)

    monkeypatch.setattr(torch, "zeros", failing_zeros)
    with pytest.raises(MemoryError, match="split_threshold"):
        greedy_dpp(ConditionalKernel(features, torch.ones(64)), 5)
