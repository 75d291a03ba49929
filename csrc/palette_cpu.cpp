// C++ (CPU, OpenMP) palette quantization kernels; the interface is documented in palette.h.
//
// Direct kernel: the palette is held as structure-of-arrays (r[], g[], b[]) padded with
// far-away colours to a multiple of kLanes, so the inner loop compares one pixel with
// kLanes palette entries at once and the compiler turns it into SIMD (target_clones builds
// AVX-512, AVX2 and baseline versions, picked at load time). Each lane keeps its best and
// second-best distance and best index; distance and argmin are fused, nothing (n, K) is
// ever stored. A pixel whose best and runner-up distances are within the fp32 error bound
// (relative 2^-20; the fp32 (x - c)^2 sum is good to about 2^-22 relative) is re-scanned
// in fp64, which makes the result the exact nearest colour, lowest index on exact ties.
//
// LUT build: the 2^24 colours are cut into 32^3 blocks and those into 8^3 cubes. For a box,
// U = min_k of the largest distance from colour k to the box bounds the nearest distance of
// every point in it, so a colour whose smallest distance to the box exceeds U can never be
// nearest (nor tie). Each cube's 512 points are quantized by the direct kernel against the
// few colours left, kept in index order so the tie rule is unchanged.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "palette.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define IGPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define IGPT_CLONES
#endif

namespace igpt {
namespace {

constexpr int kLanes = 16;      // palette entries compared side by side
constexpr int kPixels = 4;      // pixels that share each palette load
constexpr float kFar = 1e15f;   // padding colour: distance ~3e30, never the nearest
constexpr float kRel = 1.0f / (1 << 20);
constexpr float kAbs = 1e-30f;  // covers fp32 underflow of tiny differences
constexpr float kInf = std::numeric_limits<float>::infinity();

// A palette (or a subset of one, in index order) as padded structure-of-arrays.
struct Soa {
  std::vector<float> r, g, b;
  std::vector<int32_t> index;  // original palette index of entry j
  int64_t n = 0;               // real entries; r.size() is n rounded up to kLanes

