"""Files liblora writes, read by the reference tools.

Drives liblora.so through ctypes (its C API): loads a model directory,
creates an adapter on all linear layers, trains it a few steps so B ≠ 0,
saves it with lora_adapter_save, exports the merged model with
lora_model_export_merged, and records liblora's logits. Then:
  1. PEFT loads the saved adapter on the same base (PeftModel.from_pretrained)
     and its logits are compared with liblora's;
  2. transformers loads the exported merged checkpoint as a plain model and
     its logits are compared with liblora's merged logits.

    python scripts/check_peft_interop.py [MODEL_DIR] [LIBLORA_SO]

Needs torch, transformers, peft (not needed by CI: this is a manual check
whose result is recorded in the issue notes and bench/RESULTS.md).
"""
import ctypes as C
import os
import sys
import tempfile

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/default"
so = sys.argv[2] if len(sys.argv) > 2 else "target/release/liblora.so"
L = C.CDLL(os.path.abspath(so))
P = C.c_void_p


def ok(st, what):
    if st != 0:
        buf = C.create_string_buffer(1024)
        L.lora_last_error(buf, 1024)
        raise SystemExit(f"{what}: status {st}: {buf.value.decode()}")


ctx, m, tr = P(), P(), P()
ok(L.lora_context_new(None, C.byref(ctx)), "context")
ok(L.lora_model_load(ctx, model_dir.encode(), None, C.byref(m)), "load")
ok(L.lora_create(m, b"default", None), "create")
ok(L.lora_trainer_new(m, b"default", None, C.byref(tr)), "trainer")
rng = np.random.default_rng(0)
cfg = AutoModelForCausalLM.from_pretrained(model_dir).config
V = cfg.vocab_size
B, T = 2, 32
ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
for _ in range(5):
    batch = rng.integers(0, V, size=(4, 32)).astype(np.int32)
    ok(L.lora_train_step(tr, batch.ctypes.data_as(C.POINTER(C.c_int32)), None, C.c_size_t(4), C.c_size_t(32), None), "step")
ours = np.zeros((B, T, V), np.float32)
ok(L.lora_model_logits(m, ids.ctypes.data_as(C.POINTER(C.c_int32)), C.c_size_t(B), C.c_size_t(T), None, ours.ctypes.data_as(C.POINTER(C.c_float)), C.c_size_t(ours.size)), "logits")
tmp = tempfile.mkdtemp(prefix="liblora-interop-")
ad, merged = os.path.join(tmp, "adapter"), os.path.join(tmp, "merged")
ok(L.lora_adapter_save(m, b"default", ad.encode()), "save")
ok(L.lora_model_export_merged(m, merged.encode()), "export")

base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
pm = PeftModel.from_pretrained(base, ad).eval()
with torch.no_grad():
    ref = pm(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
with pm.disable_adapter(), torch.no_grad():
    plain = pm(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
effect = np.abs(ref - plain).max()
print(f"PEFT loads liblora's adapter: logits rel err {rel:.2e} (adapter moves logits by up to {effect:.3e})")

mm = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    refm = mm(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
relm = np.linalg.norm(ours - refm) / np.linalg.norm(refm)
import json
exp_dtype = json.load(open(os.path.join(merged, "config.json"))).get("dtype")
print(f"transformers loads liblora's merged export (stored as {exp_dtype}): logits rel err {relm:.2e} vs liblora unmerged")
L.lora_trainer_free(tr)
L.lora_model_free(m)
L.lora_context_free(ctx)
bad = rel > 1e-5 or (exp_dtype == "float32" and relm > 1e-5)
sys.exit(1 if bad else 0)
