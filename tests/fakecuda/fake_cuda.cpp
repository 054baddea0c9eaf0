// An emulated CUDA driver (libcuda.so) for machines without a GPU, built
// and loaded by tests/common/fakecuda.rs. Device memory is host memory
// (a CUdeviceptr is the host address), and the stream-ordered work
// (launches, cuBLAS products, asynchronous copies, memsets and frees)
// waits in one queue, in order, until something synchronizes (a stream,
// event or context synchronization, a query, a synchronous copy or free, a
// copy to pageable host memory), as a busy GPU's would: so a host read of
// managed or page-locked memory that misses its synchronization reads what
// was there before the work (LORA_FAKECUDA_DEFER=0: every call runs at
// once instead). A module is a shared library of
// the kernels compiled as host C++ (tests/common/emu.rs) with one wrapper
// per kernel, `emuw_<name>(grid x, y, z, block x, dynamic smem, params)`,
// which unpacks cuLaunchKernel's parameter array by the kernel's declared
// parameter types. What it checks: the Rust side's orchestration (which
// kernels run in which order on which buffers, launch shapes, argument
// marshalling against the kernels' signatures, buffer sizes: every
// allocation is guarded and poisoned) on the kernels' real logic. What it
// cannot: the GPU's instructions, timing, races between streams.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <dlfcn.h>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#include <sys/mman.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
struct CUmemLocation { int type; int id; };
enum {
    OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, INVALID_IMAGE = 200,
    INVALID_HANDLE = 400, NOT_FOUND = 500, LAUNCH_FAILED = 719, NOT_SUPPORTED = 801,
};

