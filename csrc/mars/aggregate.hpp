// Weighted aggregation of many model buffers with fp64 accumulation (the server side of MARS).
//
//  * aggregate:  out[j] = sum_i w_i * x_i[j] / sum_i w_i, or, with a base (the global model),
//                out[j] = base[j] + server_lr * (mean[j] - base[j]).
//  * accumulate: acc[j] += w * x[j] in place (a streaming round adds one client at a time and
//                subtracts a rejected client with -w); returns max |x[j]| and a checksum of x.
//  * finalize:   out[j] = acc[j] / total_weight (or the base form above) for a streamed sum.
//
// Every element is accumulated in fp64, over the clients in their given order, by one thread, so
// results are bit-identical for any thread count. Each product w * x[j] is rounded to fp64 before
// the addition (the compiler may fuse it into one FMA; the NumPy twin in reference.py agrees to
// within a few fp64 ulps). Inputs are validated by the caller: equal lengths, finite weights >= 0
// with a positive sum, non-null pointers for n > 0.
#pragma once

#include <cstdint>

namespace mars {
namespace aggregate {

// Max |x| (NaN propagates) and a 64-bit checksum of the bit patterns of x (position-dependent,
// order-independent to compute, not cryptographic): together they identify a re-read buffer.
// checksum = sum_j (bits_j ^ (j * 0x9E3779B97F4A7C15)) * 0xBF58476D1CE4E5B9 mod 2^64, bits_j the
// float32/float64 bit pattern of x[j] (zero-extended); reference.buffer_checksum is its twin.
struct BufferStats {
  double max_abs = 0.0;
  std::uint64_t checksum = 0;
};

// T: float or double (input buffers and base); O: float or double (output).
// base may be null (plain weighted mean); weights has n_buffers entries.
template <typename T, typename O>
void aggregate(const T* const* buffers, const double* weights, std::int64_t n_buffers,
               std::int64_t n_elems, O* out, int n_threads, const T* base = nullptr,
               double server_lr = 1.0);

// One tensor of aggregate_many: n_buffers client buffers of n_elems values (double when in64,
// else float), an optional base of the same type (null: plain mean) and the output (double when
// out64, else float).
struct MeanJob {
  const void* const* buffers;
  const void* base;
  void* out;
  std::int64_t n_elems;
  bool in64;
  bool out64;
};

// aggregate() of every job (the tensors of one model), with the same weights for all: the same
// values, bit for bit, as one aggregate() call per job, in one parallel region whose tasks
// (blocks of a tensor) go to whichever thread is free.
void aggregate_many(const MeanJob* jobs, std::int64_t n_jobs, const double* weights,
                    std::int64_t n_buffers, int n_threads, double server_lr = 1.0);

// acc[j] += weight * x[j] for j < n. T: float or double.
template <typename T>
BufferStats accumulate(double* acc, const T* x, double weight, std::int64_t n, int n_threads);

// out[j] = acc[j] / total_weight, or base[j] + server_lr * (acc[j] / total_weight - base[j]).
template <typename T, typename O>
void finalize(const double* acc, double total_weight, std::int64_t n, O* out, int n_threads,
              const T* base = nullptr, double server_lr = 1.0);


}  // namespace aggregate
}  // namespace mars
