// The emulated CUDA runtime behind cuda_runtime.h (this folder): launches, fibers, barriers,
// warp shuffles, launch-limit checks and fault exposure. See that header for the model.
#include "cuda_runtime.h"

#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulation's fibers switch stacks in x86-64 assembly"
#endif

namespace lopt_emu {

ThreadContext* g_thread = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

}  // namespace lopt_emu

namespace lopt_emu {
namespace {

// Launch limits of the targets the CUDA build compiles for (sm_80 and sm_90; where they
// differ, the smaller).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
constexpr size_t kDefaultSharedBytes = 48 * 1024;   // without cudaFuncSetAttribute
constexpr size_t kOptInSharedBytes = 163 * 1024;    // sm_80's opt-in maximum per block
constexpr size_t kStackBytes = 128 * 1024;          // per emulated thread
constexpr unsigned char kPoison = 0xFF;             // NaN in float, double, bf16 and fp16

enum class State { kReady, kBarrier, kShuffle, kDone };

struct Thread : ThreadContext {
  void* sp = nullptr;  // saved stack pointer while switched out
  State state = State::kReady;
  int linear = 0;
  // A pending __shfl_xor_sync.
  unsigned mask = 0;
  int lane_mask = 0, width = 32;
  uint64_t value = 0, result = 0;
};

std::mutex g_mutex;  // one launch at a time: the globals below belong to it
int g_last_error = cudaSuccess;
std::string g_detail;
std::unordered_map<const void*, int> g_max_dynamic;
void* g_scheduler_sp = nullptr;
std::vector<Thread> g_threads;
std::vector<char*> g_stacks;
void (*g_body)(void*) = nullptr;
void* g_closure = nullptr;
bool g_aborted = false;
std::string g_abort_message;
std::vector<uint64_t> g_dynamic;  // dynamic shared memory (16-byte aligned)
size_t g_dynamic_bytes = 0;
uint64_t g_launch_count = 0;

bool faults_enabled() {
  const char* v = std::getenv("LOPT_PORT_EMULATION_FAULTS");
  return v == nullptr || std::string(v) != "0";
}

uint64_t fault_seed() {
  const char* v = std::getenv("LOPT_PORT_EMULATION_SEED");
  return v == nullptr ? 0 : std::strtoull(v, nullptr, 10);
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
void shuffle_order(std::vector<T>& v, uint64_t& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix(rng) % i]);
}

// ---------------------------------------------------------------------------------------
// Static shared memory: the static __shared__ arrays of every kernel are thread-local statics
// of this library (cuda_runtime.h), so the calling OS thread's instance of the library's
// thread-local segment holds them all, and nothing else but this anchor.

thread_local char g_tls_anchor;

struct Segment {
  unsigned char* data = nullptr;
  size_t bytes = 0;
};

// This thread's instance of the library's thread-local segment (data null if not found).
Segment shared_segment() {
  *static_cast<volatile char*>(&g_tls_anchor) = 0;  // allocates this thread's instance if not yet
  struct Query {
    uintptr_t code;  // an address in this library
    Segment segment;
  } query{reinterpret_cast<uintptr_t>(&shared_segment), {}};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* arg) -> int {
        auto* q = static_cast<Query*>(arg);
        bool mine = false;
        size_t tls_bytes = 0;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t start = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && q->code >= start && q->code < start + ph.p_memsz)
            mine = true;
          if (ph.p_type == PT_TLS) tls_bytes = ph.p_memsz;
        }
        if (!mine) return 0;
        q->segment.data = static_cast<unsigned char*>(info->dlpi_tls_data);
        q->segment.bytes = tls_bytes;
        return 1;
      },
      &query);
  const auto* anchor = reinterpret_cast<const unsigned char*>(&g_tls_anchor);
  Segment& seg = query.segment;
  if (seg.data == nullptr || anchor < seg.data || anchor >= seg.data + seg.bytes) return {};
  return seg;
}

// ---------------------------------------------------------------------------------------
// Fibers: a stack per thread and a switch that saves the callee-saved registers.

