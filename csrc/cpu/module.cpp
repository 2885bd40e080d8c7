// eas_kernels._C: the CPU kernels behind a torch-free boundary.
//
// Every tensor arrives as an integer data pointer plus shapes and strides (in elements),
// already validated by eas_kernels/_native.py; nothing here links libtorch, so the module
// survives torch upgrades. The GIL is released while a kernel runs.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../binding.h"
#include "kernels.h"

namespace py = pybind11;

namespace eas::cpu {
namespace {

std::vector<const KernelTable*> available_tables() {
  std::vector<const KernelTable*> tables;
  for (const KernelTable* table : {avx512_kernels(), avx2_kernels(), portable_kernels()})
    if (table != nullptr) tables.push_back(table);
  return tables;
}

const KernelTable* g_table = available_tables().front();

int checked_dtype(int dtype) {
  if (dtype < kFloat32 || dtype > kBFloat16) throw std::invalid_argument("unknown dtype code");
  return dtype;
}

using binding::MergeSiteTuple;
using binding::MergeTargetTuple;
using binding::pointer;
using binding::positive;

int merge(const std::vector<MergeTargetTuple>& targets, const std::vector<MergeSiteTuple>& sites,
          int dtype, int64_t d, uintptr_t scratch, int num_threads) {
  positive(d, "d");
  positive(num_threads, "num_threads");
  std::vector<MergeSite> merge_sites = binding::merge_sites(sites);
  std::vector<MergeTarget> converted =
      binding::merge_targets(targets, d, merge_sites);
  const MergeArgs args{converted.data(),    static_cast<int>(converted.size()),
                       merge_sites.data(),  static_cast<int>(merge_sites.size()),
                       checked_dtype(dtype), d,
                       pointer<float>(scratch, "scratch"), num_threads};
  py::gil_scoped_release release;
  return g_table->merge[args.dtype](args);
}

void lowrank_factors(uintptr_t weight, int dtype, int64_t out, int64_t d, int64_t ld,
                     uintptr_t up, int64_t n, uintptr_t dst, int num_threads) {
  positive(out, "out");
  positive(d, "d");
  positive(n, "n");
  positive(num_threads, "num_threads");
  if (ld < d) throw std::invalid_argument("row stride ld must be >= d");
  const FactorArgs args{pointer<const void>(weight, "weight"), checked_dtype(dtype), out, d, ld,
                        pointer<const float>(up, "up"), n, pointer<float>(dst, "dst"),
                        num_threads};
  py::gil_scoped_release release;
  g_table->lowrank_factors[args.dtype](args);
}

void lowrank_add(uintptr_t y, int dtype, int64_t batch, int64_t tokens, int64_t out,
                 int64_t rank, int64_t y_sb, int64_t y_st, uintptr_t proj, int64_t p_sb,
                 int64_t p_st, int64_t p_sk, uintptr_t mix, uintptr_t factor, int num_threads) {
  positive(batch, "batch");
  positive(tokens, "tokens");
  positive(out, "out");
  positive(rank, "rank");
  positive(num_threads, "num_threads");
  const LowrankAddArgs args{pointer<void>(y, "y"), checked_dtype(dtype), batch, tokens, out, rank,
                            y_sb, y_st, pointer<const void>(proj, "proj"), p_sb, p_st, p_sk,
                            pointer<const float>(mix, "mix"),
                            pointer<const void>(factor, "factor"), num_threads};
  py::gil_scoped_release release;
  g_table->lowrank_add[args.dtype](args);
}

std::vector<std::string> isas() {
  std::vector<std::string> names;
  for (const KernelTable* table : available_tables()) names.emplace_back(table->name);
  return names;
}

void set_isa(const std::string& name) {
  for (const KernelTable* table : available_tables()) {
    if (name == table->name) {
      g_table = table;
      return;
    }
  }
  throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU");
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = std::string(__VERSION__);
#ifdef _OPENMP
  info["openmp"] = static_cast<int>(_OPENMP);
#else
  info["openmp"] = py::none();
#endif
  binding::add_abi_info(info);
  return info;
}

}  // namespace
}  // namespace eas::cpu

PYBIND11_MODULE(_C, m) {
  using namespace eas::cpu;
  m.doc() = "eas_kernels CPU kernels (merge, low-rank factors, low-rank add); see csrc/README.md";
  m.def("merge", &merge, "Merge PIAs: W' of their sites' targets into their merged buffers; -1 or refused target");
  m.def("lowrank_factors", &lowrank_factors, "F = U Wᵀ (fp32), U the up basis (abi.h)");
  m.def("lowrank_add", &lowrank_add, "y += κ F per row, in place (abi.h)");
  m.def("isa", [] { return std::string(g_table->name); }, "instruction set of the kernels in use");
  m.def("isas", &isas, "instruction sets this CPU can run, best first");
  m.def("set_isa", &set_isa, "use the kernels of one instruction set (tests, benchmarks)");
  m.def("build_info", &build_info, "compiler, OpenMP and ABI (abi.h) of this build");
  eas::binding::def_abi_sizes(m);
}
