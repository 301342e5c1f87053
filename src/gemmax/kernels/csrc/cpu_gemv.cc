// Decode-time matrix-vector products on the CPU for gemmax (an XLA FFI custom call).
//
// Why this exists: at batch 1 a decoder is a chain of GEMVs bound by memory bandwidth, and XLA:CPU does not
// fuse the dtype convert of int8 / bfloat16 weights into its dot (nor the per-layer dynamic slice of a
// stacked weight inside a scan): it materialises a float32 copy of every weight for every token, so int8
// and bfloat16 weights decode *slower* than float32. This kernel reads each weight byte once, converts in
// registers and accumulates in float32, and takes the whole stacked [L, ...] weight plus a layer index so
// that no slice is copied. Work is split over XLA's own intra-op thread pool.
//
// y[b, p, n] = scale[p*N+n] * sum_k x[b, k] * W[layer, p, k, n]   (in_minor = false; W is [L, P, K, N])
// y[b, n]    = scale[n]     * sum_k x[b, k] * W[layer, n, k]      (in_minor = true;  W is [L, N, K], P = 1)

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string_view>
#include <thread>
#include <unistd.h>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(int8_t v) { return static_cast<float>(v); }
inline float to_f32(uint16_t bf16_bits) {  // bfloat16 is the top half of a float32
  uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_f32(_Float16 v) { return static_cast<float>(v); }

// The FFI dtype whose elements a kernel reads as T (bfloat16 as its uint16_t bits, as to_f32 takes it).
template <typename T>
constexpr ffi::DataType kDType = ffi::DataType::INVALID;
template <>
constexpr ffi::DataType kDType<int8_t> = ffi::DataType::S8;
template <>
constexpr ffi::DataType kDType<uint16_t> = ffi::DataType::BF16;
template <>
constexpr ffi::DataType kDType<_Float16> = ffi::DataType::F16;
template <>
constexpr ffi::DataType kDType<float> = ffi::DataType::F32;

// Calls fn(T{}) for the T among Ts whose kDType is t and returns true, or returns false when t is none of
// them: one generic lambda then instantiates a handler's templated kernel for each element type it takes.
template <typename... Ts, typename Fn>
bool visit_dtype(ffi::DataType t, Fn&& fn) {
  return ((t == kDType<Ts> ? (fn(Ts{}), true) : false) || ...);
}

// Run fn(i) for i in [0, total) on the caller plus the pool's threads. Chunks are claimed from an atomic
// counter, so the caller never waits on a task that has not started: no deadlock even when the pool is busy
// or has a single thread. Shared state lives in a shared_ptr because a late task may start after we return.
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> fn;
};

void parallel_for(ffi::ThreadPool* pool, int64_t total, std::function<void(int64_t)> fn) {
  auto job = std::make_shared<Job>();
  job->total = total;
  job->fn = std::move(fn);
  auto work = [](const std::shared_ptr<Job>& j) {
    for (;;) {
      int64_t i = j->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= j->total) return;
      j->fn(i);
      j->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = pool ? std::min<int64_t>(pool->num_threads(), total) - 1 : 0;
  for (int64_t t = 0; t < helpers; ++t) pool->Schedule([job, work]() { work(job); });
  work(job);
  while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

// Activations quantized to 16 bits per block of 64 for the integer int8 paths: scale = max|x| / 32767,
// round half away from zero, so the error is at most max|x| / 65534 of the block, far below the weights'
// own int8 rounding (a weight-only int8 product to float32 accuracy). Reused per calling thread: a decode
// step makes ~130 calls.
struct QuantX16 {
  int64_t blocks;
  std::vector<int16_t> v;    // [B, blocks * 64], zero past K
  std::vector<float> scale;  // [B, blocks]
};

const QuantX16& quantize_x16(const float* x, int64_t B, int64_t K) {
  static thread_local QuantX16 q;
  q.blocks = (K + 63) / 64;
  q.v.assign(static_cast<size_t>(B * q.blocks * 64), 0);
  q.scale.assign(static_cast<size_t>(B * q.blocks), 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t blk = 0; blk < q.blocks; ++blk) {
      const int64_t k0 = blk * 64, n = std::min(K, k0 + 64) - k0;
      const float* xb = x + b * K + k0;
      float m = 0;
#pragma omp simd reduction(max : m)
      for (int64_t k = 0; k < n; ++k) m = std::max(m, std::fabs(xb[k]));
      const float s = m / 32767.0f;
      q.scale[b * q.blocks + blk] = s;
      if (s == 0) continue;
      const float inv = 1.0f / s;
      int16_t* dst = q.v.data() + b * q.blocks * 64 + k0;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const float f = xb[k] * inv;
        const int32_t v = static_cast<int32_t>(f + (f >= 0 ? 0.5f : -0.5f));
        dst[k] = static_cast<int16_t>(std::min(32767, std::max(-32767, v)));
      }
    }
  }
  return q;
}

// How many chunks of K to split an in-major product of P blocks into: ~2 tasks per thread in all, and no
// more chunks than `units` (the pieces of K a chunk must hold whole: rows or blocks).
int64_t k_chunks(ffi::ThreadPool* pool, int64_t P, int64_t units) {
  const int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
  const int64_t want = std::max<int64_t>(1, (2 * threads + P - 1) / P);
  return std::min<int64_t>(want, std::max<int64_t>(1, units));
}

// y[b, p*N + n] = scale[p*N + n] * sum_c partial[p, c, b, n]: the K-chunks of an in-major product added up
// (partial sums in column order).
void sum_partials(const float* partial, int64_t P, int64_t chunks, int64_t B, int64_t N, float* y,
                  const float* scale) {
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t b = 0; b < B; ++b) {
      float* out = y + b * P * N + p * N;
      const float* first = partial + (p * chunks) * B * N + b * N;
      std::copy(first, first + N, out);
      for (int64_t c = 1; c < chunks; ++c) {
        const float* part = partial + (p * chunks + c) * B * N + b * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) out[j] += part[j];
      }
      if (scale) {
        const float* s = scale + p * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) out[j] *= s[j];
      }
    }
  }
}

constexpr int64_t kRowGroup = 4;  // in-minor: weight rows sharing one pass over x (independent FMA chains)

// In-major W[P, K, N]: each task takes a contiguous range of K rows of one P block and streams them in
// memory order (the hardware prefetcher's best case), accumulating all N outputs in an L1/L2-resident
// partial sum; partials are added at the end. Splitting over N instead would read one cache line per row
// with a stride of N bytes, which prefetchers follow poorly.
template <typename T>
void in_major(const float* x, const T* w, float* y, const float* scale, int64_t B, int64_t P, int64_t K,
              int64_t N, ffi::ThreadPool* pool) {
  const int64_t chunks = k_chunks(pool, P, K / 32);
  const int64_t kc = (K + chunks - 1) / chunks;
  static thread_local std::vector<float> partial;
  partial.resize(static_cast<size_t>(P * chunks * B * N));
  float* const pbuf = partial.data();  // thread_local names resolve per thread: pass the pointer
  parallel_for(pool, P * chunks, [=](int64_t task) {
    const int64_t p = task / chunks, c = task % chunks;
    const int64_t k0 = c * kc, k1 = std::min(K, k0 + kc);
    float* acc = pbuf + task * B * N;
    std::fill(acc, acc + B * N, 0.0f);
    // four rows per pass over the partial sums: one load and store of acc serves four weight rows (the
    // first version, one row a pass, was bound by that load/store chain: bfloat16 down-projection 5.8 GB/s)
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      const T* r0 = w + (p * K + k) * N;
      const T* r1 = r0 + N;
      const T* r2 = r1 + N;
      const T* r3 = r2 + N;
      auto pass = [&](float* a, float x0, float x1, float x2, float x3, int64_t j0, int64_t j1) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          a[j] += (x0 * to_f32(r0[j]) + x1 * to_f32(r1[j])) + (x2 * to_f32(r2[j]) + x3 * to_f32(r3[j]));
        }
      };
      // The first row of x also prefetches the next group of four rows, one line of each per line read
      // here: four interleaved streams of short rows (N = 640 is 1280 bytes of bfloat16) kept the hardware
      // prefetcher too few lines ahead. Gemma 3 270M bfloat16 decode, per layer call: down-projection
      // 169 -> 112-134 us, gate 126 -> 90-107; the step 28-31 -> 22-26 ms (one and four groups ahead
      // measured alike, sixteen worse).
      const bool prefetch = k + 8 <= k1;
      for (int64_t b = 0; b < B; ++b) {
        const float x0 = x[b * K + k], x1 = x[b * K + k + 1], x2 = x[b * K + k + 2], x3 = x[b * K + k + 3];
        float* a = acc + b * N;
        int64_t j = 0;
        if (b == 0 && prefetch) {
          constexpr int64_t line = 64 / sizeof(T);
          for (; j + line <= N; j += line) {
            for (const T* r : {r0, r1, r2, r3}) __builtin_prefetch(r + 4 * N + j);
            pass(a, x0, x1, x2, x3, j, j + line);
          }
        }
        pass(a, x0, x1, x2, x3, j, N);
      }
    }
    for (; k < k1; ++k) {
      const T* row = w + (p * K + k) * N;
      for (int64_t b = 0; b < B; ++b) {
        const float xv = x[b * K + k];
        float* a = acc + b * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) a[j] += xv * to_f32(row[j]);
      }
    }
  });
  sum_partials(partial.data(), P, chunks, B, N, y, scale);
}

// In-minor W[N, K] (the tied embedding used as the output head): rows are contiguous, so each task streams
// a block of rows; four rows share each load of x and give four independent accumulation chains.
template <typename T>
void in_minor(const float* x, const T* w, float* y, const float* scale, int64_t B, int64_t N, int64_t K,
              ffi::ThreadPool* pool) {
  const int64_t block = 512;
  const int64_t nblocks = (N + block - 1) / block;
  parallel_for(pool, nblocks, [=](int64_t task) {
    const int64_t r0 = task * block, r1 = std::min(N, r0 + block);
    int64_t r = r0;
    for (; r + kRowGroup <= r1; r += kRowGroup) {
      const T* w0 = w + r * K;
      const T* w1 = w0 + K;
      const T* w2 = w1 + K;
      const T* w3 = w2 + K;
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * K;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < K; ++k) {
          const float xv = xb[k];
          a0 += to_f32(w0[k]) * xv;
          a1 += to_f32(w1[k]) * xv;
          a2 += to_f32(w2[k]) * xv;
          a3 += to_f32(w3[k]) * xv;
        }
        float* out = y + b * N + r;
        out[0] = scale ? a0 * scale[r] : a0;
        out[1] = scale ? a1 * scale[r + 1] : a1;
        out[2] = scale ? a2 * scale[r + 2] : a2;
        out[3] = scale ? a3 * scale[r + 3] : a3;
      }
    }
    for (; r < r1; ++r) {
      const T* row = w + r * K;
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * K;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (int64_t k = 0; k < K; ++k) a += to_f32(row[k]) * xb[k];
        y[b * N + r] = scale ? a * scale[r] : a;
      }
    }
  });
}


// AVX512-BF16: the bfloat16 prefill GEMM's row-pair tile (gemm_tile_bf16, below).
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define GEMMAX_BF16DOT 1

#endif

// float32 -> bfloat16 bits, round to nearest even (as XLA's convert), NaN kept a NaN.
inline uint16_t bf16_round(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// bfloat16 in and out of the kernels (a bfloat16 model's prefill): the kernels read bfloat16 activations and
// write bfloat16 results themselves, where XLA had converted each GEMM's, norm's and attention's input to
// float32 and its float32 output back, one pass over memory each (Gemma 3 270M bfloat16 prefill of 512
// tokens: ~12 ms of ~315).
inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t j = 0;
#ifdef GEMMAX_BF16DOT
  for (; j + 16 <= n; j += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
  }
#endif
  for (; j < n; ++j) dst[j] = bf16_round(src[j]);
}

inline void from_bf16(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = to_f32(src[j]);
}

// The AVX2 in-minor (head) kernel for weights of type T, where one is compiled: `run` has in_minor's
// signature and needs K % kMultiple == 0; kMultiple == 0 means none (the portable in_minor serves).
template <typename T>
struct Avx2InMinor {
  static constexpr int64_t kMultiple = 0;
};

#if defined(__AVX2__)
#include <immintrin.h>

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows of in-minor W[N, K] per task in the AVX2 head kernels, taken one row at a time: each thread reads
// one sequential stream.
constexpr int64_t kHeadBlock = 512;
constexpr uintptr_t kHeadAhead = 4096;  // software prefetch distance of the head GEMVs (head_rows, int8)

// The AVX2 head kernels' shared loop over in-minor W[N, K]: row blocks of kHeadBlock per task, four
// accumulators over 4 * kStep columns, then the tail kStep at a time. step(row, xb, k, acc) returns acc plus
// the kStep products of row and xb at column k (read as the kernel's own layout needs: x may be permuted for
// it). Needs K % kStep == 0.
template <int kStep, typename T, typename Step>
void head_rows(const float* x, const T* w, float* y, const float* scale, int64_t B, int64_t N, int64_t K,
               ffi::ThreadPool* pool, Step step) {
  parallel_for(pool, (N + kHeadBlock - 1) / kHeadBlock, [=](int64_t task) {
    const int64_t r0 = task * kHeadBlock, r1 = std::min(N, r0 + kHeadBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const T* wi = w + r * K;
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        // The lines kHeadAhead bytes on (a row or two later) are asked for while this row computes: on a Xeon
        // (Sapphire Rapids class, 2 threads) the hardware prefetchers alone held the Gemma 3 270M float32 head
        // to 17.7 GB/s of the 22.4 a plain read reaches; with this, 21.5 (2048-16384 bytes ahead all alike,
        // six interleaved rounds). Integer arithmetic: the address may lie past W (a prefetch never faults).
        const uintptr_t ahead = reinterpret_cast<uintptr_t>(wi) + kHeadAhead;
        for (; k + 4 * kStep <= K; k += 4 * kStep) {
          if (b == 0) {
            for (size_t o = 0; o < 4 * kStep * sizeof(T); o += 64) {
              __builtin_prefetch(reinterpret_cast<const void*>(ahead + k * sizeof(T) + o));
            }
          }
          a0 = step(wi, xb, k, a0);
          a1 = step(wi, xb, k + kStep, a1);
          a2 = step(wi, xb, k + 2 * kStep, a2);
          a3 = step(wi, xb, k + 3 * kStep, a3);
        }
        for (; k < K; k += kStep) a0 = step(wi, xb, k, a0);
        const float v = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        y[b * N + r] = scale ? v * scale[r] : v;
      }
    }
  });
}

#endif

#if defined(__AVX2__)
#define GEMMAX_AVX2_INT8 1

// int8 weights on AVX2, on every AVX2 CPU (on Zen 4 this beat a VNNI kernel: docs/architecture.md): the
// generic path converts every weight to float32 and was bound by that (the Gemma 3 270M int8 head at 5-7
// GB/s). x comes from quantize_x16; weights are sign-extended to 16 bits in registers and vpmaddwd adds
// two products per int32 lane exactly. Needs K % 16 == 0 (every Gemma width).