extern "C" void lopt_emu_switch(void** save_sp, void* load_sp);
extern "C" void lopt_emu_fiber_start();
// System V x86-64: push the callee-saved registers and the SSE/x87 control words, swap stack
// pointers, pop. A new fiber's first switch "returns" into lopt_emu_fiber_start, which calls
// r12(rbx) on a 16-byte aligned stack.
asm(R"(
  .text
  .globl lopt_emu_switch
  .hidden lopt_emu_switch
  .type lopt_emu_switch, @function
lopt_emu_switch:
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
  .size lopt_emu_switch, .-lopt_emu_switch

  .globl lopt_emu_fiber_start
  .hidden lopt_emu_fiber_start
  .type lopt_emu_fiber_start, @function
lopt_emu_fiber_start:
  movq %rbx, %rdi
  callq *%r12
  ud2
  .size lopt_emu_fiber_start, .-lopt_emu_fiber_start
)");

extern "C" [[noreturn]] void lopt_emu_fiber_main(Thread* t);

char* stack_of(int i) {
  while (static_cast<int>(g_stacks.size()) <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "lopt_emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);  // an overflow faults instead of corrupting memory
    g_stacks.push_back(static_cast<char*>(m) + page);
  }
  return g_stacks[i];
}

void init_fiber(Thread& t, char* stack) {
  auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top - 16 - 64);
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpcw) << 32);
  sp[1] = sp[2] = sp[3] = 0;                                   // r15, r14, r13
  sp[4] = reinterpret_cast<uint64_t>(&lopt_emu_fiber_main);    // r12: the entry
  sp[5] = reinterpret_cast<uint64_t>(&t);                      // rbx: its argument
  sp[6] = 0;                                                   // rbp
  sp[7] = reinterpret_cast<uint64_t>(&lopt_emu_fiber_start);   // return address
  t.sp = sp;
}

Thread& current() { return *static_cast<Thread*>(g_thread); }

// Back to the scheduler; returns when the scheduler resumes this thread.
void yield(State s) {
  Thread& t = current();
  t.state = s;
  lopt_emu_switch(&t.sp, g_scheduler_sp);
}

[[noreturn]] void fail_in_thread(const std::string& message) {
  g_aborted = true;
  g_abort_message = message;
  yield(State::kDone);
  std::abort();  // an aborted block is never resumed
}

void resume(Thread& t) {
  g_thread = &t;
  lopt_emu_switch(&g_scheduler_sp, t.sp);
  g_thread = nullptr;
}

std::string where(const Thread& t) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", g_block_idx.x,
                g_block_idx.y, g_block_idx.z, t.idx.x, t.idx.y, t.idx.z);
  return buf;
}

// ---------------------------------------------------------------------------------------
// The scheduler of one block.

// Releases the shuffles that every lane of their mask has reached, computing each lane's
// result; appends those lanes to `ready`. "" or what is wrong. The lanes of a warp waiting in
// __shfl_xor_sync form one group per mask: divergent parts of a warp may shuffle among
// themselves with disjoint masks. Lanes that one mask names must call with that mask; every
// group is checked before any is released, so that the order in which lanes arrived does not
// change what is reported.
std::string release_shuffles(int n, std::vector<int>& ready) {
  const int warps = (n + 31) / 32;
  char hex[64];
  for (int w = 0; w < warps; ++w) {
    const int lanes = n - w * 32 < 32 ? n - w * 32 : 32;
    unsigned seen = 0, complete_masks[32];
    int complete = 0;
    for (int f = 0; f < lanes; ++f) {
      const Thread& first = g_threads[w * 32 + f];
      if (first.state != State::kShuffle || ((seen >> f) & 1u)) continue;
      const unsigned mask = first.mask;  // names f (checked at the call)
      seen |= mask;
      bool arrived = true;
      for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        if (l >= lanes)
          return where(first) + ": __shfl_xor_sync's mask names lane " + std::to_string(l) +
                 ", which the block does not have";
        const Thread& t = g_threads[w * 32 + l];
        if (t.state == State::kDone)
          return where(first) + ": __shfl_xor_sync's mask names lane " + std::to_string(l) +
                 ", which has exited";
        if (t.state == State::kShuffle && t.mask != mask) {
          std::snprintf(hex, sizeof hex, " (0x%08x by lane %d, 0x%08x by lane %d)", mask, f,
                        t.mask, l);
          return where(t) + ": lanes of one warp call __shfl_xor_sync with different masks" +
                 hex;
        }
        arrived &= t.state == State::kShuffle;
      }
      if (arrived) complete_masks[complete++] = mask;
    }
    for (int g = 0; g < complete; ++g) {
      const unsigned mask = complete_masks[g];
      for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        Thread& t = g_threads[w * 32 + l];
        int src = l ^ t.lane_mask;
        // A source in a later group of `width` lanes gives the caller's own value.
        if ((src & ~(t.width - 1)) > (l & ~(t.width - 1))) src = l;
        if (src < 0 || src >= 32 || !((mask >> src) & 1u))
          return where(t) + ": __shfl_xor_sync reads lane " + std::to_string(src) +
                 ", outside the mask";
        t.result = g_threads[w * 32 + src].value;
      }
      for (int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) {
          g_threads[w * 32 + l].state = State::kReady;
          ready.push_back(w * 32 + l);
        }
    }
  }
  return "";
}

