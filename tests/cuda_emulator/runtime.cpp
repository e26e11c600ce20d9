// The emulator's runtime: a launch's blocks, their threads, barriers, shuffles, checked accesses.
//
// NOTE [emulated execution]
//   The kernels of csrc/ run unmodified as host C++ (include/cuda_shim.h). A launch runs its
//   blocks one after another; the threads of a block run concurrently, so that a missing
//   barrier shows:
//   - as fibers on the calling thread (what the tests use; NOTE [fiber switch]). A fiber runs until it
//     waits at __syncthreads or at a warp shuffle, the only points where these kernels' threads
//     see each other's writes; then the schedule picks who runs next: the lowest-numbered
//     ready thread (forward), the highest (reverse) or a random one (seeded). Forward and
//     reverse each let one side of a race run first, so between them a missing barrier cannot
//     hide. Blocks run in the same order.
//   - as std::threads (threads), for ThreadSanitizer and AddressSanitizer, which do not
//     follow fibers.
//   A barrier checks that every thread arrives at the same call site and that no thread it
//   waits for has exited; a fiber deadlock is found at once, a std::thread one by timeout. A
//   failure stops the launch, and cudaGetLastError/cudaGetErrorString report the block, the
//   thread, the site and why, which csrc/binding.cpp's launch checks raise as they would on a GPU.
#include "runtime.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cuda_shim.h"

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

