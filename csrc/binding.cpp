// torch binding of the palette kernels: igpt_kernels._C. The Python side
// (igpt_kernels/palette.py) validates shapes and picks the kernel; here we check what the
// raw-pointer kernels rely on (dtype, contiguity, device) and route to CPU or CUDA.
#include <torch/extension.h>
#include <torch/version.h>

#include "palette.h"

#ifdef IGPT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

void check_pixels(const torch::Tensor& pixels) {
  TORCH_CHECK(pixels.scalar_type() == torch::kUInt8, "pixels must be uint8, got ",
              pixels.scalar_type());
  TORCH_CHECK(pixels.dim() == 2 && pixels.size(1) == 3, "pixels must be (n, 3), got ",
              pixels.sizes());
  TORCH_CHECK(pixels.is_contiguous(), "pixels must be contiguous");
}

void check_palette(const torch::Tensor& palette, const torch::Tensor& pixels) {
  TORCH_CHECK(palette.scalar_type() == torch::kFloat32, "palette must be float32");
  TORCH_CHECK(palette.dim() == 2 && palette.size(1) == 3 && palette.size(0) >= 1 &&
                  palette.size(0) <= 65536,
              "palette must be (K, 3) with 1 <= K <= 65536, got ", palette.sizes());
  TORCH_CHECK(palette.is_contiguous(), "palette must be contiguous");
  TORCH_CHECK(palette.device() == pixels.device(), "palette is on ", palette.device(),
              " but pixels are on ", pixels.device());
}

#ifdef IGPT_WITH_CUDA
void cuda_check(int code, const char* what) {
  TORCH_CHECK(code == 0, what, " failed: ", igpt::cuda_error_string(code));
}
void* stream_of(const torch::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}
#endif

[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "igpt_kernels._C was built without CUDA; reinstall with IGPT_BUILD_CUDA=1");
}

// tokens (n,) int64 of the nearest palette colour of each pixel (n, 3). isa, boxes and
// threads choose how the CPU kernel runs (see quantize_cpu in palette.h).
torch::Tensor quantize_with(const torch::Tensor& pixels, const torch::Tensor& palette,
                            const std::string& isa, int boxes, int threads) {
  check_pixels(pixels);
  check_palette(palette, pixels);
  auto out = torch::empty({pixels.size(0)}, pixels.options().dtype(torch::kInt64));
  const auto* px = pixels.data_ptr<uint8_t>();
  const float* pal = palette.data_ptr<float>();
  if (pixels.is_cuda()) {
#ifdef IGPT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(pixels.device());
    cuda_check(igpt::quantize_cuda(px, pixels.size(0), pal, palette.size(0),
                                   out.data_ptr<int64_t>(), stream_of(pixels)),
               "quantize_cuda");
#else
    no_cuda();
#endif
  } else {
    pybind11::gil_scoped_release no_gil;
    igpt::quantize_cpu(px, pixels.size(0), pal, palette.size(0), out.data_ptr<int64_t>(), isa,
                       boxes, threads);
  }
  return out;
}

torch::Tensor quantize(const torch::Tensor& pixels, const torch::Tensor& palette) {
  return quantize_with(pixels, palette, "", -1, 0);
}

// The CPU direct kernel run a chosen way, for the tests and benchmarks that compare them:
// version isa, boxes (1 on, 0 off, -1 auto), threads (0: OpenMP's default).
torch::Tensor quantize_isa(const torch::Tensor& pixels, const torch::Tensor& palette,
                           const std::string& isa, int boxes, int threads) {
  TORCH_CHECK(!pixels.is_cuda(), "quantize_isa runs the CPU kernel; pixels are on ",
              pixels.device());
  TORCH_CHECK_VALUE(!isa.empty(), "isa must name a version (auto, avx512, avx2, default)");
  TORCH_CHECK_VALUE(boxes >= -1 && boxes <= 1, "boxes must be -1 (auto), 0 or 1, got ", boxes);
  TORCH_CHECK_VALUE(threads >= 0, "threads must be >= 0 (0: OpenMP's default), got ", threads);
  return quantize_with(pixels, palette, isa, boxes, threads);
}