// In-minor W[N, K] (the tied head): one row at a time (a sequential stream per thread, as the bfloat16
// kernel below: four rows sharing each load of x were slower here); per block of 64, int32 sums of
// vpmaddwd, then one convert and one multiply-add by the block's x scale into float32, two blocks in flight.
void in_minor_int8_avx2(const float* x, const int8_t* w, float* y, const float* scale, int64_t B, int64_t N,
                        int64_t K, ffi::ThreadPool* pool) {
  const QuantX16& q = quantize_x16(x, B, K);
  const QuantX16* qp = &q;
  parallel_for(pool, (N + kHeadBlock - 1) / kHeadBlock, [=](int64_t task) {
    const int64_t r0 = task * kHeadBlock, r1 = std::min(N, r0 + kHeadBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* wi = w + r * K;
      {  // the lines kHeadAhead bytes on, as head_rows does: the 270M int8 head on a Xeon 14.7 -> 22.6 GB/s
        const uintptr_t ahead = reinterpret_cast<uintptr_t>(wi) + kHeadAhead;
        for (int64_t o = 0; o < K; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(ahead + o));
      }
      for (int64_t b = 0; b < B; ++b) {
        const int16_t* xq = qp->v.data() + b * qp->blocks * 64;
        const float* xs = qp->scale.data() + b * qp->blocks;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        int64_t blk = 0;
        auto block_sums = [&](int64_t bi, int64_t groups) {  // int32 sums of one block of 64, as float32
          __m256i sum = _mm256_setzero_si256();
          for (int64_t g = 0; g < groups; ++g) {
            const __m128i b8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wi + bi * 64 + 16 * g));
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + bi * 64 + 16 * g));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_cvtepi8_epi16(b8), xv));
          }
          return _mm256_cvtepi32_ps(sum);
        };
        const int64_t full = K / 64;
        for (; blk + 2 <= full; blk += 2) {  // two blocks in flight: two FMA chains
          a0 = _mm256_fmadd_ps(block_sums(blk, 4), _mm256_set1_ps(xs[blk]), a0);
          a1 = _mm256_fmadd_ps(block_sums(blk + 1, 4), _mm256_set1_ps(xs[blk + 1]), a1);
        }
        for (; blk < full; ++blk) a0 = _mm256_fmadd_ps(block_sums(blk, 4), _mm256_set1_ps(xs[blk]), a0);
        if (full < qp->blocks) {
          a1 = _mm256_fmadd_ps(block_sums(full, (K - full * 64) / 16), _mm256_set1_ps(xs[full]), a1);
        }
        const float v = hsum8(_mm256_add_ps(a0, a1));
        y[b * N + r] = scale ? v * scale[r] : v;
      }
    }
  });
}
template <>
struct Avx2InMinor<int8_t> {
  static constexpr int64_t kMultiple = 16;
  static constexpr auto run = in_minor_int8_avx2;
};

// In-major int8 W[P, K, N]: rows k and k+1 are interleaved byte-wise (vpunpck[lh]bw) and sign-extended, so
// each int32 lane of vpmaddwd with the broadcast pair (x[k], x[k+1]) is x[k] W[k, n] + x[k+1] W[k+1, n] for
// eight consecutive columns, in order. Two row pairs per pass over an L1-resident int32 partial row; each
// block of 64 rows is then scaled into float32. Rows stream in memory order. Needs N % 16 == 0.
void in_major_int8_avx2(const float* x, const int8_t* w, float* y, const float* scale, int64_t B, int64_t P,
                        int64_t K, int64_t N, ffi::ThreadPool* pool) {
  const QuantX16& q = quantize_x16(x, B, K);
  const QuantX16* qp = &q;
  const int64_t blocks = q.blocks;
  const int64_t chunks = k_chunks(pool, P, blocks);
  const int64_t bc = (blocks + chunks - 1) / chunks;
  static thread_local std::vector<float> partial;
  partial.assign(static_cast<size_t>(P * chunks * B * N), 0.0f);
  float* const pbuf = partial.data();  // thread_local names resolve per thread: pass the pointer
  parallel_for(pool, P * chunks, [=](int64_t task) {
    const int64_t p = task / chunks, c = task % chunks;
    float* acc = pbuf + task * B * N;
    static thread_local std::vector<int32_t> ibuf;
    ibuf.resize(static_cast<size_t>(N));
    int32_t* ia = ibuf.data();
    for (int64_t blk = c * bc; blk < std::min(blocks, (c + 1) * bc); ++blk) {
      const int64_t k0 = blk * 64, k1 = std::min(K, k0 + 64);
      for (int64_t b = 0; b < B; ++b) {
        const int16_t* xq = qp->v.data() + b * blocks * 64;
        std::fill(ia, ia + N, 0);
        for (int64_t k = k0; k < k1; k += 4) {  // K % 16 == 0: whole groups of four rows
          const int8_t* ra = w + (p * K + k) * N;
          int32_t x01, x23;
          std::memcpy(&x01, xq + k, 4);
          std::memcpy(&x23, xq + k + 2, 4);
          const __m256i xa = _mm256_set1_epi32(x01), xb = _mm256_set1_epi32(x23);
          const bool prefetch = b == 0 && k + 8 <= k1;  // the next four rows, as in_major
          for (int64_t n = 0; n < N; n += 16) {
            if (prefetch && n % 64 == 0) {
              for (int64_t i = 4; i < 8; ++i) __builtin_prefetch(ra + i * N + n);
            }
            const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ra + n));
            const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ra + N + n));
            const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ra + 2 * N + n));
            const __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ra + 3 * N + n));
            const __m256i lo = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a0, a1)), xa),
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a2, a3)), xb));
            const __m256i hi = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a0, a1)), xa),
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a2, a3)), xb));
            __m256i* d = reinterpret_cast<__m256i*>(ia + n);
            _mm256_storeu_si256(d, _mm256_add_epi32(_mm256_loadu_si256(d), lo));
            _mm256_storeu_si256(d + 1, _mm256_add_epi32(_mm256_loadu_si256(d + 1), hi));
          }
        }
        const __m256 s = _mm256_set1_ps(qp->scale[b * blocks + blk]);
        float* ab = acc + b * N;
        for (int64_t n = 0; n < N; n += 8) {
          const __m256 t = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ia + n)));
          _mm256_storeu_ps(ab + n, _mm256_fmadd_ps(t, s, _mm256_loadu_ps(ab + n)));
        }
      }
    }
  });
  sum_partials(partial.data(), P, chunks, B, N, y, scale);
}
#endif

#if defined(__AVX2__)
// bfloat16 weights on AVX2 (no AVX512-BF16): a bfloat16 is the top half of a float32, so one 256-bit load
// of 16 weights gives the 8 even-indexed ones as floats by a 16-bit left shift of each 32-bit lane and the
// 8 odd-indexed ones by masking off the low half: 2 integer ops per 16 weights, where the portable path's
// per-element widening takes 2 per 8. x is read in the matching order (even then odd of each 16). Exact
// float32 products, float32 accumulation as the portable path; only the summation order differs.
inline __m256 bf16_even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 bf16_odd(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// In-minor W[N, K] (the tied head) on head_rows: one row at a time with four accumulators over 64 columns,
// so each thread reads one sequential stream. Measured on Zen 3 for the 270M head (335 MB): four rows sharing
// each load of x (the portable path's shape, and this one's first version) ~20 ms; this ~14.5 ms, about
// the 24 GB/s that a bare two-thread shift-and-FMA loop reaches on this machine. Needs K % 16 == 0.
void in_minor_bf16_avx2(const float* x, const uint16_t* w, float* y, const float* scale, int64_t B, int64_t N,
                        int64_t K, ffi::ThreadPool* pool) {
  static thread_local std::vector<float> xbuf;
  xbuf.resize(static_cast<size_t>(B * K));
  float* xr = xbuf.data();  // per 16: x[0], x[2], ..., x[14], x[1], x[3], ..., x[15]
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) xr[b * K + (k / 16) * 16 + (k % 2) * 8 + (k % 16) / 2] = x[b * K + k];
  }
  head_rows<16>(xr, w, y, scale, B, N, K, pool, [](const uint16_t* wi, const float* xb, int64_t k, __m256 acc) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wi + k));
    acc = _mm256_fmadd_ps(bf16_even(v), _mm256_loadu_ps(xb + k), acc);
    return _mm256_fmadd_ps(bf16_odd(v), _mm256_loadu_ps(xb + k + 8), acc);
  });
}
template <>
struct Avx2InMinor<uint16_t> {
  static constexpr int64_t kMultiple = 16;
  static constexpr auto run = in_minor_bf16_avx2;
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
// float32 in-minor W[N, K] (the tied head) on head_rows: one row at a time, four accumulators over 32
// columns, one sequential stream per thread, as the bfloat16 kernel above, where the portable path reads four rows at
// once (four streams). Gemma 3 270M float32 head (671 MB), both kernels alternated in one process, 30
// pairs: 28.7 -> 26.8 ms (23.3 -> 25.0 GB/s) and 39.5 -> 34.9 ms in a slower spell; float32 decode, 12
// pairs twice: median ratios 0.919 and 0.971. A software prefetch 4 rows ahead gained nothing. Needs
// K % 8 == 0.
void in_minor_f32_avx2(const float* x, const float* w, float* y, const float* scale, int64_t B, int64_t N,
                       int64_t K, ffi::ThreadPool* pool) {
  head_rows<8>(x, w, y, scale, B, N, K, pool, [](const float* wi, const float* xb, int64_t k, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(wi + k), _mm256_loadu_ps(xb + k), acc);
  });
}
template <>
struct Avx2InMinor<float> {
  static constexpr int64_t kMultiple = 8;
  static constexpr auto run = in_minor_f32_avx2;
};
#endif

// ---- many rows (prefill): a register-blocked GEMM ---------------------------------------------------
//
// At 512 prompt rows a linear is bound by arithmetic, not bandwidth, and XLA's own GEMM is near this CPU's
// float32 peak; what it loses is around the GEMM: it copies each layer's slice out of a stacked weight, and
// for bfloat16 / int8 weights it converts the *whole* stack to float32 on every call, hoisted out of the
// layer loop (measured on Gemma 3 270M prefill: 0.68 s of converts in a 1.5 s bfloat16 prefill). Here each
// task converts one panel of 64 columns x K rows to float32 once (kept in L2) and sweeps every row block of x
// over it, so the weights are read once, in place, at their own width.
//
// Micro-kernel: kMR rows x (kNV native vectors) of float32 accumulators, swept over the 64-column panel in
// sub-tiles: one broadcast of x and kNV fused multiply-adds per row and k. The sub-tile is sized to the
// ISA's register file, because a tile that does not fit spills every accumulator on every k: the first
// version used 64-byte GCC vectors everywhere (24 zmm with AVX-512), which on an AVX2-only CPU (Zen 3)
// lowered to 48 ymm over 16 registers and ran at 6 GFLOP/s against XLA's 130. AVX-512: 6 x 4 zmm (24 of
// 32 registers, the whole panel width per sub-tile); AVX2: 6 x 2 ymm (12 of 16, 4 sub-tiles); anything
// else (SSE, NEON): 6 x 2 vectors of 16 bytes. Written with GCC vector types, so it builds on any ISA.
// Float32 accumulation in k order.
constexpr int kNB = 64;
constexpr int64_t kPackAhead = 16;  // rows of W ahead that a packing tile fetches (gemm_tile's kPack)
// K blocking: a panel of kc rows x 64 columns must stay in L2 (512 KB a core on Zen 3, 1-2 MB on recent
// Intel) while the rows of x stream over it. Whole K up to 1024 (256 KB); longer K (the 270M down-projection,
// 2048) in near-equal blocks of at most 384 rows, partial sums kept in y: 77 -> 85 GFLOP/s a core there,
// while splitting K = 640 cost ~3% (y re-read per block), so shorter K stays whole. The whole-K limit is
// the panel filling half of this core's L2: 1024 float32 rows on Zen 3, 2048 on Zen 4 (1 MB), where the
// 270M down-projection (K = 2048) kept whole ran 2-6% faster, float32 and bfloat16 pairs, one thread.
constexpr int64_t kKC = 384;

int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t{512} << 10;
  }();
  return bytes;
}
constexpr int kMR = 6;
#if defined(__AVX512F__)
constexpr int kVL = 16, kNV = 4;
#elif defined(__AVX__)
constexpr int kVL = 8, kNV = 2;
#else
constexpr int kVL = 4, kNV = 2;
#endif
typedef float vnat __attribute__((vector_size(4 * kVL), aligned(4 * kVL)));
typedef float vnatu __attribute__((vector_size(4 * kVL), aligned(4)));
static_assert(kNB % (kVL * kNV) == 0, "the panel must split into whole sub-tiles");

template <typename V>
inline V v_exp(V x) {  // e^x, float32, ~2 ulp; e^x = 2^n e^r with |r| <= ln2 / 2
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  const V lo = V{} - 87.3f, hi = V{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// The gated MLP's element-wise step done on each finished GEMM tile while it is in L1 (XLA's fusion for it
// re-read both products from memory: 10-11 ms of a 512-token Gemma 3 270M bfloat16 prefill). The gate
// product takes act (the GELU tanh approximation or SiLU), the up product mul (the activated gate, same
// shape); in the order and roundings of model.decoder_layer: for a bfloat16 result the product is rounded
// to bfloat16 first, then activated / multiplied in float32 and rounded again.
// gelu_tanh(x) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3) (= 0.5 x (1 + tanh u)); silu(x) = x / (1 + e^-x).
struct Epilogue {
  int act = 0;  // 0 none, 1 gelu_tanh, 2 silu
  const float* mul = nullptr;
  const uint16_t* mulh = nullptr;
  bool any() const { return act != 0 || mul || mulh; }
};

#ifdef GEMMAX_BF16DOT
// AVX-512 forms of v_exp and the epilogue: 16 lanes, masked tails, 2^n by vscalefps, 1 / (1 + e) by rcp14 and
// one Newton step (~2^-28 relative). The portable form below cost 0.64 ms per million gelu elements on
// Zen 4, one thread; this one ~0.2 (a 512-token 270M prefill has 18 million a forward).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 bf16_to_ps(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

inline void epilogue_row(const Epilogue& ep, const float* src, int64_t n, int64_t row, int64_t col, int64_t ld,
                         float* dst, uint16_t* dsth) {
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(k, src + j);
    if (dsth) v = bf16_to_ps((__m256i)_mm512_cvtneps_pbh(v));  // the product as bfloat16, kept as a float
    if (ep.act) {
      __m512 z = v;  // silu: x / (1 + e^-x); gelu: z = 2 sqrt(2/pi) (x + 0.044715 x^3)
      if (ep.act == 1) {
        z = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, v), v), _mm512_set1_ps(0.044715f), v),
                          _mm512_set1_ps(1.5957691216057308f));
      }
      const __m512 d = _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), z)));
      __m512 inv = _mm512_rcp14_ps(d);
      inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, two));  // Newton: inv (2 - d inv)
      v = _mm512_mul_ps(v, inv);
    }
    if (ep.mul) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, ep.mul + row * ld + col + j));
    if (ep.mulh) v = _mm512_mul_ps(v, bf16_to_ps(_mm256_maskz_loadu_epi16(k, ep.mulh + row * ld + col + j)));
    if (dsth) {
      _mm256_mask_storeu_epi16(dsth + j, k, (__m256i)_mm512_cvtneps_pbh(v));
    } else {
      _mm512_mask_storeu_ps(dst + j, k, v);
    }
  }
}
#else
// src[0, n) (float32 sums of row `row`, column offset `col` into the [rows, ld] mul) -> dst or dsth.
inline void epilogue_row(const Epilogue& ep, const float* src, int64_t n, int64_t row, int64_t col, int64_t ld,
                         float* dst, uint16_t* dsth) {
  typedef int32_t vint __attribute__((vector_size(4 * kVL)));
  alignas(64) float tmp[kVL];
  for (int64_t j = 0; j < n; j += kVL) {
    const int64_t m = std::min<int64_t>(kVL, n - j);
    std::memcpy(tmp, src + j, m * 4);
    vnat v;
    std::memcpy(&v, tmp, sizeof v);
    if (dsth) {  // the product as bfloat16 (nearest even), kept as a float
      vint u;
      std::memcpy(&u, &v, sizeof u);
      u = (u + 0x7FFF + ((u >> 16) & 1)) & static_cast<int32_t>(0xFFFF0000u);
      std::memcpy(&v, &u, sizeof v);
    }
    if (ep.act == 1) {
      const vnat z = (v + 0.044715f * v * v * v) * -1.5957691216057308f;  // -2 sqrt(2/pi) (x + 0.044715 x^3)
      v = v / (1.0f + v_exp(z));
    } else if (ep.act == 2) {
      v = v / (1.0f + v_exp(-v));
    }
    if (ep.mul || ep.mulh) {
      alignas(64) float mt[kVL] = {};
      if (ep.mul) {
        std::memcpy(mt, ep.mul + row * ld + col + j, m * 4);
      } else {
        for (int64_t t = 0; t < m; ++t) mt[t] = to_f32(ep.mulh[row * ld + col + j + t]);
      }
      vnat mv;
      std::memcpy(&mv, mt, sizeof mv);
      v *= mv;
    }
    std::memcpy(tmp, &v, sizeof v);
    if (dsth) {
      to_bf16(tmp, dsth + j, m);
    } else {
      std::memcpy(dst + j, tmp, m * 4);
    }
  }
}
#endif