namespace largedet_emu {
namespace {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kWordBits = 64;
constexpr long long kMaxBlockSize = 1024;
constexpr long long kMaxGridSize = 2147483647;  // gridDim.x
constexpr std::size_t kVectorAlignment = 16;
constexpr std::size_t kFiberStackBytes = 128 * 1024;
constexpr auto kBarrierTimeout = std::chrono::seconds(60);

// NOTE [fiber switch]
//   A fiber switch saves the callee-saved registers and the floating-point control words on
//   the running stack, stores its stack pointer and loads the other's: what the System V
//   x86-64 ABI says survives a call, and nothing else (no signal mask, no system call, which
//   ucontext's swapcontext spends most of its time on). A new fiber's stack starts as if it
//   had switched away at the entry of fiber_start, which calls entry(arg) and never returns.
extern "C" void largedet_emu_switch(void** save, void* load);
extern "C" void largedet_emu_fiber_start();
asm(R"(
  .text
  .globl largedet_emu_switch
  .hidden largedet_emu_switch
  .type largedet_emu_switch, @function
largedet_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size largedet_emu_switch, .-largedet_emu_switch

  .globl largedet_emu_fiber_start
  .hidden largedet_emu_fiber_start
  .type largedet_emu_fiber_start, @function
largedet_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size largedet_emu_fiber_start, .-largedet_emu_fiber_start
)");

constexpr std::uint64_t kFpControl = 0x1f80 | std::uint64_t{0x037f} << 32;  // MXCSR and x87 control word at reset

// A stack on which largedet_emu_switch starts entry(arg) (NOTE [fiber switch]).
void* fiber_stack(char* base, std::size_t bytes, void (*entry)(void*), void* arg) {
  auto* sp = reinterpret_cast<std::uintptr_t*>((reinterpret_cast<std::uintptr_t>(base) + bytes) & ~std::uintptr_t{15});
  *--sp = reinterpret_cast<std::uintptr_t>(&largedet_emu_fiber_start);  // where the switch returns to
  *--sp = 0;                                                           // rbp
  *--sp = 0;                                                           // rbx
  *--sp = reinterpret_cast<std::uintptr_t>(arg);                       // r12
  *--sp = reinterpret_cast<std::uintptr_t>(entry);                     // r13
  *--sp = 0;                                                           // r14
  *--sp = 0;                                                           // r15
  *--sp = kFpControl;
  return sp;
}

Schedule schedule = Schedule::kForward;
bool skip_blocks = false;  // the "skip" schedule: launches are checked and counted, no block runs (host timing)
std::uint64_t seed = 0;
std::atomic<std::uint64_t> launches{0}, blocks{0}, vector_loads{0}, vector_stores{0};

// The last launch error, until cudaGetLastError reads it, and what the emulator saw.
std::mutex error_mutex;
cudaError_t pending_error = cudaSuccess;
cudaError_t described_error = cudaSuccess;
std::string error_description;

void set_error(cudaError_t error, std::string description) {
  const std::lock_guard<std::mutex> lock(error_mutex);
  if (pending_error != cudaSuccess) return;  // the first error of a launch is the one to read
  pending_error = described_error = error;
  error_description = std::move(description);
}

// The live allocations of NOTE [checked accesses] (ops.cpp), and on each host thread the last
// few that accesses fell in: a kernel streams through a handful of tensors, so most checks take
// no lock. A removal invalidates every thread's cache.
class Allocations {
 public:
  void add(const void* p, std::size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    live_[reinterpret_cast<std::uintptr_t>(p)] = bytes;
  }
  void remove(const void* p) {
    const std::lock_guard<std::mutex> lock(mutex_);
    live_.erase(reinterpret_cast<std::uintptr_t>(p));
    ++removals_;
  }
  bool contains(const void* p, std::size_t bytes) {
    const std::uintptr_t begin = reinterpret_cast<std::uintptr_t>(p), end = begin + bytes;
    thread_local Range recent[kRecent];
    thread_local unsigned next = 0;
    thread_local std::uint64_t seen_removals = 0;
    const std::uint64_t removals = removals_.load(std::memory_order_acquire);
    if (removals == seen_removals) {
      for (const Range& r : recent) {
        if (r.begin <= begin && end <= r.end) return true;
      }
    } else {
      std::fill(std::begin(recent), std::end(recent), Range{});
      seen_removals = removals;
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.upper_bound(begin);
    if (it == live_.begin()) return false;
    --it;
    if (end > it->first + it->second) return false;
    recent[next++ % kRecent] = {it->first, it->first + it->second};
    return true;
  }

 private:
  static constexpr unsigned kRecent = 8;
  struct Range {
    std::uintptr_t begin = 0, end = 0;
  };
  std::mutex mutex_;
  std::map<std::uintptr_t, std::size_t> live_;
  std::atomic<std::uint64_t> removals_{0};
};

Allocations& allocations() {
  static Allocations live;
  return live;
}

// Unwinds a thread of a failed launch out of its kernel.
struct Abort {};

std::string where(Site s) { return std::string(s.file) + ":" + std::to_string(s.line); }
bool same(Site a, Site b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

struct Barrier {
  unsigned expected = 0, arrived = 0;
  Site site{};
  std::uint64_t generation = 0;
  std::vector<unsigned> waiters;     // fibers
  std::condition_variable released;  // std::threads
};

struct Block {
  Block(unsigned index_, unsigned size_, bool threaded_, void (*body_)(void*), void* context_)
      : index(index_), size(size_), warps((size_ + kWarpSize - 1) / kWarpSize), threaded(threaded_), body(body_),
        context(context_), warp_barriers(warps), exchange(2 * warps * kWarpSize), exchanges(size_, 0),
        exited_in_warp(warps, 0) {
    block_barrier.expected = size;
    for (unsigned w = 0; w < warps; ++w) warp_barriers[w].expected = lanes(w);
  }
  unsigned lanes(unsigned warp) const { return std::min(kWarpSize, size - warp * kWarpSize); }

  const unsigned index, size, warps;
  const bool threaded;
  void (*const body)(void*);
  void* const context;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::uint64_t> exchange;  // [warp][2][lane]: two buffers of values between lanes
  std::vector<unsigned> exchanges;      // per thread, shuffles taken: their parity picks the buffer
  unsigned exited = 0;
  std::vector<unsigned> exited_in_warp;
  bool failed = false;
  std::string error;
  std::mutex mutex;  // std::threads: guards everything above
  std::vector<void*> stack_pointers;  // fibers: where each is switched out
  void* scheduler = nullptr;
  std::vector<std::uint64_t> ready;  // fibers that may run, a bit each
};

thread_local Block* current = nullptr;

std::unique_lock<std::mutex> lock_for(Block& b) {
  return b.threaded ? std::unique_lock<std::mutex>(b.mutex) : std::unique_lock<std::mutex>();
}

// The block's first failure (the caller holds its lock); wakes every waiting std::thread.
void record(Block& b, unsigned thread, const std::string& why) {
  if (b.failed) return;
  b.failed = true;
  b.error = "thread " + std::to_string(thread) + ": " + why;
  b.block_barrier.released.notify_all();
  for (Barrier& w : b.warp_barriers) w.released.notify_all();
}

[[noreturn]] void fail(Block& b, const std::string& why) {
  record(b, threadIdx.x, why);
  throw Abort{};
}

void set_ready(Block& b, unsigned thread, bool ready) {
  std::uint64_t& word = b.ready[thread / kWordBits];
  const std::uint64_t bit = std::uint64_t{1} << (thread % kWordBits);
  word = ready ? word | bit : word & ~bit;
}

void to_scheduler(Block& b) { largedet_emu_switch(&b.stack_pointers[threadIdx.x], b.scheduler); }

// Waits until the barrier's `expected` threads have arrived (NOTE [emulated execution]).
void arrive(Block& b, Barrier& barrier, Site site, const std::string& what, unsigned exited,
            std::unique_lock<std::mutex>& lock) {
  if (b.failed) throw Abort{};
  if (exited != 0) {
    fail(b, what + " at " + where(site) + " after " + std::to_string(exited) +
                " of the threads it waits for exited: they can never arrive");
  }
  if (barrier.arrived == 0) {
    barrier.site = site;
  } else if (!same(barrier.site, site)) {
    fail(b, "divergent " + what + ": this thread is at " + where(site) + ", " + std::to_string(barrier.arrived) +
                " wait at " + where(barrier.site));
  }
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    if (b.threaded) {
      barrier.released.notify_all();
    } else {
      for (unsigned waiter : barrier.waiters) set_ready(b, waiter, true);
      barrier.waiters.clear();
      to_scheduler(b);  // the schedule picks who goes first
    }
    return;
  }
  if (b.threaded) {
    const std::uint64_t generation = barrier.generation;
    if (!barrier.released.wait_for(lock, kBarrierTimeout,
                                   [&] { return barrier.generation != generation || b.failed; })) {
      fail(b, what + " at " + where(site) + ": timed out waiting for " +
                  std::to_string(barrier.expected - barrier.arrived) + " threads");
    }
    if (b.failed) throw Abort{};
  } else {
    barrier.waiters.push_back(threadIdx.x);
    set_ready(b, threadIdx.x, false);
    to_scheduler(b);  // resumed once the barrier is complete
  }
}

// A thread has returned from the kernel (the caller holds the block's lock).
void on_exit(Block& b, unsigned thread) {
  ++b.exited;
  ++b.exited_in_warp[thread / kWarpSize];
  const Barrier& warp = b.warp_barriers[thread / kWarpSize];
  if (b.block_barrier.arrived != 0) {
    record(b, thread, "exited while " + std::to_string(b.block_barrier.arrived) + " threads wait at __syncthreads at " +
                          where(b.block_barrier.site));
  } else if (warp.arrived != 0) {
    record(b, thread, "exited while " + std::to_string(warp.arrived) +
                          " lanes of its warp wait at __shfl_down_sync at " + where(warp.site));
  }
}

void run_thread(Block& b) {
  try {
    b.body(b.context);
  } catch (const Abort&) {
  }
}

void fiber_main(void* block) {
  Block& b = *static_cast<Block*>(block);
  const unsigned me = threadIdx.x;
  run_thread(b);
  on_exit(b, me);
  set_ready(b, me, false);
  to_scheduler(b);  // for good
}

int next_ready(const Block& b, Schedule order, std::mt19937_64& rng) {
  const int words = static_cast<int>(b.ready.size());
  if (order == Schedule::kRandom) {
    unsigned total = 0;
    for (std::uint64_t w : b.ready) total += static_cast<unsigned>(__builtin_popcountll(w));
    if (total == 0) return -1;
    unsigned k = std::uniform_int_distribution<unsigned>(0, total - 1)(rng);
    for (int i = 0; i < words; ++i) {
      for (std::uint64_t w = b.ready[i]; w != 0; w &= w - 1) {
        if (k-- == 0) return i * kWordBits + __builtin_ctzll(w);
      }
    }
  }
  for (int j = 0; j < words; ++j) {
    const int i = order == Schedule::kReverse ? words - 1 - j : j;
    const std::uint64_t w = b.ready[i];
    if (w == 0) continue;
    return i * kWordBits + (order == Schedule::kReverse ? kWordBits - 1 - __builtin_clzll(w) : __builtin_ctzll(w));
  }
  return -1;
}

void run_fibers(Block& b, Schedule order, std::mt19937_64& rng) {
  static thread_local std::vector<char> stacks;
  stacks.resize(std::max(stacks.size(), b.size * kFiberStackBytes));
  b.stack_pointers.resize(b.size);
  b.ready.assign((b.size + kWordBits - 1) / kWordBits, 0);
  for (unsigned t = 0; t < b.size; ++t) {
    b.stack_pointers[t] = fiber_stack(stacks.data() + t * kFiberStackBytes, kFiberStackBytes, fiber_main, &b);
    set_ready(b, t, true);
  }
  while (!b.failed) {
    const int t = next_ready(b, order, rng);
    if (t < 0) break;
    threadIdx = {static_cast<unsigned>(t), 0, 0};
    largedet_emu_switch(&b.scheduler, b.stack_pointers[t]);
  }
  if (!b.failed && b.exited != b.size) {
    b.failed = true;
    b.error = "deadlock: " + std::to_string(b.size - b.exited) + " threads wait and none can run";
  }
}

// The std::threads of the threads schedule, started once and kept: thread t of every block
// runs on worker t, so a block costs no thread creation.
class Workers {
 public:
  // Runs every thread of b, whose launch sets the built-in variables of the calling thread.
  void run(Block& b) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < b.size) {
      const unsigned t = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, t] { work(t); });
    }
    block_ = &b;
    index_ = blockIdx;
    dim_ = blockDim;
    grid_ = gridDim;
    running_ = b.size;
    ++round_;
    start_.notify_all();
    finished_.wait(lock, [&] { return running_ == 0; });
    block_ = nullptr;
  }

 private:
  void work(unsigned t) {
    for (std::uint64_t seen = 0;;) {
      Block* b;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return round_ != seen && block_ != nullptr; });
        seen = round_;
        if (t >= block_->size) continue;
        b = current = block_;
        threadIdx = {t, 0, 0};
        blockIdx = index_;
        blockDim = dim_;
        gridDim = grid_;
      }
      run_thread(*b);
      {
        const std::lock_guard<std::mutex> lock(b->mutex);
        on_exit(*b, t);
      }
      const std::lock_guard<std::mutex> lock(mutex_);
      if (--running_ == 0) finished_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, finished_;
  std::vector<std::thread> workers_;  // never joined: they wait for work until the process ends
  Block* block_ = nullptr;
  uint3 index_{};
  dim3 dim_{}, grid_{};
  unsigned running_ = 0;
  std::uint64_t round_ = 0;
};

