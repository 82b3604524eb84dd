// cpu_shim.h - just enough CUDA for the kernels/*.cu sources to compile with g++ and run on
// the CPU, unchanged. Force-included (g++ -include cpu_shim.h) by fastnn/cuda/shim.py, which
// also appends one launch entry per kernel (fastnn_launch_<name>).
//
// Execution model: the blocks of a grid run one after another; the threads of a block run as
// fibers (ucontext) on one OS thread. A fiber runs until it reaches a barrier, then yields to
// the next fiber. __syncthreads() is a real barrier: a fiber passes it only once every thread
// of the block has arrived. Warp shuffles go through per-warp slots: each lane writes its
// value, waits for the lanes of the mask, reads its partner's slot, waits again.
// The scheduler resumes fibers in thread order, or in reverse (blocks too) when asked, so a
// missing barrier shows up as a different result in one of the two orders. Every __shared__
// variable lives in one linker section that is filled with 0xFF bytes (NaN for floats and
// doubles, -1 for integers) before each block, so reading shared memory nobody wrote this
// block gives garbage, as on a device. Detected and reported as launch errors: a barrier some
// threads of the block never reach (they returned) or reach at a different __syncthreads()
// statement, barriers that can never complete
// (deadlock), shuffles over lanes that do not exist, have exited or are not in the mask, and
// __trap(). Fibers never run at once, so atomics are plain read-modify-writes.
#ifndef FASTNN_CPU_SHIM_H
#define FASTNN_CPU_SHIM_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <functional>
#include <mutex>
#include <string>
#include <vector>

// ---- qualifiers ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __constant__
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("fastnn_shared")))

