"""Every Triton op against its PyTorch reference (CPU, TRITON_INTERPRET=1 set by conftest before the import).

Shapes are small because interpreted kernels cost time per program; a few cases use sizes above the kernels'
block sizes to exercise the multi-block paths."""
import pytest
import torch

pytest.importorskip("triton")

import vtr.kernels  # noqa: E402
from vtr.kernels import reference as ref  # noqa: E402
from vtr.kernels import triton_ops as tri  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows


def ragged_index(B, L, p=0.6, width=None):
    """A compaction-style index: rows left-padded with -1, then ascending kept slots."""
    keep = torch.rand(B, L) < p
    keep[0, :] = True  # one full row
    if B > 2:
        keep[2, :] = False  # one empty row
    return ref.compaction_index(keep)


def sample(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) < 0.5
    if dtype == torch.long:
        return torch.randint(-1000, 1000, shape)
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.long, torch.bool])
@pytest.mark.parametrize("trailing", [(), (5,), (3, 7)])
@pytest.mark.parametrize("x_batch", [1, 3])
def test_gather_rows(dtype, trailing, x_batch):
    index = ragged_index(3, 11)
    x = sample((x_batch, 11, *trailing), dtype)
    fill = False if dtype == torch.bool else (-100 if dtype == torch.long else 0.5)
    for f in (fill, 0) if dtype != torch.bool else (False, True):
        out = tri.gather_rows(x, index, f)
        assert out.dtype == dtype and out.shape == (3, index.shape[1], *trailing)
        assert torch.equal(out, ref.gather_rows(x, index, f))


def test_gather_rows_wide_and_strided():
    index = ragged_index(2, 9)
    x = torch.randn(2, 9, 2600, dtype=torch.bfloat16)  # feature dim > block, not a multiple of it
    assert torch.equal(tri.gather_rows(x, index), ref.gather_rows(x, index))
    y = torch.randn(2, 6, 9).transpose(1, 2)  # non-contiguous [2, 9, 6]
    assert torch.equal(tri.gather_rows(y, index, -1.0), ref.gather_rows(y, index, -1.0))
    z = torch.randn(1, 9, 4).expand(2, 9, 4)  # stride-0 batch
    assert torch.equal(tri.gather_rows(z, index), ref.gather_rows(z, index))
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert tri.gather_rows(x, empty).shape == (2, 0, 2600)