void run_threads(Block& b) {
  static Workers* const workers = new Workers;  // never destroyed: its threads outlive static destruction
  workers->run(b);
}

}  // namespace

void run_grid(long long grid, long long block, std::size_t shared_bytes, void (*body)(void*), void* context) {
  ++launches;
  if (grid < 1 || grid > kMaxGridSize || block < 1 || block > kMaxBlockSize || shared_bytes != 0) {
    set_error(cudaErrorInvalidConfiguration,
              "invalid launch configuration: " + std::to_string(grid) + " blocks of " + std::to_string(block) +
                  " threads, " + std::to_string(shared_bytes) + " bytes of dynamic shared memory (none emulated)");
    return;
  }
  if (skip_blocks) return;
  const Schedule order = schedule;
  std::mt19937_64 rng(seed);
  std::vector<unsigned> indices(static_cast<std::size_t>(grid));
  std::iota(indices.begin(), indices.end(), 0u);
  if (order == Schedule::kReverse) std::reverse(indices.begin(), indices.end());
  if (order == Schedule::kRandom) std::shuffle(indices.begin(), indices.end(), rng);
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {static_cast<unsigned>(block), 1, 1};
  Block* const caller = current;
  for (const unsigned index : indices) {
    Block b(index, static_cast<unsigned>(block), order == Schedule::kThreads, body, context);
    blockIdx = {index, 0, 0};
    current = &b;
    if (b.threaded) {
      run_threads(b);
    } else {
      run_fibers(b, order, rng);
    }
    ++blocks;
    if (b.failed) {
      set_error(cudaErrorLaunchFailure, "kernel failed in block " + std::to_string(index) + " of " +
                                            std::to_string(grid) + ", " + b.error);
      break;
    }
  }
  current = caller;
}