// ---- the built-in index variables (set by the scheduler before a fiber resumes) ----
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
// external linkage (C++17 inline variables): the compiler must reload them after every
// opaque call such as a context switch
inline uint3 threadIdx = {0, 0, 0};
inline uint3 blockIdx = {0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

extern "C" char __start_fastnn_shared[] __attribute__((weak));
extern "C" char __stop_fastnn_shared[] __attribute__((weak));

namespace fastnn_shim {

constexpr int kMaxThreads = 1024;
constexpr int kWarps = kMaxThreads / 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
    ucontext_t context;
    uint3 index;
    bool done;
};

struct State {
    std::mutex lock;
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;
    ucontext_t scheduler;
    const std::function<void()>* body = nullptr;
    int threads = 0;
    int live = 0;
    int current = 0;
    bool progress = false;
    bool failed = false;
    std::string error;
    // the block barrier, and where (file, line) the first thread of this round reached it
    int block_arrived = 0;
    unsigned block_generation = 0;
    const char* barrier_file = "";
    int barrier_line = 0;
    // one barrier and one row of shuffle slots per warp
    int warp_arrived[kWarps];
    unsigned warp_generation[kWarps];
    unsigned warp_mask[kWarps];
    uint64_t slots[kWarps][32];
};

inline State state;

inline void switch_to_scheduler() {
    swapcontext(&state.fibers[state.current].context, &state.scheduler);
    __asm__ __volatile__("" ::: "memory");
}

// record the first error and leave this fiber for good (the launch is abandoned)
[[noreturn]] inline void fail(const std::string& message) {
    if (!state.failed) {
        state.failed = true;
        const uint3 t = threadIdx, b = blockIdx;
        char where[128];
        snprintf(where, sizeof where, " (block (%u, %u, %u), thread (%u, %u, %u))", b.x, b.y,
                 b.z, t.x, t.y, t.z);
        state.error = message + where;
    }
    for (;;) switch_to_scheduler();
}

inline int linear_thread() {
    return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

inline void block_barrier(const char* file, int line) {
    if (state.block_arrived == 0) {
        state.barrier_file = file;
        state.barrier_line = line;
    } else if (line != state.barrier_line || strcmp(file, state.barrier_file) != 0) {
        char text[512];
        snprintf(text, sizeof text,
                 "__syncthreads() at %s:%d while other threads of the block wait at %s:%d "
                 "(a barrier in divergent code)",
                 file, line, state.barrier_file, state.barrier_line);
        fail(text);
    }
    const unsigned generation = state.block_generation;
    if (++state.block_arrived == state.threads) {
        state.block_arrived = 0;
        ++state.block_generation;
        state.progress = true;
    }
    // yield at least once, so that after every barrier the fibers resume in scheduler order
    do {
        switch_to_scheduler();
    } while (state.block_generation == generation);
}

// the lanes of warp w that exist in this block, as a mask
inline unsigned existing_lanes(int warp) {
    const int first = warp * 32, count = state.threads - first;
    return count >= 32 ? 0xffffffffu : ((1u << count) - 1u);
}

inline void warp_barrier(unsigned mask, const char* what) {
    const int me = linear_thread(), warp = me / 32, lane = me % 32;
    if (!((mask >> lane) & 1u)) fail(std::string(what) + ": the calling lane is not in the mask");
    if (mask & ~existing_lanes(warp))
        fail(std::string(what) + ": the mask names lanes that do not exist in this block");
    for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && state.fibers[warp * 32 + l].done)
            fail(std::string(what) + ": the mask names a lane that has already returned");
    if (state.warp_arrived[warp] == 0) {
        state.warp_mask[warp] = mask;
    } else if (state.warp_mask[warp] != mask) {
        fail(std::string(what) + ": lanes of one warp wait with different masks");
    }
    const unsigned generation = state.warp_generation[warp];
    if (++state.warp_arrived[warp] == __builtin_popcount(mask)) {
        state.warp_arrived[warp] = 0;
        ++state.warp_generation[warp];
        state.progress = true;
    }
    do {
        switch_to_scheduler();
    } while (state.warp_generation[warp] == generation);
}

// every lane of the mask publishes `value`; returns the value of lane `source` (-1: own)
template <typename T> inline T exchange(unsigned mask, T value, int source, const char* what) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
    const int me = linear_thread(), warp = me / 32, lane = me % 32;
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    state.slots[warp][lane] = bits;
    warp_barrier(mask, what);
    T result = value;
    if (source >= 0 && source != lane) {
        if (!((mask >> source) & 1u)) fail(std::string(what) + ": reads a lane outside the mask");
        bits = state.slots[warp][source];
        memcpy(&result, &bits, sizeof(T));
    }
    warp_barrier(mask, what);  // nobody overwrites a slot before every lane has read
    return result;
}

inline void trampoline() {
    (*state.body)();
    state.fibers[state.current].done = true;
    --state.live;
    state.progress = true;
    for (;;) switch_to_scheduler();
}

inline char* stack(int index) {
    while ((int)state.stacks.size() <= index) {
        const size_t page = 4096;
        void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (memory == MAP_FAILED) return nullptr;
        mprotect(memory, page, PROT_NONE);  // a guard page below the stack
        state.stacks.push_back(static_cast<char*>(memory) + page);
    }
    return state.stacks[index];
}

inline std::string check_block_state() {
    if (state.block_arrived > 0 && state.live < state.threads) {
        char text[200];
        snprintf(text, sizeof text,
                 "__syncthreads() reached by %d thread(s) while %d of the block's %d threads "
                 "had already returned (a barrier in divergent code)",
                 state.block_arrived, state.threads - state.live, state.threads);
        return text;
    }
    if (!state.progress) {
        char text[200];
        snprintf(text, sizeof text,
                 "deadlock: %d live thread(s) wait at barriers that can never complete "
                 "(__syncthreads and warp barriers mixed, or divergent warp masks)",
                 state.live);
        return text;
    }
    return std::string();
}

