// The proof behind igpt.hf_patch's processor quantizer: that a proposed nearest centre wins
// by more than a margin in fp64 (interface and rule in palette.h).
//
// Per pixel: d_b = |x - c_b|^2 and r = sqrt(d_b). The neighbours of c_b are visited nearest
// first; before neighbour j, every centre not yet checked lies at least near_dist[b][j] from
// c_b (the table is sorted, and `beyond` bounds the rest), so by the triangle inequality at
// least near_dist[b][j] - r from x. That bound clears the margin, (s - r)^2 - d_b > margin
// with s > r, exactly when s > r + sqrt(d_b + margin), which s^2 > 4 (d_b + margin) implies
// (r <= sqrt(d_b + margin)): a test without square roots that gives up only a band of
// width sqrt(d_b + margin) - r <= sqrt(margin). Once a neighbour's distance from c_b passes it the pixel is clear; a
// checked neighbour within the margin makes it open. Most pixels lie well inside their
// centre's cell and stop after a neighbour or two.
#include <omp.h>

#include "palette.h"

namespace igpt {
namespace {

inline double sq3(const double* c, double x0, double x1, double x2) {
  const double a = x0 - c[0], b = x1 - c[1], d = x2 - c[2];
  return a * a + b * b + d * d;
}

template <typename T>
void check(const T* x, int64_t n, const double* centres, const int64_t* best, const int32_t* near,
           const double* near_dist, int64_t m, const double* beyond, double margin,
           uint8_t* clear, int threads) {
  if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 8192)
  for (int64_t i = 0; i < n; ++i) {
    const double x0 = x[3 * i], x1 = x[3 * i + 1], x2 = x[3 * i + 2];
    const int64_t b = best[i];
    const double d_b = sq3(centres + 3 * b, x0, x1, x2);
    const double far = 4 * (d_b + margin);  // the squared threshold above
    const int32_t* nb = near + b * m;
    const double* nd = near_dist + b * m;
    uint8_t verdict = 2;  // 2: not decided by the neighbours
    for (int64_t j = 0; j < m && verdict == 2; ++j) {
      if (nd[j] * nd[j] > far)
        verdict = 1;
      else if (sq3(centres + 3 * int64_t(nb[j]), x0, x1, x2) - d_b <= margin)
        verdict = 0;
    }
    clear[i] = verdict == 2 ? beyond[b] * beyond[b] > far : verdict;
  }
}

}  // namespace

void clear_nearest_cpu(const float* x, int64_t n, const double* centres, const int64_t* best,
                       const int32_t* near, const double* near_dist, int64_t m,
                       const double* beyond, double margin, uint8_t* clear, int threads) {
  check(x, n, centres, best, near, near_dist, m, beyond, margin, clear, threads);
}
void clear_nearest_cpu(const double* x, int64_t n, const double* centres, const int64_t* best,
                       const int32_t* near, const double* near_dist, int64_t m,
                       const double* beyond, double margin, uint8_t* clear, int threads) {
  check(x, n, centres, best, near, near_dist, m, beyond, margin, clear, threads);
}

}  // namespace igpt