// NV < kNV: sub-tiles of kVL * NV columns (the batched head's few rows of x, in_minor_gemm).
// kPack (a float32 GEMM's first tile of each panel, gemm_in_major): the weights come straight from their rows
// in W (wsrc, row stride ldw, the whole 64 columns in bounds) and the tile writes them into the panel as it
// goes, for the panel's other tiles: the panel is written, not read.
template <int MR, int NV = kNV, bool kPack = false>
inline void gemm_tile(const float* x, int64_t ldx, int64_t K, const float* panel, const float* scale, float* y,
                      int64_t ldy, int width, bool accumulate, const float* wsrc = nullptr, int64_t ldw = 0) {
  for (int j0 = 0; j0 < kNB && j0 < width; j0 += kVL * NV) {
    const int w = std::min(width - j0, kVL * NV);
    vnat acc[MR][NV] = {};
    if (accumulate) {  // a later K block: continue the sums already in y
      for (int r = 0; r < MR; ++r) {
        const float* src = y + r * ldy + j0;
        if (w == kVL * NV) {
          for (int v = 0; v < NV; ++v) acc[r][v] = *reinterpret_cast<const vnatu*>(src + kVL * v);
        } else {
          alignas(64) float tmp[kVL * NV] = {};
          std::memcpy(tmp, src, static_cast<size_t>(w) * sizeof(float));
          for (int v = 0; v < NV; ++v) acc[r][v] = reinterpret_cast<const vnat*>(tmp)[v];
        }
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const vnat* bk = reinterpret_cast<const vnat*>(panel + k * kNB + j0);
      // Panel rows are 256 bytes apart and a sub-tile reads one line of each on AVX2 (K x 64 bytes: 40 KB
      // at K = 640, more than L1 holds beside x); the L1 prefetcher does not keep up with that stride, so
      // the sub-tile's line 8 rows ahead is fetched while this row computes. Float32 prefill of 512 tokens,
      // both ways in one process alternated call by call, 24 pairs twice: median ratios 0.899 and 0.903
      // (faster in 23 and 21 of 24). Integer address arithmetic: the line may lie past the panel (a
      // prefetch never faults; a pointer past the array would be undefined).
      vnat b[NV];
      if constexpr (kPack) {  // W's row k, fetched kPackAhead rows ahead (a stride of ldw: no prefetcher follows)
        const float* row = wsrc + k * ldw + j0;
        const uintptr_t ahead = reinterpret_cast<uintptr_t>(row) + kPackAhead * ldw * sizeof(float);
        for (size_t o = 0; o < NV * sizeof(vnat); o += 64) __builtin_prefetch(reinterpret_cast<const void*>(ahead + o));
        vnat* dst = const_cast<vnat*>(bk);
        for (int v = 0; v < NV; ++v) {
          b[v] = *reinterpret_cast<const vnatu*>(row + kVL * v);
          dst[v] = b[v];
        }
      } else {
        const uintptr_t ahead = reinterpret_cast<uintptr_t>(bk) + 8 * kNB * sizeof(float);
        for (size_t o = 0; o < NV * sizeof(vnat); o += 64) __builtin_prefetch(reinterpret_cast<const void*>(ahead + o));
        for (int v = 0; v < NV; ++v) b[v] = bk[v];
      }
#pragma GCC unroll 24
      for (int r = 0; r < MR; ++r) {
        const float a = x[r * ldx + k];
        for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
      }
    }
    for (int r = 0; r < MR; ++r) {
      if (scale) {
        const vnat* sc = reinterpret_cast<const vnat*>(scale + j0);
        for (int v = 0; v < NV; ++v) acc[r][v] *= sc[v];
      }
      float* dst = y + r * ldy + j0;
      if (w == kVL * NV) {
        for (int v = 0; v < NV; ++v) *reinterpret_cast<vnatu*>(dst + kVL * v) = acc[r][v];
      } else {
        alignas(64) float tmp[kVL * NV];
        for (int v = 0; v < NV; ++v) reinterpret_cast<vnat*>(tmp)[v] = acc[r][v];
        std::memcpy(dst, tmp, static_cast<size_t>(w) * sizeof(float));
      }
    }
  }
}

#ifdef GEMMAX_BF16DOT
// The same tile for bfloat16 weights and activations on AVX512-BF16 (prefill of a bfloat16 model): the
// panel holds row pairs, panel[kp, n] = (W[2kp, n], W[2kp+1, n]) as two bfloat16 in one 32-bit lane, x
// likewise (xq[r, kp] = (x[r, 2kp], x[r, 2kp+1])), and one vdpbf16ps adds x[2kp] W[2kp, n] + x[2kp+1]
// W[2kp+1, n] for 16 columns: twice the products of a float32 FMA per instruction. The products are exact
// (bfloat16 x bfloat16 fits a float32) and accumulate in float32, so this differs from the float32 tile on
// the converted weights only in summation order. 6 rows x 4 zmm, the whole 64-column panel per k pair.
// yh (a bfloat16 result, last K block): the sums are rounded to bfloat16 from the registers and y is not
// written; rounding a tile after storing it to y cost 4% of the GEMM (a masked store does not forward to
// the load that follows it).
// NV < 4: only the first 16 NV columns of the panel (the batched head's few rows of x, below).
// kPack (NV = 4, whole 64-column panel, whole pairs): as gemm_tile's: the weights come from their bfloat16 rows
// in W (wsrc, row stride ldw), are interleaved into pairs in registers (vpermt2w) and written into the panel.
template <int MR, int NV = 4, bool kPack = false>
inline void gemm_tile_bf16(const uint32_t* xq, int64_t ldx, int64_t KP, const uint32_t* panel, const float* scale,
                           float* y, int64_t ldy, int width, bool accumulate, uint16_t* yh, int64_t ldyh,
                           const uint16_t* wsrc = nullptr, int64_t ldw = 0) {
  __mmask16 mask[NV];
  for (int v = 0; v < NV; ++v) {
    const int n = std::clamp(width - 16 * v, 0, 16);
    mask[v] = static_cast<__mmask16>((1u << n) - 1u);
  }
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mask[v], y + r * ldy + 16 * v) : _mm512_setzero_ps();
    }
  }
  for (int64_t kp = 0; kp < KP; ++kp) {
    const uint32_t* bk = panel + kp * kNB;
    __m512bh b[NV];
    if constexpr (kPack) {
      static_assert(NV == 4, "a packing tile covers the whole panel");
      // pair lane j = (row 2kp, row 2kp+1) at column j: words 2j and 2j+1 from a[j] and c[j]
      const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      const uint16_t* r0 = wsrc + 2 * kp * ldw;
      const uint16_t* r1 = r0 + ldw;
      const uintptr_t pa = reinterpret_cast<uintptr_t>(r0) + kPackAhead * ldw * sizeof(uint16_t);
      for (uintptr_t o = 0; o < 128; o += 64) {
        __builtin_prefetch(reinterpret_cast<const void*>(pa + o));
        __builtin_prefetch(reinterpret_cast<const void*>(pa + ldw * sizeof(uint16_t) + o));
      }
      const __m512i a0 = _mm512_loadu_si512(r0), a1 = _mm512_loadu_si512(r0 + 32);
      const __m512i c0 = _mm512_loadu_si512(r1), c1 = _mm512_loadu_si512(r1 + 32);
      const __m512i p[4] = {_mm512_permutex2var_epi16(a0, lo, c0), _mm512_permutex2var_epi16(a0, hi, c0),
                            _mm512_permutex2var_epi16(a1, lo, c1), _mm512_permutex2var_epi16(a1, hi, c1)};
      uint32_t* dst = const_cast<uint32_t*>(bk);
      for (int v = 0; v < 4; ++v) {
        _mm512_store_si512(dst + 16 * v, p[v]);
        b[v] = (__m512bh)p[v];
      }
    } else {
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(bk) + 8 * kNB * sizeof(uint32_t);  // as gemm_tile
      for (size_t o = 0; o < NV * 16 * sizeof(uint32_t); o += 64) {
        __builtin_prefetch(reinterpret_cast<const void*>(ahead + o));
      }
      for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_load_si512(bk + 16 * v);
    }
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xq[r * ldx + kp]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      __m512 o = acc[r][v];
      if (scale) o = _mm512_mul_ps(o, _mm512_loadu_ps(scale + 16 * v));
      if (yh) {
        _mm256_mask_storeu_epi16(yh + r * ldyh + 16 * v, mask[v], (__m256i)_mm512_cvtneps_pbh(o));
      } else {
        _mm512_mask_storeu_ps(y + r * ldy + 16 * v, mask[v], o);
      }
    }
  }
}

#endif

#if defined(GEMMAX_BF16DOT) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Intel AMX (Sapphire Rapids and later): the bfloat16 pair panel above is already the layout a tile product
// wants for its B operand (16 rows of k pairs x 16 columns of 32-bit pairs), and the pair-packed rows of x are
// its A operand (16 rows x 16 pairs). One TDPBF16PS adds a 16 x 16 x 32 product into a float32 tile: eight
// times the multiply-adds of two vdpbf16ps per cycle. The products are exact and the sums float32, as in
// gemm_tile_bf16; only the summation order differs (each tile product sums its 32 terms before adding).
// Tiles 0-3 hold a 32-row x 32-column block of sums (2 x 2), 4-5 the two 16-row slices of x, 6-7 two 16-column
// slices of the panel; a 64-column panel is two such passes.
#define GEMMAX_AMX 1
#include <sys/syscall.h>

