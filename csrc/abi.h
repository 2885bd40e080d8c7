// The boundary between Python and the compiled kernels: plain C++ structs, no torch.
//
// Python (eas_kernels/_native.py) validates tensors and passes their data pointers,
// shapes and strides (in elements) as integers. Both the CPU module (_C) and the CUDA
// module (_C_cuda) take these structs. This file is the one definition of the ABI: the
// modules report kAbiVersion, the dtype codes and kMergeTargetFields (binding.h), and
// eas_kernels/_native.py refuses a module whose report differs from what it speaks.
#pragma once

#include <cstdint>

namespace eas {

// Bumped whenever a struct below or a binding's arguments change.
constexpr int kAbiVersion = 7;

// Storage dtype of a weight (and of the activations of the low-rank path).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One linear layer (weight W: out x d) that a merge computes W' for, EAS_SPEC §4. W is only
// read: W' goes to `merged`, a buffer the caller swaps in for W once every target of the
// model has merged (and out again to restore W, without a copy).
struct MergeTarget {
  const void* weight;    // W, rows of `ld` elements (unit stride along d); read only
  int64_t out;           // rows of W
  int64_t ld;            // row stride of W, in elements (>= d)
  void* merged;          // (out, d) contiguous, receives W' = W + (W W_uᵀ) W_d1
  const void* bias;      // b (out,), or nullptr for a layer without bias (zero)
  void* new_bias;        // (out,) receives b + W βᵀ, rounded once to the storage dtype
  int64_t site;          // index of the target's PIA in MergeArgs::sites
  const float* factors;  // (out, 2r + 2) contiguous fp32: Fᵀ = W Uᵀ, the transpose of the
                         // low-rank path's F = [A; C; a₁; a₂] (FactorArgs), kept by the runtime
                         // across prompts: Q = [α₁ A + α₂ C | (α₁ A + α₂ C) cᵀ + α₁ a₁ + α₂ a₂]
                         // with the site's mix; or nullptr: Q = W [W_u; β]ᵀ from the site's up
};

// A MergeTarget's fields in the order Python passes them (binding.h's MergeTargetTuple).
inline constexpr const char* kMergeTargetFields[] = {
    "weight", "out", "ld", "merged", "bias", "new_bias", "site", "factors"};

// One PIA (one adapter site): what its targets are merged with.
struct MergeSite {
  const float* up;       // (rank + 1, d) contiguous fp32: W_u (r rows), then β; nullptr
                         // when every target of the site gives its factors
  const float* down;     // (rank, d) contiguous fp32: W_d1
  int64_t rank;          // r
  const float* mix;      // (rank + 2) fp32: α₁, α₂, c of the frozen state, which turn a
                         // target's factors into Q; nullptr when no target gives factors
};

// A MergeSite's fields in the order Python passes them (binding.h's MergeSiteTuple).
inline constexpr const char* kMergeSiteFields[] = {"up", "down", "rank", "mix"};

// Floats of MergeArgs::scratch: Q (q_floats = Σ over targets of out x (rank + 1), from W or
// from the factors), the row
// maxima (rows = Σ out), the down projections' row maxima (ranks = Σ over sites of rank)
// and one refusal flag per target.
constexpr int64_t merge_scratch_floats(int64_t q_floats, int64_t rows, int64_t ranks,
                                       int64_t targets) {
  return q_floats + rows + ranks + targets;
}

// Merge of PIAs into the targets of their sites (wq, wk, wv or w1, w3; every site of a
// model in one call): all targets share d and dtype. No entry of W' or b' may be NaN/Inf:
// the kernels check every one and report the first target that has one (W is never
// written, so nothing needs undoing).
struct MergeArgs {
  MergeTarget* targets;
  int num_targets;
  const MergeSite* sites;
  int num_sites;
  int dtype;             // DType of every weight, merged buffer and bias
  int64_t d;             // columns of W
  float* scratch;        // merge_scratch_floats(...) floats (device)
  int num_threads;       // CPU only
};

// The low-rank path's factors, F = U Wᵀ, with U the PIA's up basis (EAS_SPEC §4):
// rows W_u1ᵀ (r), W_u2ᵀ (r), b_u1, b_u2, so n = 2r + 2. Independent of the examples' states.
// Accumulated and written in fp32 (Python rounds them to fp16/bf16 for such layers).
struct FactorArgs {
  const void* weight;    // W (out, d), rows of `ld` elements
  int dtype;
  int64_t out, d, ld;
  const float* up;       // U (n, d) contiguous fp32
  int64_t n;
  float* dst;            // F (n, out) contiguous fp32
  int num_threads;
};

// y[b, t, :] += κ[b, t, :] F, in place, where F = [A; C; a₁; a₂] ((2r + 2) x out) and, with
// example b's state (α₁, α₂, c) and p = proj[b, t, :] + c,
// κ[b, t, :] = [α₁ p, α₂ p, α₁, α₂]: per example M_b = α₁ A + α₂ C and g_b = c M_b + α₁ a₁ +
// α₂ a₂, so y += proj M_b + g_b. y and proj share the storage dtype.
struct LowrankAddArgs {
  void* y;               // (B, n, out), unit stride along out
  int dtype;
  int64_t batch, tokens, out, rank;
  int64_t y_sb, y_st;    // strides of y (elements)
  const void* proj;      // (B, n, rank) = x W_d1ᵀ
  int64_t p_sb, p_st, p_sk;
  const float* mix;      // (B, rank + 2) contiguous fp32: α₁, α₂, c of each example
  const void* factor;    // F (2 rank + 2, out) contiguous, in y's storage dtype
  int num_threads;
};

}  // namespace eas