// The (2^24,) table of tokens of every RGB colour: int16 when K <= 32768, else int32.
torch::Tensor build_lut(const torch::Tensor& palette) {
  check_palette(palette, palette);
  const int64_t K = palette.size(0);
  const bool small = K <= 32768;
  auto lut = torch::empty({igpt::kLutSize}, palette.options().dtype(small ? torch::kInt16
                                                                          : torch::kInt32));
  const float* pal = palette.data_ptr<float>();
  if (palette.is_cuda()) {
#ifdef IGPT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(palette.device());
    cuda_check(small ? igpt::build_lut_cuda(pal, K, lut.data_ptr<int16_t>(), stream_of(palette))
                     : igpt::build_lut_cuda(pal, K, lut.data_ptr<int32_t>(), stream_of(palette)),
               "build_lut_cuda");
#else
    no_cuda();
#endif
  } else {
    pybind11::gil_scoped_release no_gil;
    if (small)
      igpt::build_lut_cpu(pal, K, lut.data_ptr<int16_t>());
    else
      igpt::build_lut_cpu(pal, K, lut.data_ptr<int32_t>());
  }
  return lut;
}

// tokens (n,) int64 = lut[(r << 16) | (g << 8) | b] for each pixel (n, 3).
torch::Tensor lut_gather(const torch::Tensor& pixels, const torch::Tensor& lut) {
  check_pixels(pixels);
  TORCH_CHECK(lut.dim() == 1 && lut.size(0) == igpt::kLutSize && lut.is_contiguous() &&
                  (lut.scalar_type() == torch::kInt16 || lut.scalar_type() == torch::kInt32),
              "lut must be a contiguous (2^24,) int16 or int32 tensor");
  TORCH_CHECK(lut.device() == pixels.device(), "lut is on ", lut.device(), " but pixels are on ",
              pixels.device());
  auto out = torch::empty({pixels.size(0)}, pixels.options().dtype(torch::kInt64));
  const auto* px = pixels.data_ptr<uint8_t>();
  const int64_t n = pixels.size(0);
  const bool small = lut.scalar_type() == torch::kInt16;
  if (pixels.is_cuda()) {
#ifdef IGPT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(pixels.device());
    void* stream = stream_of(pixels);
    cuda_check(small ? igpt::lut_gather_cuda(px, n, lut.data_ptr<int16_t>(),
                                             out.data_ptr<int64_t>(), stream)
                     : igpt::lut_gather_cuda(px, n, lut.data_ptr<int32_t>(),
                                             out.data_ptr<int64_t>(), stream),
               "lut_gather_cuda");
#else
    no_cuda();
#endif
  } else {
    pybind11::gil_scoped_release no_gil;
    if (small)
      igpt::lut_gather_cpu(px, n, lut.data_ptr<int16_t>(), out.data_ptr<int64_t>());
    else
      igpt::lut_gather_cpu(px, n, lut.data_ptr<int32_t>(), out.data_ptr<int64_t>());
  }
  return out;
}

