package lora

/*
#include "shim.h"
*/
import "C"

import (
	"strings"
	"unsafe"
)

// NF4 is a lora_nf4: an immutable NF4-quantized tensor.
type NF4 struct {
	p *C.lora_nf4
}

// NF4Params are lora_nf4_params without struct_size.
type NF4Params struct {
	Blocksize   uint32 // a power of two from 32 to 4096
	DoubleQuant bool   // quantize the block scales too (QLoRA)
}

// DefaultNF4Params is lora_nf4_default_params(): blocksize 64, double quantization.
func DefaultNF4Params() NF4Params {
	d := C.lora_nf4_default_params()
	return NF4Params{uint32(d.blocksize), d.double_quant != 0}
}

func (p *NF4Params) c() C.lora_nf4_params {
	cp := C.lora_nf4_default_params()
	if p != nil {
		cp.blocksize = C.uint32_t(p.Blocksize)
		cp.double_quant = C.uint32_t(b2u(p.DoubleQuant))
	}
	return cp
}

func b2u(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

// NF4Info is lora_nf4_info.
type NF4Info struct {
	Shape           []int
	Numel           int
	Dtype           Dtype // of the tensor that was quantized
	Blocksize       uint32
	NumBlocks       int
	DoubleQuant     bool
	NestedBlocksize uint32
	NumNested       int
	Offset          float32
	PackedBytes     int
	FootprintBytes  int
	BitsPerWeight   float64
}

// Quantize quantizes data (row-major, shape) to NF4 like bitsandbytes
// quantize_4bit(quant_type="nf4"); nil params means the defaults. The
// slice is read in place.
func Quantize[T Elem](ctx *Context, data []T, shape []int, params *NF4Params) (*NF4, error) {
	ptr, n := buf(data)
	sh := sizes(shape)
	cp := params.c()
	var t *C.lora_nf4
	var msg *C.char
	st := C.go_lora_quantize_nf4(ctx.handle(), ptr, n, dtypeOf[T](), first(sh), C.size_t(len(sh)), &cp, &t, &msg)
	keepAlive(ctx)
	if err := check("lora_quantize_nf4", st, msg); err != nil {
		return nil, err
	}
	return track(&NF4{p: t}), nil
}

// LoadNF4 loads the NF4 weight under module prefix prefix of a safetensors
// file (ours, or a transformers/bitsandbytes 4-bit checkpoint).
func LoadNF4(path, prefix string) (*NF4, error) {
	cpath, cprefix := C.CString(path), C.CString(prefix)
	defer C.free(unsafe.Pointer(cpath))
	defer C.free(unsafe.Pointer(cprefix))
	var t *C.lora_nf4
	var msg *C.char
	if err := check("lora_nf4_load", C.go_lora_nf4_load(cpath, cprefix, &t, &msg), msg); err != nil {
		return nil, err
	}
	return track(&NF4{p: t}), nil
}

// ListNF4 lists the module prefixes of the NF4 weights in a safetensors file, sorted.
func ListNF4(path string) ([]string, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var needed C.size_t
	var msg *C.char
	if err := check("lora_nf4_list", C.go_lora_nf4_list(cpath, nil, 0, &needed, &msg), msg); err != nil {
		return nil, err
	}
	b := make([]byte, int(needed)+1)
	if err := check("lora_nf4_list", C.go_lora_nf4_list(cpath, (*C.char)(unsafe.Pointer(&b[0])), C.size_t(len(b)), &needed, &msg), msg); err != nil {
		return nil, err
	}
	s := strings.TrimSuffix(string(b[:needed]), "\n")
	if s == "" {
		return []string{}, nil
	}
	return strings.Split(s, "\n"), nil
}

// SaveNF4 saves tensors to one safetensors file in the transformers 4-bit
// layout, tensors[i] under module prefix prefixes[i]; atomic.
func SaveNF4(path string, prefixes []string, tensors []*NF4) error {
	if len(prefixes) != len(tensors) {
		return &Error{Status: ErrInvalidArgument, Call: "lora_nf4_save", Message: "one prefix per tensor"}
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	cp := cStrings(prefixes)
	defer freeCStrings(cp)
	ts := make([]*C.lora_nf4, len(tensors))
	for i, t := range tensors {
		ts[i] = t.handle()
	}
	var msg *C.char
	st := C.go_lora_nf4_save(cpath, first(cp), first(ts), C.size_t(len(ts)), &msg)
	keepAlive(tensors)
	return check("lora_nf4_save", st, msg)
}

// Save saves this tensor alone under prefix.
func (t *NF4) Save(path, prefix string) error {
	return SaveNF4(path, []string{prefix}, []*NF4{t})
}

// Close frees the tensor.
func (t *NF4) Close() error {
	if t != nil && t.p != nil {
		untrack(t)
		C.lora_nf4_free(t.p)
		t.p = nil
	}
	return nil
}

func (t *NF4) handle() *C.lora_nf4 {
	if t == nil {
		return nil
	}
	return t.p
}

// Info describes the tensor.
func (t *NF4) Info() (NF4Info, error) {
	var i C.lora_nf4_info
	var msg *C.char
	st := C.go_lora_nf4_get_info(t.handle(), &i, &msg)
	keepAlive(t)
	if err := check("lora_nf4_get_info", st, msg); err != nil {
		return NF4Info{}, err
	}
	shape := make([]int, int(i.ndim))
	for k := range shape {
		shape[k] = int(i.shape[k])
	}
	return NF4Info{
		Shape: shape, Numel: int(i.numel), Dtype: Dtype(i.dtype), Blocksize: uint32(i.blocksize),
		NumBlocks: int(i.num_blocks), DoubleQuant: i.double_quant != 0, NestedBlocksize: uint32(i.nested_blocksize),
		NumNested: int(i.num_nested), Offset: float32(i.offset), PackedBytes: int(i.packed_bytes),
		FootprintBytes: int(i.footprint_bytes), BitsPerWeight: float64(i.bits_per_weight),
	}, nil
}

// DequantizeInto dequantizes t into out (exactly Numel elements), in place.
func DequantizeInto[T Elem](ctx *Context, t *NF4, out []T) error {
	ptr, n := buf(out)
	var msg *C.char
	st := C.go_lora_nf4_dequantize(ctx.handle(), t.handle(), dtypeOf[T](), ptr, n, &msg)
	keepAlive(ctx)
	keepAlive(t)
	return check("lora_nf4_dequantize", st, msg)
}

// Dequantize returns the tensor as a new float32 slice.
func (t *NF4) Dequantize(ctx *Context) ([]float32, error) {
	info, err := t.Info()
	if err != nil {
		return nil, err
	}
	out := make([]float32, info.Numel)
	if err := DequantizeInto(ctx, t, out); err != nil {
		return nil, err
	}
	return out, nil
}

// Packed returns a copy of the packed 4-bit codes (two per byte, the even
// element in the high nibble). A copy, because the C bytes live only as
// long as the tensor, which a finalizer may free.
func (t *NF4) Packed() ([]byte, error) {
	var d *C.uint8_t
	var n C.size_t
	var msg *C.char
	st := C.go_lora_nf4_packed(t.handle(), &d, &n, &msg)
	if err := check("lora_nf4_packed", st, msg); err != nil {
		return nil, err
	}
	out := C.GoBytes(unsafe.Pointer(d), C.int(n))
	keepAlive(t)
	return out, nil
}

// Absmax returns the fp32 block scales (decoded when double-quantized).
func (t *NF4) Absmax() ([]float32, error) {
	info, err := t.Info()
	if err != nil {
		return nil, err
	}
	out := make([]float32, info.NumBlocks)
	var msg *C.char
	st := C.go_lora_nf4_absmax(t.handle(), (*C.float)(first(out)), C.size_t(len(out)), &msg)
	keepAlive(t)
	return out, check("lora_nf4_absmax", st, msg)
}

// DoubleQuantState is the double-quantization state (copied out).
type DoubleQuantState struct {
	Codes        []byte    // one per block
	NestedAbsmax []float32 // one per 256 blocks
	Offset       float32
}

// DoubleQuant returns the double-quantization state; ErrInvalidState when
// the tensor was quantized without it.
func (t *NF4) DoubleQuant() (DoubleQuantState, error) {
	var codes *C.uint8_t
	var nested *C.float
	var nb, nn C.size_t
	var off C.float
	var msg *C.char
	st := C.go_lora_nf4_double_quant(t.handle(), &codes, &nb, &nested, &nn, &off, &msg)
	if err := check("lora_nf4_double_quant", st, msg); err != nil {
		return DoubleQuantState{}, err
	}
	s := DoubleQuantState{
		Codes:        C.GoBytes(unsafe.Pointer(codes), C.int(nb)),
		NestedAbsmax: append([]float32(nil), unsafe.Slice((*float32)(unsafe.Pointer(nested)), int(nn))...),
		Offset:       float32(off),
	}
	keepAlive(t)
	return s, nil
}
