// C++ (CPU, OpenMP) palette quantization kernels; the interface is documented in palette.h.
//
// Direct kernel: the palette is held as structure-of-arrays (r[], g[], b[]) padded with
// far-away colours to a multiple of kPad, so the inner loop compares one pixel with W
// palette entries at once in SIMD: one version per instruction set (AVX-512: W = 16, AVX2 +
// FMA: 8, baseline x86-64 SSE2: 4), the best one the CPU has picked at run time, or the one
// IGPT_CPU_ISA names. Each lane keeps its best and second-best distance and best index;
// distance and argmin are fused, nothing (n, K) is ever stored. A pixel whose best and
// runner-up distances are within the fp32 error bound (relative 2^-20; the fp32 (x - c)^2
// sum is good to about 2^-22 relative) is re-scanned in fp64, which makes the result the
// exact nearest colour, lowest index on exact ties.
// For many pixels and K >= 128 the RGB cube is first cut into 16^3 boxes, and each pixel
// is compared only with the colours that can be nearest to some point of its box (below).
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
#include <stdexcept>
#include <string>
#include <vector>

#include "palette.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define IGPT_X86 1
#else
#define IGPT_X86 0
#endif

namespace igpt {
namespace {

constexpr int kPad = 16;  // palette padding: a multiple of every version's lane count
constexpr float kRel = 1.0f / (1 << 20);
constexpr float kAbs = 1e-30f;  // covers fp32 underflow of tiny differences
constexpr float kInf = std::numeric_limits<float>::infinity();
// Padding colour: at distance +inf it never wins a lane (d < best is false even for an
// all-infinite lane) and never counts as a near one unless every colour is at +inf, where
// the fp64 re-scan decides. (A finite far colour, 1e15 before, beat palettes beyond it.)
constexpr float kFar = kInf;

// A palette (or a subset of one, in index order) as padded structure-of-arrays.
struct Soa {
  std::vector<float> r, g, b;
  std::vector<int32_t> index;  // original palette index of entry j
  int64_t n = 0;               // real entries; r.size() is n rounded up to kPad

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
    while (r.size() % kPad) r.push_back(kFar), g.push_back(kFar), b.push_back(kFar);
  }
};

// Entries [0, n) of a padded structure-of-arrays (all of a Soa, or one box's run of one).
struct Span {
  const float *r, *g, *b;
  const int32_t* index;
  int64_t n, npad;  // real entries, and n rounded up to a multiple of the lane count
};

Span span_of(const Soa& s) {
  return {s.r.data(), s.g.data(), s.b.data(), s.index.data(), s.n, int64_t(s.r.size())};
}

// The exact fp64 scan, for pixels whose fp32 best and runner-up are too close to call.
int32_t nearest_exact(const Span& s, const uint8_t* x) {
  double best = std::numeric_limits<double>::infinity();
  int64_t arg = 0;
  for (int64_t j = 0; j < s.n; ++j) {
    double dr = x[0] - double(s.r[j]), dg = x[1] - double(s.g[j]), db = x[2] - double(s.b[j]);
    double d = dr * dr + dg * dg + db * db;
    if (d < best) best = d, arg = j;
  }
  return s.index[arg];
}

// W floats / int32s as one SIMD value (GCC/Clang vector extensions), W the register width
// of the instruction set that the code is compiled for. Wider than the registers, GCC
// splits the arithmetic into register-wide halves but lowers the comparisons and selects
// lane by lane to scalar code: the 16-lane types of the old target_clones kernel made its
// AVX2 and baseline clones run at scalar speed (issue 25).
template <typename E, int W>
struct VecOf {
  typedef E T __attribute__((vector_size(W * sizeof(E))));
};
template <int W>
struct Vec {
  typedef typename VecOf<float, W>::T F;
  typedef typename VecOf<int32_t, W>::T I;
};

// The smallest and the sum of the lanes of a W-lane vector, by halving (each step one
// SIMD op on register halves) down to 4 lanes, then in scalar.
template <int W, typename E>
__attribute__((always_inline)) inline E lane_min(const typename VecOf<E, W>::T& v) {
  if constexpr (W > 4) {
    typename VecOf<E, W / 2>::T lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    const typename VecOf<E, W / 2>::T m = hi < lo ? hi : lo;
    return lane_min<W / 2, E>(m);
  } else {
    E m = v[0];
    for (int l = 1; l < W; ++l) m = v[l] < m ? v[l] : m;
    return m;
  }
}
template <int W, typename E>
__attribute__((always_inline)) inline E lane_sum(const typename VecOf<E, W>::T& v) {
  if constexpr (W > 4) {
    typename VecOf<E, W / 2>::T lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    const typename VecOf<E, W / 2>::T sum = lo + hi;
    return lane_sum<W / 2, E>(sum);
  } else {
    E sum = v[0];
    for (int l = 1; l < W; ++l) sum += v[l];
    return sum;
  }
}

// Reduce the lanes of one pixel to its token. Exactly one lane value (a best or a
// runner-up) within the fp32 error bound of the minimum: that lane's index wins. More than
// one: the call is too close for fp32 and the pixel is re-scanned in fp64. The outcome does
// not depend on W: it is the one palette entry within the bound when there is only one.
template <int W>
__attribute__((always_inline)) inline int32_t finish(const Span& s, const uint8_t* x,
                                                     const typename Vec<W>::F& best,
                                                     const typename Vec<W>::F& second,
                                                     const typename Vec<W>::I& idx) {
  const float m = lane_min<W, float>(best);
  const float bound = m + m * kRel + kAbs;
  const typename Vec<W>::I near = best <= bound, near2 = second <= bound;  // -1 true, 0 false
  const typename Vec<W>::I pick = near & idx, count = near + near2;
  const int32_t n = -lane_sum<W, int32_t>(count);
  return n == 1 ? s.index[lane_sum<W, int32_t>(pick)] : nearest_exact(s, x);
}

// tokens[i] = nearest entry of s to pixel px[3i..3i+2], for i < count: each step compares
// P pixels (sharing the palette loads) with W palette entries; the tail runs with the unused
// pixel slots repeating the last pixel. Inlined into one function per instruction set, so
// that it is compiled for that set's registers.
template <int W, int P>
__attribute__((always_inline)) inline void nearest_block(const Span& s, const uint8_t* px,
                                                         int64_t count, int32_t* tokens) {
  typedef typename Vec<W>::F VecF;
  typedef typename Vec<W>::I VecI;
  const int64_t npad = s.npad;
  VecI lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  for (int64_t i = 0; i < count; i += P) {
    float x[P][3];
    VecF best[P], second[P];
    VecI idx[P];
    for (int p = 0; p < P; ++p) {
      const int64_t q = std::min<int64_t>(i + p, count - 1);
      for (int c = 0; c < 3; ++c) x[p][c] = px[3 * q + c];
      best[p] = second[p] = VecF{} + kInf;
      idx[p] = VecI{};
    }
    VecI k = lane;
    for (int64_t k0 = 0; k0 < npad; k0 += W, k += W) {
      VecF r, g, b;  // unaligned vector loads
      std::memcpy(&r, &s.r[k0], sizeof r);
      std::memcpy(&g, &s.g[k0], sizeof g);
      std::memcpy(&b, &s.b[k0], sizeof b);
      for (int p = 0; p < P; ++p) {
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
    for (int p = 0; p < P && i + p < count; ++p)
      tokens[i + p] = finish<W>(s, px + 3 * (i + p), best[p], second[p], idx[p]);
  }
}

// Of the colours `from` (ascending index), those that can be the nearest (or tie) to some
// point of the box [lo, lo + size)^3: U = min over colours of the farthest box point's
// distance bounds every point's nearest distance, so a colour whose closest box point is
// farther than U can be dropped. In float SIMD (4 colours a step, baseline SSE2): a sum of
// three squares of rounded differences is good to ~5 * 2^-24 relative, so a margin of 2^-18
// on U never drops a colour that fp64 (or exact) arithmetic keeps; it may keep a few more.
void prune(const float* palette, const std::vector<int32_t>& from, const int lo[3], int size,
           std::vector<int32_t>& to) {
  typedef VecOf<float, 4>::T V4;
  const int64_t m = static_cast<int64_t>(from.size()), mpad = (m + 3) / 4 * 4;
  thread_local std::vector<float> coords;  // from's colours as r[mpad], g[mpad], b[mpad]
  coords.assign(3 * mpad, kFar);
  for (int64_t j = 0; j < m; ++j)
    for (int c = 0; c < 3; ++c) coords[c * mpad + j] = palette[3 * from[j] + c];
  const float* col[3] = {&coords[0], &coords[mpad], &coords[2 * mpad]};
  const float lof[3] = {float(lo[0]), float(lo[1]), float(lo[2])};
  const float hif[3] = {float(lo[0] + size - 1), float(lo[1] + size - 1), float(lo[2] + size - 1)};
  V4 umin = V4{} + kInf;
  for (int64_t j = 0; j < mpad; j += 4) {
    V4 dmax = V4{};
    for (int c = 0; c < 3; ++c) {
      V4 v;
      std::memcpy(&v, col[c] + j, sizeof v);
      const V4 a = v - lof[c], b = hif[c] - v, e = a < b ? b : a;  // the farther side
      dmax += e * e;
    }
    umin = dmax < umin ? dmax : umin;
  }
  const float u = lane_min<4, float>(umin), bound = u + u * 0x1p-18f + kAbs;
  to.clear();
  for (int64_t j = 0; j < mpad; j += 4) {
    V4 dmin = V4{};
    for (int c = 0; c < 3; ++c) {
      V4 v;
      std::memcpy(&v, col[c] + j, sizeof v);
      const V4 a = lof[c] - v, b = v - hif[c], e0 = a < b ? b : a;  // > 0 outside only
      const V4 e = e0 < 0 ? V4{} : e0;
      dmin += e * e;
    }
    const VecOf<int32_t, 4>::T keep = dmin <= bound;
    for (int l = 0; l < 4 && j + l < m; ++l)
      if (keep[l]) to.push_back(from[j + l]);
  }
}

// The direct kernel on many pixels: the RGB cube is cut into 16^3 boxes of 16^3 colours,
// each box holding the palette entries that can be nearest to (or tie at) some colour in
// it, found by prune: exact, and in index order, so a pixel compared with its box's entries
// gets the token the whole palette gives. A random 512-colour palette leaves ~8 per box.
constexpr int kBoxShift = 4, kPerAxis = 256 >> kBoxShift, kBoxes = kPerAxis * kPerAxis * kPerAxis;

inline int box_of(const uint8_t* x) {
  return (x[0] >> kBoxShift) * kPerAxis * kPerAxis + (x[1] >> kBoxShift) * kPerAxis +
         (x[2] >> kBoxShift);
}

struct Boxes {
  std::vector<float> r, g, b;  // every used box's entries, each run padded to W
  std::vector<int32_t> index;
  std::vector<int64_t> start = std::vector<int64_t>(kBoxes + 1, 0);  // run of box b
  std::vector<int64_t> count = std::vector<int64_t>(kBoxes, 0);       // its real entries

  Span span(int box) const {
    const int64_t s = start[box];
    return {&r[s], &g[s], &b[s], &index[s], count[box], start[box + 1] - s};
  }
};

// Descend the octree of cubes from (lo, size), whose candidates are `cands`: each child
// cube that holds a used box gets the candidates pruned for it, down to the boxes' size.
// used[level] flags the cubes of side 16 << level that hold a pixel.
void descend(const float* palette, const std::vector<std::vector<uint8_t>>& used,
             const int lo[3], int level, const std::vector<int32_t>& cands,
             std::vector<std::vector<int32_t>>& box_cands) {
  const int side = (1 << kBoxShift) << level, child = side / 2, per = 256 / child;
  std::vector<int32_t> pruned;
  for (int sub = 0; sub < 8; ++sub) {
    const int clo[3] = {lo[0] + (sub >> 2) * child, lo[1] + (sub >> 1 & 1) * child,
                        lo[2] + (sub & 1) * child};
    const int cell = (clo[0] / child * per + clo[1] / child) * per + clo[2] / child;
    if (!used[level - 1][cell]) continue;
    std::vector<int32_t>& to = level == 1 ? box_cands[cell] : pruned;
    prune(palette, cands, clo, child, to);
    if (level > 1) descend(palette, used, clo, level - 1, pruned, box_cands);
  }
}

// The boxes of the pixels (the others stay empty), each run padded to `pad` entries. False
// when the runs would pass `limit` entries.
bool build_boxes(const uint8_t* px, int64_t n, const float* palette, int64_t K, int pad,
                 int64_t limit, int threads, Boxes& bx) {
  constexpr int kLevels = 8 - kBoxShift;  // cubes of side 16, 32, ..., 256
  std::vector<std::vector<uint8_t>> used(kLevels + 1);
  for (int level = 0; level <= kLevels; ++level)
    used[level].assign(1 << (3 * (kLevels - level)), 0);
  for (int64_t i = 0; i < n; ++i) used[0][box_of(px + 3 * i)] = 1;
  for (int level = 1; level <= kLevels; ++level) {
    const int per = 1 << (kLevels - level), fine = 2 * per;
    for (int cell = 0; cell < fine * fine * fine; ++cell)
      if (used[level - 1][cell]) {
        const int q[3] = {cell / (fine * fine) / 2, cell / fine % fine / 2, cell % fine / 2};
        used[level][(q[0] * per + q[1]) * per + q[2]] = 1;
      }
  }
  std::vector<int32_t> all(K);
  for (int32_t k = 0; k < K; ++k) all[k] = k;
  std::vector<std::vector<int32_t>> cands(kBoxes);
  // the 64 cubes of side 64 in parallel; each prunes the whole palette, then descends
  constexpr int kTop = 2, kPer = 1 << kTop, kSide = 256 / kPer;
#pragma omp parallel num_threads(threads)
  {
    std::vector<int32_t> top;
#pragma omp for schedule(dynamic, 1)
    for (int cell = 0; cell < kPer * kPer * kPer; ++cell) {
      if (!used[kLevels - kTop][cell]) continue;
      const int lo[3] = {cell / (kPer * kPer) * kSide, cell / kPer % kPer * kSide,
                         cell % kPer * kSide};
      prune(palette, all, lo, kSide, top);
      descend(palette, used, lo, kLevels - kTop, top, cands);
    }
  }
  for (int box = 0; box < kBoxes; ++box) {
    bx.count[box] = static_cast<int64_t>(cands[box].size());
    bx.start[box + 1] = bx.start[box] + (bx.count[box] + pad - 1) / pad * pad;
  }
  const int64_t total = bx.start[kBoxes];
  if (total > limit) return false;
  bx.r.assign(total + kPad, kFar), bx.g.assign(total + kPad, kFar), bx.b.assign(total + kPad, kFar);
  bx.index.assign(total + kPad, 0);
  for (int box = 0; box < kBoxes; ++box)
    for (int64_t j = 0; j < bx.count[box]; ++j) {
      const int32_t k = cands[box][j];
      const int64_t at = bx.start[box] + j;
      bx.r[at] = palette[3 * k], bx.g[at] = palette[3 * k + 1], bx.b[at] = palette[3 * k + 2];
      bx.index[at] = k;
    }
  return true;
}

// tokens[i] = nearest palette entry to pixel i, from its box's entries.
template <int W>
__attribute__((always_inline)) inline void nearest_boxed(const Boxes& bx, const uint8_t* px,
                                                         int64_t count, int32_t* tokens) {
  for (int64_t i = 0; i < count; ++i) {
    const Span s = bx.span(box_of(px + 3 * i));
    if (s.n == 1)  // the box's only candidate
      tokens[i] = s.index[0];
    else
      nearest_block<W, 1>(s, px + 3 * i, 1, tokens + i);
  }
}

// One version per instruction set. P: AVX-512 has 32 registers, room for 4 pixels' state;
// with AVX2's and SSE2's 16, 2 pixels keep everything in registers (more spill to the
// stack: measured slower on AMD Zen 3).
typedef void (*NearestFn)(const Span&, const uint8_t*, int64_t, int32_t*);
typedef void (*BoxedFn)(const Boxes&, const uint8_t*, int64_t, int32_t*);
#if IGPT_X86
__attribute__((target("avx512f"))) void nearest_avx512(const Span& s, const uint8_t* px,
                                                        int64_t count, int32_t* tokens) {
  nearest_block<16, 4>(s, px, count, tokens);
}
__attribute__((target("avx512f"))) void boxed_avx512(const Boxes& bx, const uint8_t* px,
                                                      int64_t count, int32_t* tokens) {
  nearest_boxed<16>(bx, px, count, tokens);
}
__attribute__((target("avx2,fma"))) void nearest_avx2(const Span& s, const uint8_t* px,
                                                      int64_t count, int32_t* tokens) {
  nearest_block<8, 2>(s, px, count, tokens);
}
__attribute__((target("avx2,fma"))) void boxed_avx2(const Boxes& bx, const uint8_t* px,
                                                    int64_t count, int32_t* tokens) {
  nearest_boxed<8>(bx, px, count, tokens);
}
#endif
void nearest_baseline(const Span& s, const uint8_t* px, int64_t count, int32_t* tokens) {
  nearest_block<4, 2>(s, px, count, tokens);
}
void boxed_baseline(const Boxes& bx, const uint8_t* px, int64_t count, int32_t* tokens) {
  nearest_boxed<4>(bx, px, count, tokens);
}

struct Version {
  const char* name;
  int lanes;      // W
  int64_t box_k;  // the smallest K at which boxes beat the whole palette (see use_boxes)
  NearestFn fn;
  BoxedFn boxed;
  bool (*supported)();
};
// Best first. __builtin_cpu_supports also checks that the OS saves the wide registers.
const Version kVersions[] = {
#if IGPT_X86
    {"avx512", 16, 512, nearest_avx512, boxed_avx512,
     [] { return bool(__builtin_cpu_supports("avx512f")); }},
    {"avx2", 8, 128, nearest_avx2, boxed_avx2,
     [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }},
#endif
    {"default", 4, 64, nearest_baseline, boxed_baseline, [] { return true; }},
};

// The version `isa` names ("" or "auto": IGPT_CPU_ISA if set, else the best this CPU runs).
const Version& pick_version(const std::string& isa) {
  std::string want = isa;
  if (want.empty() || want == "auto") {
    const char* env = std::getenv("IGPT_CPU_ISA");
    want = env && *env ? env : "auto";
  }
  std::string names;
  for (const Version& v : kVersions) {
    if (!v.supported()) continue;
    if (want == "auto" || want == v.name) return v;
    names += names.empty() ? v.name : std::string(", ") + v.name;
  }
  throw std::invalid_argument("isa (or IGPT_CPU_ISA) must be auto or one of this CPU's "
                              "versions of the kernel (" + names + "), got '" + want + "'");
}

Soa full_palette(const float* palette, int64_t K) {
  Soa s;
  for (int32_t k = 0; k < K; ++k) s.push(palette, k);
  s.pad();
  return s;
}

constexpr int64_t kChunk = 1024;  // pixels per work item of the direct kernel

// Boxes pay for their set-up (pruning: ~2 ms at K = 512, ~100 ms at K = 65536) from about
// n * K = 2^25 pixel x colour pairs and n = 2^15 pixels, and below K = v.box_k the whole
// padded palette is as quick as a box's few colours: 128 with AVX2, 64 with SSE2 (measured
// on AMD Zen 3); 512 with AVX-512, whose whole-palette loop is twice as wide (not measured:
// kept where boxes surely win). Their lists hold at most 2^22 entries (64 MiB).
bool use_boxes(const Version& v, int64_t n, int64_t K) {
  return K >= v.box_k && n >= (1 << 15) && n * K >= (int64_t(1) << 25);
}
constexpr int64_t kBoxLimit = int64_t(1) << 22;

// Two levels of boxes: 32^3 blocks prune the palette, their 8^3 cubes prune it again, and
// the direct kernel quantizes each cube's 512 colours against what is left (or the cube is
// filled at once when one colour is left).
template <typename T>
void build_lut(const float* palette, int64_t K, T* lut, NearestFn nearest) {
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
          nearest(span_of(s), points, kPoints, tokens);
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
                  int64_t* out, const std::string& isa, int boxes, int threads) {
  const Version& version = pick_version(isa);  // throws before any thread starts
  if (n <= 0) return;
  if (threads <= 0) threads = omp_get_max_threads();
  Boxes bx;
  const bool boxed = (boxes < 0 ? use_boxes(version, n, K) : boxes > 0) &&
                     build_boxes(pixels, n, palette, K, version.lanes, kBoxLimit, threads, bx);
  const Soa s = boxed ? Soa() : full_palette(palette, K);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if (n * K > (1 << 16))
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    int32_t tokens[kChunk];
    const int64_t start = chunk * kChunk, count = std::min(kChunk, n - start);
    if (boxed)
      version.boxed(bx, pixels + 3 * start, count, tokens);
    else
      version.fn(span_of(s), pixels + 3 * start, count, tokens);
    for (int64_t j = 0; j < count; ++j) out[start + j] = tokens[j];
  }
}

void build_lut_cpu(const float* palette, int64_t K, int16_t* lut, const std::string& isa) {
  build_lut(palette, K, lut, pick_version(isa).fn);
}
void build_lut_cpu(const float* palette, int64_t K, int32_t* lut, const std::string& isa) {
  build_lut(palette, K, lut, pick_version(isa).fn);
}
const char* cpu_isa(const std::string& isa) { return pick_version(isa).name; }
std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const Version& v : kVersions)
    if (v.supported()) names.push_back(v.name);
  return names;
}
void lut_gather_cpu(const uint8_t* pixels, int64_t n, const int16_t* lut, int64_t* out) {
  lut_gather(pixels, n, lut, out);
}
void lut_gather_cpu(const uint8_t* pixels, int64_t n, const int32_t* lut, int64_t* out) {
  lut_gather(pixels, n, lut, out);
}

}  // namespace igpt