// clear (n,) bool: whether centres[best] is nearer to x than every other centre by more than
// margin (clear_nearest_cpu in palette.h). CPU tensors: x (n, 3) float32/float64, centres
// (K, 3) float64, best (n,) int64, near (K, m) int32, near_dist (K, m) and beyond (K,)
// float64, all contiguous.
torch::Tensor clear_nearest(const torch::Tensor& x, const torch::Tensor& centres,
                            const torch::Tensor& best, const torch::Tensor& near,
                            const torch::Tensor& near_dist, const torch::Tensor& beyond,
                            double margin, int threads) {
  const bool fp64 = x.scalar_type() == torch::kFloat64;
  TORCH_CHECK_VALUE(fp64 || x.scalar_type() == torch::kFloat32,
                    "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == 3, "x must be (n, 3), got ", x.sizes());
  const int64_t n = x.size(0), K = centres.size(0), m = near.dim() == 2 ? near.size(1) : -1;
  TORCH_CHECK_VALUE(centres.dim() == 2 && centres.size(1) == 3 && K >= 1 &&
                        centres.scalar_type() == torch::kFloat64,
                    "centres must be (K, 3) float64, got ", centres.sizes(), " ",
                    centres.scalar_type());
  TORCH_CHECK_VALUE(best.dim() == 1 && best.size(0) == n && best.scalar_type() == torch::kInt64,
                    "best must be (n,) int64 with n = ", n);
  TORCH_CHECK_VALUE(near.dim() == 2 && near.size(0) == K && near.scalar_type() == torch::kInt32,
                    "near must be (K, m) int32 with K = ", K);
  TORCH_CHECK_VALUE(near_dist.sizes() == near.sizes() &&
                        near_dist.scalar_type() == torch::kFloat64,
                    "near_dist must be float64 of near's shape");
  TORCH_CHECK_VALUE(beyond.dim() == 1 && beyond.size(0) == K &&
                        beyond.scalar_type() == torch::kFloat64,
                    "beyond must be (K,) float64");
  for (const auto* t : {&x, &centres, &best, &near, &near_dist, &beyond}) {
    TORCH_CHECK_VALUE(!t->is_cuda() && t->is_contiguous(),
                      "clear_nearest takes contiguous CPU tensors");
  }
  if (n > 0) {
    TORCH_CHECK_VALUE(best.min().item<int64_t>() >= 0 && best.max().item<int64_t>() < K,
                      "best must lie in [0, ", K, ")");
  }
  if (K > 1 && m > 0) {
    TORCH_CHECK_VALUE(near.min().item<int32_t>() >= 0 && near.max().item<int32_t>() < K,
                      "near must lie in [0, ", K, ")");
  }
  auto clear = torch::empty({n}, x.options().dtype(torch::kBool));
  auto* out = reinterpret_cast<uint8_t*>(clear.data_ptr<bool>());
  pybind11::gil_scoped_release no_gil;
  if (fp64)
    igpt::clear_nearest_cpu(x.data_ptr<double>(), n, centres.data_ptr<double>(),
                            best.data_ptr<int64_t>(), near.data_ptr<int32_t>(),
                            near_dist.data_ptr<double>(), m, beyond.data_ptr<double>(), margin,
                            out, threads);
  else
    igpt::clear_nearest_cpu(x.data_ptr<float>(), n, centres.data_ptr<double>(),
                            best.data_ptr<int64_t>(), near.data_ptr<int32_t>(),
                            near_dist.data_ptr<double>(), m, beyond.data_ptr<double>(), margin,
                            out, threads);
  return clear;
}

bool has_cuda() {
#ifdef IGPT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// What this module was compiled against, so that the Python side can refuse a build made for
// another torch (a prebuilt _C left behind by a torch upgrade) instead of crashing in it.
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                  "." + std::to_string(TORCH_VERSION_PATCH);
#ifdef _GLIBCXX_USE_CXX11_ABI
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#else
  info["cxx11_abi"] = pybind11::none();
#endif
  info["cuda"] = has_cuda();
#ifdef IGPT_SOURCES_DIGEST  // igpt_kernels._build.sources_digest of the sources built
#define IGPT_STRING2(x) #x
#define IGPT_STRING(x) IGPT_STRING2(x)
  info["sources"] = IGPT_STRING(IGPT_SOURCES_DIGEST);
#else
  info["sources"] = pybind11::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "igpt palette quantization kernels (C++/OpenMP and CUDA)";
  m.def("quantize", &quantize, "tokens (n,) int64 of pixels (n, 3) uint8", py::arg("pixels"),
        py::arg("palette"));
  m.def("build_lut", &build_lut, "(2^24,) token table of a (K, 3) float32 palette",
        py::arg("palette"));
  m.def("lut_gather", &lut_gather, "tokens (n,) int64 = lut[rgb key] of pixels (n, 3)",
        py::arg("pixels"), py::arg("lut"));
  m.def("quantize_isa", &quantize_isa,
        "quantize on the CPU with the kernel version isa ('auto', 'avx512', 'avx2', 'default'; "
        "ValueError if this CPU cannot run it), boxes (1 on, 0 off, -1 auto) and threads "
        "(0: OpenMP's default)",
        py::arg("pixels"), py::arg("palette"), py::arg("isa") = "auto", py::arg("boxes") = -1,
        py::arg("threads") = 0);
  m.def(
      "cpu_isa", [] { return std::string(igpt::cpu_isa()); },
      "the CPU kernel's version that quantize and build_lut use ($IGPT_CPU_ISA or the best)");
  m.def("cpu_isas", &igpt::cpu_isas, "the CPU kernel's versions this CPU runs, best first");
  m.def("clear_nearest", &clear_nearest,
        "(n,) bool: whether centres[best] beats every other centre by more than margin in "
        "fp64 squared distance, proven with each centre's nearest-neighbour table",
        py::arg("x"), py::arg("centres"), py::arg("best"), py::arg("near"), py::arg("near_dist"),
        py::arg("beyond"), py::arg("margin"), py::arg("threads") = 0);
  m.def("has_cuda", &has_cuda, "whether this build has the CUDA kernels");
  m.def("build_info", &build_info,
        "{torch: 'X.Y.Z', cxx11_abi, cuda, sources: digest} this module was built with");
}
