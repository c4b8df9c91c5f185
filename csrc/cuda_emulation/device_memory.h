// "Device memory" of the emulated CUDA backend: every buffer a launcher hands to the kernels
// is a copy between two guard regions, so that out-of-bounds accesses show. Guards and
// scratch hold NaN bytes (0xFF): a read past an end or of unwritten scratch turns results
// into NaN; a write past an end changes a guard, which finish() reports by buffer name.
// Each copy is known to the emulator by name while it lives (its launch log's probe).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

extern "C" {
// The emulator's list of live device buffers (emulator.cpp): what the launch log probes.
void lopt_emu_buffer_added(void* device, size_t bytes, const char* what);
void lopt_emu_buffer_removed(const void* device);
}

namespace lopt_emu {

class DeviceCopies {
 public:
  DeviceCopies() = default;
  DeviceCopies(const DeviceCopies&) = delete;
  DeviceCopies& operator=(const DeviceCopies&) = delete;
  ~DeviceCopies() {
    for (const Buffer& b : buffers_) lopt_emu_buffer_removed(b.device);
  }

  static constexpr size_t kGuardBytes = 4096;
  static constexpr unsigned char kPoison = 0xFF;

  // The device copy of host [data, data + bytes): its contents when `copy_in`, else NaN
  // bytes (scratch and outputs). finish() copies it back. `what` names it in reports.
  template <typename T>
  T* add(T* data, size_t count, std::string what, bool copy_in = true) {
    if (data == nullptr) return nullptr;
    const size_t bytes = count * sizeof(T);
    Buffer b;
    b.host = const_cast<void*>(static_cast<const void*>(data));
    b.bytes = bytes;
    b.what = std::move(what);
    b.memory.reset(new unsigned char[bytes + 2 * kGuardBytes + 64]);
    // 64-byte aligned, as cudaMalloc's (at least 256) alignment would be.
    auto base = reinterpret_cast<uintptr_t>(b.memory.get()) + kGuardBytes;
    base = (base + 63) & ~uintptr_t{63};
    b.device = reinterpret_cast<unsigned char*>(base);
    std::memset(b.device - kGuardBytes, kPoison, bytes + 2 * kGuardBytes);
    if (copy_in) std::memcpy(b.device, b.host, bytes);
    lopt_emu_buffer_added(b.device, bytes, b.what.c_str());
    buffers_.push_back(std::move(b));
    return reinterpret_cast<T*>(buffers_.back().device);
  }

  // Checks every guard and copies every buffer back; "" or the first overwritten guard.
  std::string finish() {
    std::string error;
    for (const Buffer& b : buffers_) {
      if (error.empty()) error = check(b, true);
      if (error.empty()) error = check(b, false);
      std::memcpy(b.host, b.device, b.bytes);
      lopt_emu_buffer_removed(b.device);
    }
    buffers_.clear();
    return error;
  }

 private:
  struct Buffer {
    void* host;
    size_t bytes;
    std::string what;
    std::unique_ptr<unsigned char[]> memory;
    unsigned char* device;
  };

  // "" or where a kernel wrote into the guard before (`before`) or after the buffer: the
  // changed byte nearest to the buffer, as an offset from the buffer's start.
  static std::string check(const Buffer& b, bool before) {
    const unsigned char* guard = before ? b.device - kGuardBytes : b.device + b.bytes;
    for (size_t k = 0; k < kGuardBytes; ++k) {
      const size_t i = before ? kGuardBytes - 1 - k : k;
      if (guard[i] == kPoison) continue;
      const std::string offset = before ? "-" + std::to_string(k + 1)
                                        : std::to_string(b.bytes + k);
      return std::string("a kernel wrote ") + (before ? "before the start" : "past the end") +
             " of " + b.what + " (" + std::to_string(b.bytes) + " bytes), at byte offset " +
             offset;
    }
    return "";
  }

  std::vector<Buffer> buffers_;
};

}  // namespace lopt_emu
