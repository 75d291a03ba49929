// CUDA palette quantization kernels; the interface is documented in palette.h. No torch
// headers here: the torch binding (binding.cpp) passes raw pointers and the stream, so
// `nvcc -c palette_cuda.cu` compiles on any machine with a CUDA toolkit, GPU or not.
//
// Direct kernel: a block copies the palette in tiles of kTile colours into shared memory as
// float4 (r, g, b, 0); every thread of the block reads the same entry at the same time (a
// broadcast, no bank conflicts). Each thread owns kPix consecutive pixels, loaded with
// 8-byte loads (24 bytes = 8 RGB pixels) when the pointer allows, and keeps per pixel the
// best and runner-up fp32 distance (x - c)^2 and the best index. A pixel whose runner-up is
// within the fp32 error bound of its best is re-scanned in fp64 from global memory (rare),
// so the token is the exact nearest colour, lowest index on exact ties, as on the CPU.
//
// LUT: the same kernel run over the implicit grid of all 2^24 colours (no pixel reads)
// writes int16/int32 tokens; the gather kernel then maps 4 pixels per thread.
#include <cuda_runtime.h>

#include <cstdint>

#include "palette.h"

namespace igpt {
namespace {

constexpr int kThreads = 256;
constexpr int kPix = 8;       // pixels per thread
constexpr int kTile = 2048;   // palette colours per shared-memory tile (32 KiB)
constexpr int kGatherPix = 4; // pixels per thread of the LUT gather
constexpr float kRel = 1.0f / (1 << 20);
constexpr float kAbs = 1e-30f;

__device__ int32_t nearest_exact(const float* __restrict__ palette, int64_t K, float x0, float x1,
                                 float x2) {
  double best = 1e300;
  int32_t arg = 0;
  for (int64_t k = 0; k < K; ++k) {
    double dr = double(x0) - palette[3 * k], dg = double(x1) - palette[3 * k + 1];
    double db = double(x2) - palette[3 * k + 2];
    double d = dr * dr + dg * dg + db * db;
    if (d < best) best = d, arg = static_cast<int32_t>(k);
  }
  return arg;
}

// kGrid: pixel i is the colour (i >> 16, (i >> 8) & 255, i & 255) and px is unused.
template <bool kGrid, typename OutT>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const uint8_t* __restrict__ px, int64_t n, const float* __restrict__ palette,
                    int64_t K, OutT* __restrict__ out, bool wide) {
  __shared__ float4 tile[kTile];
  const int64_t first = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kPix;
  float x[kPix][3];
  if (kGrid) {
#pragma unroll
    for (int p = 0; p < kPix; ++p) {
      const int64_t v = first + p;
      x[p][0] = float((v >> 16) & 255), x[p][1] = float((v >> 8) & 255), x[p][2] = float(v & 255);
    }
  } else if (wide && first + kPix <= n) {
    const uint2* w = reinterpret_cast<const uint2*>(px + 3 * first);
    uint32_t words[6];
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const uint2 u = __ldg(w + j);
      words[2 * j] = u.x, words[2 * j + 1] = u.y;
    }
#pragma unroll
    for (int p = 0; p < kPix; ++p)
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const int byte = 3 * p + c;
        x[p][c] = float((words[byte / 4] >> (8 * (byte % 4))) & 255);
      }
  } else {
#pragma unroll
    for (int p = 0; p < kPix; ++p) {
      const int64_t q = first + p < n ? first + p : n - 1;  // past the end: repeat the last
#pragma unroll
      for (int c = 0; c < 3; ++c) x[p][c] = float(px[3 * q + c]);
    }
  }
  float best[kPix], second[kPix];
  int32_t idx[kPix];
#pragma unroll
  for (int p = 0; p < kPix; ++p) best[p] = second[p] = INFINITY, idx[p] = 0;

  for (int64_t t0 = 0; t0 < K; t0 += kTile) {
    const int m = static_cast<int>(K - t0 < kTile ? K - t0 : kTile);
    __syncthreads();  // the previous tile is no longer read
    for (int j = threadIdx.x; j < m; j += kThreads) {
      const float* c = palette + 3 * (t0 + j);
      tile[j] = make_float4(c[0], c[1], c[2], 0.f);
    }
    __syncthreads();
    for (int j = 0; j < m; ++j) {
      const float4 c = tile[j];
      const int32_t k = static_cast<int32_t>(t0 + j);
#pragma unroll
      for (int p = 0; p < kPix; ++p) {
        const float dr = x[p][0] - c.x, dg = x[p][1] - c.y, db = x[p][2] - c.z;
        const float d = dr * dr + dg * dg + db * db;
        const bool wins = d < best[p];
        // new runner-up: the old best if d wins, else d if it beats the old runner-up
        second[p] = fminf(second[p], wins ? best[p] : d);
        idx[p] = wins ? k : idx[p];
        best[p] = wins ? d : best[p];
      }
    }
  }