// Linux hands a process AMX's 8 KB register state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults. Asked once; false means "use AVX512-BF16",
// as does GEMMAX_CPU_AMX=0 in the environment (for comparing the two paths).
bool amx_ready() {
  static const bool ok = [] {
    const char* off = std::getenv("GEMMAX_CPU_AMX");
    if (off && std::string_view(off) == "0") return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// The tile shapes are a per-thread register (LDTILECFG): every tile 16 rows x 64 bytes. Loaded by each task
// that uses tiles (XLA's pool threads run other work in between), released at its end.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void amx_begin() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

inline void amx_end() { _tile_release(); }

// out[16 RB, 64] = xq[16 RB rows, KP pairs] (row stride ldx pairs) x panel[KP, 64] pairs; KP a multiple of 16.
template <int RB>
inline void amx_tile(const uint32_t* xq, int64_t ldx, int64_t KP, const uint32_t* panel, float* out) {
  static_assert(RB == 1 || RB == 2, "one or two 16-row slices");
  const int64_t sx = ldx * 4;
  for (int half = 0; half < 2; ++half) {
    const uint32_t* pb = panel + 32 * half;
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (RB == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kp = 0; kp < KP; kp += 16) {
      _tile_loadd(4, xq + kp, sx);
      _tile_loadd(6, pb + kp * kNB, kNB * 4);
      _tile_loadd(7, pb + kp * kNB + 16, kNB * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (RB == 2) {
        _tile_loadd(5, xq + 16 * ldx + kp, sx);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, out + 32 * half, kNB * 4);
    _tile_stored(1, out + 32 * half + 16, kNB * 4);
    if constexpr (RB == 2) {
      _tile_stored(2, out + 16 * kNB + 32 * half, kNB * 4);
      _tile_stored(3, out + 16 * kNB + 32 * half + 16, kNB * 4);
    }
  }
}
#else
inline bool amx_ready() { return false; }
#endif

// y[rows, width] = x[rows, K] (row stride ldx) x panel[K, 64] (* scale), row tiles of MR then a remainder.
// X = uint32_t: bfloat16 row pairs for gemm_tile_bf16 (K and ldx counted in pairs).
// yh (pair tiles only): the result rounded to bfloat16 instead of y, row stride ldyh.
// NV (float32 tiles): vectors per sub-tile, as gemm_tile's.
template <int MR, int NV = kNV, typename X, typename Pan>
void gemm_rows(const X* x, int64_t ldx, int64_t rows, int64_t K, const Pan* panel, const float* scale,
               float* y, int64_t ldy, int width, bool accumulate = false, uint16_t* yh = nullptr,
               int64_t ldyh = 0) {
  int64_t m = 0;
  for (; m + MR <= rows; m += MR) {
#ifdef GEMMAX_BF16DOT
    if constexpr (std::is_same_v<X, uint32_t>) {
      gemm_tile_bf16<MR>(x + m * ldx, ldx, K, panel, scale, y + m * ldy, ldy, width, accumulate,
                         yh ? yh + m * ldyh : nullptr, ldyh);
      continue;
    }
#endif
    if constexpr (std::is_same_v<X, float>) {
      gemm_tile<MR, NV>(x + m * ldx, ldx, K, panel, scale, y + m * ldy, ldy, width, accumulate);
    }
  }
  if constexpr (MR > 1) {
    if (m < rows) {
      gemm_rows<MR - 1, NV>(x + m * ldx, ldx, rows - m, K, panel, scale, y + m * ldy, ldy, width, accumulate,
                        yh ? yh + m * ldyh : nullptr, ldyh);
    }
  }
}

// Spreads software prefetches of a weight block (rows of `bytes` at `stride`) over the tiles of the block
// being computed, so the next panel's rows arrive while this one's arithmetic runs.
struct BlockPrefetch {
  const char* base = nullptr;
  int64_t stride = 0, rows = 0, bytes = 0, done = 0;
  void upto(int64_t row) {  // issue every row below `row` (clamped to the block)
    for (row = std::min(row, rows); done < row; ++done) {
      const char* r = base + done * stride;
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(r + o);
      __builtin_prefetch(r + bytes - 1);  // a row that does not start on a line boundary
    }
  }
};

// Rows [0, kc) of a `width`-column slice of W (row stride N) as float32 into a 64-wide panel, zero past
// `width`: the panel of a block that its first row tile does not pack (a partial panel, or too few rows).
template <typename T>
void pack_panel(const T* src, int64_t N, int64_t kc, int width, float* panel) {
  for (int64_t k = 0; k < kc; ++k) {
    float* dst = panel + k * kNB;
    const T* row = src + k * N;
#pragma omp simd
    for (int j = 0; j < width; ++j) dst[j] = to_f32(row[j]);
    for (int j = width; j < kNB; ++j) dst[j] = 0.0f;
  }
}

// y[b, p*N + n] = scale[p*N + n] * sum_k x[b, k] W[p, k, n]. Work items are (p, row chunk, 64-column
// panel); row chunks only split the rows when there are too few panels to keep every thread busy (each
// repacks). Packing a panel reads 64 columns of each of K weight rows, N apart: from memory a latency-bound
// walk the hardware prefetcher does not follow (Gemma 3 270M float32 prefill GEMMs, 2 threads: 155-178
// GFLOP/s with the weights in cache, 106-137 cold; packing 5-8% of the threads' time). So while one
// (panel, K block) computes, the next one is prefetched a few rows per row tile: packing time -30-40%,
// float32 prefill of 512 tokens 1042 -> 937 ms. Each thread claims items one at a time, always one ahead
// (the item it will do next is known, so it can be prefetched): a thread that starts late or runs slower
// (XLA's pool wakes its workers; this VM's cores are shared) leaves at most one panel for the other to wait
// on. Groups of four panels per task had left up to a quarter of a thread's share: one process, old and new
// alternated call by call, 20 pairs: 1067 -> 1016 ms a prefill, faster in 13 of 20 pairs. The last items
// are also split into row slices (below): two A/Bs of 24 pairs, median ratios 0.967 and 0.949.
//
// kPairs (bfloat16 weights and activations on AVX512-BF16): x is first packed into bfloat16 pairs and each
// panel holds row pairs for gemm_tile_bf16; K blocks then start on even rows.
//
// xh (kPairs): x as bfloat16 [B, K]; with K even its rows already are the pairs. yh: y is then float32
// scratch and each finished tile is also rounded to bfloat16 into yh, while it is still in L1.
template <typename T, bool kPairs = false>
void gemm_in_major(const float* x, const uint16_t* xh, const T* w, float* y, uint16_t* yh, const float* scale,
                   int64_t B, int64_t P, int64_t K, int64_t N, ffi::ThreadPool* pool, const Epilogue& ep = {}) {
  const int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
  const int64_t KP = (K + 1) / 2;  // x's row length in pairs (kPairs)
  static thread_local std::vector<uint32_t> xq_buf;
  const uint32_t* xq = nullptr;
  if constexpr (kPairs) {  // xq[b, kp] = (x[b, 2kp], x[b, 2kp + 1]) as bfloat16 bits
    if (K % 2 == 0) {
      xq = reinterpret_cast<const uint32_t*>(xh);
    } else {
      xq_buf.assign(static_cast<size_t>(B * KP), 0u);
      uint32_t* dst = xq_buf.data();
      for (int64_t b = 0; b < B; ++b) std::memcpy(dst + b * KP, xh + b * K, static_cast<size_t>(K) * 2);
      xq = dst;  // thread_local names resolve per thread: the workers get the pointer
    }
  }
  const int64_t panels = (N + kNB - 1) / kNB;
  // float32 weights: a block's first row tile packs the panel itself (gemm_tile's kPack), its loads from W
  // overlapped with its arithmetic, where a packing loop first had stalled on them. Float32 prefill of 512
  // tokens, both ways alternated in one process, 20 and 16 pairs: median ratios 0.978 and 0.977 (a panel
  // packed ahead, persistently, would gain ~4% at the cost of a second copy of every weight: not done).
  const bool fused_pack = std::is_same_v<T, float> && !kPairs;
  // The same for the bfloat16 pair tile (gemm_tile_bf16's kPack: two W rows interleaved into pairs in
  // registers) wherever a block has whole row pairs: bfloat16 prefill of 512 tokens, 24 pairs twice, median
  // ratios 0.964 and 0.972 (faster in 17 and 19).
  const bool pair_pack = kPairs && std::is_same_v<T, uint16_t>;
  int64_t chunk = B;
  while (P * panels * ((B + chunk - 1) / chunk) < 4 * threads && chunk > 8 * kMR) {
    chunk = ((chunk / 2 + kMR - 1) / kMR) * kMR;
  }
  const int64_t chunks = (B + chunk - 1) / chunk;
  const int64_t whole = P * chunks * panels;  // (p, row chunk, panel), panel fastest
  // The last `threads` items are handed out in kTailSplit row slices each, so that the thread that finishes
  // last waits on a slice, not a whole panel (10 panels of 512 rows for an N = 640 projection: one panel is
  // a tenth of the call).
  constexpr int64_t kTailSplit = 3;
  const int64_t tail = chunk >= kTailSplit * 4 * kMR ? std::min(threads, whole) : 0;
  const int64_t items = whole - tail + tail * kTailSplit;
  const int64_t panel_bytes = K * kNB * (kPairs ? 2 : 4);  // float32 rows, or bfloat16 row pairs
  const int64_t kblocks0 = 2 * panel_bytes <= l2_bytes() || K <= 1024 ? 1 : (K + kKC - 1) / kKC;
  // AMX (bfloat16 pairs, a CPU that has it, whole 16-row slices to fill): tile products need K blocks of
  // whole 32-element steps, so K blocks are rounded up to them; a block of another length keeps the pair tile.
  const bool use_amx = kPairs && B >= 16 && amx_ready();
  const int64_t kc_step = use_amx ? 32 : kPairs ? 2 : 1;
  const int64_t kc_max = ((K + kblocks0 - 1) / kblocks0 + kc_step - 1) / kc_step * kc_step;
  const int64_t kblocks = (K + kc_max - 1) / kc_max;  // rounding up never leaves an empty last block
  struct Block {
    int64_t p, r0, r1, n0, k0, kc;
    int width;
  };
  auto block_of = [=](int64_t item, int64_t kb) {
    const int64_t slice = item < whole - tail ? -1 : (item - (whole - tail)) % kTailSplit;
    const int64_t w_item = slice < 0 ? item : whole - tail + (item - (whole - tail)) / kTailSplit;
    const int64_t pj = w_item % panels, c = (w_item / panels) % chunks, p = w_item / (panels * chunks);
    const int64_t n0 = pj * kNB, k0 = kb * kc_max;
    int64_t r0 = c * chunk, r1 = std::min(B, r0 + chunk);
    if (slice >= 0) {  // whole tiles of kMR rows per slice, the remainder in the last
      const int64_t step = ((r1 - r0) / kTailSplit / kMR) * kMR;
      r1 = slice + 1 < kTailSplit ? r0 + (slice + 1) * step : r1;
      r0 += slice * step;
    }
    return Block{p, r0, r1, n0, k0, std::min(kc_max, K - k0), static_cast<int>(std::min<int64_t>(kNB, N - n0))};
  };
  std::atomic<int64_t> next{0};
  parallel_for(pool, std::min(threads, items), [&](int64_t) {
    static thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>((kc_max + 1) * kNB + 16));
    float* panel = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
    float* sc = panel + kc_max * kNB;
    alignas(64) float tile[kMR * kNB];
#ifdef GEMMAX_AMX
    alignas(64) float amx_out[32 * kNB];
    if (use_amx) amx_begin();
#endif
    int64_t item = next.fetch_add(1, std::memory_order_relaxed);
    while (item < items) {
      // claimed one item ahead, so its first block can be prefetched while this item computes
      const int64_t ahead = next.fetch_add(1, std::memory_order_relaxed);
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const auto [p, r0, r1, n0, k0, kc, width] = block_of(item, kb);
        if (scale && k0 == 0) {
          for (int j = 0; j < kNB; ++j) sc[j] = j < width ? scale[p * N + n0 + j] : 0.0f;
        }
        const T* src = w + p * K * N + k0 * N + n0;
        // whole panel, whole pairs, at least one whole row tile: the block's first tile packs (t == 0 below)
        const bool amx_block = use_amx && kc % 32 == 0 && r1 - r0 >= 16;
        const bool tile_packs = (fused_pack || (pair_pack && kc % 2 == 0)) && width == kNB && r1 - r0 >= kMR &&
                                !amx_block;
        if (tile_packs) {
          // packed by the block's first row tile, below
        } else if constexpr (kPairs) {
          uint32_t* pp = reinterpret_cast<uint32_t*>(panel);
          for (int64_t k = 0; k < kc; k += 2) {
            uint32_t* dst = pp + (k / 2) * kNB;
            const uint16_t* r0 = reinterpret_cast<const uint16_t*>(src + k * N);
            if (k + 1 < kc) {
              const uint16_t* r1 = r0 + N;
#pragma omp simd
              for (int j = 0; j < width; ++j) dst[j] = r0[j] | (static_cast<uint32_t>(r1[j]) << 16);
            } else {  // odd K: the pair's second row is zero
              for (int j = 0; j < width; ++j) dst[j] = r0[j];
            }
            for (int j = width; j < kNB; ++j) dst[j] = 0;
          }
        } else {
          pack_panel(src, N, kc, width, panel);
        }
        BlockPrefetch pf;
        if (kb + 1 < kblocks || ahead < items) {
          const Block nb = kb + 1 < kblocks ? block_of(item, kb + 1) : block_of(ahead, 0);
          pf = {reinterpret_cast<const char*>(w + nb.p * K * N + nb.k0 * N + nb.n0),
                N * static_cast<int64_t>(sizeof(T)), nb.kc, nb.width * static_cast<int64_t>(sizeof(T))};
        }
        const bool last = k0 + kc == K;
        const float* s = scale && last ? sc : nullptr;
        float* yb = y + p * N + n0;
        int64_t r_amx = r0;  // rows below r_amx are done by tile products
#ifdef GEMMAX_AMX
        if (amx_block) {
          const uint32_t* pp = reinterpret_cast<const uint32_t*>(panel);
          const int64_t slices = (r1 - r0) / 16;
          for (int64_t m = r0; m + 16 <= r1;) {
            const int rb = m + 32 <= r1 ? 2 : 1;
            if (rb == 2) {
              amx_tile<2>(xq + m * KP + k0 / 2, KP, kc / 2, pp, amx_out);
            } else {
              amx_tile<1>(xq + m * KP + k0 / 2, KP, kc / 2, pp, amx_out);
            }
            for (int r = 0; r < 16 * rb; ++r) {
              float* src = amx_out + r * kNB;
              float* yr = yb + (m + r) * P * N;
              if (k0 > 0) {
                for (int j = 0; j < width; ++j) src[j] += yr[j];
              }
              if (!last) {
                std::memcpy(yr, src, static_cast<size_t>(width) * 4);
                continue;
              }
              if (s) {
                for (int j = 0; j < width; ++j) src[j] *= s[j];
              }
              uint16_t* dh = yh ? yh + (m + r) * P * N + p * N + n0 : nullptr;
              if (ep.any()) {
                epilogue_row(ep, src, width, m + r, p * N + n0, P * N, yr, dh);
              } else if (dh) {
                to_bf16(src, dh, width);
              } else {
                std::memcpy(yr, src, static_cast<size_t>(width) * 4);
              }
            }
            m += 16 * rb;
            r_amx = m;
            pf.upto(pf.rows * ((m - r0) / 16) / std::max<int64_t>(slices, 1));
          }
        }
#endif
        const int64_t tiles = (r1 - r_amx + kMR - 1) / kMR;
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t m = r_amx + t * kMR, rows = std::min<int64_t>(kMR, r1 - m);
          // the pair tile rounds its own bfloat16 result unless there is an epilogue
          // A bfloat16 result leaves by the pair tile's own rounding, or (float32 tile, epilogue) through a
          // tile in L1: with whole K the float32 sums need not reach y at all (writing them cost the gelu
          // GEMM of the 270M 16% on one thread, the lines fetched from memory only to be overwritten).
          const bool tile_rounds = kPairs && !ep.any();
          const bool local = kblocks == 1 && yh && !tile_rounds;
          float* yt = local ? tile : yb + m * P * N;
          const int64_t ldt = local ? kNB : P * N;
          if (last && (ep.mul || ep.mulh)) {  // the tile's rows of mul, fetched while its products run
            const int64_t esz = ep.mul ? 4 : 2;
            const char* base = ep.mul ? reinterpret_cast<const char*>(ep.mul) : reinterpret_cast<const char*>(ep.mulh);
            for (int64_t r = m; r < m + rows; ++r) {
              const char* row = base + (r * P * N + p * N + n0) * esz;
              for (int64_t o = 0; o < width * esz; o += 64) __builtin_prefetch(row + o);
              __builtin_prefetch(row + width * esz - 1);
            }
          }
          auto round_tile = [&] {
            if (!last) return;
            for (int64_t r = 0; r < rows; ++r) {
              float* src = yt + r * ldt;
              uint16_t* dh = yh ? yh + (m + r) * P * N + p * N + n0 : nullptr;
              if (ep.any()) {
                epilogue_row(ep, src, width, m + r, p * N + n0, P * N, src, dh);
              } else if (!tile_rounds && dh) {
                to_bf16(src, dh, width);
              }
            }
          };
          if constexpr (kPairs) {
#ifdef GEMMAX_BF16DOT
            if (tile_packs && t == 0) {
              if constexpr (std::is_same_v<T, uint16_t>) {
                gemm_tile_bf16<kMR, 4, true>(xq + m * KP + k0 / 2, KP, kc / 2, reinterpret_cast<const uint32_t*>(panel),
                                             s, yt, ldt, width, k0 > 0,
                                             yh && last && tile_rounds ? yh + m * P * N + p * N + n0 : nullptr, P * N,
                                             reinterpret_cast<const uint16_t*>(src), N);
              }
            } else {
              gemm_rows<kMR>(xq + m * KP + k0 / 2, KP, rows, (kc + 1) / 2, reinterpret_cast<const uint32_t*>(panel), s,
                             yt, ldt, width, k0 > 0, yh && last && tile_rounds ? yh + m * P * N + p * N + n0 : nullptr,
                             P * N);
            }
#endif
          } else if (tile_packs && t == 0) {
            if constexpr (std::is_same_v<T, float>) {
              gemm_tile<kMR, kNV, true>(x + m * K + k0, K, kc, panel, s, yt, ldt, width, k0 > 0, src, N);
            }
          } else if (rows == kMR) {
            gemm_tile<kMR>(x + m * K + k0, K, kc, panel, s, yt, ldt, width, k0 > 0);
          } else {
            gemm_rows<kMR - 1>(x + m * K + k0, K, rows, kc, panel, s, yt, ldt, width, k0 > 0);
          }
          round_tile();
          pf.upto(pf.rows * (t + 1) / tiles);
        }
      }
      item = ahead;
    }
#ifdef GEMMAX_AMX
    if (use_amx) amx_end();
#endif
  });
}


// y[B, N] = x[B, K] W[K, N] (* scale) for a K far longer than the other two: the hidden states' gradient
// through a head stored [V, D] (g [rows, V] x head [V, D], contracting over the vocabulary). gemm_in_major's
// items are 64-column panels that each walk all of K, so x (rows x V floats, hundreds of MB) is read from
// memory once per panel: ten times for D = 640. Here K is cut into slices that the threads claim one at a
// time. A thread walks a slice one chunk of rows at a time, its K blocks with the panels inside: each block
// of x comes from memory once and from L2 for the other panels, summed into the slice's own copy of y
// (the chunk's part of it stays in L2); the copies are added up at the end, in slice order. Float32 weights and x, one
// product (P = 1); a gated MLP's epilogue is applied to the finished rows (dispatch).
//
// Rows in chunks whose part of y fills at most a quarter of L2 (W is read once per chunk), K in blocks of
// 256. Two-thread Xeon (2 MB L2), g [rows, 262144] x [262144, 640], medians of 6 calls alternated with
// gemm_in_major's: 128 rows 350 -> 267 ms, 512 rows 1316 -> 1042-1156 ms (chunks of 128-256 rows and
// blocks of 128-384 alike within the noise; y whole at 512 rows: 1230 ms).
//
// A batched decode's few rows (kSkinnyRows to kSplitKRows) take it too, in blocks of 64 rows of W: a 64-column
// panel walked down all of K reads 256 bytes of each of W's rows (one float32 gate projection of the 270M:
// 640 rows 8 KB apart), a stride no hardware prefetcher follows, while a block's panels sweep up its rows
// page by page, which the L2 streamer does follow. Two-thread Xeon, 8 rows through the 18 gate and down
// projections of the 270M (float32, from memory), alternated calls: 17.2 -> 12.2-12.7 ms; 12 rows 19.3 ->
// 14.9, 16 rows 26.7 -> 20.7; equal at 24 and 32 rows. The real 270M sampling 8 rows of 32 tokens (float32,
// greedy, alternated): 3.19 -> 2.84 s; a GRPO step of the post-training benchmark 4.61 -> 4.32 s.
constexpr int64_t kSplitKRows = 16;

bool long_k(int64_t B, int64_t K, int64_t N) {
  return N > kNB && K >= 16 * N && B * K * static_cast<int64_t>(sizeof(float)) > 4 * l2_bytes();
}

void gemm_split_k(const float* x, const float* w, float* y, const float* scale, int64_t B, int64_t K, int64_t N,
                 ffi::ThreadPool* pool) {
  const int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
  const int64_t panels = (N + kNB - 1) / kNB;
  // a few rows: blocks of at most 64 rows of W, fewer where that leaves under four blocks a thread
  const int64_t kc = B <= kSplitKRows ? std::clamp<int64_t>(K / (4 * threads) / 16 * 16, 16, 64) : 256;
  const int64_t chunk = std::min(B, std::max<int64_t>(8 * kMR, l2_bytes() / 4 / (N * 4) / kMR * kMR));
  const int64_t kblocks = (K + kc - 1) / kc;
  // several slices a thread: one that runs slower (a shared VM core) leaves the others a slice, not half.
  // Each slice sums into its own copy of y (slice 0 into y itself), added up in slice order at the end, so
  // a row's result does not depend on which thread took which slice: a decode step is reproducible.
  const int64_t slices = std::min<int64_t>(kblocks, 4 * threads);
  static thread_local std::vector<float> parts;  // the calling thread's, filled by the workers
  parts.resize(static_cast<size_t>((slices - 1) * B * N));
  float* const part0 = parts.data();
  std::atomic<int64_t> next{0};
  parallel_for(pool, std::min(threads, slices), [&](int64_t) {
    static thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(kc * kNB + 16));
    float* panel = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
    for (int64_t s = next.fetch_add(1, std::memory_order_relaxed); s < slices;
         s = next.fetch_add(1, std::memory_order_relaxed)) {
      float* out = s == 0 ? y : part0 + (s - 1) * B * N;
      const int64_t kb0 = s * kblocks / slices, kb1 = (s + 1) * kblocks / slices;
      for (int64_t c0 = 0; c0 < B; c0 += chunk) {
        const int64_t c1 = std::min(B, c0 + chunk), tiles = (c1 - c0 + kMR - 1) / kMR;
        for (int64_t kb = kb0; kb < kb1; ++kb) {
          const int64_t k0 = kb * kc, kcur = std::min(kc, K - k0);
          const bool add = kb > kb0;  // the slice's first block stores, the later ones add
          for (int64_t pj = 0; pj < panels; ++pj) {
            const int64_t n0 = pj * kNB;
            const int width = static_cast<int>(std::min<int64_t>(kNB, N - n0));
            const float* src = w + k0 * N + n0;
            const bool packs = width == kNB && c1 - c0 >= kMR;  // the first row tile packs the panel
            if (!packs) pack_panel(src, N, kcur, width, panel);
            BlockPrefetch pf;  // the next panel's rows of this block, or the next block's first panel
            if (pj + 1 < panels) {
              pf = {reinterpret_cast<const char*>(src + kNB), N * 4, kcur, std::min<int64_t>(kNB, N - n0 - kNB) * 4};
            } else if (kb + 1 < kb1) {
              pf = {reinterpret_cast<const char*>(w + (k0 + kc) * N), N * 4, std::min(kc, K - k0 - kc),
                    std::min<int64_t>(kNB, N) * 4};
            }
            for (int64_t ti = 0; ti < tiles; ++ti) {
              const int64_t m = c0 + ti * kMR, rows = std::min<int64_t>(kMR, c1 - m);
              const float* xb = x + m * K + k0;
              float* yb = out + m * N + n0;
              if (packs && ti == 0) {
                gemm_tile<kMR, kNV, true>(xb, K, kcur, panel, nullptr, yb, N, width, add, src, N);
              } else if (rows == kMR) {
                gemm_tile<kMR>(xb, K, kcur, panel, nullptr, yb, N, width, add);
              } else {
                gemm_rows<kMR - 1>(xb, K, rows, kcur, panel, nullptr, yb, N, width, add);
              }
              pf.upto(pf.rows * (ti + 1) / tiles);
            }
          }
        }
      }
    }
  });
  for (int64_t s = 1; s < slices; ++s) {
    const float* part = part0 + (s - 1) * B * N;
#pragma omp simd
    for (int64_t i = 0; i < B * N; ++i) y[i] += part[i];
  }
  if (scale) {
    for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) y[b * N + j] *= scale[j];
    }
  }
}


