package lora

/*
#include "shim.h"
*/
import "C"

import "unsafe"

// Model is a lora_model: a Llama, Mistral or Qwen2 checkpoint (fp32 or NF4
// base) with named LoRA adapters. Calls on one model serialize inside
// liblora, so it may be shared between goroutines.
type Model struct {
	p *C.lora_model
}

// Quant is lora_quant: how LoadModel stores the linear layers.
type Quant uint32

const (
	QuantNone Quant = C.LORA_QUANT_NONE
	QuantNF4  Quant = C.LORA_QUANT_NF4 // QLoRA: NF4 at load, bit-exact with bitsandbytes
)

// ModelParams are lora_model_params without struct_size (and without the
// progress callback, which the Go binding does not expose).
type ModelParams struct {
	Quantize    Quant
	Blocksize   uint32 // NF4 blocksize, a power of two from 32 to 4096
	DoubleQuant bool
}

// DefaultModelParams is lora_model_default_params(): weights as stored;
// blocksize 64 and double quantization for when Quantize is QuantNF4.
func DefaultModelParams() ModelParams {
	d := C.lora_model_default_params()
	return ModelParams{Quant(d.quantize), uint32(d.blocksize), d.double_quant != 0}
}

// ModelInfo is lora_model_info.
type ModelInfo struct {
	Layers, HiddenSize, IntermediateSize, Heads, KVHeads, HeadDim int
	VocabSize, MaxPositionEmbeddings                              int
	Quantized                                                     bool
	Blocksize                                                     int // NF4 blocksize, or 0
	TiedEmbeddings, Merged                                        bool
	Adapters                                                      int
	BOSTokenID, EOSTokenID                                        int64 // -1 when unknown
}

// CreateParams are lora_create_params without struct_size.
type CreateParams struct {
	R         uint32
	Alpha     float32
	Dropout   float32
	UseRSLoRA bool
	Init      Init // InitKaimingUniform or InitGaussian
	// "all-linear" (also when empty), "q_proj,v_proj" or "re:<regex>".
	TargetModules     string
	LayersToTransform []int32 // nil: all layers
	RankPattern       string  // "pattern=rank,..." or ""
	AlphaPattern      string  // "pattern=alpha,..." or ""
}

// DefaultCreateParams is lora_create_default_params(): r 8, alpha 16, no
// dropout, all linear layers.
func DefaultCreateParams() CreateParams {
	d := C.lora_create_default_params()
	return CreateParams{R: uint32(d.r), Alpha: float32(d.alpha), Dropout: float32(d.dropout),
		UseRSLoRA: d.use_rslora != 0, Init: Init(d.init), TargetModules: "all-linear"}
}

// GenerateParams are lora_generate_params without struct_size and the
// progress callback.
type GenerateParams struct {
	MaxNewTokens uint32
	Temperature  float32 // 0: greedy
	TopK         uint32  // 0: off
	TopP         float32 // 1: off
	Seed         uint64
	StopAtEOS    bool
}

// DefaultGenerateParams is lora_generate_default_params(): greedy, 32
// tokens, stop at EOS.
func DefaultGenerateParams() GenerateParams {
	d := C.lora_generate_default_params()
	return GenerateParams{uint32(d.max_new_tokens), float32(d.temperature), uint32(d.top_k), float32(d.top_p),
		uint64(d.seed), d.stop_at_eos != 0}
}

func (p *GenerateParams) c() C.lora_generate_params {
	cp := C.lora_generate_default_params()
	if p != nil {
		cp.max_new_tokens = C.uint32_t(p.MaxNewTokens)
		cp.temperature = C.float(p.Temperature)
		cp.top_k = C.uint32_t(p.TopK)
		cp.top_p = C.float(p.TopP)
		cp.seed = C.uint64_t(p.Seed)
		cp.stop_at_eos = C.uint32_t(b2u(p.StopAtEOS))
	}
	return cp
}

// MemoryStats is lora_memory_stats: bytes by category.
type MemoryStats struct {
	BaseWeights, BaseQuantized, QuantizedWeights, Adapters uint64
	Optimizer, Activations, KVCache, Peak                  uint64
}

