package lora

/*
#include "shim.h"
*/
import "C"

import "unsafe"

// Layer is a lora_layer: a linear layer with named LoRA adapters. Use it
// from one goroutine at a time.
type Layer struct {
	p *C.lora_layer
}

// Init is lora_init: how a new adapter's weights are initialized.
type Init uint32

const (
	InitKaimingUniform Init = C.LORA_INIT_KAIMING_UNIFORM
	InitGaussian       Init = C.LORA_INIT_GAUSSIAN
	InitGiven          Init = C.LORA_INIT_GIVEN
)

// Combine is lora_combine (AddWeighted).
type Combine uint32

const (
	CombineLinear Combine = C.LORA_COMBINE_LINEAR
	CombineCat    Combine = C.LORA_COMBINE_CAT
)

// AdapterConfig is lora_adapter_config without struct_size.
type AdapterConfig struct {
	R         uint32
	Alpha     float32
	Dropout   float32
	UseRSLoRA bool
	Init      Init
	A         []float32 // with InitGiven: r·in floats [r,in]
	B         []float32 // with InitGiven: out·r floats [out,r]
}

// DefaultAdapterConfig is lora_adapter_default_config(): r 8, alpha 8,
// kaiming-uniform A, zero B.
func DefaultAdapterConfig() AdapterConfig {
	d := C.lora_adapter_default_config()
	return AdapterConfig{R: uint32(d.r), Alpha: float32(d.alpha), Dropout: float32(d.dropout),
		UseRSLoRA: d.use_rslora != 0, Init: Init(d.init)}
}

func biasPtr(bias []float32) *C.float {
	if len(bias) == 0 {
		return nil
	}
	return (*C.float)(&bias[0])
}

// NewLayer makes a layer over a dense weight [out,in] (or [in,out] with
// fanInFanOut) of float32, F16 or BF16, copied; bias nil or out floats.
func NewLayer[T Elem](ctx *Context, weight []T, in, out int, fanInFanOut bool, bias []float32) (*Layer, error) {
	if bias != nil && len(bias) != out {
		return nil, &Error{Status: ErrBufferSize, Call: "lora_layer_new", Message: "bias must hold out floats"}
	}
	ptr, n := buf(weight)
	var l *C.lora_layer
	var msg *C.char
	st := C.go_lora_layer_new(ctx.handle(), ptr, n, dtypeOf[T](), C.size_t(in), C.size_t(out), C.uint32_t(b2u(fanInFanOut)), biasPtr(bias), &l, &msg)
	keepAlive(ctx)
	if err := check("lora_layer_new", st, msg); err != nil {
		return nil, err
	}
	return track(&Layer{p: l}), nil
}

// NewLayerNF4 makes a layer over an NF4 weight [out,in] (copied: weight
// stays the caller's); bias nil or out floats.
func NewLayerNF4(ctx *Context, weight *NF4, bias []float32) (*Layer, error) {
	if bias != nil {
		info, err := weight.Info()
		if err != nil {
			return nil, err
		}
		if len(bias) != info.Shape[0] {
			return nil, &Error{Status: ErrBufferSize, Call: "lora_layer_new_nf4", Message: "bias must hold out floats"}
		}
	}
	var l *C.lora_layer
	var msg *C.char
	st := C.go_lora_layer_new_nf4(ctx.handle(), weight.handle(), biasPtr(bias), &l, &msg)
	keepAlive(ctx)
	keepAlive(weight)
	if err := check("lora_layer_new_nf4", st, msg); err != nil {
		return nil, err
	}
	return track(&Layer{p: l}), nil
}

// Close frees the layer.
func (l *Layer) Close() error {
	if l != nil && l.p != nil {
		untrack(l)
		C.lora_layer_free(l.p)
		l.p = nil
	}
	return nil
}

func (l *Layer) handle() *C.lora_layer {
	if l == nil {
		return nil
	}
	return l.p
}

// call runs one shim on the layer and keeps the layer alive through it.
func (l *Layer) call(name string, f func(p *C.lora_layer, msg **C.char) C.lora_status) error {
	var msg *C.char
	st := f(l.handle(), &msg)
	keepAlive(l)
	return check(name, st, msg)
}