// Run the grid; returns 0, or 1 with the reason in `error`.
inline int launch(const unsigned* grid, const unsigned* block, bool reverse,
                  const std::function<void()>& body, std::string& error) {
    std::lock_guard<std::mutex> guard(state.lock);
    const long long threads = (long long)block[0] * block[1] * block[2];
    if (threads < 1 || threads > kMaxThreads || block[2] > 64) {
        error = "invalid block shape: 1 to 1024 threads, blockDim.z <= 64";
        return 1;
    }
    if (grid[0] < 1 || grid[1] < 1 || grid[2] < 1 || grid[1] > 65535 || grid[2] > 65535) {
        error = "invalid grid shape: each dimension >= 1, gridDim.y and .z <= 65535";
        return 1;
    }
    gridDim = dim3(grid[0], grid[1], grid[2]);
    blockDim = dim3(block[0], block[1], block[2]);
    state.threads = (int)threads;
    state.body = &body;
    state.failed = false;
    state.error.clear();
    state.fibers.resize(threads);
    for (int t = 0; t < state.threads; ++t)
        if (!stack(t)) {
            error = "could not map fiber stacks";
            return 1;
        }
    const long long blocks = (long long)grid[0] * grid[1] * grid[2];
    const size_t shared_bytes = (size_t)(__stop_fastnn_shared - __start_fastnn_shared);
    for (long long ordinal = 0; ordinal < blocks; ++ordinal) {
        const long long b = reverse ? blocks - 1 - ordinal : ordinal;
        blockIdx.x = (unsigned)(b % grid[0]);
        blockIdx.y = (unsigned)((b / grid[0]) % grid[1]);
        blockIdx.z = (unsigned)(b / ((long long)grid[0] * grid[1]));
        if (__start_fastnn_shared && shared_bytes) memset(__start_fastnn_shared, 0xff, shared_bytes);
        state.block_arrived = 0;
        for (int w = 0; w < kWarps; ++w) state.warp_arrived[w] = 0;
        for (int t = 0; t < state.threads; ++t) {
            Fiber& fiber = state.fibers[t];
            fiber.index.x = t % block[0];
            fiber.index.y = (t / block[0]) % block[1];
            fiber.index.z = t / (block[0] * block[1]);
            fiber.done = false;
            getcontext(&fiber.context);
            fiber.context.uc_stack.ss_sp = state.stacks[t];
            fiber.context.uc_stack.ss_size = kStackBytes;
            fiber.context.uc_link = nullptr;
            makecontext(&fiber.context, trampoline, 0);
        }
        state.live = state.threads;
        while (state.live > 0) {
            state.progress = false;
            for (int k = 0; k < state.threads; ++k) {
                const int t = reverse ? state.threads - 1 - k : k;
                if (state.fibers[t].done) continue;
                state.current = t;
                threadIdx = state.fibers[t].index;
                swapcontext(&state.scheduler, &state.fibers[t].context);
                if (state.failed) {
                    error = state.error;
                    return 1;
                }
            }
            if (state.live > 0) {
                const std::string problem = check_block_state();
                if (!problem.empty()) {
                    char where[96];
                    snprintf(where, sizeof where, " (block (%u, %u, %u))", blockIdx.x,
                             blockIdx.y, blockIdx.z);
                    error = problem + where;
                    return 1;
                }
            }
        }
    }
    return 0;
}

}  // namespace fastnn_shim

// ---- synchronisation ----
// a macro, so that the barrier knows its call site: threads of a block waiting at different
// __syncthreads() statements are a bug the plain arrival count would not see
#define __syncthreads() fastnn_shim::block_barrier(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    fastnn_shim::warp_barrier(mask, "__syncwarp");
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() { fastnn_shim::fail("__trap() called"); }