#pragma unroll
  for (int p = 0; p < kPix; ++p) {
    if (first + p >= n) break;
    int32_t token = idx[p];
    if (second[p] <= best[p] + best[p] * kRel + kAbs)
      token = nearest_exact(palette, K, x[p][0], x[p][1], x[p][2]);
    out[first + p] = static_cast<OutT>(token);
  }
}

template <typename LutT>
__global__ void __launch_bounds__(kThreads)
    lut_gather_kernel(const uint8_t* __restrict__ px, int64_t n, const LutT* __restrict__ lut,
                      int64_t* __restrict__ out, bool wide) {
  const int64_t first = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kGatherPix;
  if (first >= n) return;
  if (wide && first + kGatherPix <= n) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(px + 3 * first);
    const uint32_t w0 = __ldg(w), w1 = __ldg(w + 1), w2 = __ldg(w + 2);
    // bytes r0 g0 b0 r1 | g1 b1 r2 g2 | b2 r3 g3 b3 (little endian)
    const uint32_t key0 = ((w0 & 255) << 16) | (((w0 >> 8) & 255) << 8) | ((w0 >> 16) & 255);
    const uint32_t key1 = ((w0 >> 24) << 16) | ((w1 & 255) << 8) | ((w1 >> 8) & 255);
    const uint32_t key2 = (((w1 >> 16) & 255) << 16) | ((w1 >> 24) << 8) | (w2 & 255);
    const uint32_t key3 = (((w2 >> 8) & 255) << 16) | (((w2 >> 16) & 255) << 8) | (w2 >> 24);
    longlong2* o = reinterpret_cast<longlong2*>(out + first);
    o[0] = make_longlong2(__ldg(lut + key0), __ldg(lut + key1));
    o[1] = make_longlong2(__ldg(lut + key2), __ldg(lut + key3));
    return;
  }
  for (int64_t i = first; i < n && i < first + kGatherPix; ++i)
    out[i] = lut[(uint32_t(px[3 * i]) << 16) | (uint32_t(px[3 * i + 1]) << 8) | px[3 * i + 2]];
}

inline int64_t blocks_for(int64_t n, int per_thread) {
  return (n + int64_t(kThreads) * per_thread - 1) / (int64_t(kThreads) * per_thread);
}

template <typename LutT>
int build_lut(const float* palette, int64_t K, LutT* lut, void* stream) {
  quantize_kernel<true, LutT>
      <<<blocks_for(kLutSize, kPix), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          nullptr, kLutSize, palette, K, lut, false);
  return static_cast<int>(cudaGetLastError());
}

template <typename LutT>
int lut_gather(const uint8_t* px, int64_t n, const LutT* lut, int64_t* out, void* stream) {
  if (n <= 0) return 0;
  // 4 pixels = three aligned 4-byte words, and 4 tokens = two 16-byte stores
  const bool wide = reinterpret_cast<uintptr_t>(px) % 4 == 0 &&
                    reinterpret_cast<uintptr_t>(out) % 16 == 0;
  lut_gather_kernel<LutT>
      <<<blocks_for(n, kGatherPix), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          px, n, lut, out, wide);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int quantize_cuda(const uint8_t* pixels, int64_t n, const float* palette, int64_t K,
                  int64_t* out, void* stream) {
  if (n <= 0) return 0;
  const bool wide = reinterpret_cast<uintptr_t>(pixels) % 8 == 0;  // 8 pixels = 3 x 8 bytes
  quantize_kernel<false, int64_t>
      <<<blocks_for(n, kPix), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          pixels, n, palette, K, out, wide);
  return static_cast<int>(cudaGetLastError());
}

int build_lut_cuda(const float* palette, int64_t K, int16_t* lut, void* stream) {
  return build_lut(palette, K, lut, stream);
}
int build_lut_cuda(const float* palette, int64_t K, int32_t* lut, void* stream) {
  return build_lut(palette, K, lut, stream);
}
int lut_gather_cuda(const uint8_t* pixels, int64_t n, const int16_t* lut, int64_t* out,
                    void* stream) {
  return lut_gather(pixels, n, lut, out, stream);
}
int lut_gather_cuda(const uint8_t* pixels, int64_t n, const int32_t* lut, int64_t* out,
                    void* stream) {
  return lut_gather(pixels, n, lut, out, stream);
}
const char* cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace igpt
