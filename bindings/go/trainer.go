package lora

/*
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"math"
	"unsafe"
)

// Trainer is a lora_trainer: the optimizer, schedule and step count of
// one adapter's training. It keeps the model's data alive (the Model may
// be closed first). Use it from one goroutine at a time.
type Trainer struct {
	p *C.lora_trainer
}

// Optim is lora_optim.
type Optim uint32

const (
	OptimAdamW     Optim = C.LORA_OPTIM_ADAMW
	OptimAdamW8bit Optim = C.LORA_OPTIM_ADAMW_8BIT
)

// Schedule is lora_schedule (transformers' names).
type Schedule uint32

const (
	ScheduleConstant           Schedule = C.LORA_SCHEDULE_CONSTANT
	ScheduleConstantWithWarmup Schedule = C.LORA_SCHEDULE_CONSTANT_WITH_WARMUP
	ScheduleLinear             Schedule = C.LORA_SCHEDULE_LINEAR
	ScheduleCosine             Schedule = C.LORA_SCHEDULE_COSINE
)

// PagedState is lora_paged_state: where AdamW's moments live.
type PagedState uint32

const (
	PagedStateAuto PagedState = C.LORA_PAGED_STATE_AUTO // paged for NF4 models
	PagedStateOff  PagedState = C.LORA_PAGED_STATE_OFF
	PagedStateOn   PagedState = C.LORA_PAGED_STATE_ON
)

// TrainerParams are lora_trainer_params without struct_size and the
// progress callback.
type TrainerParams struct {
	Optimizer                      Optim
	LR                             float64
	Beta1, Beta2, Eps, WeightDecay float64
	Schedule                       Schedule
	WarmupSteps, TotalSteps        uint64
	MaxGradNorm                    float64 // 0: no clipping
	MicroBatch                     uint32  // 0: the whole batch
	Checkpointing                  bool
	PagedState                     PagedState
}

// DefaultTrainerParams is lora_trainer_default_params(): AdamW, lr 2e-4,
// constant schedule, clipping at 1.0.
func DefaultTrainerParams() TrainerParams {
	d := C.lora_trainer_default_params()
	return TrainerParams{Optim(d.optimizer), float64(d.lr), float64(d.beta1), float64(d.beta2), float64(d.eps),
		float64(d.weight_decay), Schedule(d.schedule), uint64(d.warmup_steps), uint64(d.total_steps),
		float64(d.max_grad_norm), uint32(d.micro_batch), d.checkpointing != 0, PagedState(d.paged_state)}
}

func (p *TrainerParams) c() C.lora_trainer_params {
	cp := C.lora_trainer_default_params()
	if p != nil {
		cp.optimizer = C.lora_optim(p.Optimizer)
		cp.lr = C.double(p.LR)
		cp.beta1, cp.beta2, cp.eps, cp.weight_decay = C.double(p.Beta1), C.double(p.Beta2), C.double(p.Eps), C.double(p.WeightDecay)
		cp.schedule = C.lora_schedule(p.Schedule)
		cp.warmup_steps, cp.total_steps = C.uint64_t(p.WarmupSteps), C.uint64_t(p.TotalSteps)
		cp.max_grad_norm = C.double(p.MaxGradNorm)
		cp.micro_batch = C.uint32_t(p.MicroBatch)
		cp.checkpointing = C.uint32_t(b2u(p.Checkpointing))
		cp.paged_state = C.lora_paged_state(p.PagedState)
	}
	return cp
}

// StepResult is lora_step_result: what one Step did.
type StepResult struct {
	Loss          float64 // mean loss of the step's counted tokens, before the update
	GradNorm      float64 // global gradient norm before clipping
	LR            float64
	Step          uint64 // steps completed, this one included
	Tokens        uint64
	CountedTokens uint64
	Seconds       float64
	TokensPerS    float64
}

// NewTrainer makes a trainer for adapter of m (which becomes the only
// active adapter); nil params means the defaults.
func NewTrainer(m *Model, adapter string, params *TrainerParams) (*Trainer, error) {
	cp := params.c()
	cname := C.CString(adapter)
	defer C.free(unsafe.Pointer(cname))
	var t *C.lora_trainer
	var msg *C.char
	st := C.go_lora_trainer_new(m.handle(), cname, &cp, &t, &msg)
	keepAlive(m)
	if err := check("lora_trainer_new", st, msg); err != nil {
		return nil, err
	}
	return track(&Trainer{p: t}), nil
}

// ResumeTrainer resumes a checkpoint written by Save on a freshly loaded
// copy of the same base model (the hyperparameters come from it).
func ResumeTrainer(m *Model, dir string) (*Trainer, error) {
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	var t *C.lora_trainer
	var msg *C.char
	st := C.go_lora_trainer_resume(m.handle(), cdir, nil, &t, &msg)
	keepAlive(m)
	if err := check("lora_trainer_resume", st, msg); err != nil {
		return nil, err
	}
	return track(&Trainer{p: t}), nil
}

// Close frees the trainer.
func (t *Trainer) Close() error {
	if t != nil && t.p != nil {
		untrack(t)
		C.lora_trainer_free(t.p)
		t.p = nil
	}
	return nil
}

func (t *Trainer) handle() *C.lora_trainer {
	if t == nil {
		return nil
	}
	return t.p
}

// Step runs one optimizer step on ids [batch, seq] (labels nil: the ids;
// -100 ignored). On failure the adapter and optimizer are unchanged.
func (t *Trainer) Step(ids, labels []int32, batch, seq int) (StepResult, error) {
	if len(ids) != batch*seq || (labels != nil && len(labels) != batch*seq) {
		return StepResult{}, &Error{Status: ErrBufferSize, Call: "lora_train_step", Message: "ids (and labels) must hold batch*seq tokens"}
	}
	var r C.lora_step_result
	var msg *C.char
	st := C.go_lora_train_step(t.handle(), (*C.int32_t)(first(ids)), (*C.int32_t)(first(labels)), C.size_t(batch), C.size_t(seq), &r, &msg)
	keepAlive(t)
	if err := check("lora_train_step", st, msg); err != nil {
		return StepResult{}, err
	}
	return StepResult{float64(r.loss), float64(r.grad_norm), float64(r.lr), uint64(r.step), uint64(r.tokens),
		uint64(r.counted_tokens), float64(r.seconds), float64(r.tokens_per_s)}, nil
}

// Compute precisions of a GPU step (lora_compute).
const (
	ComputeBF16 = C.LORA_COMPUTE_BF16
	ComputeF32  = C.LORA_COMPUTE_F32
)

// UseDevice moves the steps to CUDA device `device` (-1: back to the CPU)
// with `compute` precision (ComputeBF16 or ComputeF32); without a GPU the
// error's Status is ErrCudaUnavailable and the trainer stays on the CPU.
func (t *Trainer) UseDevice(device int, compute int) error {
	var msg *C.char
	st := C.go_lora_trainer_use_device(t.handle(), C.int32_t(device), C.lora_compute(compute), &msg)
	keepAlive(t)
	return check("lora_trainer_use_device", st, msg)
}

// SetBatching sets the micro-batch size (0: the whole batch) and
// activation checkpointing from the next step on: the memory a step needs,
// not what it computes. A step on a GPU that failed with ErrOutOfMemory
// applied nothing; retry it with smaller micro-batches or checkpointing.
func (t *Trainer) SetBatching(microBatch int, checkpointing bool) error {
	if microBatch < 0 || microBatch > math.MaxUint32 {
		return fmt.Errorf("lora: micro-batch size %d out of range", microBatch)
	}
	var ck C.uint32_t
	if checkpointing {
		ck = 1
	}
	var msg *C.char
	st := C.go_lora_trainer_set_batching(t.handle(), C.uint32_t(microBatch), ck, &msg)
	keepAlive(t)
	return check("lora_trainer_set_batching", st, msg)
}

// Save writes a checkpoint (adapter, optimizer state, counters) to dir.
func (t *Trainer) Save(dir string) error {
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	var msg *C.char
	st := C.go_lora_trainer_save(t.handle(), cdir, &msg)
	keepAlive(t)
	return check("lora_trainer_save", st, msg)
}