// LoadModel loads a Hugging Face checkpoint directory; nil params means
// the defaults (QuantNF4 quantizes each linear layer as it is read).
func LoadModel(ctx *Context, dir string, params *ModelParams) (*Model, error) {
	cp := C.lora_model_default_params()
	if params != nil {
		cp.quantize = C.lora_quant(params.Quantize)
		cp.blocksize = C.uint32_t(params.Blocksize)
		cp.double_quant = C.uint32_t(b2u(params.DoubleQuant))
	}
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	var m *C.lora_model
	var msg *C.char
	st := C.go_lora_model_load(ctx.handle(), cdir, &cp, &m, &msg)
	keepAlive(ctx)
	if err := check("lora_model_load", st, msg); err != nil {
		return nil, err
	}
	return track(&Model{p: m}), nil
}

// Close frees the model handle (a trainer made on it keeps working).
func (m *Model) Close() error {
	if m != nil && m.p != nil {
		untrack(m)
		C.lora_model_free(m.p)
		m.p = nil
	}
	return nil
}

func (m *Model) handle() *C.lora_model {
	if m == nil {
		return nil
	}
	return m.p
}

// call runs one shim on the model and keeps the model alive through it.
func (m *Model) call(name string, f func(p *C.lora_model, msg **C.char) C.lora_status) error {
	var msg *C.char
	st := f(m.handle(), &msg)
	keepAlive(m)
	return check(name, st, msg)
}

// Info returns facts about the model.
func (m *Model) Info() (ModelInfo, error) {
	var i C.lora_model_info
	err := m.call("lora_model_get_info", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_get_info(p, &i, msg)
	})
	return ModelInfo{int(i.n_layers), int(i.hidden_size), int(i.intermediate_size), int(i.n_heads), int(i.n_kv_heads),
		int(i.head_dim), int(i.vocab_size), int(i.max_position_embeddings), i.quantized != 0, int(i.blocksize),
		i.tied_embeddings != 0, i.merged != 0, int(i.n_adapters), int64(i.bos_token_id), int64(i.eos_token_id)}, err
}

// CreateAdapter adds adapter name on the target modules (PEFT
// get_peft_model); nil params means the defaults. The first adapter
// becomes active.
func (m *Model) CreateAdapter(name string, params *CreateParams) error {
	cp := C.lora_create_default_params()
	// cgo forbids Go memory holding Go pointers: the struct points at C copies.
	var frees []unsafe.Pointer
	defer func() {
		for _, p := range frees {
			C.free(p)
		}
	}()
	cstr := func(s string) *C.char {
		if s == "" {
			return nil
		}
		c := C.CString(s)
		frees = append(frees, unsafe.Pointer(c))
		return c
	}
	if params != nil {
		cp.r = C.uint32_t(params.R)
		cp.alpha = C.float(params.Alpha)
		cp.dropout = C.float(params.Dropout)
		cp.use_rslora = C.uint32_t(b2u(params.UseRSLoRA))
		cp.init = C.lora_init(params.Init)
		cp.target_modules = cstr(params.TargetModules)
		cp.rank_pattern = cstr(params.RankPattern)
		cp.alpha_pattern = cstr(params.AlphaPattern)
		if len(params.LayersToTransform) > 0 {
			l := C.malloc(C.size_t(4 * len(params.LayersToTransform)))
			frees = append(frees, l)
			copy(unsafe.Slice((*int32)(l), len(params.LayersToTransform)), params.LayersToTransform)
			cp.layers_to_transform = (*C.int32_t)(l)
			cp.n_layers_to_transform = C.size_t(len(params.LayersToTransform))
		}
	}
	cname := cstr(name)
	if cname == nil {
		cname = C.CString("")
		frees = append(frees, unsafe.Pointer(cname))
	}
	return m.call("lora_create", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_create(p, cname, &cp, msg)
	})
}

// ParamCounts returns the trainable (adapter) and total parameter counts.
func (m *Model) ParamCounts() (trainable, total uint64, err error) {
	var tr, tot C.uint64_t
	err = m.call("lora_model_param_counts", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_param_counts(p, &tr, &tot, msg)
	})
	return uint64(tr), uint64(tot), err
}

// TrainableSummary is PEFT's print_trainable_parameters line.
func (m *Model) TrainableSummary() (string, error) {
	var needed C.size_t
	err := m.call("lora_model_trainable_summary", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_trainable_summary(p, nil, 0, &needed, msg)
	})
	if err != nil {
		return "", err
	}
	b := make([]byte, int(needed)+1)
	err = m.call("lora_model_trainable_summary", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_trainable_summary(p, (*C.char)(unsafe.Pointer(&b[0])), C.size_t(len(b)), &needed, msg)
	})
	return string(b[:needed]), err
}

// Merge merges the active adapters into the weights.
func (m *Model) Merge() error {
	return m.call("lora_merge", func(p *C.lora_model, msg **C.char) C.lora_status { return C.go_lora_merge(p, msg) })
}

