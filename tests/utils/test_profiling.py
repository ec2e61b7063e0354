"""The profile summary: kernel names sorted into categories, busy vs wall time, by hand."""

import pytest

from lightning_qpeft.utils.profiling import category, summarise


@pytest.mark.parametrize("kernel, expected", [
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, ...)", "4-bit dequantize"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NTN", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("void kOptimizer32bit2State<float, 4, 4096, 8>(...)", "optimizer"),
    ("_fused_linear_cross_entropy_kernel (triton)", "triton (liger / compile)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<...>>", "element-wise and other"),
])
def test_kernel_categories(kernel, expected):
    assert category(kernel) == expected


def test_summary_splits_busy_time_and_reports_idle():
    times = {"sm90_xmma_gemm_a": 0.6, "kDequantizeBlockwise": 0.2, "vectorized_elementwise_kernel": 0.2}
    summary, text = summarise(times, wall_s=2.0, steps=2)
    assert summary["gpu_busy_s_per_step"] == pytest.approx(0.5)
    assert summary["gpu_idle_fraction"] == pytest.approx(0.5)
    assert summary["categories_s_per_step"] == pytest.approx({"matmul": 0.3, "4-bit dequantize": 0.1,
                                                              "element-wise and other": 0.1})
    assert list(summary["categories_s_per_step"])[0] == "matmul"
    assert "idle 50.0 %" in text and "matmul" in text


def test_annotation_ranges_are_not_kernels():
    from lightning_qpeft.utils.profiling import is_annotation

    assert is_annotation("Optimizer.step#PagedAdamW32bit.step") and is_annotation("ProfilerStep#3")
    assert is_annotation("FullyShardedDataParallel.forward")
    assert not is_annotation("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*)")
    assert not is_annotation("void kOptimizer32bit2State<float, 0>(float*, float*)")