// ---- warp shuffles and votes ----
template <typename T> inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    const int lane = fastnn_shim::linear_thread() % 32;
    const int source = (lane / width) * width + ((src_lane % width) + width) % width;
    return fastnn_shim::exchange(mask, var, source, "__shfl_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    const int lane = fastnn_shim::linear_thread() % 32;
    const int source = (lane % width) + (int)delta < width ? lane + (int)delta : -1;
    return fastnn_shim::exchange(mask, var, source, "__shfl_down_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    const int lane = fastnn_shim::linear_thread() % 32;
    const int source = (lane % width) - (int)delta >= 0 ? lane - (int)delta : -1;
    return fastnn_shim::exchange(mask, var, source, "__shfl_up_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    const int lane = fastnn_shim::linear_thread() % 32;
    const int partner = lane ^ lane_mask;
    const int source = partner / width > lane / width ? -1 : partner;  // no later groups
    return fastnn_shim::exchange(mask, var, source, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    const int lane = fastnn_shim::linear_thread() % 32;
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        const int vote = fastnn_shim::exchange(mask, predicate ? 1 : 0, l, "__ballot_sync");
        if (vote) ballot |= 1u << l;
    }
    (void)lane;
    return ballot;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
    return __ballot_sync(mask, predicate) == mask;
}
inline unsigned __activemask() {
    const int warp = fastnn_shim::linear_thread() / 32;
    unsigned mask = 0;
    for (int l = 0; l < 32 && warp * 32 + l < fastnn_shim::state.threads; ++l)
        if (!fastnn_shim::state.fibers[warp * 32 + l].done) mask |= 1u << l;
    return mask;
}

// ---- atomics (fibers never run at once: plain read-modify-write) ----
template <typename T> inline T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}
template <typename T> inline T atomicSub(T* address, T value) {
    const T old = *address;
    *address = old - value;
    return old;
}
template <typename T> inline T atomicExch(T* address, T value) {
    const T old = *address;
    *address = value;
    return old;
}
template <typename T> inline T atomicMax(T* address, T value) {
    const T old = *address;
    *address = old < value ? value : old;
    return old;
}
template <typename T> inline T atomicMin(T* address, T value) {
    const T old = *address;
    *address = value < old ? value : old;
    return old;
}
template <typename T> inline T atomicCAS(T* address, T compare, T value) {
    const T old = *address;
    if (old == compare) *address = value;
    return old;
}
template <typename T> inline T atomicAnd(T* address, T value) {
    const T old = *address;
    *address = old & value;
    return old;
}
template <typename T> inline T atomicOr(T* address, T value) {
    const T old = *address;
    *address = old | value;
    return old;
}
template <typename T> inline T atomicXor(T* address, T value) {
    const T old = *address;
    *address = old ^ value;
    return old;
}
inline unsigned atomicInc(unsigned* address, unsigned limit) {
    const unsigned old = *address;
    *address = old >= limit ? 0u : old + 1u;
    return old;
}
inline unsigned atomicDec(unsigned* address, unsigned limit) {
    const unsigned old = *address;
    *address = (old == 0u || old > limit) ? limit : old - 1u;
    return old;
}

// ---- loads, bit casts, integer intrinsics ----
template <typename T> inline T __ldg(const T* address) { return *address; }

inline long long __double_as_longlong(double x) {
    long long bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}
inline double __longlong_as_double(long long bits) {
    double x;
    memcpy(&x, &bits, sizeof x);
    return x;
}
inline int __float_as_int(float x) {
    int bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}
inline float __int_as_float(int bits) {
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}
inline unsigned __float_as_uint(float x) { return (unsigned)__float_as_int(x); }
inline float __uint_as_float(unsigned bits) { return __int_as_float((int)bits); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// ---- math: <math.h> brings the float overloads of exp, log, ... into the global namespace ----
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

#define FASTNN_SHIM_MINMAX(T)                                                                  \
    inline T min(T a, T b) { return b < a ? b : a; }                                          \
    inline T max(T a, T b) { return a < b ? b : a; }
FASTNN_SHIM_MINMAX(int)
FASTNN_SHIM_MINMAX(unsigned int)
FASTNN_SHIM_MINMAX(long long)
FASTNN_SHIM_MINMAX(unsigned long long)
#undef FASTNN_SHIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

#endif  // FASTNN_CPU_SHIM_H
