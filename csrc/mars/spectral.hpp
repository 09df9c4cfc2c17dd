// Per-channel largest singular value of a convolution / linear weight.
//
// The weight is C-contiguous with shape (out, rows, cols): channel k's matrix M_k is the
// (rows x cols) block starting at w + k * rows * cols, where rows = weight.shape[1] (input
// channels per group) and cols = prod(kernel) (1 for a Linear layer, whose per-row matrix is a
// column vector so sigma = ||row||_2). result[k] = sigma_max(M_k) * scale[k] (scale may be null).
//
// Method: the fp64 Gram matrix of the smaller side (cols <= rows: M^T M, cols x cols; otherwise
// M M^T, rows x rows), then its largest eigenvalue, sigma = sqrt(max(lambda, 0)). Products of
// float32 values are exact in fp64, so for float32 input only the fp64 summation rounds. float64
// input whose magnitude would overflow or underflow the squares is rescaled by an exact power of
// two first. A channel containing NaN or Inf yields NaN.
//
// Speed: the Gram is built by register-tiled fused multiply-adds over rows staged in fp64 blocks
// (3x3 kernels: the float32 -> fp64 conversion is fused with the widest tile, and the next block
// is prefetched while the current one is computed); the eigenvalue comes from Householder
// tridiagonalisation + Laguerre iteration for 4 channels at once, one per SIMD lane (topeig.hpp).
//
// Channels are distributed over threads with mars::parallel::parallel_for; each channel is
// computed by exactly one thread with a fixed summation order, and SIMD lanes never interact, so
// results are bit-identical for any thread count.
#pragma once

#include <cstdint>

namespace mars {
namespace spectral {

void channel_spectral_norms(const float* weight, std::int64_t out, std::int64_t rows,
                            std::int64_t cols, const double* scale, double* result,
                            int n_threads);
void channel_spectral_norms(const double* weight, std::int64_t out, std::int64_t rows,
                            std::int64_t cols, const double* scale, double* result,
                            int n_threads);

// One layer of a batch: the arguments of channel_spectral_norms.
template <typename T>
struct LayerView {
  const T* weight;
  std::int64_t out, rows, cols;
  const double* scale;  // may be null
  double* result;
};

// channel_spectral_norms for every layer of the list, in one parallel region (tasks of about
// equal work spread over the threads): the per-call overhead is paid once for a whole model.
// Results are bit-identical to one channel_spectral_norms call per layer.
//
// keep (optional, one count per layer; < 1 or >= out: every value exact): only the layer's
// `keep` largest values are wanted (the CBE). The channels that can be among them, and every
// channel whose value is >= the keep-th largest, get their exact value, bit-identical to the
// full computation; the eigen-solves of the others are skipped once an LDL^T factorisation
// certifies their value below the keep-th largest (they then hold an upper bound of their
// value that stays below it). So any top-k or quantile rule that reads only the keep largest
// values gives the same bits. For float32 3x3 kernels (at least 9 input channels) the ranking
// and the certificates use a Gram summed in float32 (half the arithmetic of the fp64 one) whose
// rigorous error bound is taken off the threshold; the channels that are solved get their exact
// fp64 Gram computed again from the weights. Applied to layers whose Gram order is 3..16: one
// task per layer when such layers hold at least 16 times the largest one's work (a round of many
// models); otherwise (one model) to those whose channels are at least twice the size of their
// Gram (3x3 float32: 36 input channels or more), each split into Gram tasks and a finishing task,
// with the Grams kept in a buffer the calling thread reuses across calls (at most 64 MB; beyond
// it every value is exact). The keep largest values are the same bits either way (the other
// entries are exact values or bounds, depending on the layer's treatment in the batch), and no
// value depends on n_threads.
void channel_spectral_norms_batch(const LayerView<float>* layers, std::int64_t n_layers,
                                  int n_threads, const std::int64_t* keep = nullptr);
void channel_spectral_norms_batch(const LayerView<double>* layers, std::int64_t n_layers,
                                  int n_threads, const std::int64_t* keep = nullptr);

}  // namespace spectral
}  // namespace mars