  void clear() {
    r.clear(), g.clear(), b.clear(), index.clear();
    n = 0;
  }
  void push(const float* palette, int32_t k) {
    r.push_back(palette[3 * k]), g.push_back(palette[3 * k + 1]);
    b.push_back(palette[3 * k + 2]), index.push_back(k);
    ++n;
  }
  void pad() {
    while (r.size() % kLanes) r.push_back(kFar), g.push_back(kFar), b.push_back(kFar);
  }
};

// The exact fp64 scan, for pixels whose fp32 best and runner-up are too close to call.
int32_t nearest_exact(const Soa& s, const uint8_t* x) {
  double best = std::numeric_limits<double>::infinity();
  int64_t arg = 0;
  for (int64_t j = 0; j < s.n; ++j) {
    double dr = x[0] - double(s.r[j]), dg = x[1] - double(s.g[j]), db = x[2] - double(s.b[j]);
    double d = dr * dr + dg * dg + db * db;
    if (d < best) best = d, arg = j;
  }
  return s.index[arg];
}

// kLanes floats / int32s as one SIMD value (GCC/Clang vector extensions: AVX-512 is one
// register, AVX2 two, SSE four).
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

typedef float VecF8 __attribute__((vector_size(8 * sizeof(float))));
typedef float VecF4 __attribute__((vector_size(4 * sizeof(float))));
static_assert(kLanes == 16, "hmin halves 16 lanes");

// The smallest lane, by halving (vector min at each step).
inline float hmin(const VecF& v) {
  VecF8 a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  a = b < a ? b : a;
  VecF4 c, d;
  std::memcpy(&c, &a, sizeof c);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
  c = d < c ? d : c;
  float m = c[0];
  for (int l = 1; l < 4; ++l) m = c[l] < m ? c[l] : m;
  return m;
}

// Reduce the lanes of one pixel to its token. Exactly one lane value (a best or a
// runner-up) within the fp32 error bound of the minimum: that lane's index wins. More than
// one: the call is too close for fp32 and the pixel is re-scanned in fp64.
__attribute__((always_inline)) inline int32_t finish(const Soa& s, const uint8_t* x,
                                                     const VecF& best, const VecF& second,
                                                     const VecI& idx) {
  const float m = hmin(best);
  const float bound = m + m * kRel + kAbs;
  const VecI near = best <= bound, near2 = second <= bound;  // lanes: -1 true, 0 false
  const VecI pick = near & idx, count = near + near2;
  int32_t arg = 0, n = 0;
  for (int l = 0; l < kLanes; ++l) arg += pick[l], n -= count[l];
  return n == 1 ? s.index[arg] : nearest_exact(s, x);
}

// tokens[i] = nearest entry of s to pixel px[3i..3i+2], for i < count. kPixels pixels share
// each palette load; the tail runs with the unused slots repeating the last pixel.
IGPT_CLONES void nearest_many(const Soa& s, const uint8_t* px, int64_t count, int32_t* tokens) {
  const int64_t npad = static_cast<int64_t>(s.r.size());
  VecI lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  for (int64_t i = 0; i < count; i += kPixels) {
    float x[kPixels][3];
    VecF best[kPixels], second[kPixels];
    VecI idx[kPixels];
    for (int p = 0; p < kPixels; ++p) {
      const int64_t q = std::min<int64_t>(i + p, count - 1);
      for (int c = 0; c < 3; ++c) x[p][c] = px[3 * q + c];
      best[p] = second[p] = VecF{} + kInf;
      idx[p] = VecI{};
    }
    for (int64_t k0 = 0; k0 < npad; k0 += kLanes) {
      VecF r, g, b;  // unaligned vector loads
      std::memcpy(&r, &s.r[k0], sizeof r);
      std::memcpy(&g, &s.g[k0], sizeof g);
      std::memcpy(&b, &s.b[k0], sizeof b);
      const VecI k = lane + static_cast<int32_t>(k0);
      for (int p = 0; p < kPixels; ++p) {
        const VecF dr = x[p][0] - r, dg = x[p][1] - g, db = x[p][2] - b;
        const VecF d = dr * dr + dg * dg + db * db;
        const VecI wins = d < best[p];
        // new runner-up: the old best if d wins, else d if it beats the old runner-up
        const VecF up = wins ? best[p] : d;
        second[p] = up < second[p] ? up : second[p];
        idx[p] = wins ? k : idx[p];
        best[p] = wins ? d : best[p];
      }
    }
    for (int p = 0; p < kPixels && i + p < count; ++p)
      tokens[i + p] = finish(s, px + 3 * (i + p), best[p], second[p], idx[p]);
  }
}

Soa full_palette(const float* palette, int64_t K) {
  Soa s;
  for (int32_t k = 0; k < K; ++k) s.push(palette, k);
  s.pad();
  return s;
}

constexpr int64_t kChunk = 1024;  // pixels per work item of the direct kernel

// Of the colours `from` (ascending index), those that can be the nearest (or tie) to some
// point of the box [lo, lo + size)^3: U = min over colours of the farthest box point's
// distance bounds every point's nearest distance, so a colour whose closest box point is
// farther than U can be dropped. fp64, with a margin so rounding never drops a colour.
void prune(const float* palette, const std::vector<int32_t>& from, const int lo[3], int size,
           std::vector<int32_t>& to) {
  double bound = std::numeric_limits<double>::infinity();
  for (int32_t k : from) {
    double dmax = 0;
    for (int c = 0; c < 3; ++c) {
      const double v = palette[3 * k + c];
      const double e = std::max(std::fabs(v - lo[c]), std::fabs(v - (lo[c] + size - 1)));
      dmax += e * e;
    }
    bound = std::min(bound, dmax);
  }
  bound = bound * (1 + 1e-12) + 1e-12;
  to.clear();
  for (int32_t k : from) {
    double dmin = 0;
    for (int c = 0; c < 3; ++c) {
      const double v = palette[3 * k + c], hi = lo[c] + size - 1;
      const double e = v < lo[c] ? lo[c] - v : (v > hi ? v - hi : 0.0);
      dmin += e * e;
    }
    if (dmin <= bound) to.push_back(k);
  }
}

// Two levels of boxes: 32^3 blocks prune the palette, their 8^3 cubes prune it again, and
// the direct kernel quantizes each cube's 512 colours against what is left (or the cube is
// filled at once when one colour is left).
template <typename T>
void build_lut(const float* palette, int64_t K, T* lut) {
  constexpr int kBlock = 32, kCube = 8, kBlocks = 256 / kBlock, kCubes = kBlock / kCube;
  constexpr int kPoints = kCube * kCube * kCube;
  std::vector<int32_t> all(K);
  for (int32_t k = 0; k < K; ++k) all[k] = k;
#pragma omp parallel
  {
    Soa s;
    std::vector<int32_t> block_cands, cube_cands;
    uint8_t points[kPoints * 3];
    int32_t tokens[kPoints];
#pragma omp for schedule(dynamic, 1)
    for (int block = 0; block < kBlocks * kBlocks * kBlocks; ++block) {
      const int blo[3] = {block / (kBlocks * kBlocks) * kBlock, block / kBlocks % kBlocks * kBlock,
                          block % kBlocks * kBlock};
      prune(palette, all, blo, kBlock, block_cands);
      for (int cube = 0; cube < kCubes * kCubes * kCubes; ++cube) {
        const int lo[3] = {blo[0] + cube / (kCubes * kCubes) * kCube,
                           blo[1] + cube / kCubes % kCubes * kCube, blo[2] + cube % kCubes * kCube};
        prune(palette, block_cands, lo, kCube, cube_cands);
        int n = 0;
        for (int r = 0; r < kCube; ++r)
          for (int g = 0; g < kCube; ++g)
            for (int b = 0; b < kCube; ++b, ++n) {
              points[3 * n] = static_cast<uint8_t>(lo[0] + r);
              points[3 * n + 1] = static_cast<uint8_t>(lo[1] + g);
              points[3 * n + 2] = static_cast<uint8_t>(lo[2] + b);
            }
        if (cube_cands.size() == 1) {
          std::fill(tokens, tokens + kPoints, cube_cands[0]);
        } else {
          s.clear();
          for (int32_t k : cube_cands) s.push(palette, k);
          s.pad();
          nearest_many(s, points, kPoints, tokens);
        }
        for (int j = 0; j < kPoints; ++j) {
          const int64_t key = (int64_t(points[3 * j]) << 16) | (int64_t(points[3 * j + 1]) << 8) |
                              points[3 * j + 2];
          lut[key] = static_cast<T>(tokens[j]);
        }
      }
    }
  }
}

template <typename T>
void lut_gather(const uint8_t* px, int64_t n, const T* lut, int64_t* out) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i)
    out[i] = lut[(int64_t(px[3 * i]) << 16) | (int64_t(px[3 * i + 1]) << 8) | px[3 * i + 2]];
}

}  // namespace

void quantize_cpu(const uint8_t* pixels, int64_t n, const float* palette, int64_t K,
                  int64_t* out) {
  if (n <= 0) return;
  const Soa s = full_palette(palette, K);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(dynamic, 4) if (n * K > (1 << 16))
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    int32_t tokens[kChunk];
    const int64_t start = chunk * kChunk, count = std::min(kChunk, n - start);
    nearest_many(s, pixels + 3 * start, count, tokens);
    for (int64_t j = 0; j < count; ++j) out[start + j] = tokens[j];
  }
}

void build_lut_cpu(const float* palette, int64_t K, int16_t* lut) { build_lut(palette, K, lut); }
void build_lut_cpu(const float* palette, int64_t K, int32_t* lut) { build_lut(palette, K, lut); }
void lut_gather_cpu(const uint8_t* pixels, int64_t n, const int16_t* lut, int64_t* out) {
  lut_gather(pixels, n, lut, out);
}
void lut_gather_cpu(const uint8_t* pixels, int64_t n, const int32_t* lut, int64_t* out) {
  lut_gather(pixels, n, lut, out);
}

}  // namespace igpt