// ---- a few rows (batched decode): the in-minor head as a skinny GEMM -------------------------------------
//
// The tied head W[N, K] against several rows of x. The one-row kernels above re-read each weight row from L1
// once per row of x, and x from L2 for every weight row: at 16 rows of the 270M float32 head, ~33 GFLOP/s a
// core, bound by L2 loads. Here x is packed transposed once into a [K, 64] panel (B <= 64 columns, L1/L2
// resident) and the weight rows are the GEMM's "A" side: the tile above broadcasts each weight once into
// ceil(B / kVL) fused multiply-adds, so W streams from memory exactly once. Output tiles come out as
// y^T [rows, B] and are written back transposed and scaled. One thread, a quarter of that head at 16 rows:
// 42.5 -> 25.5 ms; the engine's batch-16 float32 step (which had used XLA's dot): 264 -> 139 ms.
//
// From kSkinnyRows rows of x on, products take these register-blocked GEMM paths (in-major: gemm_in_major,
// as prefill; in-minor: in_minor_gemm) instead of the GEMV kernels, whose cost grows with every row.
// Measured on Zen 3, one thread, float32 weights streamed from memory, GEMM / GEMV time: at 8 rows 0.78-1.03
// (in-major), 0.93 (head); at 16 rows 0.60-0.76 and 0.59; at 32 rows 0.43-0.53.
// (The head with AVX-512 waits for 32 rows: see dispatch. Not measured on an AVX-512 CPU.)
constexpr int64_t kSkinnyRows = 8;
constexpr int64_t kHeadRows = 48;  // weight rows per tile pass (8 tiles of kMR), converted to float32 once

// NV < kNV (AVX-512 with at most 32 rows of x): the weight rows go through a tile as wide as the rows of
// x, 24 / NV weight rows x NV vectors (24 accumulators), instead of 6 x kNV; with one vector (8-16 rows of x)
// 16 weight rows: Gemma 3 270M head, float32, 8 and 16 rows on Zen 4, 42-43 -> 36 ms (two A/B rounds).
template <typename T, int NV = kNV>
void in_minor_gemm(const float* x, const T* w, float* y, const float* scale, int64_t B, int64_t N, int64_t K,
                   ffi::ThreadPool* pool) {
  static thread_local std::vector<float> xt_buf;
  xt_buf.assign(static_cast<size_t>(K * kNB + 16), 0.0f);
  float* xt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xt_buf.data()) + 63) & ~uintptr_t{63});
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) xt[k * kNB + b] = x[b * K + k];
  }
  const int width = static_cast<int>(B);
  const int64_t block = 8 * kHeadRows;
  parallel_for(pool, (N + block - 1) / block, [=](int64_t task) {
    static thread_local std::vector<float> rows_buf, out_buf;
    out_buf.resize(static_cast<size_t>(kHeadRows * kNB));
    float* out = out_buf.data();
    const int64_t r0 = task * block, r1 = std::min(N, r0 + block);
    for (int64_t s0 = r0; s0 < r1; s0 += kHeadRows) {
      const int64_t n = std::min(kHeadRows, r1 - s0);
      const float* a;
      if constexpr (std::is_same_v<T, float>) {
        a = w + s0 * K;
      } else {  // converted once, then swept 6 rows at a time from L2
        rows_buf.resize(static_cast<size_t>(kHeadRows * K));
        const T* src = w + s0 * K;
#pragma omp simd
        for (int64_t i = 0; i < n * K; ++i) rows_buf[i] = to_f32(src[i]);
        a = rows_buf.data();
      }
      gemm_rows<NV == kNV ? kMR : NV == 1 ? 16 : 24 / NV, NV>(a, K, n, K, xt, nullptr, out, kNB, width);
      for (int64_t b = 0; b < B; ++b) {
        float* dst = y + b * N + s0;
        for (int64_t i = 0; i < n; ++i) dst[i] = out[i * kNB + b] * (scale ? scale[s0 + i] : 1.0f);
      }
    }
  });
}


// The float32 head with at most kVL / 2 rows of x (8 with AVX-512: the engine's default 8 slots, a GRPO
// group): in_minor_gemm's narrowest tile puts the rows of x in a vector's lanes, so 8 rows leave half of
// every multiply-add on padding. Here a lane pair holds one row of x at two consecutive k, and each weight
// row is broadcast two floats at a time (one 64-bit broadcast): every lane works, the loop runs K / 2 steps,
// and a row's two partial sums are added at the end (k order within each of the two sums). Gemma 3 270M
// float32 head, 8 rows, two threads, Xeon (Sapphire Rapids class), alternated in one process: 52-59 ms in
// the narrow tile, 37.7-39.6 ms here.
constexpr int kPairRows = 16;  // weight rows per tile (16 accumulators)
typedef double vpair __attribute__((vector_size(4 * kVL), aligned(4)));

template <int MR>
inline void head_pair_tile(const float* w, int64_t K, const float* xt2, float* out) {
  vnat acc[MR] = {};
  // The next tile's MR rows (contiguous, MR * K floats) are fetched while this one computes, MR * 8 bytes of
  // them per step: two lines a step at MR = 16. The 16 row streams of a tile are more than the hardware
  // prefetchers follow (8 rows of the 270M head on a Xeon: 52.9 ms without, 39.6 one tile ahead, 43.1 two,
  // 48.0 four). Integer arithmetic: the lines may lie past W (a prefetch never faults).
  const uintptr_t next = reinterpret_cast<uintptr_t>(w + MR * K);
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    const vnat b = *reinterpret_cast<const vnat*>(xt2 + kp * kVL);
    const uintptr_t at = next + static_cast<uintptr_t>(kp) * MR * 8;
    __builtin_prefetch(reinterpret_cast<const void*>(at));
    if constexpr (MR * 8 > 64) __builtin_prefetch(reinterpret_cast<const void*>(at + 64));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      double two;
      std::memcpy(&two, w + r * K + 2 * kp, sizeof(two));
      acc[r] += reinterpret_cast<vnat>(vpair{} + two) * b;
    }
  }
  for (int r = 0; r < MR; ++r) *reinterpret_cast<vnatu*>(out + r * kVL) = acc[r];
}

inline void in_minor_pairs(const float* x, const float* w, float* y, const float* scale, int64_t B, int64_t N,
                           int64_t K, ffi::ThreadPool* pool) {
  static thread_local std::vector<float> xt_buf;
  xt_buf.assign(static_cast<size_t>(K / 2 * kVL + 16), 0.0f);
  float* xt2 = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xt_buf.data()) + 63) & ~uintptr_t{63});
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) xt2[(k / 2) * kVL + 2 * b + (k & 1)] = x[b * K + k];
  }
  const int64_t block = 8 * kHeadRows;
  parallel_for(pool, (N + block - 1) / block, [=](int64_t task) {
    alignas(64) float out[kPairRows * kVL];
    const int64_t r0 = task * block, r1 = std::min(N, r0 + block);
    for (int64_t s0 = r0; s0 < r1; s0 += kPairRows) {
      const int64_t n = std::min<int64_t>(kPairRows, r1 - s0);
      if (n == kPairRows) {
        head_pair_tile<kPairRows>(w + s0 * K, K, xt2, out);
      } else {
        for (int64_t i = 0; i < n; ++i) head_pair_tile<1>(w + (s0 + i) * K, K, xt2, out + i * kVL);
      }
      for (int64_t b = 0; b < B; ++b) {
        float* dst = y + b * N + s0;
        for (int64_t i = 0; i < n; ++i) {
          const float v = out[i * kVL + 2 * b] + out[i * kVL + 2 * b + 1];
          dst[i] = scale ? v * scale[s0 + i] : v;
        }
      }
    }
  });
}

#ifdef GEMMAX_BF16DOT
// The batched head (in-minor W[N, K]) with bfloat16 weights and bfloat16 x on AVX512-BF16: the weight rows
// are the tile's rows as they are (with K even a bfloat16 row is its own pair layout: nothing converted,
// where in_minor_gemm converts every weight row to float32, 335 MB a step for the 270M head), x is packed
// once as transposed pairs [K/2, 64], and the tile is only as wide as the rows of x: NV = ceil(B / 16) zmm,
// MR = 24 / NV weight rows (24 accumulators). Gemma 3 270M bfloat16, batch 16: the head had been 75 ms
// of a ~125 ms step (the one-row GEMVs, once per row of x).
// Up to kNB rows of bfloat16 x [B, K] (K even) as transposed pairs [K/2, kNB] (column b holds row b's pairs,
// zero past B), 64-byte aligned, in a per-thread buffer: the B operand of the batched heads below.
inline const uint32_t* pack_pairs_transposed(const uint16_t* xh, int64_t B, int64_t K) {
  const int64_t KP = K / 2;
  static thread_local std::vector<uint32_t> xt_buf;
  xt_buf.assign(static_cast<size_t>(KP * kNB + 16), 0u);
  uint32_t* xt = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(xt_buf.data()) + 63) & ~uintptr_t{63});
  for (int64_t b = 0; b < B; ++b) {
    const uint32_t* xr = reinterpret_cast<const uint32_t*>(xh + b * K);
    for (int64_t kp = 0; kp < KP; ++kp) xt[kp * kNB + b] = xr[kp];
  }
  return xt;
}

template <int MR, int NV>
void head_rows_bf16(const uint32_t* w2, int64_t KP, int64_t rows, const uint32_t* xt, float* out, int width) {
  int64_t m = 0;
  for (; m + MR <= rows; m += MR) {
    gemm_tile_bf16<MR, NV>(w2 + m * KP, KP, KP, xt, nullptr, out + m * kNB, kNB, width, false, nullptr, 0);
  }
  if constexpr (MR > 1) {
    if (m < rows) head_rows_bf16<MR - 1, NV>(w2 + m * KP, KP, rows - m, xt, out + m * kNB, width);
  }
}

template <int NV>
void in_minor_gemm_bf16(const uint16_t* xh, const uint16_t* w, float* y, const float* scale, int64_t B, int64_t N,
                        int64_t K, ffi::ThreadPool* pool) {
  const int64_t KP = K / 2;  // K even (checked by the caller)
  const uint32_t* xt = pack_pairs_transposed(xh, B, K);
  constexpr int64_t kRows = 240;  // weight rows per task
  const auto* w2 = reinterpret_cast<const uint32_t*>(w);
  parallel_for(pool, (N + kRows - 1) / kRows, [=](int64_t task) {
    static thread_local std::vector<float> out_buf;
    out_buf.resize(static_cast<size_t>(kRows * kNB));
    float* out = out_buf.data();
    const int64_t r0 = task * kRows, n = std::min(kRows, N - r0);
    head_rows_bf16<24 / NV, NV>(w2 + r0 * KP, KP, n, xt, out, static_cast<int>(B));
    for (int64_t b = 0; b < B; ++b) {
      float* dst = y + b * N + r0;
      for (int64_t i = 0; i < n; ++i) dst[i] = out[i * kNB + b] * (scale ? scale[r0 + i] : 1.0f);
    }
  });
}
#endif

#ifdef GEMMAX_AMX
// The same product on AMX, with the roles turned round: the *weights* are the A operand, 16 weight rows x 32 k
// read in place (a tile load takes the row stride K, so an in-minor bfloat16 weight needs no packing at all),
// and x is the B operand, the transposed pairs [K/2, 64] packed above, 16 rows of x per tile. One block is 32
// weight rows x RB * 16 rows of x: tiles 0-3 the float32 sums C[n, b], 4-5 the two weight slices, 6-7 the two
// slices of x. A tile product is 16 x 16 x 32 multiply-adds (~11 ns on a Sapphire Rapids core); the loop is
// bound by its tile loads instead. Gemma 3 270M bfloat16 head on a 2-core Xeon: 8 rows ~14 ms (~24 GB/s, near
// the read bandwidth), 32 rows 31-35 ms (93 ms in the AVX512-BF16 tile above).
template <int RB>
inline void amx_head_block(const uint16_t* w, int64_t K, const uint32_t* xt, float* out) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (RB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t sw = K * 2;  // bytes from one weight row to the next
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    _tile_loadd(4, w + k0, sw);
    _tile_loadd(5, w + 16 * K + k0, sw);
    const uint32_t* xb = xt + (k0 / 2) * kNB;
    _tile_loadd(6, xb, kNB * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if constexpr (RB == 2) {
      _tile_loadd(7, xb + 16, kNB * 4);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out, kNB * 4);  // weight rows 0-15 x rows of x 0-15, as out[n * kNB + b]
  _tile_stored(1, out + 16 * kNB, kNB * 4);
  if constexpr (RB == 2) {
    _tile_stored(2, out + 16, kNB * 4);
    _tile_stored(3, out + 16 * kNB + 16, kNB * 4);
  }
}

// y[B, N] = x[B, K] W[N, K]^T for 1 <= B <= 32 rows of bfloat16 x, bfloat16 W, K a multiple of 32; weight rows
// past the last whole 32-row block take head_rows_bf16.
template <int RB>
void in_minor_amx(const uint16_t* xh, const uint16_t* w, float* y, const float* scale, int64_t B, int64_t N,
                  int64_t K, ffi::ThreadPool* pool) {
  const int64_t KP = K / 2;
  const uint32_t* xt = pack_pairs_transposed(xh, B, K);
  constexpr int64_t kRows = 256;  // weight rows per task: 8 blocks
  parallel_for(pool, (N + kRows - 1) / kRows, [=](int64_t task) {
    alignas(64) float out[32 * kNB];  // one block's sums, or a tail of fewer than 32 weight rows
    const int64_t r0 = task * kRows, n = std::min(kRows, N - r0);
    int64_t m = 0;
    if (n >= 32) {
      // each block's sums are turned round into y while they are in L1: column b of the block's [32, kNB]
      // sums is 16 + 16 gathered floats, one store each (a strided scalar copy of the whole task's sums had
      // cost the 270M head ~20 ms at 32 rows)
      const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(kNB));
      amx_begin();
      for (; m + 32 <= n; m += 32) {
        amx_head_block<RB>(w + (r0 + m) * K, K, xt, out);
        for (int64_t b = 0; b < B; ++b) {
          float* dst = y + b * N + r0 + m;
          for (int h = 0; h < 2; ++h) {
            __m512 v = _mm512_i32gather_ps(idx, out + h * 16 * kNB + b, 4);
            if (scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + r0 + m + 16 * h));
            _mm512_storeu_ps(dst + 16 * h, v);
          }
        }
      }
      amx_end();
    }
    if (m < n) {
      head_rows_bf16<24 / RB, RB>(reinterpret_cast<const uint32_t*>(w) + (r0 + m) * KP, KP, n - m, xt, out,
                                  static_cast<int>(B));
      for (int64_t b = 0; b < B; ++b) {
        float* dst = y + b * N + r0 + m;
        for (int64_t i = 0; i < n - m; ++i) dst[i] = out[i * kNB + b] * (scale ? scale[r0 + m + i] : 1.0f);
      }
    }
  });
}

