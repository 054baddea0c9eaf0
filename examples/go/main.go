// liblora from Go: quantize a weight to NF4, put a LoRA adapter on it, run
// one forward/backward step, merge; then a short QLoRA fine-tune of a
// model (NF4 at load, LoRA on all linear layers) and a generation.
//
//	make install PREFIX=$HOME/.local
//	PKG_CONFIG_PATH=$HOME/.local/lib/pkgconfig LD_LIBRARY_PATH=$HOME/.local/lib go run . [MODEL_DIR [TEXT]]
//
// Defaults: the repository's models/default and data/finetune.txt.
package main

import (
	"errors"
	"fmt"
	"log"
	"os"

	"lora"
)

func finetune(ctx *lora.Context, modelDir, textPath string) error {
	mp := lora.DefaultModelParams()
	mp.Quantize = lora.QuantNF4
	model, err := lora.LoadModel(ctx, modelDir, &mp)
	if err != nil {
		return err
	}
	defer model.Close()
	tok, err := lora.LoadTokenizer(modelDir)
	if err != nil {
		return err
	}
	defer tok.Close()
	if err := model.CreateAdapter("verse", nil); err != nil { // r 8, alpha 16, all linear layers
		return err
	}
	summary, _ := model.TrainableSummary()
	fmt.Println(summary)

	text, err := os.ReadFile(textPath)
	if err != nil {
		return err
	}
	ids, err := tok.EncodeBytes(text, false)
	if err != nil {
		return err
	}
	const batch, seq, steps = 4, 64, 8
	if len(ids) < batch*seq*steps {
		return fmt.Errorf("%s is too short", textPath)
	}
	tp := lora.DefaultTrainerParams()
	tp.LR = 3e-3
	tr, err := lora.NewTrainer(model, "verse", &tp)
	if err != nil {
		return err
	}
	defer tr.Close()
	for s := 0; s < steps; s++ {
		r, err := tr.Step(ids[s*batch*seq:(s+1)*batch*seq], nil, batch, seq)
		if err != nil {
			return err
		}
		fmt.Printf("step %d: loss %.4f\n", s+1, r.Loss)
	}

	prompt, err := tok.Encode("When I consider", false)
	if err != nil {
		return err
	}
	gp := lora.DefaultGenerateParams()
	gp.MaxNewTokens = 48
	gen, err := model.Generate([][]int32{prompt}, nil, &gp)
	if err != nil {
		return err
	}
	out, err := tok.Decode(append(prompt, gen[0]...), true)
	if err != nil {
		return err
	}
	fmt.Printf("generated: %s\n", out)
	return nil
}

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

	modelDir, textPath := "../../models/default", "../../data/finetune.txt"
	if len(os.Args) > 1 {
		modelDir = os.Args[1]
	}
	if len(os.Args) > 2 {
		textPath = os.Args[2]
	}
	if err := finetune(ctx, modelDir, textPath); err != nil {
		log.Fatal(err)
	}
}
