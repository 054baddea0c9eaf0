package lora

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

func ramp(n int, scale float32) []float32 {
	v := make([]float32, n)
	s := uint32(12345)
	for i := range v {
		s = s*1664525 + 1013904223
		v[i] = scale * (float32(s>>8)/16777216.0 - 0.5)
	}
	return v
}

func cpu(t *testing.T) *Context {
	t.Helper()
	p := DefaultContextParams()
	p.Backend = BackendCPU
	p.Threads = 2
	ctx, err := NewContext(&p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctx.Close() })
	return ctx
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// wantStatus checks that err is an *Error with status s and a message.
func wantStatus(t *testing.T, err error, s Status, what string) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || !errors.Is(err, s) || e.Message == "" {
		t.Errorf("%s: got %v, want %s with a message", what, err, s)
	}
}

func TestVersion(t *testing.T) {
	if Version()>>16 != ABIMajor {
		t.Fatalf("library ABI %d, header %d", Version()>>16, ABIMajor)
	}
	if !strings.Contains(VersionString(), ".") {
		t.Fatalf("version string %q", VersionString())
	}
}

func TestQuantizeRoundTrip(t *testing.T) {
	ctx := cpu(t)
	b, err := ctx.Backend()
	must(t, err)
	desc, err := ctx.Describe()
	must(t, err)
	if b != BackendCPU || !strings.Contains(desc, "cpu") {
		t.Fatalf("backend %d %q", b, desc)
	}
	const rows, cols = 64, 96
	w := ramp(rows*cols, 2)
	q, err := Quantize(ctx, w, []int{rows, cols}, nil)
	must(t, err)
	defer q.Close()
	info, err := q.Info()
	must(t, err)
	if info.Numel != rows*cols || len(info.Shape) != 2 || info.Shape[1] != cols || !info.DoubleQuant || info.Blocksize != 64 {
		t.Fatalf("info %+v", info)
	}
	if math.Abs(info.BitsPerWeight-4.127) > 0.01 {
		t.Errorf("bits per weight %g", info.BitsPerWeight)
	}
	back, err := q.Dequantize(ctx)
	must(t, err)
	var e2, r2 float64
	for i := range w {
		d := float64(back[i] - w[i])
		e2 += d * d
		r2 += float64(w[i]) * float64(w[i])
	}
	if rel := math.Sqrt(e2 / r2); rel > 0.15 {
		t.Errorf("relative error %g", rel)
	}
	// bf16 output is fp32's value rounded once.
	b16 := make([]BF16, rows*cols)
	must(t, DequantizeInto(ctx, q, b16))
	bits := math.Float32bits(back[1])
	if want := BF16((bits + 0x7fff + ((bits >> 16) & 1)) >> 16); b16[1] != want {
		t.Errorf("bf16 %#x want %#x", b16[1], want)
	}
	packed, err := q.Packed()
	must(t, err)
	absmax, err := q.Absmax()
	must(t, err)
	dq, err := q.DoubleQuant()
	must(t, err)
	if len(packed) != rows*cols/2 || len(absmax) != info.NumBlocks || len(dq.Codes) != info.NumBlocks || len(dq.NestedAbsmax) != info.NumNested {
		t.Fatalf("sizes %d %d %d %d", len(packed), len(absmax), len(dq.Codes), len(dq.NestedAbsmax))
	}

	// Quantizing the bf16 copy of w: the same input type path from Go.
	wb := make([]BF16, len(w))
	for i, x := range w {
		wb[i] = BF16(math.Float32bits(x) >> 16)
	}
	plain := DefaultNF4Params()
	plain.DoubleQuant = false
	q2, err := Quantize(ctx, wb, []int{rows * cols}, &plain)
	must(t, err)
	defer q2.Close()
	i2, err := q2.Info()
	must(t, err)
	if i2.Dtype != DtypeBF16 || i2.DoubleQuant {
		t.Errorf("bf16 info %+v", i2)
	}
	_, err = q2.DoubleQuant()
	wantStatus(t, err, ErrInvalidState, "double quant of a plain tensor")

	// Save, list, load: bit for bit.
	path := filepath.Join(t.TempDir(), "go.safetensors")
	must(t, SaveNF4(path, []string{"model.a", "model.b"}, []*NF4{q, q2}))
	names, err := ListNF4(path)
	must(t, err)
	if fmt.Sprint(names) != "[model.a model.b]" {
		t.Fatalf("list %v", names)
	}
	l, err := LoadNF4(path, "model.a")
	must(t, err)
	defer l.Close()
	lp, err := l.Packed()
	must(t, err)
	if string(lp) != string(packed) {
		t.Fatal("loaded codes differ")
	}
	la, err := l.Absmax()
	must(t, err)
	for i := range la {
		if la[i] != absmax[i] {
			t.Fatalf("loaded absmax[%d] %g != %g", i, la[i], absmax[i])
		}
	}
}

