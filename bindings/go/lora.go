// Package lora is the Go binding of liblora, LoRA and QLoRA fine-tuning
// with a stable C ABI (include/lora.h), through cgo.
//
// Build: the package finds liblora with pkg-config (`make install` writes
// lora.pc); for a prefix outside pkg-config's default path set
// PKG_CONFIG_PATH=<prefix>/lib/pkgconfig, and LD_LIBRARY_PATH (or an
// rpath) so the loader finds liblora.so.0 at run time.
//
// Conventions:
//   - Every handle type (Context, NF4, Layer, Model, Trainer, Tokenizer) has
//     Close, which frees it and may be called more than once; a finalizer frees a handle that was
//     never closed, as a safety net only (close handles yourself: the GC
//     does not see liblora's memory). A closed handle is NULL to the C API,
//     so using it returns an error with ErrNullPointer.
//   - Every failure is an *Error carrying the Status, the C function and
//     the library's message for that failure. errors.Is(err, lora.ErrIO)
//     tests the status.
//   - Buffers are Go slices, passed to C without copying for the duration
//     of the call. Element types pick the dtype: float32 (F32), F16, BF16.
//     Views into liblora-owned memory are copied out, so no Go slice ever
//     points into memory a finalizer could free.
//   - Parameter structs are Go structs mirroring the C ones (without
//     struct_size); start from Default*Params(). nil means the defaults.
//     Progress callbacks (lora_progress_fn) are not exposed: a call runs
//     to completion and cannot be cancelled from Go.
//
// Thread safety is that of the C objects (see lora.h): a Context, an NF4, a
// Model and a Tokenizer may be used from several goroutines; a Layer and a
// Trainer from one at a time; Close must not race with any other use.
package lora

