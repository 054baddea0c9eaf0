package lora

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The embedded default model and fine-tuning text, from the repository
// this package lives in.
const (
	modelDir = "../../models/default"
	textPath = "../../data/finetune.txt"
)

func maxAbsDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	m := 0.0
	for i := range a {
		m = math.Max(m, math.Abs(float64(a[i]-b[i])))
	}
	return m
}

func loadQLoRA(t *testing.T, ctx *Context) *Model {
	t.Helper()
	mp := DefaultModelParams()
	mp.Quantize = QuantNF4
	m, err := LoadModel(ctx, modelDir, &mp)
	must(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func TestTokenizer(t *testing.T) {
	tok, err := LoadTokenizer(modelDir)
	must(t, err)
	defer tok.Close()
	info, err := tok.Info()
	must(t, err)
	if info.VocabSize != 256 {
		t.Fatalf("info %+v", info)
	}
	const s = "Shall I compare thee to a summer's day?"
	ids, err := tok.Encode(s, false)
	must(t, err)
	back, err := tok.Decode(ids, true)
	must(t, err)
	if back != s || len(ids) == 0 {
		t.Fatalf("round trip %q -> %v -> %q", s, ids, back)
	}
	piece, err := tok.IDToToken(ids[0])
	must(t, err)
	id, err := tok.TokenToID(piece)
	must(t, err)
	if id != ids[0] {
		t.Fatalf("token %q: id %d, want %d", piece, id, ids[0])
	}
	if sp, err := tok.IsSpecial(ids[0]); err != nil || sp {
		t.Fatalf("is special: %v %v", sp, err)
	}
	_, err = tok.Decode([]int32{-1}, true)
	wantStatus(t, err, ErrInvalidArgument, "negative id")
	_, err = tok.Encode(string([]byte{0xff, 0xfe}), false)
	wantStatus(t, err, ErrInvalidArgument, "invalid UTF-8")
	_, err = LoadTokenizer(filepath.Join(t.TempDir(), "none.json"))
	wantStatus(t, err, ErrIO, "missing tokenizer")
	must(t, tok.Close())
	_, err = tok.Encode("x", false)
	wantStatus(t, err, ErrNullPointer, "closed tokenizer")
}

// A short QLoRA fine-tune of the default model: NF4 at load, LoRA r 8 on
// all linear layers, five steps on one batch of 2 x 64 tokens of
// data/finetune.txt; then generation, save/load, merge/unmerge, swaps and
// a trainer checkpoint resumed on a fresh copy of the model.
func TestFineTune(t *testing.T) {
	ctx := cpu(t)
	dir := t.TempDir()
	m := loadQLoRA(t, ctx)
	info, err := m.Info()
	must(t, err)
	if !info.Quantized || info.VocabSize != 256 || info.Adapters != 0 {
		t.Fatalf("info %+v", info)
	}
	tok, err := LoadTokenizer(modelDir)
	must(t, err)
	defer tok.Close()
	text, err := os.ReadFile(textPath)
	must(t, err)
	all, err := tok.EncodeBytes(text, false)
	must(t, err)
	const batch, seq = 2, 64
	if len(all) < batch*seq {
		t.Fatalf("%d tokens", len(all))
	}
	ids := all[:batch*seq]

	base, err := m.Logits(ids, batch, seq, nil)
	must(t, err)
	cp := DefaultCreateParams()
	cp.R, cp.Alpha, cp.TargetModules = 8, 16, "all-linear"
	must(t, m.CreateAdapter("verse", &cp))
	wantStatus(t, m.CreateAdapter("verse", &cp), ErrInvalidArgument, "duplicate adapter")
	summary, err := m.TrainableSummary()
	must(t, err)
	trainable, total, err := m.ParamCounts()
	must(t, err)
	if !strings.Contains(summary, "trainable params") || trainable == 0 || total <= trainable {
		t.Fatalf("summary %q, counts %d %d", summary, trainable, total)
	}

	before, err := m.Loss(ids, nil, batch, seq)
	must(t, err)
	tp := DefaultTrainerParams()
	tp.LR = 3e-3
	tr, err := NewTrainer(m, "verse", &tp)
	must(t, err)
	var losses []float64
	for s := 0; s < 5; s++ {
		r, err := tr.Step(ids, nil, batch, seq)
		must(t, err)
		if math.IsNaN(r.Loss) || math.IsInf(r.Loss, 0) || r.Step != uint64(s+1) || r.Tokens != batch*seq {
			t.Fatalf("step %d: %+v", s, r)
		}
		losses = append(losses, r.Loss)
	}
	mem, err := m.Memory(tr)
	must(t, err)
	if mem.Optimizer == 0 || mem.BaseQuantized == 0 {
		t.Errorf("memory %+v", mem)
	}
	must(t, tr.Save(filepath.Join(dir, "ckpt")))
	// Micro-batches of one with checkpointing: the same batch trains on.
	must(t, tr.SetBatching(1, true))
	mr, err := tr.Step(ids, nil, batch, seq)
	must(t, err)
	if mr.Step != 6 || !(mr.Loss < losses[4]) {
		t.Errorf("micro-batched step %+v after losses %v", mr, losses)
	}
	if err := tr.SetBatching(-1, false); err == nil {
		t.Errorf("SetBatching(-1) accepted")
	}
	// A GPU or its absence, stated; the CPU is always there.
	if err := tr.UseDevice(0, ComputeBF16); err != nil {
		wantStatus(t, err, ErrCudaUnavailable, "UseDevice(0) without a GPU")
	}
	must(t, tr.UseDevice(-1, ComputeBF16))
	wantStatus(t, tr.UseDevice(0, 9), ErrInvalidArgument, "unknown compute")
	if err := m.UseDevice(0, ComputeF32); err != nil {
		wantStatus(t, err, ErrCudaUnavailable, "Model.UseDevice(0) without a GPU")
	} else {
		must(t, m.UseDevice(-1, ComputeF32))
	}
	wantStatus(t, m.UseDevice(0, 9), ErrInvalidArgument, "unknown compute (model)")
	wantStatus(t, m.SetDeviceOption(DeviceRecompute, false), ErrInvalidState, "a device switch of a host model")
	wantStatus(t, m.SetDeviceOption(DeviceFoldAdapters, false), ErrInvalidState, "a device switch of a host model (folding)")
	if _, err := m.DeviceOption(DeviceTensorCoreAttention); err == nil {
		t.Fatal("DeviceOption of a host model: no error")
	} else {
		wantStatus(t, err, ErrInvalidState, "a device switch of a host model (read)")
	}
	_, err = tr.Step(ids, nil, batch, seq+1)
	wantStatus(t, err, ErrBufferSize, "short batch")
	must(t, tr.Close())
	after, err := m.Loss(ids, nil, batch, seq)
	must(t, err)
	t.Logf("fine-tune: loss %.4f -> %.4f, steps %.4v", before, after, losses)
	// Training on one fixed batch: deterministic, the loss must fall.
	if !(after < before) || !(losses[4] < losses[0]) {
		t.Fatalf("loss did not fall: %.4f -> %.4f, steps %v", before, after, losses)
	}

	// Generation decodes to text; one prompt per adapter in a mixed batch.
	prompt, err := tok.Encode("When I consider", false)
	must(t, err)
	gp := DefaultGenerateParams()
	gp.MaxNewTokens = 16
	gen, err := m.Generate([][]int32{prompt}, nil, &gp)
	must(t, err)
	out, err := tok.Decode(append(append([]int32{}, prompt...), gen[0]...), true)
	must(t, err)
	if len(gen[0]) == 0 || len(gen[0]) > 16 || !strings.HasPrefix(out, "When I consider") || len(out) <= len("When I consider") {
		t.Fatalf("generated %v = %q", gen[0], out)
	}
	mixed, err := m.Generate([][]int32{prompt, prompt}, []string{"verse", ""}, &gp)
	must(t, err)
	if len(mixed) != 2 || fmt.Sprint(mixed[0]) != fmt.Sprint(gen[0]) {
		t.Fatalf("mixed batch %v vs %v", mixed, gen)
	}

	// Save and load back as a second adapter: the same function.
	trained, err := m.Logits(ids, batch, seq, nil)
	must(t, err)
	if maxAbsDiff(trained, base) < 1e-3 {
		t.Fatal("training did not change the logits")
	}
	must(t, m.SaveAdapter("verse", filepath.Join(dir, "verse")))
	must(t, m.LoadAdapter(filepath.Join(dir, "verse"), "loaded"))
	per, err := m.Logits(ids, batch, seq, []string{"loaded", ""})
	must(t, err)
	half := len(per) / 2
	if maxAbsDiff(per[:half], trained[:half]) > 1e-5 || maxAbsDiff(per[half:], base[half:]) > 1e-5 {
		t.Fatal("per-sequence adapters: loaded != trained or base != base")
	}

	// Swaps: base alone, the loaded copy.
	must(t, m.SwapAdapter(nil, nil))
	got, err := m.Logits(ids, batch, seq, nil)
	must(t, err)
	if maxAbsDiff(got, base) > 1e-5 {
		t.Fatal("no adapter != base")
	}
	must(t, m.SwapAdapter([]string{"loaded"}, nil))
	got, err = m.Logits(ids, batch, seq, nil)
	must(t, err)
	if maxAbsDiff(got, trained) > 1e-5 {
		t.Fatal("swapped-in copy != trained")
	}
	wantStatus(t, m.SwapAdapter([]string{"nope"}, nil), ErrInvalidArgument, "unknown adapter")

	// Merge, a merged swap, unmerge.
	must(t, m.Merge())
	got, err = m.Logits(ids, batch, seq, nil)
	must(t, err)
	if d := maxAbsDiff(got, trained); d > 1e-3 {
		t.Fatalf("merged differs by %g", d)
	}
	wantStatus(t, m.Merge(), ErrInvalidState, "merge twice")
	must(t, m.SwapAdapter(nil, nil))
	got, err = m.Logits(ids, batch, seq, nil)
	must(t, err)
	if d := maxAbsDiff(got, base); d > 1e-3 {
		t.Fatalf("merged base differs by %g", d)
	}
	must(t, m.SwapAdapter([]string{"verse"}, []float32{1}))
	must(t, m.Unmerge())
	got, err = m.Logits(ids, batch, seq, nil)
	must(t, err)
	if maxAbsDiff(got, trained) > 1e-5 {
		t.Fatal("unmerged != trained")
	}
	must(t, m.RemoveAdapter("loaded"))
	must(t, m.ExportMerged(filepath.Join(dir, "merged")))
	if _, err := os.Stat(filepath.Join(dir, "merged", "model.safetensors")); err != nil {
		t.Fatal(err)
	}

	// The checkpoint on a fresh copy resumes at step 5; the trainer keeps
	// the model alive after its handle is closed.
	fresh := loadQLoRA(t, ctx)
	rt, err := ResumeTrainer(fresh, filepath.Join(dir, "ckpt"))
	must(t, err)
	defer rt.Close()
	must(t, fresh.Close())
	r, err := rt.Step(ids, nil, batch, seq)
	must(t, err)
	if r.Step != 6 {
		t.Fatalf("resumed step %d", r.Step)
	}

	_, err = LoadModel(ctx, filepath.Join(dir, "no-such-model"), nil)
	wantStatus(t, err, ErrIO, "missing model")
	must(t, m.Close())
	_, err = m.Info()
	wantStatus(t, err, ErrNullPointer, "closed model")
}

func TestPaging(t *testing.T) {
	ctx := cpu(t)
	must(t, ctx.SetPaging(&PagingParams{BudgetBytes: 1 << 20, Dir: t.TempDir()}))
	st, err := ctx.PagedStats()
	must(t, err)
	if st.BudgetBytes != 1<<20 || st.Buffers != 0 {
		t.Fatalf("stats %+v", st)
	}
	err = ctx.SetPaging(&PagingParams{Dir: filepath.Join(t.TempDir(), "missing")})
	wantStatus(t, err, ErrIO, "missing paging dir")
	must(t, ctx.SetPaging(nil))
}
