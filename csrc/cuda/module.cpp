// eas_kernels._C_cuda: the CUDA kernels behind a torch-free boundary.
//
// Compiled by the host compiler (no CUDA headers here, see launch.h) and linked by nvcc
// with the CUDA runtime linked statically. Tensors arrive as device pointers, shapes and
// strides validated by eas_kernels/_native.py, with the device ordinal and torch's current
// stream as an integer handle; the kernels are enqueued on that stream. The GIL is
// released while the host code runs (merge synchronises the stream once).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../binding.h"
#include "launch.h"

namespace py = pybind11;

namespace eas::cuda {
namespace {

using binding::MergeSiteTuple;
using binding::MergeTargetTuple;
using binding::pointer;
using binding::positive;

void* stream_of(uintptr_t handle) { return reinterpret_cast<void*>(handle); }

int merge_py(const std::vector<MergeTargetTuple>& targets, const std::vector<MergeSiteTuple>& sites,
             int dtype, int64_t d, uintptr_t scratch, int device, uintptr_t stream) {
  positive(d, "d");
  std::vector<MergeSite> merge_sites = binding::merge_sites(sites);
  std::vector<MergeTarget> converted =
      binding::merge_targets(targets, d, merge_sites);
  const MergeArgs args{converted.data(),   static_cast<int>(converted.size()),
                       merge_sites.data(), static_cast<int>(merge_sites.size()),
                       dtype,              d,
                       pointer<float>(scratch, "scratch"), 1};
  py::gil_scoped_release release;
  return merge(args, device, stream_of(stream));
}

void lowrank_factors_py(uintptr_t weight, int dtype, int64_t out, int64_t d, int64_t ld,
                     uintptr_t up, int64_t n, uintptr_t dst, int device, uintptr_t stream) {
  positive(out, "out");
  positive(d, "d");
  positive(n, "n");
  if (ld < d) throw std::invalid_argument("row stride ld must be >= d");
  const FactorArgs args{pointer<const void>(weight, "weight"), dtype, out, d, ld,
                        pointer<const float>(up, "up"), n, pointer<float>(dst, "dst"), 1};
  py::gil_scoped_release release;
  lowrank_factors(args, device, stream_of(stream));
}

void lowrank_add_py(uintptr_t y, int dtype, int64_t batch, int64_t tokens, int64_t out,
                    int64_t rank, int64_t y_sb, int64_t y_st, uintptr_t proj, int64_t p_sb,
                    int64_t p_st, int64_t p_sk, uintptr_t mix, uintptr_t factor, int device,
                    uintptr_t stream) {
  positive(batch, "batch");
  positive(tokens, "tokens");
  positive(out, "out");
  positive(rank, "rank");
  const LowrankAddArgs args{pointer<void>(y, "y"), dtype, batch, tokens, out, rank, y_sb, y_st,
                            pointer<const void>(proj, "proj"), p_sb, p_st, p_sk,
                            pointer<const float>(mix, "mix"),
                            pointer<const void>(factor, "factor"), 1};
  py::gil_scoped_release release;
  lowrank_add(args, device, stream_of(stream));
}

py::dict build_info() {
  py::dict info;
  std::vector<std::string> names;
  const std::string text = archs();
  for (size_t start = 0; start <= text.size();) {
    const size_t end = text.find(';', start);
    names.push_back(text.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  binding::add_abi_info(info);
  info["archs"] = names;
  const int version = runtime_version();
  info["cuda_version"] = std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
  return info;
}

}  // namespace
}  // namespace eas::cuda

PYBIND11_MODULE(_C_cuda, m) {
  using namespace eas::cuda;
  m.doc() = "eas_kernels CUDA kernels (merge, low-rank factors, low-rank add); see csrc/README.md";
  m.def("merge", &merge_py, "Merge PIAs: W' of their sites' targets into their merged buffers; -1 or refused target");
  m.def("lowrank_factors", &lowrank_factors_py, "F = U Wᵀ (fp32), U the up basis (abi.h)");
  m.def("lowrank_add", &lowrank_add_py, "y += κ F per row, in place (abi.h)");
  m.def("build_info", &build_info, "ABI (abi.h), compute capabilities and CUDA runtime of this build");
  eas::binding::def_abi_sizes(m);
  m.def("device_count", &device_count, "CUDA devices the static runtime sees");
  m.def("device_status", &device_status, "'N device(s)' or why none is usable");
}