/*
#cgo pkg-config: lora
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"unsafe"
)

// Status is liblora's lora_status. It is an error itself, so that
// errors.Is(err, lora.ErrBufferSize) matches any *Error with that status.
type Status int32

// The statuses of lora.h (values fixed by the C ABI).
const (
	OK                  Status = C.LORA_OK
	ErrNullPointer      Status = C.LORA_ERR_NULL_POINTER
	ErrInvalidArgument  Status = C.LORA_ERR_INVALID_ARGUMENT
	ErrInvalidShape     Status = C.LORA_ERR_INVALID_SHAPE
	ErrInvalidBlocksize Status = C.LORA_ERR_INVALID_BLOCKSIZE
	ErrBufferSize       Status = C.LORA_ERR_BUFFER_SIZE
	ErrUnknownDtype     Status = C.LORA_ERR_UNKNOWN_DTYPE
	ErrNonFinite        Status = C.LORA_ERR_NON_FINITE
	ErrIO               Status = C.LORA_ERR_IO
	ErrFileFormat       Status = C.LORA_ERR_FILE_FORMAT
	ErrTensorNotFound   Status = C.LORA_ERR_TENSOR_NOT_FOUND
	ErrDtypeMismatch    Status = C.LORA_ERR_DTYPE_MISMATCH
	ErrShapeMismatch    Status = C.LORA_ERR_SHAPE_MISMATCH
	ErrCudaUnavailable  Status = C.LORA_ERR_CUDA_UNAVAILABLE
	ErrCuda             Status = C.LORA_ERR_CUDA
	ErrOutOfMemory      Status = C.LORA_ERR_OUT_OF_MEMORY
	ErrUnsupported      Status = C.LORA_ERR_UNSUPPORTED
	ErrStructSize       Status = C.LORA_ERR_STRUCT_SIZE
	ErrPanic            Status = C.LORA_ERR_PANIC
	ErrInternal         Status = C.LORA_ERR_INTERNAL
	ErrInvalidState     Status = C.LORA_ERR_INVALID_STATE
	ErrCancelled        Status = C.LORA_ERR_CANCELLED
	ErrDeviceMemory     Status = C.LORA_ERR_DEVICE_MEMORY_EXCEEDED
)

// Error returns lora_status_str: a static name of the status.
func (s Status) Error() string { return C.GoString(C.lora_status_str(C.lora_status(s))) }

func (s Status) String() string { return s.Error() }

// Error is a failed liblora call.
type Error struct {
	Status  Status // what went wrong
	Call    string // the C function, e.g. "lora_quantize_nf4"
	Message string // lora_last_error() right after the failure, on the same thread
}

func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("%s: %s", e.Call, e.Status)
	}
	return fmt.Sprintf("%s: %s: %s", e.Call, e.Status, e.Message)
}

// Unwrap gives the Status, for errors.Is.
func (e *Error) Unwrap() error { return e.Status }

// check turns a shim's result into an error, taking ownership of msg (the
// malloc'd message the shim copied on the failing thread).
func check(call string, st C.lora_status, msg *C.char) error {
	if msg != nil {
		defer C.free(unsafe.Pointer(msg))
	}
	if st == C.LORA_OK {
		return nil
	}
	e := &Error{Status: Status(st), Call: call}
	if msg != nil {
		e.Message = C.GoString(msg)
	}
	return e
}

// Version is lora_version(): (major << 16) | (minor << 8) | patch.
func Version() uint32 { return uint32(C.lora_version()) }

// VersionString is the library's version, e.g. "0.1.0".
func VersionString() string { return C.GoString(C.lora_version_string()) }

// ABIMajor is the header's LORA_VERSION_MAJOR this package was built with;
// Version()>>16 must equal it.
const ABIMajor = C.LORA_VERSION_MAJOR

// Dtype is lora_dtype.
type Dtype uint32

const (
	DtypeF32  Dtype = C.LORA_DTYPE_F32
	DtypeF16  Dtype = C.LORA_DTYPE_F16
	DtypeBF16 Dtype = C.LORA_DTYPE_BF16
)

// F16 holds the bits of an IEEE binary16 value.
type F16 uint16

// BF16 holds the bits of a bfloat16 value (the upper half of a float32).
type BF16 uint16

// Elem is a buffer element type: its Go type selects the dtype.
type Elem interface {
	float32 | F16 | BF16
}

func dtypeOf[T Elem]() C.lora_dtype {
	var z T
	switch any(z).(type) {
	case F16:
		return C.LORA_DTYPE_F16
	case BF16:
		return C.LORA_DTYPE_BF16
	default:
		return C.LORA_DTYPE_F32
	}
}

// buf is a slice's data pointer and length in bytes (nil for an empty
// slice: liblora then reports the missing buffer). The slice's memory holds
// no Go pointers, so cgo lets C read and write it during the call.
func buf[T any](s []T) (unsafe.Pointer, C.size_t) {
	if len(s) == 0 {
		return nil, 0
	}
	var z T
	return unsafe.Pointer(&s[0]), C.size_t(uintptr(len(s)) * unsafe.Sizeof(z))
}

func sizes(v []int) []C.size_t {
	out := make([]C.size_t, len(v))
	for i, x := range v {
		out[i] = C.size_t(x)
	}
	return out
}

// cStrings makes C copies of names (free with freeCStrings).
func cStrings(names []string) []*C.char {
	out := make([]*C.char, len(names))
	for i, n := range names {
		out[i] = C.CString(n)
	}
	return out
}

func freeCStrings(p []*C.char) {
	for _, s := range p {
		C.free(unsafe.Pointer(s))
	}
}

func first[T any](s []T) *T {
	if len(s) == 0 {
		return nil
	}
	return &s[0]
}

// Context is a lora_context: backend, CPU threads, seed.
type Context struct {
	p *C.lora_context
}

// Backend is lora_backend.
type Backend uint32

const (
	BackendAuto Backend = C.LORA_BACKEND_AUTO
	BackendCPU  Backend = C.LORA_BACKEND_CPU
	BackendCUDA Backend = C.LORA_BACKEND_CUDA
)

// ContextParams are lora_context_params without struct_size.
type ContextParams struct {
	Backend     Backend
	Threads     uint32 // 0: one per core
	DeviceIndex uint32
	Seed        uint64
}

// DefaultContextParams is lora_context_default_params().
func DefaultContextParams() ContextParams {
	d := C.lora_context_default_params()
	return ContextParams{Backend(d.backend), uint32(d.n_threads), uint32(d.device_index), uint64(d.seed)}
}

// NewContext creates a context; nil params means the defaults.
func NewContext(params *ContextParams) (*Context, error) {
	cp := C.lora_context_default_params()
	if params != nil {
		cp.backend = C.lora_backend(params.Backend)
		cp.n_threads = C.uint32_t(params.Threads)
		cp.device_index = C.uint32_t(params.DeviceIndex)
		cp.seed = C.uint64_t(params.Seed)
	}
	var p *C.lora_context
	var msg *C.char
	if err := check("lora_context_new", C.go_lora_context_new(&cp, &p, &msg), msg); err != nil {
		return nil, err
	}
	return track(&Context{p: p}), nil
}

// Close frees the context (layers made from it keep working).
func (c *Context) Close() error {
	if c != nil && c.p != nil {
		untrack(c)
		C.lora_context_free(c.p)
		c.p = nil
	}
	return nil
}

func (c *Context) handle() *C.lora_context {
	if c == nil {
		return nil
	}
	return c.p
}

// Backend is the backend in use (BackendCPU or BackendCUDA).
func (c *Context) Backend() (Backend, error) {
	var b C.lora_backend
	var msg *C.char
	st := C.go_lora_context_backend(c.handle(), &b, &msg)
	keepAlive(c)
	return Backend(b), check("lora_context_backend", st, msg)
}

// Describe names the device, e.g. "cpu (2 CPU threads)".
func (c *Context) Describe() (string, error) {
	var needed C.size_t
	var msg *C.char
	st := C.go_lora_context_describe(c.handle(), nil, 0, &needed, &msg)
	if err := check("lora_context_describe", st, msg); err != nil {
		return "", err
	}
	b := make([]byte, int(needed)+1)
	st = C.go_lora_context_describe(c.handle(), (*C.char)(unsafe.Pointer(&b[0])), C.size_t(len(b)), &needed, &msg)
	keepAlive(c)
	if err := check("lora_context_describe", st, msg); err != nil {
		return "", err
	}
	return string(b[:needed]), nil
}

// PagingParams are lora_paging_params without struct_size.
type PagingParams struct {
	AllowOversubscription bool   // CUDA: allocate past the device's free memory
	BudgetBytes           uint64 // most bytes of paged memory kept in RAM/device memory; 0: no limit
	Dir                   string // CPU: directory of the backing files; "": the system temp directory
}

// PagedStats is lora_paged_stats: counters over the context's paged buffers.
type PagedStats struct {
	Flags                                 uint32
	Buffers, BytesTotal, BytesResident    uint64
	BytesPagedOut, PageIns, PageOuts      uint64
	BytesPagedInTotal, BytesPagedOutTotal uint64
	BytesInMemory, BudgetBytes            uint64
}

// SetPaging sets the budget and directory of the context's paged memory
// (where a QLoRA trainer keeps AdamW's moments by default); nil restores
// the defaults.
func (c *Context) SetPaging(params *PagingParams) error {
	var msg *C.char
	var st C.lora_status
	if params == nil {
		st = C.go_lora_context_set_paging(c.handle(), nil, &msg)
	} else {
		cp := C.lora_paging_default_params()
		cp.allow_oversubscription = C.uint32_t(b2u(params.AllowOversubscription))
		cp.budget_bytes = C.uint64_t(params.BudgetBytes)
		if params.Dir != "" {
			cp.dir = C.CString(params.Dir)
			defer C.free(unsafe.Pointer(cp.dir))
		}
		st = C.go_lora_context_set_paging(c.handle(), &cp, &msg)
	}
	keepAlive(c)
	return check("lora_context_set_paging", st, msg)
}

// PagedStats returns the counters of the context's paged buffers.
func (c *Context) PagedStats() (PagedStats, error) {
	var s C.lora_paged_stats
	s.struct_size = C.uint32_t(unsafe.Sizeof(s))
	var msg *C.char
	st := C.go_lora_context_paged_stats(c.handle(), &s, &msg)
	keepAlive(c)
	return PagedStats{uint32(s.flags), uint64(s.buffers), uint64(s.bytes_total), uint64(s.bytes_resident),
		uint64(s.bytes_paged_out), uint64(s.page_ins), uint64(s.page_outs), uint64(s.bytes_paged_in_total),
		uint64(s.bytes_paged_out_total), uint64(s.bytes_in_memory), uint64(s.budget_bytes)}, check("lora_context_paged_stats", st, msg)
}