void syncthreads(Site site) {
  Block& b = *current;
  auto lock = lock_for(b);
  arrive(b, b.block_barrier, site, "__syncthreads", b.exited, lock);
}

std::uint64_t shuffle_down(std::uint64_t bits, unsigned int delta, unsigned int mask, Site site) {
  Block& b = *current;
  auto lock = lock_for(b);
  const unsigned me = threadIdx.x, warp = me / kWarpSize, lane = me % kWarpSize, lanes = b.lanes(warp);
  const unsigned whole = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
  if (mask != whole) fail(b, "__shfl_down_sync at " + where(site) + " with a partial mask: not emulated");
  std::uint64_t* buffer = &b.exchange[(2 * warp + b.exchanges[me]++ % 2) * kWarpSize];
  buffer[lane] = bits;
  arrive(b, b.warp_barriers[warp], site, "__shfl_down_sync", b.exited_in_warp[warp], lock);
  return lane + delta < lanes ? buffer[lane + delta] : bits;
}

void check_access(const void* p, std::size_t bytes, bool write) {
  ++(write ? vector_stores : vector_loads);
  const bool aligned = reinterpret_cast<std::uintptr_t>(p) % kVectorAlignment == 0;
  if (aligned && allocations().contains(p, bytes)) return;
  Block& b = *current;
  auto lock = lock_for(b);
  char address[32];
  std::snprintf(address, sizeof address, "%p", p);
  fail(b, std::to_string(bytes) + "-byte " + (write ? "store" : "load") + " at " + address +
              (aligned ? " outside every live allocation" : " is misaligned (a GPU faults)"));
}