std::string describe_deadlock(int n) {
  int at_barrier = 0, at_shuffle = 0, done = 0;
  for (int i = 0; i < n; ++i) {
    at_barrier += g_threads[i].state == State::kBarrier;
    at_shuffle += g_threads[i].state == State::kShuffle;
    done += g_threads[i].state == State::kDone;
  }
  char buf[200];
  std::snprintf(buf, sizeof buf,
                "block (%u,%u,%u) deadlocks: %d threads wait at __syncthreads, %d in "
                "__shfl_xor_sync whose lanes never all arrive, %d have exited",
                g_block_idx.x, g_block_idx.y, g_block_idx.z, at_barrier, at_shuffle, done);
  return buf;
}

// Runs one block; "" or why it failed.
std::string run_block(int n, bool faults, uint64_t rng, const Segment& shared) {
  if (faults) {
    std::memset(shared.data, kPoison, shared.bytes);
    std::memset(g_dynamic.data(), kPoison, g_dynamic_bytes);
  }
  std::vector<int> ready(n);
  for (int i = 0; i < n; ++i) {
    Thread& t = g_threads[i];
    t.linear = i;
    t.idx = uint3{i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y,
                  i / (g_block_dim.x * g_block_dim.y)};
    t.state = State::kReady;
    init_fiber(t, stack_of(i));
    ready[i] = i;
  }
  g_aborted = false;
  while (true) {
    if (faults) shuffle_order(ready, rng);
    for (const int i : ready) {
      resume(g_threads[i]);
      if (g_aborted) return g_abort_message;
    }
    ready.clear();
    if (std::string e = release_shuffles(n, ready); !e.empty()) return e;
    if (!ready.empty()) continue;
    int live = 0, at_barrier = 0;
    for (int i = 0; i < n; ++i) {
      live += g_threads[i].state != State::kDone;
      at_barrier += g_threads[i].state == State::kBarrier;
    }
    if (live == 0) return "";
    if (at_barrier != live) return describe_deadlock(n);
    // Every thread that has not exited is at the barrier (exited threads count as arrived).
    for (int i = 0; i < n; ++i)
      if (g_threads[i].state == State::kBarrier) {
        g_threads[i].state = State::kReady;
        ready.push_back(i);
      }
  }
}

std::string check_config(const LaunchConfig& c) {
  const unsigned b[3] = {c.block.x, c.block.y, c.block.z};
  const unsigned g[3] = {c.grid.x, c.grid.y, c.grid.z};
  char buf[200];
  for (int d = 0; d < 3; ++d) {
    if (b[d] == 0 || b[d] > kMaxBlockDim[d]) {
      std::snprintf(buf, sizeof buf, "block dimension %d is %u (limit %u)", d, b[d],
                    kMaxBlockDim[d]);
      return buf;
    }
    if (g[d] == 0 || g[d] > kMaxGridDim[d]) {
      std::snprintf(buf, sizeof buf, "grid dimension %d is %u (1 to %u)", d, g[d],
                    kMaxGridDim[d]);
      return buf;
    }
  }
  const uint64_t threads = uint64_t{b[0]} * b[1] * b[2];
  if (threads > kMaxThreadsPerBlock) {
    std::snprintf(buf, sizeof buf, "%llu threads per block (limit %u)",
                  static_cast<unsigned long long>(threads), kMaxThreadsPerBlock);
    return buf;
  }
  return "";
}