// Unmerge undoes Merge exactly.
func (m *Model) Unmerge() error {
	return m.call("lora_unmerge", func(p *C.lora_model, msg **C.char) C.lora_status { return C.go_lora_unmerge(p, msg) })
}

// UseDevice puts the model on CUDA device `device` (-1: back to the CPU)
// with `compute` precision (ComputeBF16 or ComputeF32): logits,
// generation, Merge, Unmerge and SwapAdapter then run there. Without a GPU
// the error's Status is ErrCudaUnavailable and the model stays on the CPU.
func (m *Model) UseDevice(device int, compute int) error {
	return m.call("lora_model_use_device", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_use_device(p, C.int32_t(device), C.lora_compute(compute), msg)
	})
}

// Switches of a model's device copy (lora_device_option).
const (
	DeviceTensorCoreAttention = C.LORA_DEVICE_TENSOR_CORE_ATTENTION
	DeviceBF16AdapterProducts = C.LORA_DEVICE_BF16_ADAPTER_PRODUCTS
	DeviceRecompute           = C.LORA_DEVICE_RECOMPUTE
	DeviceFoldAdapters        = C.LORA_DEVICE_FOLD_ADAPTERS
)

// SetDeviceOption turns switch `option` (Device*) of the model's device
// copy on or off (see lora_model_set_device_option); off a device the
// error's Status is ErrInvalidState.
func (m *Model) SetDeviceOption(option int, on bool) error {
	v := C.int32_t(0)
	if on {
		v = 1
	}
	return m.call("lora_model_set_device_option", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_set_device_option(p, C.lora_device_option(option), v, msg)
	})
}

// DeviceOption reports whether switch `option` of the model's device copy
// is on (see lora_model_device_option).
func (m *Model) DeviceOption(option int) (bool, error) {
	var v C.int32_t
	err := m.call("lora_model_device_option", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_device_option(p, C.lora_device_option(option), &v, msg)
	})
	return v != 0, err
}

// SwapAdapter makes names the active adapters, scaled by multipliers (nil:
// all 1); no names leaves the base alone. Works merged or not.
func (m *Model) SwapAdapter(names []string, multipliers []float32) error {
	if multipliers != nil && len(multipliers) != len(names) {
		return &Error{Status: ErrInvalidArgument, Call: "lora_swap_adapter", Message: "one multiplier per adapter name"}
	}
	p := cStrings(names)
	defer freeCStrings(p)
	return m.call("lora_swap_adapter", func(h *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_swap_adapter(h, first(p), (*C.float)(first(multipliers)), C.size_t(len(names)), msg)
	})
}

// adapterNames makes C names for per-sequence adapters, "" being NULL (the
// base alone); nil for nil.
func adapterNames(names []string) []*C.char {
	if names == nil {
		return nil
	}
	out := make([]*C.char, len(names))
	for i, n := range names {
		if n != "" {
			out[i] = C.CString(n)
		}
	}
	return out
}

// LogitsInto writes the logits [batch, seq, vocab] of ids [batch, seq] to
// out, with the active adapters, or with adapters (one name per sequence,
// "" for the base alone; the model must be unmerged) when not nil.
func (m *Model) LogitsInto(ids []int32, batch, seq int, adapters []string, out []float32) error {
	if len(ids) != batch*seq {
		return &Error{Status: ErrBufferSize, Call: "lora_model_logits", Message: "ids must hold batch*seq tokens"}
	}
	if adapters != nil && len(adapters) != batch {
		return &Error{Status: ErrInvalidArgument, Call: "lora_model_logits", Message: "one adapter name per sequence"}
	}
	a := adapterNames(adapters)
	defer freeCStrings(a)
	return m.call("lora_model_logits", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_logits(p, (*C.int32_t)(first(ids)), C.size_t(batch), C.size_t(seq), first(a),
			(*C.float)(first(out)), C.size_t(len(out)), msg)
	})
}

// Logits returns the logits [batch, seq, vocab] of ids; see LogitsInto.
func (m *Model) Logits(ids []int32, batch, seq int, adapters []string) ([]float32, error) {
	info, err := m.Info()
	if err != nil {
		return nil, err
	}
	out := make([]float32, batch*seq*info.VocabSize)
	if err := m.LogitsInto(ids, batch, seq, adapters, out); err != nil {
		return nil, err
	}
	return out, nil
}

