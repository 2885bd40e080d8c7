// The emulated CUDA runtime's launches, barriers and warp exchanges (see cuda_runtime.h).
#include <barrier>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

namespace emu {

thread_local uint3 thread_index{0, 0, 0};
thread_local uint3 block_index{0, 0, 0};
thread_local dim3 grid_dim;
thread_local dim3 block_dim;

namespace {

struct Warp {
  explicit Warp(std::ptrdiff_t lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  unsigned char slots[32][8] = {};
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads) {
    for (unsigned first = 0; first < threads; first += 32)
      warps.emplace_back(static_cast<std::ptrdiff_t>(threads - first < 32 ? threads - first : 32));
  }
  std::barrier<> barrier;
  std::deque<Warp> warps;
};

thread_local Block* current = nullptr;

}  // namespace

cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}

void sync_block() { current->barrier.arrive_and_wait(); }

void gather(const void* value, std::size_t size, void* lanes) {
  Warp& warp = current->warps[thread_index.x / 32];
  std::memcpy(warp.slots[thread_index.x % 32], value, size);
  warp.barrier.arrive_and_wait();
  for (int lane = 0; lane < 32; ++lane)
    std::memcpy(static_cast<unsigned char*>(lanes) + lane * size, warp.slots[lane], size);
  warp.barrier.arrive_and_wait();  // every lane has read before a slot is written again
}

void run_grid(dim3 grid, unsigned threads, const std::function<void()>& body) {
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.x > 2147483647u || grid.y < 1 ||
      grid.y > 65535 || grid.z < 1 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block block(threads);
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          workers.emplace_back([&, t] {
            thread_index = {t, 0, 0};
            block_index = {x, y, z};
            grid_dim = grid;
            block_dim = dim3(threads);
            current = &block;
            body();
            // a thread that returned no longer takes part in any barrier
            block.warps[t / 32].barrier.arrive_and_drop();
            block.barrier.arrive_and_drop();
          });
        for (std::thread& worker : workers) worker.join();
      }
}

}  // namespace emu
