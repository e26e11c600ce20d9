// How the host side of the emulator (ops.cpp, the Python tests) steers and observes the
// runtime of runtime.cpp. Torch-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace largedet_emu {

// Which thread runs next when one blocks (NOTE [emulated execution] in runtime.cpp).
enum class Schedule { kForward, kReverse, kRandom, kThreads };

// Throws std::invalid_argument for an unknown name: forward, reverse, random or threads.
void configure(const std::string& schedule, std::uint64_t seed);

struct Counters {
  std::uint64_t launches, blocks, vector_loads, vector_stores;
};
Counters counters();
void reset_counters();

// NOTE [checked accesses]: the live CPU allocations, kept by the tracking allocator of ops.cpp.
void track_allocation(const void* p, std::size_t bytes);
void untrack_allocation(const void* p);

}  // namespace largedet_emu