func TestErrors(t *testing.T) {
	ctx := cpu(t)
	w := ramp(256, 1)
	bad := NF4Params{Blocksize: 48, DoubleQuant: true}
	_, err := Quantize(ctx, w, []int{256}, &bad)
	wantStatus(t, err, ErrInvalidBlocksize, "blocksize 48")
	_, err = Quantize(ctx, w, []int{257}, nil)
	wantStatus(t, err, ErrBufferSize, "shape/buffer mismatch")
	w[3] = float32(math.NaN())
	_, err = Quantize(ctx, w, []int{256}, nil)
	wantStatus(t, err, ErrNonFinite, "NaN")
	_, err = Quantize(ctx, []float32{}, []int{0}, nil)
	if err == nil {
		t.Error("empty input accepted")
	}
	_, err = LoadNF4(filepath.Join(t.TempDir(), "missing.safetensors"), "x")
	wantStatus(t, err, ErrIO, "missing file")

	// Closed handles: Close is idempotent, use after Close is an error.
	q, err := Quantize(ctx, ramp(64, 1), []int{64}, nil)
	must(t, err)
	must(t, q.Close())
	must(t, q.Close())
	_, err = q.Info()
	wantStatus(t, err, ErrNullPointer, "closed tensor")
}

// The message belongs to the failing call even when goroutines hop between
// OS threads: many goroutines fail at once, each on its own file name, and
// each must get its own name back (the shims read lora_last_error in the
// same C call).
func TestErrorMessagePerCall(t *testing.T) {
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 25; i++ {
				name := fmt.Sprintf("missing-%d-%d.safetensors", g, i)
				_, err := LoadNF4(filepath.Join(dir, name), "x")
				var e *Error
				if !errors.As(err, &e) || !strings.Contains(e.Message, name) {
					errs <- fmt.Errorf("goroutine %d call %d: %v (wanted a message naming %s)", g, i, err, name)
					return
				}
				runtime.Gosched()
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestLayer(t *testing.T) {
	ctx := cpu(t)
	const in, out, n, r = 32, 24, 5, 4
	w, x, dy, bias := ramp(in*out, 0.5), ramp(n*in, 1), ramp(n*out, 1), ramp(out, 0.1)
	l, err := NewLayer(ctx, w, in, out, false, bias)
	must(t, err)
	defer l.Close()
	y0 := make([]float32, n*out)
	must(t, l.Forward(x, n, y0, false, nil))

	cfg := DefaultAdapterConfig()
	cfg.R, cfg.Alpha = r, 8
	must(t, l.AddAdapter("style", cfg))
	must(t, l.AddAdapter("other", cfg))
	wantStatus(t, l.AddAdapter("style", cfg), ErrInvalidArgument, "duplicate adapter")
	s, err := l.Shape()
	must(t, err)
	if s != (LayerShape{In: in, Out: out, Adapters: 2}) {
		t.Fatalf("shape %+v", s)
	}
	idx, err := l.AdapterIndex("other")
	must(t, err)
	tr, tot, err := l.ParamCounts()
	must(t, err)
	if idx != 1 || tr != 2*r*(in+out) || tot != tr+in*out+out {
		t.Fatalf("index %d counts %d %d", idx, tr, tot)
	}

	y := make([]float32, n*out)
	must(t, l.Forward(x, n, y, false, nil))
	if fmt.Sprint(y) != fmt.Sprint(y0) {
		t.Fatal("a fresh adapter changed the output")
	}
	a, b := make([]float32, r*in), make([]float32, out*r)
	must(t, l.GetAdapter("style", false, a, b))
	for i := range b {
		b[i] = 0.01
	}
	must(t, l.SetAdapter("style", a, b))
	must(t, l.Forward(x, n, y, true, nil))
	dx := make([]float32, n*in)
	must(t, l.Backward(x, dy, n, dx))
	da, db := make([]float32, r*in), make([]float32, out*r)
	must(t, l.GetAdapter("style", true, da, db))
	var g float64
	for _, v := range db {
		g += math.Abs(float64(v))
	}
	if g == 0 {
		t.Fatal("no gradient for B")
	}
	wantStatus(t, l.Merge(), ErrInvalidState, "merge with pending gradients")
	must(t, l.ZeroGrad())
	must(t, l.Merge())
	ym := make([]float32, n*out)
	must(t, l.Forward(x, n, ym, false, nil))
	for i := range y {
		if math.Abs(float64(ym[i]-y[i])) > 1e-5*(1+math.Abs(float64(y[i]))) {
			t.Fatalf("merged y[%d] %g vs %g", i, ym[i], y[i])
		}
	}
	must(t, l.Unmerge())
	must(t, l.SwapAdapter([]string{"style", "other"}, []float32{0.5, 1}))
	must(t, l.SwapAdapter(nil, nil))
	must(t, l.Forward(x, n, y, false, nil))
	if fmt.Sprint(y) != fmt.Sprint(y0) {
		t.Fatal("base-only output differs")
	}
	must(t, l.AddWeighted("mix", []string{"style", "other"}, []float32{1, 1}, CombineCat))
	wt, err := l.Weight()
	must(t, err)
	if len(wt) != in*out {
		t.Fatal("weight size")
	}
	// Mixed-adapter batch with bf16 output through the generic function.
	rows := []int32{0, -1, 1, 0, -1}
	y16 := make([]BF16, n*out)
	must(t, LayerForward(l, x, n, y16, false, rows))

	// Given init and an NF4 base.
	q, err := Quantize(ctx, w, []int{out, in}, nil)
	must(t, err)
	ql, err := NewLayerNF4(ctx, q, nil)
	must(t, err)
	must(t, q.Close()) // the layer holds its own copy
	defer ql.Close()
	given := DefaultAdapterConfig()
	given.R, given.Init, given.A, given.B = r, InitGiven, ramp(r*in, 0.1), ramp(out*r, 0.1)
	must(t, ql.AddAdapter("given", given))
	ga, gb := make([]float32, r*in), make([]float32, out*r)
	must(t, ql.GetAdapter("given", false, ga, gb))
	if fmt.Sprint(ga) != fmt.Sprint(given.A) || fmt.Sprint(gb) != fmt.Sprint(given.B) {
		t.Fatal("given A/B not kept")
	}
	must(t, ql.Merge())
	rel, mx, err := ql.Requantize(nil)
	must(t, err)
	if rel <= 0 || rel > 0.2 || mx <= 0 {
		t.Errorf("requantize error %g %g", rel, mx)
	}
}

// dropTensors makes n tensors and drops them without Close; not inlined,
// so no reference survives in the caller's frame.
//
//go:noinline
func dropTensors(t *testing.T, ctx *Context, n int) {
	for i := 0; i < n; i++ {
		if _, err := Quantize(ctx, ramp(1024, 1), []int{1024}, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// Handles left to the GC are freed by their finalizers (a safety net).
func TestFinalizers(t *testing.T) {
	ctx := cpu(t)
	// A closed handle's finalizer is disarmed: Close frees exactly once.
	q, err := Quantize(ctx, ramp(64, 1), []int{64}, nil)
	must(t, err)
	must(t, q.Close())
	before := finalized.Load()
	q = nil
	runtime.GC()
	runtime.GC()
	time.Sleep(20 * time.Millisecond)
	if finalized.Load() != before {
		t.Fatal("a closed handle was finalized")
	}

	before = finalized.Load()
	dropTensors(t, ctx, 20)
	// Finalizers run on their own goroutine after a GC finds the handles
	// unreachable. The GC owes no promise about any one object (a stale
	// register or stack slot may keep the last one alive for a while), so
	// most, not all, must have been freed.
	deadline := time.Now().Add(5 * time.Second)
	for finalized.Load()-before < 20 && time.Now().Before(deadline) {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	if n := finalized.Load() - before; n < 15 {
		t.Fatalf("only %d of 20 unreachable tensors finalized", n)
	}
}