// The batched bfloat16 head on AMX where it applies (8-32 rows, K whole 32-element steps, the CPU has it):
// true when done.
inline bool head_amx(const uint16_t* xh, const uint16_t* w, float* y, const float* scale, int64_t B, int64_t N,
                     int64_t K, ffi::ThreadPool* pool) {
  if (B > 32 || K % 32 != 0 || !amx_ready()) return false;
  if (B <= 16) {
    in_minor_amx<1>(xh, w, y, scale, B, N, K, pool);
  } else {
    in_minor_amx<2>(xh, w, y, scale, B, N, K, pool);
  }
  return true;
}
#else
inline bool head_amx(const uint16_t*, const uint16_t*, float*, const float*, int64_t, int64_t, int64_t,
                     ffi::ThreadPool*) {
  return false;
}
#endif


// ---- prefill attention ------------------------------------------------------------------------------
//
// Causal (optionally sliding-window) grouped-query attention over whole prompts, blocked so that a block of
// queries only meets the keys it can see: about half the work of a dense [T, T] product for a causal prompt,
// O(T x window) for local layers, and no [H, T, T] score tensor in memory (XLA's path spends ~150 ms of a
// 0.63 s Gemma 3 270M prefill of 512 tokens on scores, mask, softmax and their layout copies). Both products
// run on the GEMM tile above: K is packed once per (row, KV head) as transposed 64-key panels, V as 64-wide
// column panels. Masking equals gemmax's attention_mask with segment = (position < length): a prompt
// position attends positions [i - window + 1, i]; a padding position only other padding positions.
constexpr int64_t kQB = 48;  // query rows per task (8 tiles of kMR)


struct AttnDims {
  int64_t B, T, H, KV, D;
};

// Unnormalised softmax over one row of scores s[0, n) (already capped), keys outside [a, b) excluded: s
// becomes e^(s - max), zero where excluded; returns 1 / sum, which the caller applies to the row's output
// (one pass over D values instead of one over the n probabilities). Vector max, exp and sum on native
// vectors; the tail is padded to a whole vector and its extra lanes zeroed after the exp (v_exp clamps).
inline vnat lane_index() {
  vnat v;
  for (int t = 0; t < kVL; ++t) v[t] = static_cast<float>(t);
  return v;
}

// The largest of p[0, n) (-inf when n == 0), on native vectors.
inline float row_max(const float* p, int64_t n) {
  vnat mv = vnat{} - INFINITY;
  int64_t j = 0;
  for (; j + kVL <= n; j += kVL) {
    vnat v;
    std::memcpy(&v, p + j, sizeof v);
    mv = v > mv ? v : mv;
  }
  float m = -INFINITY;
  for (int t = 0; t < kVL; ++t) m = std::max(m, mv[t]);
  for (; j < n; ++j) m = std::max(m, p[j]);
  return m;
}

inline float softmax_row(float* s, int64_t n, int64_t a, int64_t b) {
  constexpr int L = kVL;
  const float m = row_max(s + a, b - a);
  int64_t j = a;
  std::fill(s, s + a, 0.0f);
  std::fill(s + b, s + n, 0.0f);
  vnat sv = {};
  for (j = a; j + L <= b; j += L) {
    vnat v;
    std::memcpy(&v, s + j, sizeof v);
    v = v_exp(v - m);
    std::memcpy(s + j, &v, sizeof v);
    sv += v;
  }
  if (j < b) {
    alignas(64) float tail[L];
    for (int t = 0; t < L; ++t) tail[t] = j + t < b ? s[j + t] - m : -INFINITY;
    vnat v;
    std::memcpy(&v, tail, sizeof v);
    v = v_exp(v);
    v = static_cast<float>(j) + lane_index() < static_cast<float>(b) ? v : vnat{};
    std::memcpy(tail, &v, sizeof v);
    std::memcpy(s + j, tail, static_cast<size_t>(b - j) * sizeof(float));
    sv += v;
  }
  float sum = 0.0f;
  for (int t = 0; t < L; ++t) sum += sv[t];
  return 1.0f / sum;
}

// kPairs (bfloat16 q, k and v on AVX512-BF16, even head dim): both products take the row-pair tile
// (gemm_tile_bf16). Q K^T is then exact products in float32 sums, as the float32 path on the same values;
// the probabilities are rounded to bfloat16 for P V (what torch's bfloat16 flash attention does too) while
// the softmax, its sum and the output stay float32. K^T panels hold head-dim pairs [D/2, 64], V panels key
// pairs [T/2, 64]: key blocks start at multiples of 64, so a block's pairs never straddle two panels.
// In = uint16_t (bfloat16 q/k/v) for kPairs, float otherwise; out: float32, or (out16) rounded to bfloat16.
template <bool kPairs, typename In = std::conditional_t<kPairs, uint16_t, float>>
void prefill_attention(const In* q, const In* k, const In* v, const int32_t* lengths, int64_t window,
                       float cap, float* out, uint16_t* out16, AttnDims d, ffi::ThreadPool* pool) {
  const int64_t T = d.T, D = d.D, group = d.H / d.KV;
  const int64_t kpanels = (T + kNB - 1) / kNB, dpanels = (D + kNB - 1) / kNB;
  // float32: K^T [B, KV, kpanels, D, 64] and V [B, KV, dpanels, T, 64]; pairs: K^T [.., kpanels, D/2, 64]
  // and V [.., dpanels, T/2 (rounded up), 64] of 32-bit pairs. Zero-padded either way.
  const int64_t KD = kPairs ? D / 2 : D, TV = kPairs ? (T + 1) / 2 : T;
  static thread_local std::vector<float> kt_buf, v_buf;
  kt_buf.assign(static_cast<size_t>(d.B * d.KV * kpanels * KD * kNB + 16), 0.0f);
  v_buf.assign(static_cast<size_t>(d.B * d.KV * dpanels * TV * kNB + 16), 0.0f);
  float* kt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(kt_buf.data()) + 63) & ~uintptr_t{63});
  float* vp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v_buf.data()) + 63) & ~uintptr_t{63});
  parallel_for(pool, d.B * d.KV * kpanels, [=](int64_t task) {  // one 64-key panel of one (row, KV head)
    const int64_t bg = task / kpanels, b = bg / d.KV, g = bg % d.KV, t0 = (task % kpanels) * kNB;
    float* ktb = kt + bg * kpanels * KD * kNB;
    float* vpb = vp + bg * dpanels * TV * kNB;
    for (int64_t t = t0; t < std::min(T, t0 + kNB); ++t) {
      const In* kr = k + ((b * T + t) * d.KV + g) * D;
      const In* vr = v + ((b * T + t) * d.KV + g) * D;
      float* kd = ktb + (t / kNB) * KD * kNB + t % kNB;
      if constexpr (kPairs) {
        auto* kq = reinterpret_cast<uint32_t*>(kd);
        const auto* kr2 = reinterpret_cast<const uint32_t*>(kr);  // D even: the row is D / 2 pairs
        for (int64_t c = 0; c < KD; ++c) kq[c * kNB] = kr2[c];
        auto* v16 = reinterpret_cast<uint16_t*>(vpb);
        for (int64_t c = 0; c < D; ++c) v16[(((c / kNB) * TV + t / 2) * kNB + c % kNB) * 2 + t % 2] = vr[c];
      } else {
        for (int64_t c = 0; c < D; ++c) kd[c * kNB] = kr[c];
        for (int64_t c = 0; c < D; ++c) vpb[((c / kNB) * T + t) * kNB + c % kNB] = vr[c];
      }
    }
  });
  const int64_t qblocks = (T + kQB - 1) / kQB;
  parallel_for(pool, d.B * d.H * qblocks, [=](int64_t task) {
    // the last query blocks see the most keys: hand them out first so that no thread is left with one
    const int64_t qb = qblocks - 1 - task / (d.B * d.H), h = task % d.H, b = (task / d.H) % d.B;
    const int64_t g = h / group, len = lengths[b];
    const int64_t i0 = qb * kQB, i1 = std::min(T, i0 + kQB), rows = i1 - i0;
    const int64_t lo = std::max<int64_t>(0, i0 - window + 1);  // the first key any row here may see
    const int64_t p0 = lo / kNB, p1 = (i1 + kNB - 1) / kNB, j0 = p0 * kNB, nk = (p1 - p0) * kNB;
    static thread_local std::vector<float> qbuf, sbuf, obuf;
    static thread_local std::vector<uint32_t> pbuf;
    qbuf.resize(static_cast<size_t>(kQB * D));
    sbuf.resize(static_cast<size_t>(kQB * nk));
    if (out16) obuf.resize(static_cast<size_t>(kMR * D));
    float* qm = qbuf.data();
    float* sm = sbuf.data();
    if constexpr (kPairs) {
      pbuf.resize(static_cast<size_t>(kMR * nk / 2));
      for (int64_t r = 0; r < rows; ++r) std::memcpy(qm + r * KD, q + ((b * T + i0 + r) * d.H + h) * D, D * 2);
    } else {
      for (int64_t r = 0; r < rows; ++r) std::memcpy(qm + r * D, q + ((b * T + i0 + r) * d.H + h) * D, D * 4);
    }
    const float* ktb = kt + (b * d.KV + g) * kpanels * KD * kNB;
    const float* vpb = vp + (b * d.KV + g) * dpanels * TV * kNB;
    // Tiles of kMR query rows; each meets only the keys up to its own last row (the causal bound), so the
    // diagonal blocks compute no more than a tile's triangle beyond the useful products.
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int64_t tr = std::min<int64_t>(kMR, rows - r0);
      const int64_t nt = i0 + r0 + tr - j0;  // keys j0 .. i0 + r0 + tr - 1
      float* st = sm + r0 * nk;
      for (int64_t pj = p0; (pj - p0) * kNB < nt; ++pj) {
        const int width = static_cast<int>(std::min<int64_t>(kNB, nt - (pj - p0) * kNB));
        if constexpr (kPairs) {
          gemm_rows<kMR>(reinterpret_cast<const uint32_t*>(qm) + r0 * KD, KD, tr, KD,
                         reinterpret_cast<const uint32_t*>(ktb) + pj * KD * kNB, nullptr, st + (pj - p0) * kNB,
                         nk, width);
        } else {
          const float* kp = ktb + pj * D * kNB;
          float* sp = st + (pj - p0) * kNB;
          // A partial last panel of keys on AVX-512 (one 64-column sub-tile): a tile only as wide as the keys
          // left, not all 64 (a causal row block's last panel is on average half empty).
          // (AVX2 and narrower ISAs already skip the panel's sub-tiles past the width.)
          if constexpr (kVL == 16) {
            const int nv = (width + kVL - 1) / kVL;
            if (nv == 1) {
              gemm_rows<kMR, 1>(qm + r0 * D, D, tr, D, kp, nullptr, sp, nk, width);
            } else if (nv == 2) {
              gemm_rows<kMR, 2>(qm + r0 * D, D, tr, D, kp, nullptr, sp, nk, width);
            } else if (nv == 3) {
              gemm_rows<kMR, 3>(qm + r0 * D, D, tr, D, kp, nullptr, sp, nk, width);
            } else {
              gemm_rows<kMR>(qm + r0 * D, D, tr, D, kp, nullptr, sp, nk, width);
            }
          } else {
            gemm_rows<kMR>(qm + r0 * D, D, tr, D, kp, nullptr, sp, nk, width);
          }
        }
      }
      float inv[kMR];
      for (int64_t r = 0; r < tr; ++r) {
        const int64_t i = i0 + r0 + r;
        float* srow = st + r * nk;
        if (cap > 0.0f) {  // cap * tanh(s / cap), tanh(y) = 1 - 2 / (e^(2y) + 1)
          for (int64_t j = 0; j < nt; j += kVL) {
            alignas(64) float tmp[kVL] = {};
            const int64_t m = std::min<int64_t>(kVL, nt - j);
            std::memcpy(tmp, srow + j, m * 4);
            vnat x;
            std::memcpy(&x, tmp, sizeof x);
            x = cap - (2.0f * cap) / (v_exp(x * (2.0f / cap)) + 1.0f);
            std::memcpy(tmp, &x, sizeof x);
            std::memcpy(srow + j, tmp, m * 4);
          }
        }
        const int64_t first = std::max<int64_t>(i < len ? 0 : len, i - window + 1);
        inv[r] = softmax_row(srow, nt, first - j0, i + 1 - j0);
      }
      // the output tile: in place, or float32 scratch rounded to bfloat16 at the end
      float* ot = out16 ? obuf.data() : out + ((b * T + i0 + r0) * d.H + h) * D;
      const int64_t ldo = out16 ? D : d.H * D;
      if constexpr (kPairs) {
        const int64_t np = (nt + 1) / 2;  // key pairs; an odd count's last pair ends in a zero probability
        uint32_t* pq = pbuf.data();
        for (int64_t r = 0; r < tr; ++r) {
          float* srow = st + r * nk;
          if (nt % 2) srow[nt] = 0.0f;  // nk is a multiple of 64: the slot exists
          to_bf16(srow, reinterpret_cast<uint16_t*>(pq + r * (nk / 2)), 2 * np);
        }
        for (int64_t c = 0; c < dpanels; ++c) {
          const int width = static_cast<int>(std::min<int64_t>(kNB, D - c * kNB));
          gemm_rows<kMR>(static_cast<const uint32_t*>(pq), nk / 2, tr, np,
                         reinterpret_cast<const uint32_t*>(vpb) + (c * TV + j0 / 2) * kNB, nullptr,
                         ot + c * kNB, ldo, width);
        }
      } else {
        for (int64_t c = 0; c < dpanels; ++c) {
          const int width = static_cast<int>(std::min<int64_t>(kNB, D - c * kNB));
          gemm_rows<kMR>(st, nk, tr, nt, vpb + (c * T + j0) * kNB, nullptr, ot + c * kNB, ldo, width);
        }
      }
      for (int64_t r = 0; r < tr; ++r) {
        float* orow = ot + r * ldo;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) orow[c] *= inv[r];
        if (out16) to_bf16(orow, out16 + ((b * T + i0 + r0 + r) * d.H + h) * D, D);
      }
    }
  });
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> window, ffi::Result<ffi::AnyBuffer> out,
                     float cap) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] ||
      qd[2] % kd[2] != 0 || lengths.element_count() != static_cast<size_t>(qd[0]) ||
      v.element_count() != k.element_count()) {
    return ffi::Error::InvalidArgument("gemmax attention: expected q [B,T,H,D], k/v [B,T,KV,D], lengths [B]");
  }
  const auto t = q.element_type();
  if ((t != ffi::DataType::F32 && t != ffi::DataType::BF16) || k.element_type() != t || v.element_type() != t ||
      (out->element_type() != ffi::DataType::F32 && out->element_type() != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("gemmax attention: q, k, v both float32 or bfloat16; out float32 or bfloat16");
  }
  AttnDims d{qd[0], qd[1], qd[2], kd[2], qd[3]};
  const int64_t w = std::max<int64_t>(1, window.typed_data()[0]);
  const bool o16 = out->element_type() == ffi::DataType::BF16;
  float* of = o16 ? nullptr : static_cast<float*>(out->untyped_data());
  uint16_t* oh = o16 ? static_cast<uint16_t*>(out->untyped_data()) : nullptr;
  if (t == ffi::DataType::BF16) {
    const auto *qh = static_cast<const uint16_t*>(q.untyped_data()), *kh = static_cast<const uint16_t*>(k.untyped_data()),
               *vh = static_cast<const uint16_t*>(v.untyped_data());
#ifdef GEMMAX_BF16DOT
    if (d.D % 2 == 0) {
      prefill_attention<true>(qh, kh, vh, lengths.typed_data(), w, cap, of, oh, d, &pool);
      return ffi::Error::Success();
    }
#endif
    std::vector<float> qf(q.element_count()), kf(k.element_count()), vf(v.element_count());
    from_bf16(qh, qf.data(), static_cast<int64_t>(qf.size()));
    from_bf16(kh, kf.data(), static_cast<int64_t>(kf.size()));
    from_bf16(vh, vf.data(), static_cast<int64_t>(vf.size()));
    prefill_attention<false>(qf.data(), kf.data(), vf.data(), lengths.typed_data(), w, cap, of, oh, d, &pool);
    return ffi::Error::Success();
  }
  prefill_attention<false>(static_cast<const float*>(q.untyped_data()), static_cast<const float*>(k.untyped_data()),
                           static_cast<const float*>(v.untyped_data()), lengths.typed_data(), w, cap, of, oh, d,
                           &pool);
  return ffi::Error::Success();
}


