"""GPU checks (skipped without CUDA; CI has no GPU): the exactness test under SDPA and FlashAttention-2 in half
precision, and the Triton kernels on the device against their references. Run with benchmarks/gpu_checks.sh."""
import pytest
import torch

import reference as R
import tiny_models as tm
import vtr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def backends():
    yield "sdpa"
    try:
        import flash_attn  # noqa: F401
        yield "flash_attention_2"
    except ImportError:
        pass


@pytest.mark.parametrize("attn", list(backends()))
@pytest.mark.parametrize("family", tm.FAMILIES)
@pytest.mark.parametrize("method", ["divprune", "fastv", "dart"])
@pytest.mark.parametrize("batch", [1, 2])
def test_pruned_equals_reference_on_gpu(method, family, attn, batch):
    model, proc = tm.build(family, attn=attn)
    model = model.to("cuda", torch.bfloat16)
    inputs = tm.image_inputs(family, proc, batch).to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with vtr.patch(model, method, ratio=0.75) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    # The reference runs the same weights on the kept tokens under sdpa (the layer-stage reference passes explicit
    # additive 4-D masks, which FlashAttention does not take); the tolerance covers the backends' rounding.
    model.set_attn_implementation("sdpa")
    lm_inputs = R.capture_lm_inputs(model, inputs, generate=True)
    _, expected, _ = R.reference_for(model, handle.method, lm_inputs, handle.last.index, 4)
    got = torch.stack(out.logits, 1).float()
    assert (got - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()


def test_triton_kernels_match_references_on_gpu():
    from vtr.kernels import reference, triton_ops
    assert triton_ops.AVAILABLE
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 640, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    keep = torch.rand(2, 640, device="cuda", generator=g) > 0.7
    index = reference.compaction_index(keep)
    assert torch.equal(triton_ops.compaction_index(keep), index)
    assert torch.equal(triton_ops.gather_rows(x, index), reference.gather_rows(x, index))
    q = torch.randn(2, 32, 1, 128, device="cuda", generator=g)
    k = torch.randn(2, 8, 640, 128, device="cuda", generator=g)
    got = triton_ops.attention_scores(q, k, keep, 128 ** -0.5)
    assert torch.allclose(got, reference.attention_scores(q, k, keep, 128 ** -0.5), atol=1e-5)
    feats = torch.randn(576, 4096, device="cuda", generator=g)
    assert torch.equal(triton_ops.greedy_maxmin(feats, 64), reference.greedy_maxmin(feats, 64))
    n, d = 8192, 256  # blockwise (no matrix budget): O(n) memory
    video = torch.randn(n, d, device="cuda", generator=g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    picks = triton_ops.greedy_maxmin(video, 300, max_matrix_bytes=0)
    bound = 4 * reference.BLOCK_ROWS * n * 4 + 2 * n * d * 4  # blocks of distances, the unit rows
    assert torch.cuda.max_memory_allocated() - base < bound < n * n * 4  # below one dense distance matrix
    assert torch.equal(picks, reference.greedy_maxmin(video, 300, max_matrix_bytes=0))
    # within the default budget: the one dense matrix, the same picks as the reference's dense path
    assert torch.equal(triton_ops.greedy_maxmin(video, 300), reference.greedy_maxmin(video, 300))
    pool = torch.arange(8, 576, device="cuda")
    pivots = torch.arange(8, device="cuda")
    assert torch.equal(triton_ops.pivot_least_similar(feats, pivots, pool, 15),
                       reference.pivot_least_similar(feats, pivots, pool, 15))