// Runs every block of the launch `config` (g_body and friends set), in an order shuffled by
// `rng` under fault exposure; the cudaError_t, g_detail set on failure.
int run_grid(const LaunchConfig& config, uint64_t rng, const Segment& shared) {
  const int n = static_cast<int>(config.block.x * config.block.y * config.block.z);
  const bool faults = faults_enabled();
  const uint64_t blocks = uint64_t{config.grid.x} * config.grid.y * config.grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  if (faults) shuffle_order(order, rng);
  for (const uint64_t b : order) {
    g_block_idx = uint3{static_cast<unsigned>(b % config.grid.x),
                        static_cast<unsigned>((b / config.grid.x) % config.grid.y),
                        static_cast<unsigned>(b / (uint64_t{config.grid.x} * config.grid.y))};
    const std::string e = run_block(n, faults, rng + b, shared);
    if (!e.empty()) {
      g_detail = e;
      return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------
// The launch log (lopt_emu_launch_log) and the device buffers it probes (device_memory.h).

struct DeviceBuffer {
  unsigned char* data;
  size_t bytes;
  std::string what;
};
std::vector<DeviceBuffer> g_buffers;
int g_log_mode = 0;
std::string g_log;       // the entries since the last lopt_emu_launch_log, comma-separated
std::string g_log_out;   // what lopt_emu_launch_log returned last

using Snapshot = std::vector<std::vector<unsigned char>>;

Snapshot snapshot() {
  Snapshot s;
  for (const DeviceBuffer& b : g_buffers) s.emplace_back(b.data, b.data + b.bytes);
  return s;
}

void restore(const Snapshot& s) {
  for (size_t i = 0; i < g_buffers.size(); ++i)
    std::memcpy(g_buffers[i].data, s[i].data(), g_buffers[i].bytes);
}

bool same(size_t i, const Snapshot& s) {
  return std::memcmp(g_buffers[i].data, s[i].data(), g_buffers[i].bytes) == 0;
}

std::string json_names(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ",\"" : "\"") + names[i] + "\"";
  return out + "]";
}

// run_grid, then the launch's log entry; probing (mode 2), the buffers it writes and reads.
int run_logged(const LaunchConfig& config, uint64_t rng, const Segment& shared) {
  const Snapshot before = g_log_mode == 2 ? snapshot() : Snapshot{};
  const int err = run_grid(config, rng, shared);
  if (err != cudaSuccess) return err;
  char dims[160];
  std::snprintf(dims, sizeof dims, "\"grid\":[%u,%u,%u],\"block\":[%u,%u,%u],\"smem\":%zu",
                config.grid.x, config.grid.y, config.grid.z, config.block.x, config.block.y,
                config.block.z, config.dynamic_smem);
  std::string entry = std::string("{\"kernel\":\"") + config.name + "\"," + dims;
  if (g_log_mode == 2) {
    const Snapshot after = snapshot();
    std::vector<bool> written(g_buffers.size());
    std::vector<std::string> writes, reads;
    for (size_t i = 0; i < g_buffers.size(); ++i)
      if ((written[i] = !same(i, before))) writes.push_back(g_buffers[i].what);
    for (size_t p = 0; p < g_buffers.size(); ++p) {
      restore(before);
      std::memset(g_buffers[p].data, kPoison, g_buffers[p].bytes);
      const int rerun = run_grid(config, rng, shared);
      if (rerun != cudaSuccess) return rerun;
      bool read = false;
      for (size_t i = 0; i < g_buffers.size() && !read; ++i)
        read = i != p && !same(i, after);
      // The poisoned buffer itself: only the bytes that the first run changed.
      for (size_t j = 0; j < g_buffers[p].bytes && written[p] && !read; ++j)
        read = after[p][j] != before[p][j] && g_buffers[p].data[j] != after[p][j];
      if (read) reads.push_back(g_buffers[p].what);
    }
    restore(after);
    entry += ",\"writes\":" + json_names(writes) + ",\"reads\":" + json_names(reads);
  }
  g_log += (g_log.empty() ? "" : ",") + entry + "}";
  return cudaSuccess;
}

}  // namespace

extern "C" [[noreturn]] void lopt_emu_fiber_main(Thread* t) {
  g_body(g_closure);
  t->state = State::kDone;
  lopt_emu_switch(&t->sp, g_scheduler_sp);
  std::abort();  // a finished thread is never resumed
}

void syncthreads() { yield(State::kBarrier); }

uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width) {
  Thread& t = current();
  const int lane = t.linear % 32;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail_in_thread(where(t) + ": __shfl_xor_sync width " + std::to_string(width) +
                   " is not a power of two up to 32");
  if (!((mask >> lane) & 1u))
    fail_in_thread(where(t) + ": __shfl_xor_sync's mask does not name the calling lane");
  t.mask = mask;
  t.lane_mask = lane_mask;
  t.width = width;
  t.value = bits;
  yield(State::kShuffle);
  return t.result;
}