namespace {
std::mutex mu;
// Live allocations: address -> bytes (stream-ordered pool, plain, managed,
// and page-locked host memory all come from here); managed ones also in
// `mapped`.
std::map<uintptr_t, size_t> live;
std::map<uintptr_t, size_t> mapped;
// Page-locked host allocations (cuMemAllocHost, cuMemHostAlloc), also in
// `live`: asynchronous copies to and from them run in stream order.
std::map<uintptr_t, size_t> pinned;
// In count-only mode, the live allocations at the pool's peak, and when
// each was made (a count of allocations).
std::map<uintptr_t, size_t> peak_live;
std::map<uintptr_t, unsigned long> born, peak_born;
unsigned long allocs;
// Kernel launches by kernel name, and their threads, counted in every mode
// (lora_fakecuda_launch_report).
std::map<std::string, std::pair<unsigned long long, unsigned long long>> launches;
size_t used = 0, used_high = 0, reserved_high = 0;
// Device memory by the thread that allocated it (live bytes and their
// high-water mark), and each allocation's thread: tests run concurrently
// in one process, so a test limits and reads its own thread's
// (lora_fakecuda_set_memory_limit, lora_fakecuda_thread_memory).
std::map<std::thread::id, std::pair<size_t, size_t>> thread_used;
std::map<uintptr_t, std::thread::id> owner;
// Stream-ordered frees queued but not yet run: their bytes are already
// out of the counts above (the driver's pool hands them to the stream's
// next allocations at once), the buffers still live for the queued work.
std::map<uintptr_t, bool> free_queued;
// The calling thread's limit on its live device memory.
thread_local size_t mem_limit = ~size_t(0);
std::string module_dir;
int ctx_token, stream_token, pool_token, event_token;

// Guard bytes before and after each allocation, checked when it is freed:
// a kernel or copy that writes outside its buffer is reported there.
constexpr size_t GUARD = 256;
constexpr unsigned char GUARD_BYTE = 0xA5;

// LORA_FAKECUDA_COUNT_ONLY=1: no kernel and no product runs and fresh
// memory is not poisoned (so not touched): the allocations of a model too
// big to emulate, counted (the pool's peak) in seconds.
bool count_only() {
    static const bool on = [] { const char* v = std::getenv("LORA_FAKECUDA_COUNT_ONLY"); return v && std::strcmp(v, "1") == 0; }();
    return on;
}

// Stream-ordered work waits in `queue` until a synchronization runs it
// (`flush`), in order (one queue for every stream: the crate uses one per
// context); unless LORA_FAKECUDA_DEFER=0, or count-only (nothing runs).
bool defer_mode() {
    static const bool on = [] { const char* v = std::getenv("LORA_FAKECUDA_DEFER"); return !(v && std::strcmp(v, "0") == 0) && !count_only(); }();
    return on;
}
std::mutex queue_mu;  // the queue
std::mutex run_mu;    // one flush at a time: the work runs in order
std::deque<std::function<void()>> queue;

void submit(std::function<void()> f) {
    if (!defer_mode()) {
        f();
        return;
    }
    std::lock_guard<std::mutex> g(queue_mu);
    queue.push_back(std::move(f));
}

// The calls that made the host wait for the device, by calling thread and
// call, counted in every mode (lora_fakecuda_sync_report).
std::mutex sync_mu;
std::map<std::thread::id, std::map<std::string, unsigned long long>> syncs;

// Runs everything queued (a synchronization), counted under `why` (the
// call that waits).
void flush(const char* why) {
    {
        std::lock_guard<std::mutex> g(sync_mu);
        syncs[std::this_thread::get_id()][why]++;
    }
    if (!defer_mode()) return;
    std::lock_guard<std::mutex> r(run_mu);
    for (;;) {
        std::function<void()> f;
        {
            std::lock_guard<std::mutex> g(queue_mu);
            if (queue.empty()) return;
            f = std::move(queue.front());
            queue.pop_front();
        }
        f();
    }
}

// `device`: device memory, refused past mem_limit (page-locked host
// memory is not).
CUresult alloc(CUdeviceptr* p, size_t n, bool device = true) {
    if (!p) return INVALID_VALUE;
    if (device) {
        std::lock_guard<std::mutex> g(mu);
        const size_t mine = thread_used[std::this_thread::get_id()].first;
        if (n > mem_limit || mine > mem_limit - n) return OUT_OF_MEMORY;  // as the driver's pool: refused at the call
    }
    unsigned char* raw = static_cast<unsigned char*>(std::aligned_alloc(256, GUARD + ((n + 255) / 256) * 256 + GUARD));
    if (!raw) return OUT_OF_MEMORY;
    size_t body = ((n + 255) / 256) * 256;
    std::memset(raw, GUARD_BYTE, GUARD);
    if (!count_only()) std::memset(raw + GUARD, 0xFF, body);  // fresh memory is NaN in every float type
    std::memset(raw + GUARD + body, GUARD_BYTE, GUARD);
    std::lock_guard<std::mutex> g(mu);
    uintptr_t a = reinterpret_cast<uintptr_t>(raw + GUARD);
    live[a] = n;
    used += n;
    if (device) {
        auto& t = thread_used[std::this_thread::get_id()];
        t.first += n;
        t.second = std::max(t.second, t.first);
        owner[a] = std::this_thread::get_id();
    }
    if (count_only()) born[a] = allocs++;
    if (used > used_high) {
        used_high = used;
        if (count_only()) peak_live = live, peak_born = born;
    }
    if (used > reserved_high) reserved_high = used;
    *p = a;
    return OK;
}

// Managed memory: pages mapped as they are first touched, and zero then,
// as the driver's are (cuMemAllocManaged does not promise cleared memory,
// but a page a process has not touched cannot hold another's data: the
// GPU check's cuda_paged tests read fresh managed memory on the device);
// no guards, so that a buffer larger than the host's memory works as far
// as it is touched.
CUresult alloc_managed(CUdeviceptr* p, size_t n) {
    if (!p || n == 0) return INVALID_VALUE;
    void* m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(mu);
    uintptr_t a = reinterpret_cast<uintptr_t>(m);
    live[a] = n;
    mapped[a] = n;
    *p = a;
    return OK;
}

// Takes allocation `a` of `n` bytes out of the memory in use (mu held).
void uncount(uintptr_t a, size_t n) {
    used -= n;
    auto o = owner.find(a);
    if (o != owner.end()) {
        thread_used[o->second].first -= n;
        owner.erase(o);
    }
}

CUresult release(uintptr_t a) {
    if (a == 0) return OK;
    size_t n;
    {
        std::lock_guard<std::mutex> g(mu);
        auto it = live.find(a);
        if (it == live.end()) {
            std::fprintf(stderr, "fake CUDA: free of %#lx, which is not a live allocation\n", (unsigned long)a);
            return INVALID_VALUE;
        }
        n = it->second;
        live.erase(it);
        born.erase(a);
        pinned.erase(a);
        if (mapped.erase(a)) {
            munmap(reinterpret_cast<void*>(a), n);
            return OK;
        }
        if (!free_queued.erase(a)) uncount(a, n);
    }
    unsigned char* body = reinterpret_cast<unsigned char*>(a);
    size_t padded = ((n + 255) / 256) * 256;
    for (size_t i = 0; i < GUARD; i++)
        if (body[-(long)GUARD + (long)i] != GUARD_BYTE || body[padded + i] != GUARD_BYTE) {
            std::fprintf(stderr, "fake CUDA: the guard bytes around the %zu-byte allocation at %#lx were overwritten (a write out of bounds)\n", n, (unsigned long)a);
            std::abort();
        }
    // Bytes between n and the padded end belong to no one: check them too.
    for (size_t i = n; i < padded && !count_only(); i++)
        if (body[i] != 0xFF) {
            std::fprintf(stderr, "fake CUDA: byte %zu past the end of the %zu-byte allocation at %#lx was written (a write out of bounds)\n", i - n, n, (unsigned long)a);
            std::abort();
        }
    std::free(body - GUARD);
    return OK;
}

// True when [p, p + n) lies inside one of `allocs` (address -> bytes).
bool within(const std::map<uintptr_t, size_t>& allocs, uintptr_t p, size_t n) {
    std::lock_guard<std::mutex> g(mu);
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

// True when [p, p + n) lies inside one live allocation (or is empty).
bool inside(uintptr_t p, size_t n) { return n == 0 || within(live, p, n); }

CUresult copy(uintptr_t dst, uintptr_t src, size_t n, bool dst_dev, bool src_dev) {
    if ((dst_dev && !inside(dst, n)) || (src_dev && !inside(src, n))) {
        std::fprintf(stderr, "fake CUDA: a %zu-byte copy outside its device buffers (dst %#lx%s, src %#lx%s)\n", n, (unsigned long)dst,
                     dst_dev ? " on the device" : "", (unsigned long)src, src_dev ? " on the device" : "");
        return INVALID_VALUE;
    }
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return OK;
}

// Whether [p, p + n) is page-locked host memory.
bool is_pinned(uintptr_t p, size_t n) { return within(pinned, p, n); }

// An asynchronous copy, in stream order. Device to pageable host memory
// completes before it returns (the driver's rule: it waits for the stream);
// pageable host memory to the device is read at the call (staged, as the
// driver does) and written in stream order; page-locked memory is read and
// written in stream order.
CUresult copy_async(uintptr_t dst, uintptr_t src, size_t n, bool dst_dev, bool src_dev) {
    if ((dst_dev && !inside(dst, n)) || (src_dev && !inside(src, n))) return copy(dst, src, n, dst_dev, src_dev);  // reports it
    if (!dst_dev && !is_pinned(dst, n)) {
        flush("cuMemcpyDtoHAsync (pageable host memory)");
        return copy(dst, src, n, dst_dev, src_dev);
    }
    if (!src_dev && !is_pinned(src, n)) {
        auto staged = std::make_shared<std::vector<unsigned char>>(reinterpret_cast<const unsigned char*>(src), reinterpret_cast<const unsigned char*>(src) + n);
        submit([=] { std::memcpy(reinterpret_cast<void*>(dst), staged->data(), n); });
        return OK;
    }
    submit([=] { std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n); });
    return OK;
}

struct Module { void* so; };
typedef void (*Defer)(void (*)(void*), void*);
typedef void (*Wrapper)(unsigned, unsigned, unsigned, unsigned, unsigned, void**, Defer);
// max_dyn: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (48 KiB unless
// raised, as on the GPU, where a launch asking for more fails).
struct Function { Wrapper w; std::string name; int max_dyn = 48 << 10; };
}  // namespace