// ---- decode attention -------------------------------------------------------------------------------
//
// One new query per row against its KV cache plus its own new key, reading the stacked cache [L, B, S, KV, D]
// of layer `layer` in place and at its own width (XLA sliced a copy of the layer's cache for every layer of
// every token, and spent ~4 ms a token of a 34 ms bfloat16 Gemma 3 270M decode step on this attention). Each
// task is one (row, KV head): every cached key and value is read once and serves all the query heads of its
// group. Softmax in float32 over the cache and the new key jointly, as _attend_cached in generate.py.
template <typename T>
void decode_attention(const float* q, const float* kn, const float* vn, const T* kc, const T* vc,
                      const bool* valid, float* out, int64_t B, int64_t S, int64_t H, int64_t KV, int64_t D,
                      float cap, ffi::ThreadPool* pool) {
  const int64_t G = H / KV;
  parallel_for(pool, B * KV, [=](int64_t task) {
    const int64_t b = task / KV, g = task % KV;
    static thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(G * (S + 1) + D));
    float* sc = buf.data();  // [G, S + 1]: scores, then probabilities; column S is the new key
    float* row = sc + G * (S + 1);  // one key or value row in float32
    const float* qg = q + (b * H + g * G) * D;
    const bool* ok = valid + b * S;
    auto scores = [&](const float* kr, int64_t j) {
      for (int64_t h = 0; h < G; ++h) {
        const float* qh = qg + h * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < D; ++c) dot += qh[c] * kr[c];
        if (cap > 0.0f) dot = cap * std::tanh(dot / cap);
        sc[h * (S + 1) + j] = dot;
      }
    };
    for (int64_t j = 0; j < S; ++j) {
      if (!ok[j]) continue;
      const T* kj = kc + ((b * S + j) * KV + g) * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) row[c] = to_f32(kj[c]);
      scores(row, j);
    }
    scores(kn + (b * KV + g) * D, S);
    for (int64_t h = 0; h < G; ++h) {
      float* sh = sc + h * (S + 1);
      float m = sh[S];
      for (int64_t j = 0; j < S; ++j) {
        if (ok[j]) m = std::max(m, sh[j]);
      }
      float z = 0.0f;
      for (int64_t j = 0; j <= S; ++j) {
        const float e = (j == S || ok[j]) ? std::exp(sh[j] - m) : 0.0f;
        sh[j] = e;
        z += e;
      }
      const float inv = 1.0f / z;
      for (int64_t j = 0; j <= S; ++j) sh[j] *= inv;
    }
    for (int64_t h = 0; h < G; ++h) {
      float* oh = out + (b * H + g * G + h) * D;
      const float pn = sc[h * (S + 1) + S];
      const float* vr = vn + (b * KV + g) * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) oh[c] = pn * vr[c];
    }
    for (int64_t j = 0; j < S; ++j) {
      if (!ok[j]) continue;
      const T* vj = vc + ((b * S + j) * KV + g) * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) row[c] = to_f32(vj[c]);
      for (int64_t h = 0; h < G; ++h) {
        float* oh = out + (b * H + g * G + h) * D;
        const float p = sc[h * (S + 1) + j];
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) oh[c] += p * row[c];
      }
    }
  });
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kn,
                           ffi::Buffer<ffi::F32> vn, ffi::AnyBuffer kc, ffi::AnyBuffer vc,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::PRED> valid,
                           ffi::ResultBuffer<ffi::F32> out, float cap) {
  auto qd = q.dimensions(), cd = kc.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || cd[1] != qd[0] || cd[4] != qd[2] || qd[1] % cd[3] != 0 ||
      kc.element_type() != vc.element_type() || kc.element_count() != vc.element_count() ||
      valid.element_count() != static_cast<size_t>(cd[1] * cd[2])) {
    return ffi::Error::InvalidArgument("gemmax decode attention: expected q [B,H,D], caches [L,B,S,KV,D]");
  }
  const int64_t B = qd[0], H = qd[1], D = qd[2], S = cd[2], KV = cd[3];
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= cd[0]) return ffi::Error::InvalidArgument("gemmax decode attention: layer out of range");
  const int64_t off = l * B * S * KV * D;
  const bool* ok = reinterpret_cast<const bool*>(valid.untyped_data());
  const bool known = visit_dtype<uint16_t, _Float16, float>(kc.element_type(), [&](auto tag) {
    using T = decltype(tag);
    decode_attention<T>(q.typed_data(), kn.typed_data(), vn.typed_data(),
                        static_cast<const T*>(kc.untyped_data()) + off, static_cast<const T*>(vc.untyped_data()) + off,
                        ok, out->typed_data(), B, S, H, KV, D, cap, &pool);
  });
  if (!known) {
    return ffi::Error::InvalidArgument("gemmax decode attention: cache must be bfloat16, float16 or float32");
  }
  return ffi::Error::Success();
}

template <typename T>
void dispatch_f32(const float* x, const T* w, float* y, const float* scale, bool in_minor_, int64_t B, int64_t P,
                  int64_t K, int64_t N, ffi::ThreadPool* pool);

// x: float32 or (xh) bfloat16; y: float32, or float32 scratch plus (yh) its bfloat16 rounding.
template <typename T>
void dispatch(const float* x, const uint16_t* xh, const void* w_all, float* y, uint16_t* yh, const float* scale,
              int64_t layer, bool in_minor_, int64_t B, int64_t P, int64_t K, int64_t N, ffi::ThreadPool* pool,
              const Epilogue& ep) {
  const T* w = static_cast<const T*>(w_all) + layer * P * K * N;
#ifdef GEMMAX_BF16DOT
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (xh && !in_minor_ && B >= kSkinnyRows) {
      gemm_in_major<T, true>(nullptr, xh, w, y, yh, scale, B, P, K, N, pool, ep);
      return;
    }
    // a bfloat16 result too: the float32 sums of the same tile, rounded, so that both results of one product
    // come from one summation order
    if (xh && in_minor_ && B >= kSkinnyRows && B <= kNB && K % 2 == 0 && !ep.any()) {
      if (head_amx(xh, w, y, scale, B, N, K, pool)) {
        // done on AMX
      } else if (B <= 16) {
        in_minor_gemm_bf16<1>(xh, w, y, scale, B, N, K, pool);
      } else if (B <= 32) {
        in_minor_gemm_bf16<2>(xh, w, y, scale, B, N, K, pool);
      } else if (B <= 48) {
        in_minor_gemm_bf16<3>(xh, w, y, scale, B, N, K, pool);
      } else {
        in_minor_gemm_bf16<4>(xh, w, y, scale, B, N, K, pool);
      }
      if (yh) to_bf16(y, yh, B * N);
      return;
    }
  }
#endif
  static thread_local std::vector<float> xs;
  if (xh) {
    xs.resize(static_cast<size_t>(B * K));
    from_bf16(xh, xs.data(), B * K);
    x = xs.data();
  }
  bool split_k = false;  // float32 weights: a few rows, or a contraction far longer than the rest
  if constexpr (std::is_same_v<T, float>) {
    split_k = !in_minor_ && P == 1 && B >= kSkinnyRows && (B <= kSplitKRows || long_k(B, K, N));
  }
  if (split_k) {
    gemm_split_k(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(w), y, scale, B, K, N, pool);
  } else if (!in_minor_ && B >= kSkinnyRows) {
    gemm_in_major<T>(x, nullptr, w, y, yh, scale, B, P, K, N, pool, ep);
    return;
  } else {
    dispatch_f32<T>(x, w, y, scale, in_minor_, B, P, K, N, pool);
  }
  if (ep.any()) {
    for (int64_t b = 0; b < B; ++b) {
      epilogue_row(ep, y + b * P * N, P * N, b, 0, P * N, y + b * P * N, yh ? yh + b * P * N : nullptr);
    }
  } else if (yh) {
    to_bf16(y, yh, B * P * N);
  }
}

template <typename T>
void dispatch_f32(const float* x, const T* w, float* y, const float* scale, bool in_minor_, int64_t B, int64_t P,
                  int64_t K, int64_t N, ffi::ThreadPool* pool) {
  if constexpr (std::is_same_v<T, float> && kVL == 16) {  // AVX-512, float32, 8 rows: lane pairs
    if (in_minor_ && B >= kSkinnyRows && 2 * B <= kVL && K % 2 == 0) {
      in_minor_pairs(x, w, y, scale, B, N, K, pool);
      return;
    }
  }
  if constexpr (kVL == 16) {  // AVX-512, 8-32 rows: the narrow tile (16 or 32 columns)
    // 32 rows too: the full 64-column tile would multiply 32 columns of padding. Gemma 3 270M head, float32,
    // 32 rows, Zen 4: 108 ms (99 GFLOP/s) in the full tile, 2x the 16-row call's 47 ms
    if (in_minor_ && B >= kSkinnyRows && B <= 32) {
      if (B <= 16) {
        in_minor_gemm<T, 1>(x, w, y, scale, B, N, K, pool);
      } else {
        in_minor_gemm<T, 2>(x, w, y, scale, B, N, K, pool);
      }
      return;
    }
  }
  // the head's skinny GEMM puts the rows of x in the tile's vector lanes: a sub-tile is kVL * kNV columns
  // (16 with AVX2, 64 with AVX-512), so it waits until at most half of them would multiply padding
  if (in_minor_ && B >= kSkinnyRows && 2 * B >= kVL * kNV && B <= kNB) {
    in_minor_gemm<T>(x, w, y, scale, B, N, K, pool);
    return;
  }
  if (in_minor_) {
    if constexpr (Avx2InMinor<T>::kMultiple > 0) {
      if (K % Avx2InMinor<T>::kMultiple == 0) {
        Avx2InMinor<T>::run(x, w, y, scale, B, N, K, pool);
        return;
      }
    }
    in_minor<T>(x, w, y, scale, B, N, K, pool);
  } else {
#ifdef GEMMAX_AVX2_INT8
    if constexpr (std::is_same_v<T, int8_t>) {
      if (N % 16 == 0 && K % 16 == 0) {
        in_major_int8_avx2(x, w, y, scale, B, P, K, N, pool);
        return;
      }
    }
#endif
    in_major<T>(x, w, y, scale, B, P, K, N, pool);
  }
}

ffi::Error Gemv(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                ffi::Buffer<ffi::S32> layer, ffi::AnyBuffer mul, ffi::Result<ffi::AnyBuffer> y, bool in_minor_,
                bool has_scale, int64_t p, int64_t k, int64_t n, int64_t act, bool has_mul) {
  const int64_t rows = static_cast<int64_t>(x.element_count()) / k;
  if (rows * k != static_cast<int64_t>(x.element_count())) {
    return ffi::Error::InvalidArgument("gemmax gemv: x size is not a multiple of K");
  }
  const auto xt = x.element_type(), yt = y->element_type();
  if ((xt != ffi::DataType::F32 && xt != ffi::DataType::BF16) ||
      (yt != ffi::DataType::F32 && yt != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("gemmax gemv: x and y must be float32 or bfloat16");
  }
  const float* xf = xt == ffi::DataType::F32 ? static_cast<const float*>(x.untyped_data()) : nullptr;
  const uint16_t* xh = xf ? nullptr : static_cast<const uint16_t*>(x.untyped_data());
  static thread_local std::vector<float> ys;
  uint16_t* yh = yt == ffi::DataType::BF16 ? static_cast<uint16_t*>(y->untyped_data()) : nullptr;
  if (yh) ys.resize(static_cast<size_t>(rows * p * n));
  float* yf = yh ? ys.data() : static_cast<float*>(y->untyped_data());
  Epilogue ep;
  if (act < 0 || act > 2) return ffi::Error::InvalidArgument("gemmax gemv: act must be 0, 1 (gelu_tanh) or 2 (silu)");
  ep.act = static_cast<int>(act);
  if (has_mul) {
    if (mul.element_count() != static_cast<size_t>(rows * p * n) || mul.element_type() != yt) {
      return ffi::Error::InvalidArgument("gemmax gemv: mul must have y's shape and dtype");
    }
    if (yh) {
      ep.mulh = static_cast<const uint16_t*>(mul.untyped_data());
    } else {
      ep.mul = static_cast<const float*>(mul.untyped_data());
    }
  }
  const int64_t per_layer = p * k * n;
  const int64_t n_layers = static_cast<int64_t>(w.element_count()) / per_layer;
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= n_layers) return ffi::Error::InvalidArgument("gemmax gemv: layer index out of range");
  const float* s = has_scale ? scale.typed_data() : nullptr;
  const bool known = visit_dtype<int8_t, uint16_t, _Float16, float>(w.element_type(), [&](auto tag) {
    dispatch<decltype(tag)>(xf, xh, w.untyped_data(), yf, yh, s, l, in_minor_, rows, p, k, n, &pool, ep);
  });
  if (!known) {
    return ffi::Error::InvalidArgument("gemmax gemv: weights must be int8, bfloat16, float16 or float32");
  }
  return ffi::Error::Success();
}

// ---- q / k normalisation and RoPE (prefill) ------------------------------------------------------------
//
// y[r, h, :] = rope(rmsnorm(x[r, h, :])) * mult, one pass per head row: Gemma 3's q/k RMSNorm, then rotate-
// half RoPE on the first 2 * rh channels (the rest pass through), then the query scale. XLA:CPU computed it
// as two half-width fusions per tensor, each re-reading the input and the norm, plus a concatenate. Gemma 3
// 270M float32 prefill of 512 tokens, profiled both ways in one process: XLA's element-wise time 62 -> 32
// ms, this pass 6 ms (q 4.4, k 1.3). Float32, in the order of layers.rms_norm and layers.apply_rope:
// (x * 1/sqrt(mean(x^2) + eps)) * (offset + w), then x1 cos - x2 sin | x2 cos + x1 sin.
// bfloat16 x (xh) and y (yh): each row converted on the way in and rounded once on the way out.
void norm_rope(const float* x, const uint16_t* xh, const float* w, const float* sin, const float* cos, float* y,
               uint16_t* yh, int64_t R, int64_t H, int64_t D, int64_t rh, bool has_norm, float eps, float offset,
               float mult, ffi::ThreadPool* pool) {
  constexpr int64_t kRows = 64;  // head rows per task
  const int64_t rows = R * H;
  parallel_for(pool, (rows + kRows - 1) / kRows, [=](int64_t task) {
    static thread_local std::vector<float> normed, xin, yout;
    normed.resize(static_cast<size_t>(D));
    xin.resize(static_cast<size_t>(D));
    yout.resize(static_cast<size_t>(D));
    for (int64_t i = task * kRows; i < std::min(rows, (task + 1) * kRows); ++i) {
      const float* xr = x ? x + i * D : xin.data();
      if (!x) from_bf16(xh + i * D, xin.data(), D);
      float* yr = yh ? yout.data() : y + i * D;
      const int64_t r = i / H;
      const float* t = xr;  // the row the rotation reads: x itself, or its normalised copy
      if (has_norm) {
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < D; ++c) ss += xr[c] * xr[c];
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
        float* nr = normed.data();
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) nr[c] = (xr[c] * inv) * (offset + w[c]);
        t = nr;
      }
      const float* sr = sin + r * rh;
      const float* cr = cos + r * rh;
#pragma omp simd
      for (int64_t c = 0; c < rh; ++c) {
        yr[c] = (t[c] * cr[c] - t[c + rh] * sr[c]) * mult;
        yr[c + rh] = (t[c + rh] * cr[c] + t[c] * sr[c]) * mult;
      }
      for (int64_t c = 2 * rh; c < D; ++c) yr[c] = t[c] * mult;
      if (yh) to_bf16(yr, yh + i * D, D);
    }
  });
}

