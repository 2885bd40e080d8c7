// The Python side of the ABI (abi.h), shared by both modules' pybind11 bindings
// (cpu/module.cpp, cuda/module.cpp): argument conversion and what a module reports about
// its ABI, so that eas_kernels/_native.py can check at import that it speaks the same one.
// Host code only (pybind11, no CUDA, no torch).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "abi.h"

namespace eas::binding {

namespace py = pybind11;

template <class P>
P* pointer(uintptr_t address, const char* name) {
  if (address == 0) throw std::invalid_argument(std::string(name) + " is a null pointer");
  return reinterpret_cast<P*>(address);
}

inline void positive(int64_t value, const char* name) {
  if (value <= 0) throw std::invalid_argument(std::string(name) + " must be positive");
}

// A MergeTarget as Python passes it: the fields of kMergeTargetFields, in that order.
using MergeTargetTuple =
    std::tuple<uintptr_t, int64_t, int64_t, uintptr_t, uintptr_t, uintptr_t, int64_t, uintptr_t>;
// A MergeSite as Python passes it: the fields of kMergeSiteFields, in that order.
using MergeSiteTuple = std::tuple<uintptr_t, uintptr_t, int64_t, uintptr_t>;

inline std::vector<MergeSite> merge_sites(const std::vector<MergeSiteTuple>& sites) {
  if (sites.empty()) throw std::invalid_argument("no merge site");
  std::vector<MergeSite> converted;
  for (const auto& [up, down, rank, mix] : sites) {
    positive(rank, "rank");
    // up and mix may be null: merge_targets checks that each target has what it reads
    converted.push_back(MergeSite{reinterpret_cast<const float*>(up),
                                  pointer<const float>(down, "down"), rank,
                                  reinterpret_cast<const float*>(mix)});
  }
  return converted;
}

inline std::vector<MergeTarget> merge_targets(const std::vector<MergeTargetTuple>& targets,
                                              int64_t d, const std::vector<MergeSite>& sites) {
  if (targets.empty()) throw std::invalid_argument("no merge target");
  const auto num_sites = static_cast<int64_t>(sites.size());
  std::vector<MergeTarget> converted;
  for (const auto& [weight, out, ld, merged, bias, new_bias, site, factors] : targets) {
    positive(out, "out");
    if (ld < d) throw std::invalid_argument("row stride ld must be >= d");
    if (site < 0 || site >= num_sites) throw std::invalid_argument("site index out of range");
    if (factors == 0 && sites[site].up == nullptr)
      throw std::invalid_argument("a target without factors needs its site's up rows");
    if (factors != 0 && sites[site].mix == nullptr)
      throw std::invalid_argument("a target with factors needs its site's mix");
    converted.push_back(MergeTarget{pointer<const void>(weight, "weight"), out, ld,
                                    pointer<void>(merged, "merged"),
                                    reinterpret_cast<const void*>(bias),
                                    pointer<void>(new_bias, "new_bias"), site,
                                    reinterpret_cast<const float*>(factors)});
  }
  return converted;
}

// What build_info() reports of the ABI: its version, the dtype codes and the merge
// target's fields (checked by eas_kernels/_native.py when the module is imported).
inline void add_abi_info(py::dict& info) {
  info["abi"] = kAbiVersion;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(kFloat32);
  dtypes["float16"] = static_cast<int>(kFloat16);
  dtypes["bfloat16"] = static_cast<int>(kBFloat16);
  info["dtype_codes"] = dtypes;
  std::vector<std::string> fields(std::begin(kMergeTargetFields), std::end(kMergeTargetFields));
  info["merge_target_fields"] = fields;
  std::vector<std::string> site_fields(std::begin(kMergeSiteFields), std::end(kMergeSiteFields));
  info["merge_site_fields"] = site_fields;
}

// The ABI's sizes, bound as module functions.
inline void def_abi_sizes(py::module_& m) {
  m.def("merge_scratch_floats", &merge_scratch_floats, py::arg("q_floats"), py::arg("rows"),
        py::arg("ranks"), py::arg("targets"), "floats of MergeArgs::scratch (abi.h)");
}

}  // namespace eas::binding
