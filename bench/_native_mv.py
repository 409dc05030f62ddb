"""A native one-token experts kernel for ``bench/decode_gemv.py --native`` (bench only; moelab itself
ships no compiled code): does a C++/OpenMP loop over the active experts' slices read them faster
than PyTorch's per-slice ``torch.mv``?

``slices_mv(w_EOI, ids_K, v_KI) -> out_KO``: ``out[k] = w[ids[k]] @ v[k]`` (``v`` of one row: the
same vector for every k), all K*O dot products along contiguous rows in one OpenMP parallel region
(one fork/join instead of one per slice). The one-token forward is three calls: gate and up on x,
the activation in PyTorch, then down on the weighted activations, summed over k.

Built with ``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ``pip install ninja``;
about 30 s the first time, cached under ``TORCH_EXTENSIONS_DIR`` after).
"""

from __future__ import annotations

import torch.nn.functional as F

_SOURCE = r"""
#include <torch/extension.h>

template <typename T>
static void slices_mv_impl(const T* w, const int64_t* ids, const T* v, int64_t v_stride, T* out,
                           int64_t K, int64_t O, int64_t I) {
  #pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < K * O; ++r) {
    const int64_t k = r / O, o = r % O;
    const T* row = w + (ids[k] * O + o) * I;
    const T* vk = v + k * v_stride;
    T acc = 0;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < I; ++i) acc += row[i] * vk[i];
    out[r] = acc;
  }
}

torch::Tensor slices_mv(torch::Tensor w, torch::Tensor ids, torch::Tensor v) {
  TORCH_CHECK(w.is_contiguous() && v.is_contiguous() && ids.scalar_type() == torch::kLong);
  const int64_t K = ids.size(0), O = w.size(1), I = w.size(2);
  auto out = torch::empty({K, O}, w.options());
  const int64_t v_stride = v.size(0) == 1 ? 0 : v.stride(0);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "slices_mv", [&] {
    slices_mv_impl<scalar_t>(w.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), v.data_ptr<scalar_t>(),
                             v_stride, out.data_ptr<scalar_t>(), K, O, I);
  });
  return out;
}
"""


def build():
    """The compiled module (``slices_mv``); a clear error where it cannot be built."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline("moelab_bench_slices_mv", cpp_sources=_SOURCE, functions=["slices_mv"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"--native: could not build the kernel ({e}); it needs a C++ compiler and "
                         "`pip install ninja`") from e


def native_forward(mod, x_H, ids_K, w_K1, gate_EIH, up_EIH, down_EHI):
    """``y_H = sum_k w_k down_e(silu(gate_e x) * up_e x)`` by three ``slices_mv`` calls."""
    x_1H = x_H.unsqueeze(0)
    a_KI = F.silu(mod.slices_mv(gate_EIH, ids_K, x_1H)).mul_(mod.slices_mv(up_EIH, ids_K, x_1H)).mul_(w_K1)
    return mod.slices_mv(down_EHI, ids_K, a_KI).sum(0)


__all__ = ["build", "native_forward"]