// Loss is the mean causal-LM cross-entropy of ids [batch, seq] (labels
// nil: the ids; -100 ignored), without gradients.
func (m *Model) Loss(ids, labels []int32, batch, seq int) (float32, error) {
	if len(ids) != batch*seq || (labels != nil && len(labels) != batch*seq) {
		return 0, &Error{Status: ErrBufferSize, Call: "lora_model_loss", Message: "ids (and labels) must hold batch*seq tokens"}
	}
	var l C.float
	err := m.call("lora_model_loss", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_loss(p, (*C.int32_t)(first(ids)), (*C.int32_t)(first(labels)), C.size_t(batch), C.size_t(seq), &l, msg)
	})
	return float32(l), err
}

func (m *Model) strCall(name string, strs []string, f func(p *C.lora_model, s []*C.char, msg **C.char) C.lora_status) error {
	s := cStrings(strs)
	defer freeCStrings(s)
	return m.call(name, func(p *C.lora_model, msg **C.char) C.lora_status { return f(p, s, msg) })
}

// SaveAdapter writes adapter name to directory dir in PEFT's format.
func (m *Model) SaveAdapter(name, dir string) error {
	return m.strCall("lora_adapter_save", []string{name, dir}, func(p *C.lora_model, s []*C.char, msg **C.char) C.lora_status {
		return C.go_lora_adapter_save(p, s[0], s[1], msg)
	})
}

// LoadAdapter loads a PEFT adapter directory as adapter name.
func (m *Model) LoadAdapter(dir, name string) error {
	return m.strCall("lora_adapter_load", []string{dir, name}, func(p *C.lora_model, s []*C.char, msg **C.char) C.lora_status {
		return C.go_lora_adapter_load(p, s[0], s[1], msg)
	})
}

// RemoveAdapter deletes adapter name (refused while merged).
func (m *Model) RemoveAdapter(name string) error {
	return m.strCall("lora_adapter_remove", []string{name}, func(p *C.lora_model, s []*C.char, msg **C.char) C.lora_status {
		return C.go_lora_adapter_remove(p, s[0], msg)
	})
}

// ExportMerged writes the model with its active adapters merged as a
// Hugging Face checkpoint directory.
func (m *Model) ExportMerged(dir string) error {
	return m.strCall("lora_model_export_merged", []string{dir}, func(p *C.lora_model, s []*C.char, msg **C.char) C.lora_status {
		return C.go_lora_model_export_merged(p, s[0], msg)
	})
}

// Generate continues each prompt and returns the new tokens of each. With
// adapters nil the active adapters are used; otherwise one name per
// prompt ("" for the base alone): a mixed-adapter batch. nil params means
// the defaults.
func (m *Model) Generate(prompts [][]int32, adapters []string, params *GenerateParams) ([][]int32, error) {
	if adapters != nil && len(adapters) != len(prompts) {
		return nil, &Error{Status: ErrInvalidArgument, Call: "lora_generate", Message: "one adapter name per prompt"}
	}
	cp := params.c()
	var flat []int32
	lens := make([]C.size_t, len(prompts))
	for i, p := range prompts {
		flat = append(flat, p...)
		lens[i] = C.size_t(len(p))
	}
	a := adapterNames(adapters)
	defer freeCStrings(a)
	maxNew := int(cp.max_new_tokens)
	out := make([]int32, len(prompts)*maxNew)
	outLens := make([]C.size_t, len(prompts))
	err := m.call("lora_generate", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_generate(p, (*C.int32_t)(first(flat)), first(lens), first(a), C.size_t(len(prompts)), &cp,
			(*C.int32_t)(first(out)), C.size_t(len(out)), first(outLens), msg)
	})
	if err != nil {
		return nil, err
	}
	res := make([][]int32, len(prompts))
	for i := range res {
		res[i] = out[i*maxNew : i*maxNew+int(outLens[i]) : i*maxNew+int(outLens[i])]
	}
	return res, nil
}

// Memory returns the bytes held by category, with tr's optimizer state
// when tr is not nil.
func (m *Model) Memory(tr *Trainer) (MemoryStats, error) {
	var s C.lora_memory_stats
	err := m.call("lora_model_memory", func(p *C.lora_model, msg **C.char) C.lora_status {
		return C.go_lora_model_memory(p, tr.handle(), &s, msg)
	})
	keepAlive(tr)
	return MemoryStats{uint64(s.base_weights), uint64(s.base_quantized), uint64(s.quantized_weights), uint64(s.adapters),
		uint64(s.optimizer), uint64(s.activations), uint64(s.kv_cache), uint64(s.peak)}, err
}