// AddAdapter adds adapter name (the first one becomes active).
func (l *Layer) AddAdapter(name string, cfg AdapterConfig) error {
	if cfg.Init == InitGiven && (len(cfg.A) == 0 || len(cfg.B) == 0) {
		return &Error{Status: ErrNullPointer, Call: "lora_layer_add_adapter", Message: "InitGiven needs A and B"}
	}
	c := C.lora_adapter_default_config()
	c.r = C.uint32_t(cfg.R)
	c.alpha = C.float(cfg.Alpha)
	c.dropout = C.float(cfg.Dropout)
	c.use_rslora = C.uint32_t(b2u(cfg.UseRSLoRA))
	c.init = C.lora_init(cfg.Init)
	if cfg.Init == InitGiven {
		// cgo forbids passing Go memory that holds Go pointers, so the
		// struct points at C copies of A and B (liblora copies them again).
		a := C.malloc(C.size_t(len(cfg.A) * 4))
		b := C.malloc(C.size_t(len(cfg.B) * 4))
		defer C.free(a)
		defer C.free(b)
		copy(unsafe.Slice((*float32)(a), len(cfg.A)), cfg.A)
		copy(unsafe.Slice((*float32)(b), len(cfg.B)), cfg.B)
		c.a, c.b = (*C.float)(a), (*C.float)(b)
	}
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	return l.call("lora_layer_add_adapter", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_add_adapter(p, cname, &c, msg)
	})
}

// SetBiasTrainable makes the base bias trainable or frozen.
func (l *Layer) SetBiasTrainable(trainable bool) error {
	return l.call("lora_layer_set_bias_trainable", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_set_bias_trainable(p, C.uint32_t(b2u(trainable)), msg)
	})
}

// ParamCounts returns the trainable and total parameter counts.
func (l *Layer) ParamCounts() (trainable, total int, err error) {
	var tr, tot C.size_t
	err = l.call("lora_layer_param_counts", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_param_counts(p, &tr, &tot, msg)
	})
	return int(tr), int(tot), err
}

// AdapterIndex is the index of adapter name, for Forward's rowAdapter.
func (l *Layer) AdapterIndex(name string) (int32, error) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var i C.int32_t
	err := l.call("lora_layer_adapter_index", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_adapter_index(p, cname, &i, msg)
	})
	return int32(i), err
}

// LayerShape is lora_layer_get_shape's result.
type LayerShape struct {
	In, Out, Adapters int
	Merged            bool
}

// Shape returns the layer's features, adapter count and merged state.
func (l *Layer) Shape() (LayerShape, error) {
	var in, out, na C.size_t
	var merged C.uint32_t
	err := l.call("lora_layer_get_shape", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_get_shape(p, &in, &out, &na, &merged, msg)
	})
	return LayerShape{int(in), int(out), int(na), merged != 0}, err
}

// Forward computes y for n rows of x with float32 buffers; see LayerForward.
func (l *Layer) Forward(x []float32, n int, y []float32, train bool, rowAdapter []int32) error {
	return LayerForward(l, x, n, y, train, rowAdapter)
}

// LayerForward computes y (n·out elements) from x (n·in) in place;
// rowAdapter nil (the active adapters) or n adapter indices (-1: base
// only); train applies dropout and records what Backward needs.
func LayerForward[X, Y Elem](l *Layer, x []X, n int, y []Y, train bool, rowAdapter []int32) error {
	xp, xn := buf(x)
	yp, yn := buf(y)
	return l.call("lora_layer_forward", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_forward(p, xp, xn, dtypeOf[X](), C.size_t(n), (*C.int32_t)(first(rowAdapter)), yp, yn, dtypeOf[Y](), C.uint32_t(b2u(train)), msg)
	})
}

// Backward of the latest Forward (same x, n) with float32 buffers; dx may
// be nil. See LayerBackward.
func (l *Layer) Backward(x []float32, dy []float32, n int, dx []float32) error {
	return LayerBackward(l, x, dy, n, dx)
}