extern "C" {
// Test hook (not CUDA API), count-only mode: the live pool allocations at
// the pool's peak, by size (largest total first), to stderr.
void lora_fakecuda_peak_report() {
    std::lock_guard<std::mutex> g(mu);
    std::map<size_t, size_t> by;
    for (auto& [a, n] : peak_live)
        if (!mapped.count(a)) by[n]++;
    std::vector<std::pair<size_t, size_t>> v(by.begin(), by.end());
    std::sort(v.begin(), v.end(), [](auto& x, auto& y) { return x.first * x.second > y.first * y.second; });
    size_t total = 0;
    for (auto& [n, c] : v) total += n * c;
    std::fprintf(stderr, "    at the peak: %zu allocations, %.1f MiB\n", peak_live.size(), total / 1048576.0);
    for (auto& [n, c] : v)
        if (n * c >= (1u << 20)) std::fprintf(stderr, "      %4zu x %10.2f MiB = %8.1f MiB\n", c, n / 1048576.0, n * c / 1048576.0);
    // The youngest: what the step was doing at the peak.
    std::vector<std::pair<unsigned long, size_t>> young;
    for (auto& [a, n] : peak_live) young.push_back({peak_born[a], n});
    std::sort(young.rbegin(), young.rend());
    std::fprintf(stderr, "      youngest (MiB, newest first):");
    // LORA_FAKECUDA_PEAK_ALL=1: every one, not only the 12 youngest.
    const char* all = std::getenv("LORA_FAKECUDA_PEAK_ALL");
    const size_t shown = all && all[0] == '1' ? young.size() : 12;
    for (size_t i = 0; i < young.size() && i < shown; i++) std::fprintf(stderr, " %.2f", young[i].second / 1048576.0);
    std::fprintf(stderr, "\n");
}

// For the fake cuBLAS and the kernel wrappers (not CUDA API): runs
// `run(data)` in stream order (queued; now with LORA_FAKECUDA_DEFER=0).
void lora_fakecuda_enqueue(void (*run)(void*), void* data) { submit([run, data] { run(data); }); }

// Test hook (not CUDA API): the kernel launches since the last reset, by
// kernel (most launched first), to stderr; `reset` clears them.
void lora_fakecuda_launch_report(int print, int reset) {
    std::lock_guard<std::mutex> g(mu);
    if (print) {
        std::vector<std::pair<std::string, std::pair<unsigned long long, unsigned long long>>> v(launches.begin(), launches.end());
        std::sort(v.begin(), v.end(), [](auto& x, auto& y) { return x.second.first > y.second.first; });
        unsigned long long total = 0;
        for (auto& e : v) total += e.second.first;
        std::fprintf(stderr, "    kernel launches: %llu (%zu kernels)\n", total, v.size());
        for (auto& [name, c] : v) std::fprintf(stderr, "      %8llu x %-40s %14llu threads\n", c.first, name.c_str(), c.second);
    }
    if (reset) launches.clear();
}

// Test hook (not CUDA API): the calls by which the calling thread waited
// for the device since its last reset (synchronizations, blocking copies
// and frees), by call, to stderr with `print`; returns their total.
// `reset` clears them.
unsigned long long lora_fakecuda_sync_report(int print, int reset) {
    std::lock_guard<std::mutex> g(sync_mu);
    auto& mine = syncs[std::this_thread::get_id()];
    unsigned long long total = 0;
    for (auto& e : mine) total += e.second;
    if (print) {
        std::fprintf(stderr, "    host waits for the device: %llu\n", total);
        for (auto& [name, c] : mine) std::fprintf(stderr, "      %8llu x %s\n", c, name.c_str());
    }
    if (reset) mine.clear();
    return total;
}

// Test hook (not CUDA API): the calling thread's device allocations
// (plain and stream-ordered; managed memory may oversubscribe, as on the
// GPU) fail with CUDA_ERROR_OUT_OF_MEMORY, as the driver's do when the
// device is full, once they would take the thread's live device memory
// past `bytes` (0: no limit).
void lora_fakecuda_set_memory_limit(size_t bytes) { mem_limit = bytes ? bytes : ~size_t(0); }

// Test hook (not CUDA API): the calling thread's live device memory and
// its high-water mark (which `reset_high` then sets to the live bytes).
// A stream-ordered free counts at the call, as the driver's pool does.
void lora_fakecuda_thread_memory(size_t* live_bytes, size_t* high, int reset_high) {
    std::lock_guard<std::mutex> g(mu);
    auto& t = thread_used[std::this_thread::get_id()];
    *live_bytes = t.first;
    *high = t.second;
    if (reset_high) t.second = t.first;
}

// The test hook (not CUDA API): where the modules are.
void lora_fakecuda_set_module_dir(const char* dir) { std::lock_guard<std::mutex> g(mu); module_dir = dir; }

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) { if (ordinal != 0) return INVALID_VALUE; *d = 0; return OK; }
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (size_t)len, "liblora emulated CUDA device (host threads)");
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) { *b = size_t(80) << 30; return OK; }
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 75: *v = 9; break;             // compute capability major
        case 76: *v = 0; break;             // minor
        case 16: *v = 4; break;             // multiprocessors
        case 1: *v = 1024; break;           // max threads per block
        case 8: *v = 48 << 10; break;       // shared memory per block
        case 97: *v = 227 << 10; break;     // opt-in shared memory per block
        case 10: *v = 32; break;            // warp size
        case 89: *v = 1; break;             // concurrent managed access
        case 115: *v = 1; break;            // memory pools
        default: *v = 0;
    }
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) { *ctx = &ctx_token; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
CUresult cuDevicePrimaryCtxReset_v2(CUdevice) { return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &ctx_token; return OK; }
CUresult cuCtxPushCurrent_v2(void*) { return OK; }
CUresult cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = &ctx_token; return OK; }
CUresult cuCtxSynchronize() { flush("cuCtxSynchronize"); return OK; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return OK; }

