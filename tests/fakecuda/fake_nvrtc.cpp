// An emulated NVRTC (libnvrtc.so) for the emulated CUDA device
// (tests/fakecuda/fake_cuda.cpp): "compiling" a program records its name,
// and its "CUBIN" is "LORAEMU:<name>", which the fake driver resolves to
// the kernels of that source compiled as host C++. Its version, 0.1,
// matches no real NVRTC, so no cache mistakes one for the other's output.
#include <cstdio>
#include <cstring>
#include <string>

typedef int nvrtcResult;
struct Program { std::string image; };

extern "C" {
const char* nvrtcGetErrorString(nvrtcResult r) { return r == 0 ? "NVRTC_SUCCESS" : "NVRTC_ERROR (emulated)"; }
nvrtcResult nvrtcVersion(int* major, int* minor) { *major = 0; *minor = 1; return 0; }
nvrtcResult nvrtcGetNumSupportedArchs(int* n) { *n = 2; return 0; }
nvrtcResult nvrtcGetSupportedArchs(int* a) { a[0] = 80; a[1] = 90; return 0; }
nvrtcResult nvrtcCreateProgram(Program** p, const char*, const char* name, int, const char* const*, const char* const*) {
    *p = new Program{std::string("LORAEMU:") + (name ? name : "unnamed")};
    return 0;
}
nvrtcResult nvrtcDestroyProgram(Program** p) { delete *p; *p = nullptr; return 0; }
nvrtcResult nvrtcCompileProgram(Program*, int, const char* const*) { return 0; }
nvrtcResult nvrtcGetCUBINSize(Program* p, size_t* n) { *n = p->image.size() + 1; return 0; }
nvrtcResult nvrtcGetCUBIN(Program* p, char* out) { std::memcpy(out, p->image.c_str(), p->image.size() + 1); return 0; }
nvrtcResult nvrtcGetPTXSize(Program* p, size_t* n) { return nvrtcGetCUBINSize(p, n); }
nvrtcResult nvrtcGetPTX(Program* p, char* out) { return nvrtcGetCUBIN(p, out); }
nvrtcResult nvrtcGetProgramLogSize(Program*, size_t* n) { *n = 1; return 0; }
nvrtcResult nvrtcGetProgramLog(Program*, char* out) { out[0] = 0; return 0; }
}