void* dynamic_shared() { return g_dynamic.data(); }

int run_launch(const LaunchConfig& config, void (*body)(void*), void* closure) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::string bad = check_config(config);
  if (!bad.empty()) {
    g_detail = "invalid launch configuration: " + bad;
    return cudaErrorInvalidConfiguration;
  }
  const auto limit = g_max_dynamic.find(config.kernel);
  const size_t max_dynamic =
      limit == g_max_dynamic.end() ? kDefaultSharedBytes : static_cast<size_t>(limit->second);
  const Segment shared = shared_segment();
  if (shared.data == nullptr) {
    g_detail = "the emulator cannot find its thread-local segment (the static shared memory)";
    return cudaErrorLaunchFailure;
  }
  const size_t static_bytes = shared.bytes;
  if (config.dynamic_smem > max_dynamic || static_bytes + config.dynamic_smem > kOptInSharedBytes) {
    g_detail = "the launch asks for " + std::to_string(config.dynamic_smem) +
               " bytes of dynamic shared memory; the kernel may use " +
               std::to_string(max_dynamic) + " (cudaFuncSetAttribute raises it up to " +
               std::to_string(kOptInSharedBytes) + " minus the static shared memory, " +
               std::to_string(static_bytes) + " bytes counted over all kernels)";
    return cudaErrorInvalidValue;
  }
  const int n = static_cast<int>(config.block.x * config.block.y * config.block.z);
  if (static_cast<int>(g_threads.size()) < n) g_threads.resize(n);
  g_dynamic.assign((config.dynamic_smem + 7) / 8, 0);
  g_dynamic_bytes = config.dynamic_smem;
  g_body = body;
  g_closure = closure;
  g_block_dim = config.block;
  g_grid_dim = config.grid;
  const uint64_t rng = fault_seed() ^ (0xC0FFEEull + 0x10001ull * ++g_launch_count);
  if (g_log_mode == 0) return run_grid(config, rng, shared);
  return run_logged(config, rng, shared);
}

int set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (bytes < 0 || static_cast<size_t>(bytes) > kOptInSharedBytes) {
    g_detail = "cudaFuncSetAttribute: " + std::to_string(bytes) +
               " bytes of dynamic shared memory exceed the opt-in maximum " +
               std::to_string(kOptInSharedBytes);
    g_last_error = cudaErrorInvalidValue;  // as every failed runtime call, for cudaGetLastError
    return cudaErrorInvalidValue;
  }
  g_max_dynamic[kernel] = bytes;
  return cudaSuccess;
}

int take_last_error() {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

void set_last_error(int code) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_last_error = code;
}

}  // namespace lopt_emu

const char* cudaGetErrorString(cudaError_t code) {
  switch (code) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

extern "C" const char* lopt_emu_failure_detail() { return lopt_emu::g_detail.c_str(); }

extern "C" void lopt_emu_buffer_added(void* device, size_t bytes, const char* what) {
  std::lock_guard<std::mutex> lock(lopt_emu::g_mutex);
  lopt_emu::g_buffers.push_back({static_cast<unsigned char*>(device), bytes, what});
}

extern "C" void lopt_emu_buffer_removed(const void* device) {
  std::lock_guard<std::mutex> lock(lopt_emu::g_mutex);
  auto& v = lopt_emu::g_buffers;
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i].data == device) {
      v.erase(v.begin() + static_cast<std::ptrdiff_t>(i));
      return;
    }
}

extern "C" const char* lopt_emu_launch_log(int mode) {
  std::lock_guard<std::mutex> lock(lopt_emu::g_mutex);
  lopt_emu::g_log_out = "[" + lopt_emu::g_log + "]";
  lopt_emu::g_log.clear();
  lopt_emu::g_log_mode = mode;
  return lopt_emu::g_log_out.c_str();
}