@pytest.mark.parametrize("mrope", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_gather_positions(mrope, batch):
    index = ragged_index(4, 13)
    positions = torch.arange(13).repeat(batch, 1) + torch.arange(batch)[:, None]
    if mrope:
        positions = torch.stack([positions, positions * 2, positions + 7])
    out = tri.gather_positions(positions, index)
    assert torch.equal(out, ref.gather_positions(positions, index))
    assert torch.equal(tri.gather_positions(positions, index, fill=0), ref.gather_positions(positions, index, 0))


@pytest.mark.parametrize("B,L", [(1, 1), (4, 37), (3, 300), (2, 5000)])
def test_compaction_index(B, L):
    for p in (0.0, 0.3, 0.9, 1.0):
        keep = torch.rand(B, L) < p
        if B > 1 and 0 < p < 1:
            keep[-1] = False
        assert torch.equal(tri.compaction_index(keep), ref.compaction_index(keep))
    assert tri.compaction_index(torch.zeros(0, 5, dtype=torch.bool)).shape == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_scores(dtype, gqa, causal):
    B, H, R, L, d = 2, 4, 2, 100, 128  # L spans two key blocks of 64, the last one partial
    q = (torch.randn(B, R, H, d) * 2).to(dtype).transpose(1, 2)  # non-contiguous, as after a projection
    k = (torch.randn(B, H // gqa, L, d) * 2).to(dtype)
    key_mask = torch.rand(B, L) < 0.8
    key_mask[1, :10] = False  # left padding
    q_positions = torch.tensor([[0, L - 1], [10, 70]]) if causal else None
    for reduce in ("mean", "sum", "max"):
        expected = ref.attention_scores(q, k, key_mask, d ** -0.5, reduce, q_positions)
        got = tri.attention_scores(q, k, key_mask, d ** -0.5, reduce, q_positions)
        assert got.dtype == torch.float32 and got.shape == (B, R, L)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    got = tri.attention_scores(q, k, None, 0.1, "mean", q_positions)
    torch.testing.assert_close(got, ref.attention_scores(q, k, None, 0.1, "mean", q_positions), rtol=1e-5, atol=1e-7)


def test_attention_scores_fully_masked_row_is_nan_like_reference():
    q, k = torch.randn(2, 2, 2, 16), torch.randn(2, 1, 20, 16)
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1] = False  # batch 1 sees no key at all
    q_positions = torch.tensor([[-1, 19], [5, 19]])  # (0, 0) sees nothing either
    for reduce in ("mean", "sum", "max"):
        expected = ref.attention_scores(q, k, key_mask, 0.25, reduce, q_positions)
        got = tri.attention_scores(q, k, key_mask, 0.25, reduce, q_positions)
        assert expected[1].isnan().all() and expected[0, 0].isnan().all() and not expected[0, 1].isnan().any()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, equal_nan=True)
    with pytest.raises(ValueError):
        tri.attention_scores(q, k, None, 0.25, "median")


@pytest.mark.parametrize("n,D", [(1, 8), (2, 8), (37, 24), (100, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_maxmin(n, D, dtype):
    x = torch.randn(n, D).to(dtype)
    for k in sorted({0, 1, 2, n // 2, n - 1, n, n + 5}):
        got = tri.greedy_maxmin(x, k)
        assert torch.equal(got, ref.greedy_maxmin(x, k)), k
        assert len(set(got.tolist())) == len(got) == min(max(k, 0), n)


def test_greedy_maxmin_ties_and_multiple_blocks():
    base = torch.randn(30, 16)
    x = torch.cat([base, base[:10], base[:10] * 3])  # exact duplicates: distance ties, lowest index must win
    for k in (1, 15, 45, 50):
        assert torch.equal(tri.greedy_maxmin(x, k), ref.greedy_maxmin(x, k))
    x = torch.randn(2100, 8)  # more rows than one block (2048), not a multiple of it
    assert torch.equal(tri.greedy_maxmin(x, 6), ref.greedy_maxmin(x, 6))


@pytest.mark.parametrize("M,P,C", [(40, 1, 30), (64, 3, 50), (100, 8, 85)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pivot_least_similar(M, P, C, dtype):
    x = torch.randn(M, 32).to(dtype)
    perm = torch.randperm(M)
    pivots, pool = perm[:P], perm[P:P + C]  # pivots in arbitrary (set) order, pool not sorted
    for per_pivot in sorted({0, 1, 3, C // P, C // P + 1, C + 10}):
        got = tri.pivot_least_similar(x, pivots, pool, per_pivot)
        assert torch.equal(got, ref.pivot_least_similar(x, pivots, pool, per_pivot)), per_pivot
        assert len(set(got.tolist())) == len(got) == min(P * per_pivot, C)


def test_pivot_least_similar_edges():
    base = torch.randn(20, 16)
    x = torch.cat([base, base, -base[:5]])  # duplicated rows: equal similarities, earlier pool entry first
    pivots, pool = torch.tensor([3, 0, 7]), torch.arange(8, 45)
    for per_pivot in (1, 4, 20):
        assert torch.equal(tri.pivot_least_similar(x, pivots, pool, per_pivot),
                           ref.pivot_least_similar(x, pivots, pool, per_pivot))
    empty = torch.zeros(0, dtype=torch.long)
    assert tri.pivot_least_similar(x, pivots, empty, 4).shape == (0,)
    assert tri.pivot_least_similar(x, empty, pool, 4).shape == (0,)
    x = torch.randn(2200, 8)  # pool larger than one block (2048)
    pivots, pool = torch.tensor([5, 2]), torch.arange(10, 2200)
    assert torch.equal(tri.pivot_least_similar(x, pivots, pool, 3), ref.pivot_least_similar(x, pivots, pool, 3))


def test_dispatch_routes_to_triton(monkeypatch):
    calls = []
    for name in ("gather_rows", "gather_positions", "compaction_index", "attention_scores", "greedy_maxmin",
                 "pivot_least_similar"):
        fused = getattr(tri, name)
        monkeypatch.setattr(tri, name, lambda *a, _f=fused, _n=name, **kw: calls.append(_n) or _f(*a, **kw))

    x, keep = torch.randn(2, 9, 4), torch.rand(2, 9) < 0.5
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16)
    feats = torch.randn(20, 8)

    def run_all():
        index = vtr.kernels.compaction_index(keep)
        return [index, vtr.kernels.gather_rows(x, index), vtr.kernels.gather_positions(torch.arange(9)[None], index),
                vtr.kernels.attention_scores(q, k, keep, 0.25, "mean"), vtr.kernels.greedy_maxmin(feats, 5),
                vtr.kernels.pivot_least_similar(feats, torch.tensor([1, 0]), torch.arange(2, 20), 3)]

    monkeypatch.setenv("VTR_KERNELS", "torch")
    assert vtr.kernels.backend(x) == "torch"
    expected = run_all()
    assert calls == []
    monkeypatch.setenv("VTR_KERNELS", "triton")
    assert vtr.kernels.backend(x) == "triton"
    got = run_all()
    assert sorted(set(calls)) == sorted(["gather_rows", "gather_positions", "compaction_index", "attention_scores",
                                         "greedy_maxmin", "pivot_least_similar"])
    for a, b in zip(got, expected):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(a, b)
    monkeypatch.setenv("VTR_KERNELS", "auto")
    assert vtr.kernels.backend(x) == "torch"  # CPU tensors use the reference by default