void configure(const std::string& name, std::uint64_t new_seed) {
  skip_blocks = name == "skip";
  if (skip_blocks) {
    // no block runs, so no order to pick
  } else if (name == "forward") {
    schedule = Schedule::kForward;
  } else if (name == "reverse") {
    schedule = Schedule::kReverse;
  } else if (name == "random") {
    schedule = Schedule::kRandom;
  } else if (name == "threads") {
    schedule = Schedule::kThreads;
  } else {
    throw std::invalid_argument("schedule must be forward, reverse, random or threads, got " + name);
  }
  seed = new_seed;
}

Counters counters() { return {launches.load(), blocks.load(), vector_loads.load(), vector_stores.load()}; }

void reset_counters() { launches = blocks = vector_loads = vector_stores = 0; }

void track_allocation(const void* p, std::size_t bytes) { allocations().add(p, bytes); }
void untrack_allocation(const void* p) { allocations().remove(p); }

}  // namespace largedet_emu

cudaError_t cudaGetLastError() {
  const std::lock_guard<std::mutex> lock(largedet_emu::error_mutex);
  const cudaError_t error = largedet_emu::pending_error;
  largedet_emu::pending_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  thread_local std::string text;
  const std::lock_guard<std::mutex> lock(largedet_emu::error_mutex);
  if (error == largedet_emu::described_error) {
    text = largedet_emu::error_description;
  } else {
    text = error == cudaSuccess ? "no error" : "CUDA error " + std::to_string(static_cast<int>(error));
  }
  return text.c_str();
}