ffi::Error NormRope(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> sin,
                    ffi::Buffer<ffi::F32> cos, ffi::Result<ffi::AnyBuffer> y, int64_t heads, int64_t dim,
                    bool has_norm, float eps, float offset, float mult) {
  const int64_t total = static_cast<int64_t>(x.element_count());
  const auto xt = x.element_type();
  if ((xt != ffi::DataType::F32 && xt != ffi::DataType::BF16) || y->element_type() != xt) {
    return ffi::Error::InvalidArgument("gemmax norm_rope: x and y must both be float32 or bfloat16");
  }
  const bool h16 = xt == ffi::DataType::BF16;
  if (heads <= 0 || dim <= 0 || total % (heads * dim) != 0) {
    return ffi::Error::InvalidArgument("gemmax norm_rope: x is not [rows, heads, dim]");
  }
  const int64_t R = total / (heads * dim);
  const int64_t tab = static_cast<int64_t>(sin.element_count());
  if (tab != static_cast<int64_t>(cos.element_count()) || tab % R != 0 || 2 * (tab / R) > dim ||
      (has_norm && static_cast<int64_t>(w.element_count()) != dim)) {
    return ffi::Error::InvalidArgument("gemmax norm_rope: sin/cos must be [rows, <= dim/2], scale [dim]");
  }
  norm_rope(h16 ? nullptr : static_cast<const float*>(x.untyped_data()),
            h16 ? static_cast<const uint16_t*>(x.untyped_data()) : nullptr, w.typed_data(), sin.typed_data(),
            cos.typed_data(), h16 ? nullptr : static_cast<float*>(y->untyped_data()),
            h16 ? static_cast<uint16_t*>(y->untyped_data()) : nullptr, R, heads, dim, tab / R, has_norm, eps, offset,
            mult, &pool);
  return ffi::Error::Success();
}

}  // namespace

// The bindings list each handler's parameters in order, a line per group.
XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxGemv, Gemv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()  // x, w
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>()  // scale, layer
                                  .Arg<ffi::AnyBuffer>()  // mul
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<bool>("in_minor").Attr<bool>("has_scale")
                                  .Attr<int64_t>("p").Attr<int64_t>("k").Attr<int64_t>("n")
                                  .Attr<int64_t>("act").Attr<bool>("has_mul"));

// Embedding rows for a decode step: out[i] = table[ids[i]], any dtype, bytes copied. XLA:CPU gathers
// bfloat16 by converting the *whole* table to float32 (and hoists that out of the decode loop: 671 MB
// written per chunk for a 262144 x 640 table); a custom call is left alone.
namespace {
ffi::Error TakeRows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = table.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("gemmax take_rows: table must be 2-D");
  const int64_t rows = dims[0];
  const size_t row_bytes = table.size_bytes() / static_cast<size_t>(rows);
  const int32_t* id = ids.typed_data();
  auto* dst = static_cast<char*>(out->untyped_data());
  const auto* src = static_cast<const char*>(table.untyped_data());
  for (size_t i = 0; i < ids.element_count(); ++i) {
    if (id[i] < 0 || id[i] >= rows) return ffi::Error::InvalidArgument("gemmax take_rows: id out of range");
    std::memcpy(dst + i * row_bytes, src + static_cast<size_t>(id[i]) * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

// cache[l, slots[i], pos[i, j]] = rows[l, i, j] for a stacked cache [L, B, S, ...] written in place (the result
// aliases the cache operand): a decode step's new keys and values (one position a row), a prefill's rows
// admitted into their slots (positions 0..t-1), a block of accepted entries (ring positions). XLA:CPU widens a
// bfloat16 scatter (and a dynamic update slice) to float32 over the *whole* operand: each decode step converted
// every layer's cache twice (~60 ms of a 32-row Gemma 3 270M bfloat16 step), and admitting 32 prompts into a
// 512-position cache took ~290 ms of converts for a few MB of rows; this copies the rows' bytes, any dtype. A
// slot outside [0, B) or a position outside [0, S) is skipped, as the scatter's "drop" mode skips it.
ffi::Error WriteRows(ffi::AnyBuffer cache, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> slots,
                     ffi::Buffer<ffi::S32> pos, ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = cache.dimensions();
  const auto rdims = rows.dimensions();
  if (dims.size() < 3 || rdims.size() != dims.size()) {
    return ffi::Error::InvalidArgument("gemmax write_rows: cache must be [L, B, S, ...] and rows [L, b, t, ...]");
  }
  const int64_t L = dims[0], B = dims[1], S = dims[2], b = rdims[1], t = rdims[2];
  bool same_tail = rdims[0] == L && rows.element_type() == cache.element_type();
  for (size_t d = 3; d < dims.size(); ++d) same_tail = same_tail && rdims[d] == dims[d];
  if (!same_tail || static_cast<int64_t>(slots.element_count()) != b ||
      static_cast<int64_t>(pos.element_count()) != b * t) {
    return ffi::Error::InvalidArgument(
        "gemmax write_rows: rows must be [L, b, t, ...] of the cache's dtype and trailing shape, slots [b], pos [b, t]");
  }
  const size_t row_bytes = L * B * S ? cache.size_bytes() / static_cast<size_t>(L * B * S) : 0;
  auto* dst = static_cast<char*>(out->untyped_data());
  if (dst != cache.untyped_data()) std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const auto* src = static_cast<const char*>(rows.untyped_data());
  const int32_t* sl = slots.typed_data();
  const int32_t* p = pos.typed_data();
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t i = 0; i < b; ++i) {
      if (sl[i] < 0 || sl[i] >= B) continue;
      for (int64_t j = 0; j < t; ++j) {
        const int32_t at = p[i * t + j];
        if (at < 0 || at >= S) continue;
        std::memcpy(dst + ((l * B + sl[i]) * S + at) * row_bytes, src + ((l * b + i) * t + j) * row_bytes,
                    row_bytes);
      }
    }
  }
  return ffi::Error::Success();
}
}  // namespace

namespace {
// y[M, N] = a[K, M]^T b[K, N], float32: the weight gradient of a tied head, g^T h (g [rows, V] the logits'
// gradient, h [rows, D] the hidden states), contracting over the rows. XLA:CPU runs this product on its
// Eigen dot at ~245 GFLOP/s on a two-core Zen 5 (262144 x 640 from 512 rows: ~700 ms), the transposed
// operand read with a stride of the whole vocabulary. Here b is packed once into 64-column panels (all of
// it: 512 x 640 floats is 1.3 MB), and the threads claim blocks of y's rows: a block of a's columns is
// transposed into [rows, K] (read once from memory, kept in L2) and multiplied by every panel with the
// prefill GEMM's tiles, writing a contiguous block of y.
void gemm_tn(const float* a, const float* b, float* y, int64_t K, int64_t M, int64_t N, ffi::ThreadPool* pool) {
  const int64_t panels = (N + kNB - 1) / kNB;
  std::vector<float> buf(static_cast<size_t>(panels * K * kNB + 16));
  // the tiles load panel rows as aligned vectors
  float* packed = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
  parallel_for(pool, panels, [&](int64_t p) {
    const int width = static_cast<int>(std::min<int64_t>(kNB, N - p * kNB));
    pack_panel(b + p * kNB, N, K, width, packed + p * K * kNB);
  });
  // rows of y per block: the transposed block takes at most a quarter of L2, whole tiles, at least two
  const int64_t fit = (l2_bytes() / 4) / (K * static_cast<int64_t>(sizeof(float)));
  const int64_t block = std::max<int64_t>(2 * kMR, std::min<int64_t>(96, fit / kMR * kMR));
  const int64_t blocks = (M + block - 1) / block;
  parallel_for(pool, blocks, [&](int64_t blk) {
    static thread_local std::vector<float> xt;
    xt.resize(static_cast<size_t>(block * K));
    const int64_t m0 = blk * block, rows = std::min(block, M - m0);
    // transpose a[:, m0:m0+rows] into xt[rows, K], eight rows of a at a time (32-byte runs of xt)
    constexpr int64_t kStep = 8;
    int64_t k0 = 0;
    for (; k0 + kStep <= K; k0 += kStep) {
      const float* src = a + k0 * M + m0;
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = xt.data() + r * K + k0;
#pragma GCC unroll 8
        for (int64_t j = 0; j < kStep; ++j) dst[j] = src[j * M + r];
      }
    }
    for (; k0 < K; ++k0) {
      const float* src = a + k0 * M + m0;
      for (int64_t r = 0; r < rows; ++r) xt[static_cast<size_t>(r * K + k0)] = src[r];
    }
    for (int64_t p = 0; p < panels; ++p) {
      const int width = static_cast<int>(std::min<int64_t>(kNB, N - p * kNB));
      gemm_rows<kMR>(xt.data(), K, rows, K, packed + p * K * kNB, nullptr, y + m0 * N + p * kNB, N, width);
    }
  });
}

ffi::Error GemmTN(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[0] != bd[0]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "gemm_tn: a [K, M] and b [K, N] with the same K");
  }
  gemm_tn(a.typed_data(), b.typed_data(), y->typed_data(), ad[0], ad[1], bd[1], &pool);
  return ffi::Error::Success();
}
}  // namespace

// The cross-entropy's element-wise work on a chunk of float32 logits [n, V], for the fine-tuning loss:
// per row the log-sum-exp, the loss lse - z[y], whether the target's logit is the row's largest, and (when
// asked) the gradient with respect to the logits, w (softmax - onehot(y)), in float32 or bfloat16.
// XLA:CPU spent ~0.45 s of a 2.8 s mixed-precision LoRA step of the 270M on these passes (its exp inside a
// reduction runs at ~2.5 ns an element on Zen 4); here each row is read twice (max and sum of exp in blocks
// that stay in L1, then the gradient) with a vectorised exp, on XLA's intra-op threads.
namespace {
constexpr int64_t kXentBlock = 2048;  // floats per block of the first pass: 8 KB, in L1 while it is read twice

// Row statistics: (max, sum of exp(z - max)) with the max rescaled block by block.
inline void xent_row_stats(const float* z, int64_t v, float* top, float* sum) {
  float m = -INFINITY, s = 0.0f;
  for (int64_t b0 = 0; b0 < v; b0 += kXentBlock) {
    const int64_t len = std::min<int64_t>(kXentBlock, v - b0);
    const float* p = z + b0;
    const float nm = std::max(m, row_max(p, len));
    vnat vs = vnat{};
    const vnat shift = vnat{} + nm;
    int64_t j = 0;
    for (; j + kVL <= len; j += kVL) {
      vnat x;
      std::memcpy(&x, p + j, sizeof x);
      vs += v_exp(x - shift);
    }
    float bs = 0.0f;
    for (int l = 0; l < kVL; ++l) bs += vs[l];
    for (; j < len; ++j) bs += std::exp(p[j] - nm);
    s = (m == -INFINITY ? 0.0f : s * std::exp(m - nm)) + bs;
    m = nm;
  }
  *top = m;
  *sum = s;
}

ffi::Error SoftmaxXent(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets,
                       ffi::Buffer<ffi::F32> weights, ffi::Result<ffi::Buffer<ffi::F32>> tok,
                       ffi::Result<ffi::Buffer<ffi::F32>> top_hit, ffi::Result<ffi::AnyBuffer> grad) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("gemmax softmax_xent: logits must be [n, V]");
  const int64_t n = dims[0], v = dims[1];
  const bool want = static_cast<int64_t>(grad->element_count()) == n * v;
  const bool half = grad->element_type() == ffi::DataType::BF16;
  if (want && !half && grad->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("gemmax softmax_xent: the gradient must be float32 or bfloat16");
  const float* z = logits.typed_data();
  const int32_t* y = targets.typed_data();
  const float* w = weights.typed_data();
  float* out_tok = tok->typed_data();
  float* out_hit = top_hit->typed_data();
  for (int64_t i = 0; i < n; ++i)
    if (y[i] < 0 || y[i] >= v) return ffi::Error::InvalidArgument("gemmax softmax_xent: target out of range");
  parallel_for(&pool, n, [&](int64_t i) {
    const float* row = z + i * v;
    float m, s;
    xent_row_stats(row, v, &m, &s);
    const float lse = m + std::log(s);
    const float tgt = row[y[i]];
    out_tok[i] = lse - tgt;
    out_hit[i] = tgt >= m ? 1.0f : 0.0f;
    if (!want) return;
    const float wi = w[i];
    const vnat vl = vnat{} + lse, vw = vnat{} + wi;
    int64_t j = 0;
    if (half) {
      typedef int32_t VI __attribute__((vector_size(4 * kVL)));
      typedef uint16_t VH __attribute__((vector_size(2 * kVL)));
      uint16_t* g = static_cast<uint16_t*>(grad->untyped_data()) + i * v;
      for (; j + kVL <= v; j += kVL) {
        vnat x;
        std::memcpy(&x, row + j, sizeof x);
        const vnat e = v_exp(x - vl) * vw;
        VI u;
        std::memcpy(&u, &e, sizeof u);
        u += 0x7FFF + ((u >> 16) & 1);
        const VH h = __builtin_convertvector((u >> 16) & 0xFFFF, VH);  // e >= 0: no sign to carry
        std::memcpy(g + j, &h, sizeof h);
      }
      for (; j < v; ++j) g[j] = bf16_round(std::exp(row[j] - lse) * wi);
      g[y[i]] = bf16_round((std::exp(tgt - lse) - 1.0f) * wi);
    } else {
      float* g = static_cast<float*>(grad->untyped_data()) + i * v;
      for (; j + kVL <= v; j += kVL) {
        vnat x;
        std::memcpy(&x, row + j, sizeof x);
        const vnat e = v_exp(x - vl) * vw;
        std::memcpy(g + j, &e, sizeof e);
      }
      for (; j < v; ++j) g[j] = std::exp(row[j] - lse) * wi;
      g[y[i]] = (std::exp(tgt - lse) - 1.0f) * wi;
    }
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxSoftmaxXent, SoftmaxXent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits [n, V]
                                  .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::F32>>()  // targets, weights
                                  .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()  // tok, top_hit
                                  .Ret<ffi::AnyBuffer>());  // grad [n, V], or one element when not wanted

// The machine's read bandwidth as the kernels see it: a float32 buffer summed in 1 MiB blocks claimed by the
// caller and XLA's intra-op pool (the same threads and the same sequential streams as a decode GEMV), eight
// independent accumulators per block so the adds never limit the read. The sum is returned so that nothing is
// optimised away; benchmarks time the call and divide the buffer's size by it (a STREAM-like "read" test).
namespace {
ffi::Error ReadSum(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  constexpr int64_t kBlock = (1 << 20) / sizeof(float);
  const float* data = x.typed_data();
  const int64_t n = static_cast<int64_t>(x.element_count());
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<float> partial(static_cast<size_t>(blocks), 0.0f);
  parallel_for(&pool, blocks, [&](int64_t b) {
    const float* p = data + b * kBlock;
    const int64_t len = std::min<int64_t>(kBlock, n - b * kBlock);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 64 <= len; i += 64) {
#pragma omp simd
      for (int j = 0; j < 8; ++j) {
        acc[j] += p[i + j] + p[i + 8 + j] + p[i + 16 + j] + p[i + 24 + j] + p[i + 32 + j] + p[i + 40 + j] +
                  p[i + 48 + j] + p[i + 56 + j];
      }
    }
    float s = acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
    for (; i < len; ++i) s += p[i];
    partial[static_cast<size_t>(b)] = s;
  });
  float total = 0.0f;
  for (float v : partial) total += v;
  out->typed_data()[0] = total;
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxGemmTN, GemmTN,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxReadSum, ReadSum,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxNormRope, NormRope,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()  // sin, cos
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int64_t>("heads").Attr<int64_t>("dim")
                                  .Attr<bool>("has_norm").Attr<float>("eps").Attr<float>("offset")
                                  .Attr<float>("mult"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxTakeRows, TakeRows,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxWriteRows, WriteRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()  // cache, rows
                                  .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()  // slots, pos
                                  .Ret<ffi::AnyBuffer>());  // the cache, aliased

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()  // q, k, v
                                  .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()  // lengths, window
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<float>("cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()  // kn, vn
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()  // kc, vc
                                  .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::PRED>>()  // layer, valid
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<float>("cap"));