CUresult cuStreamCreate(void** s, unsigned) { *s = &stream_token; return OK; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { *s = &stream_token; return OK; }
CUresult cuStreamDestroy_v2(void*) { flush("cuStreamDestroy_v2"); return OK; }
CUresult cuStreamSynchronize(void*) { flush("cuStreamSynchronize"); return OK; }
CUresult cuStreamQuery(void*) { flush("cuStreamQuery"); return OK; }  // done once asked: the work runs now
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
typedef void (*HostFn)(void*);
CUresult cuLaunchHostFunc(void*, HostFn f, void* data) { submit([f, data] { f(data); }); return OK; }

CUresult cuEventCreate(void** e, unsigned) { *e = &event_token; return OK; }
CUresult cuEventRecord(void*, void*) { return OK; }
CUresult cuEventSynchronize(void*) { flush("cuEventSynchronize"); return OK; }
CUresult cuEventQuery(void*) { flush("cuEventQuery"); return OK; }
CUresult cuEventDestroy_v2(void*) { return OK; }
CUresult cuEventElapsedTime_v2(float* ms, void*, void*) { flush("cuEventElapsedTime_v2"); *ms = 0.0f; return OK; }
CUresult cuEventElapsedTime(float* ms, void*, void*) { flush("cuEventElapsedTime"); *ms = 0.0f; return OK; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return alloc(p, n); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) { return alloc(p, n); }
CUresult cuMemAllocManaged(CUdeviceptr* p, size_t n, unsigned) { return alloc_managed(p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { flush("cuMemFree_v2"); return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) {
    if (!defer_mode()) return release(p);
    {
        std::lock_guard<std::mutex> g(mu);
        auto it = live.find(p);
        if (it == live.end() || free_queued.count(p)) {
            std::fprintf(stderr, "fake CUDA: free of %#lx, which is not a live allocation\n", (unsigned long)p);
            return INVALID_VALUE;
        }
        // Out of the memory in use now, as the pool counts it; the buffer
        // itself goes when the queued work before the free has run.
        if (!mapped.count(p)) {
            uncount(p, it->second);
            free_queued[p] = true;
        }
    }
    submit([p] { release(p); });
    return OK;
}
CUresult cuMemAllocHost_v2(void** p, size_t n) {
    CUdeviceptr a;
    CUresult r = alloc(&a, n, false);
    if (r != OK) return r;
    *p = reinterpret_cast<void*>(a);
    std::lock_guard<std::mutex> g(mu);
    pinned[a] = n;
    return OK;
}
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) { return cuMemAllocHost_v2(p, n); }
CUresult cuMemFreeHost(void* p) { flush("cuMemFreeHost"); return release(reinterpret_cast<uintptr_t>(p)); }
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr* d, void* p, unsigned) { *d = reinterpret_cast<uintptr_t>(p); return OK; }
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    std::lock_guard<std::mutex> g(mu);
    *total = size_t(80) << 30;
    *free_b = *total - used;
    return OK;
}
CUresult cuMemPrefetchAsync_v2(CUdeviceptr p, size_t n, CUmemLocation, unsigned, void*) { return inside(p, n) ? OK : INVALID_VALUE; }
CUresult cuMemAdvise_v2(CUdeviceptr p, size_t n, int, CUmemLocation) { return inside(p, n) ? OK : INVALID_VALUE; }

CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) { flush("cuMemcpyHtoD_v2"); return copy(d, reinterpret_cast<uintptr_t>(h), n, true, false); }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void*) { return copy_async(d, reinterpret_cast<uintptr_t>(h), n, true, false); }
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) { flush("cuMemcpyDtoH_v2"); return copy(reinterpret_cast<uintptr_t>(h), d, n, false, true); }
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void*) { return copy_async(reinterpret_cast<uintptr_t>(h), d, n, false, true); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { flush("cuMemcpyDtoD_v2"); return copy(d, s, n, true, true); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { return copy_async(d, s, n, true, true); }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char b, size_t n, void*) {
    if (!inside(d, n)) return INVALID_VALUE;
    submit([=] { std::memset(reinterpret_cast<void*>(d), b, n); });
    return OK;
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char b, size_t n) {
    CUresult r = cuMemsetD8Async(d, b, n, nullptr);
    flush("cuMemsetD8_v2");
    return r;
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void*) {
    if (!inside(d, n * 4)) return INVALID_VALUE;
    submit([=] { for (size_t i = 0; i < n; i++) std::memcpy(reinterpret_cast<unsigned char*>(d) + 4 * i, &v, 4); });
    return OK;
}

CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice) { *pool = &pool_token; return OK; }
CUresult cuMemPoolSetAttribute(void*, int attr, void* v) {
    std::lock_guard<std::mutex> g(mu);
    if (attr == 8) {                        // USED_MEM_HIGH: reset
        used_high = used;
        peak_live = live;
        peak_born = born;
    }
    if (attr == 6) reserved_high = used;    // RESERVED_MEM_HIGH: reset
    (void)v;
    return OK;
}
CUresult cuMemPoolGetAttribute(void*, int attr, void* v) {
    std::lock_guard<std::mutex> g(mu);
    unsigned long long x = 0;
    switch (attr) {
        case 4: x = ~0ull; break;
        case 5: case 7: x = used; break;
        case 6: x = reserved_high; break;
        case 8: x = used_high; break;
        default: std::memcpy(v, &x, 4); return OK;  // the int-valued reuse flags
    }
    std::memcpy(v, &x, 8);
    return OK;
}
CUresult cuMemPoolTrimTo(void*, size_t) { return OK; }

