// liblora from Go: quantize a weight to NF4, put a LoRA adapter on it, run
// one forward/backward step, merge.
//
//	make install PREFIX=$HOME/.local
//	PKG_CONFIG_PATH=$HOME/.local/lib/pkgconfig LD_LIBRARY_PATH=$HOME/.local/lib go run .
package main

import (
	"errors"
	"fmt"
	"log"

	"lora"
)

func main() {
	params := lora.DefaultContextParams()
	params.Backend = lora.BackendCPU
	ctx, err := lora.NewContext(&params)
	if err != nil {
		log.Fatal(err)
	}
	defer ctx.Close()

	const in, out, n = 256, 128, 4
	w, x, dy := make([]float32, in*out), make([]float32, n*in), make([]float32, n*out)
	for i := range w {
		w[i] = 0.02 * float32(i*7919%201-100) / 100
	}
	for i := range x {
		x[i] = float32(i%17-8) / 8
	}
	for i := range dy {
		dy[i] = 0.01
	}

	q, err := lora.Quantize(ctx, w, []int{out, in}, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer q.Close()
	info, _ := q.Info()
	fmt.Printf("NF4: %d weights, %.3f bits each\n", info.Numel, info.BitsPerWeight)

	layer, err := lora.NewLayerNF4(ctx, q, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer layer.Close()
	cfg := lora.DefaultAdapterConfig()
	cfg.R, cfg.Alpha = 8, 16
	if err := layer.AddAdapter("style", cfg); err != nil {
		log.Fatal(err)
	}
	y := make([]float32, n*out)
	da, db := make([]float32, int(cfg.R)*in), make([]float32, out*int(cfg.R))
	if err := layer.Forward(x, n, y, true, nil); err != nil {
		log.Fatal(err)
	}
	if err := layer.Backward(x, dy, n, nil); err != nil {
		log.Fatal(err)
	}
	if err := layer.GetAdapter("style", true, da, db); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("y[0] = %.5f, dB[0] = %.5f\n", y[0], db[0])
	if err := layer.ZeroGrad(); err != nil {
		log.Fatal(err)
	}
	if err := layer.Merge(); err != nil {
		log.Fatal(err)
	}
	shape, _ := layer.Shape()
	fmt.Printf("merged: %v\n", shape.Merged)

	err = layer.Merge() // already merged
	if errors.Is(err, lora.ErrInvalidState) {
		fmt.Printf("expected error: %v\n", err)
	} else {
		log.Fatalf("wanted ErrInvalidState, got %v", err)
	}
}