// LayerBackward writes dx (nil: not needed) and accumulates the adapters'
// gradients until ZeroGrad.
func LayerBackward[X, DY, DX Elem](l *Layer, x []X, dy []DY, n int, dx []DX) error {
	xp, xn := buf(x)
	dyp, dyn := buf(dy)
	dxp, dxn := buf(dx)
	return l.call("lora_layer_backward", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_backward(p, xp, xn, dtypeOf[X](), dyp, dyn, dtypeOf[DY](), C.size_t(n), dxp, dxn, dtypeOf[DX](), msg)
	})
}

// ZeroGrad clears the accumulated gradients.
func (l *Layer) ZeroGrad() error {
	return l.call("lora_layer_zero_grad", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_zero_grad(p, msg)
	})
}

// GetAdapter copies adapter name's A [r,in] and B [out,r] (or their
// gradients with grads) into a and b, whose lengths must match.
func (l *Layer) GetAdapter(name string, grads bool, a, b []float32) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	return l.call("lora_layer_get_adapter", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_get_adapter(p, cname, C.uint32_t(b2u(grads)), (*C.float)(first(a)), C.size_t(len(a)), (*C.float)(first(b)), C.size_t(len(b)), msg)
	})
}

// SetAdapter replaces adapter name's A and B.
func (l *Layer) SetAdapter(name string, a, b []float32) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	return l.call("lora_layer_set_adapter", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_set_adapter(p, cname, (*C.float)(first(a)), C.size_t(len(a)), (*C.float)(first(b)), C.size_t(len(b)), msg)
	})
}

// Merge folds the active adapters into the weight (W0 + Σ m·s·B·A).
func (l *Layer) Merge() error {
	return l.call("lora_layer_merge", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_merge(p, msg)
	})
}

// Unmerge undoes Merge exactly.
func (l *Layer) Unmerge() error {
	return l.call("lora_layer_unmerge", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_unmerge(p, msg)
	})
}

// SwapAdapter makes names the active adapters, scaled by multipliers (nil: all 1).
func (l *Layer) SwapAdapter(names []string, multipliers []float32) error {
	if multipliers != nil && len(multipliers) != len(names) {
		return &Error{Status: ErrInvalidArgument, Call: "lora_layer_swap_adapter", Message: "one multiplier per adapter name"}
	}
	cn := cStrings(names)
	defer freeCStrings(cn)
	return l.call("lora_layer_swap_adapter", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_swap_adapter(p, first(cn), (*C.float)(first(multipliers)), C.size_t(len(cn)), msg)
	})
}

// Requantize makes NF4(merged weight) the new base; returns the error it
// added (relative RMS, max abs). nil params means the defaults.
func (l *Layer) Requantize(params *NF4Params) (relRMS float64, maxAbs float32, err error) {
	cp := params.c()
	var rel C.double
	var mx C.float
	err = l.call("lora_layer_requantize", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_requantize(p, &cp, &rel, &mx, msg)
	})
	return float64(rel), float32(mx), err
}

// LayerWeightInto writes the weight the layer computes with (base layout) into out.
func LayerWeightInto[T Elem](l *Layer, out []T) error {
	op, on := buf(out)
	return l.call("lora_layer_weight", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_weight(p, dtypeOf[T](), op, on, msg)
	})
}

// Weight returns the weight the layer computes with as float32.
func (l *Layer) Weight() ([]float32, error) {
	s, err := l.Shape()
	if err != nil {
		return nil, err
	}
	out := make([]float32, s.In*s.Out)
	return out, LayerWeightInto(l, out)
}

// AddWeighted adds adapter name combining names with weights (PEFT add_weighted_adapter).
func (l *Layer) AddWeighted(name string, names []string, weights []float32, how Combine) error {
	if len(weights) != len(names) {
		return &Error{Status: ErrInvalidArgument, Call: "lora_layer_add_weighted", Message: "one weight per adapter name"}
	}
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	cn := cStrings(names)
	defer freeCStrings(cn)
	return l.call("lora_layer_add_weighted", func(p *C.lora_layer, msg **C.char) C.lora_status {
		return C.go_lora_layer_add_weighted(p, cname, first(cn), (*C.float)(first(weights)), C.size_t(len(cn)), C.lora_combine(how), msg)
	})
}
