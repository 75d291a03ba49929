// Nearest-colour palette quantization kernels: the interface shared by the C++ (CPU,
// OpenMP) kernels in palette_cpu.cpp, the CUDA kernels in palette_cuda.cu and the torch
// binding in binding.cpp. Plain pointers only: neither kernel file includes torch.
//
//   token[i] = argmin_k sum_c (pixel[i][c] - palette[k][c])^2, the lowest k on exact ties.
//
// pixels: uint8 (n, 3) RGB, contiguous. palette: float32 (K, 3), contiguous, finite,
// 1 <= K <= 65536. Distances are computed in fp32 as (x - c)^2 sums (accurate near the
// minimum, unlike |c|^2 - 2 x.c); a pixel whose best and second-best fp32 distances lie
// within the fp32 error bound is re-scanned in fp64, so the token is the exact nearest
// colour except at exact fp64 ties, which go to the lowest index.
//
// LUT: lut[(r << 16) | (g << 8) | b] = token of (r, g, b) for all 2^24 colours, int16 when
// K <= 32768, int32 otherwise; quantizing with it is one gather per pixel.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace igpt {

constexpr int64_t kLutSize = int64_t(1) << 24;

// ---- CPU (palette_cpu.cpp) -------------------------------------------------------------
// The direct kernel has one version per x86 instruction set: "avx512" (AVX-512F), "avx2"
// (AVX2 + FMA) and "default" (baseline x86-64; the only one elsewhere). `isa` picks one:
// "" or "auto" takes $IGPT_CPU_ISA where set, else the best this CPU runs. A name this CPU
// cannot run throws std::invalid_argument. All versions give the same tokens.
// boxes: compare each pixel only with the colours that can be nearest in its 16^3 box of
// the RGB cube (1), with the whole palette (0), or pick by n and K (-1); same tokens.
// threads: OpenMP threads, 0 for OpenMP's default.
void quantize_cpu(const uint8_t* pixels, int64_t n, const float* palette, int64_t K,
                  int64_t* out, const std::string& isa = "", int boxes = -1, int threads = 0);
void build_lut_cpu(const float* palette, int64_t K, int16_t* lut, const std::string& isa = "");
void build_lut_cpu(const float* palette, int64_t K, int32_t* lut, const std::string& isa = "");
const char* cpu_isa(const std::string& isa = "");  // the version `isa` resolves to
std::vector<std::string> cpu_isas();                // the versions this CPU runs, best first
void lut_gather_cpu(const uint8_t* pixels, int64_t n, const int16_t* lut, int64_t* out);
void lut_gather_cpu(const uint8_t* pixels, int64_t n, const int32_t* lut, int64_t* out);

// ---- The nearest-centre proof (nearest_check.cpp) --------------------------------------
// clear[i] = 1 when centre best[i] is nearer to x[i] than every other centre by more than
// `margin` in squared distance (fp64), 0 otherwise. x: (n, 3) float32 or float64, centres:
// (K, 3) float64, best: (n,) in [0, K). near (K, m): each centre's m nearest other centres,
// nearest first, at distances near_dist (K, m); beyond (K,): the distance from each centre
// to the nearest centre not in its row (+inf when none). threads: 0 for OpenMP's default.
// Exact and near ties give 0: the caller decides those pixels some other way.
void clear_nearest_cpu(const float* x, int64_t n, const double* centres, const int64_t* best,
                       const int32_t* near, const double* near_dist, int64_t m,
                       const double* beyond, double margin, uint8_t* clear, int threads = 0);
void clear_nearest_cpu(const double* x, int64_t n, const double* centres, const int64_t* best,
                       const int32_t* near, const double* near_dist, int64_t m,
                       const double* beyond, double margin, uint8_t* clear, int threads = 0);

// ---- CUDA (palette_cuda.cu); stream is a cudaStream_t --------------------------------
// Each returns 0 or a cudaError_t code; cuda_error_string turns that into text.
int quantize_cuda(const uint8_t* pixels, int64_t n, const float* palette, int64_t K,
                  int64_t* out, void* stream);
int build_lut_cuda(const float* palette, int64_t K, int16_t* lut, void* stream);
int build_lut_cuda(const float* palette, int64_t K, int32_t* lut, void* stream);
int lut_gather_cuda(const uint8_t* pixels, int64_t n, const int16_t* lut, int64_t* out,
                    void* stream);
int lut_gather_cuda(const uint8_t* pixels, int64_t n, const int32_t* lut, int64_t* out,
                    void* stream);
const char* cuda_error_string(int code);

}  // namespace igpt