// A module image is what the fake NVRTC returned: "LORAEMU:<source name>".
CUresult cuModuleLoadData(void** m, const void* image) {
    const char* s = static_cast<const char*>(image);
    if (std::strncmp(s, "LORAEMU:", 8) != 0) {
        std::fprintf(stderr, "fake CUDA: cuModuleLoadData got an image the fake NVRTC did not make\n");
        return INVALID_IMAGE;
    }
    std::string path;
    {
        std::lock_guard<std::mutex> g(mu);
        path = module_dir + "/" + (s + 8) + ".so";
    }
    void* so = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!so) {
        std::fprintf(stderr, "fake CUDA: cannot load %s: %s\n", path.c_str(), dlerror());
        return INVALID_IMAGE;
    }
    *m = new Module{so};
    return OK;
}
CUresult cuModuleLoadDataEx(void** m, const void* image, unsigned, void*, void*) { return cuModuleLoadData(m, image); }
CUresult cuModuleUnload(void* m) { flush("cuModuleUnload"); delete static_cast<Module*>(m); return OK; }  // the library stays loaded
CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
    std::string sym = std::string("emuw_") + name;
    void* w = dlsym(static_cast<Module*>(m)->so, sym.c_str());
    if (!w) return NOT_FOUND;
    *f = new Function{reinterpret_cast<Wrapper>(w), name};
    return OK;
}
CUresult cuFuncSetAttribute(void* f, int attr, int v) {
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (v < 0 || v > (227 << 10)) return INVALID_VALUE;
        static_cast<Function*>(f)->max_dyn = v;
    }
    return OK;
}
CUresult cuFuncGetAttribute(int* v, int, void*) { *v = 0; return OK; }
CUresult cuFuncSetCacheConfig(void*, int) { return OK; }
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem, void*, void** params, void** extra) {
    Function* fn = static_cast<Function*>(f);
    if (by != 1 || bz != 1 || extra != nullptr || bx == 0 || bx > 1024 || bx % 32 != 0 || gx == 0 || gy == 0 || gz == 0 || smem > (227u << 10)) {
        std::fprintf(stderr, "fake CUDA: launch of %s with grid (%u, %u, %u), block (%u, %u, %u), %u bytes of shared memory: not emulated\n",
                     fn->name.c_str(), gx, gy, gz, bx, by, bz, smem);
        return INVALID_VALUE;
    }
    if (gy > 65535 || gz > 65535) return INVALID_VALUE;
    if (smem > (unsigned)fn->max_dyn) {
        std::fprintf(stderr, "fake CUDA: launch of %s with %u bytes of dynamic shared memory, above its %d (cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES)\n", fn->name.c_str(), smem, fn->max_dyn);
        return INVALID_VALUE;
    }
    {
        std::lock_guard<std::mutex> g(mu);
        auto& c = launches[fn->name];
        c.first++;
        c.second += (unsigned long long)gx * gy * gz * bx;
    }
    if (!count_only()) fn->w(gx, gy, gz, bx, smem, params, defer_mode() ? lora_fakecuda_enqueue : nullptr);
    return OK;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }
}
