package lora

/*
#include "shim.h"
*/
import "C"

import "unsafe"

// Tokenizer is a lora_tokenizer: a Hugging Face tokenizer.json
// (byte-level or SentencePiece-style BPE). Immutable: it may be used from
// several goroutines at once.
type Tokenizer struct {
	p *C.lora_tokenizer
}

// TokenizerInfo is lora_tokenizer_info's result.
type TokenizerInfo struct {
	VocabSize int
	BOS, EOS  int32 // -1 when unknown
}

// LoadTokenizer loads a tokenizer.json, or the one in a model directory.
func LoadTokenizer(path string) (*Tokenizer, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var t *C.lora_tokenizer
	var msg *C.char
	if err := check("lora_tokenizer_load", C.go_lora_tokenizer_load(cpath, &t, &msg), msg); err != nil {
		return nil, err
	}
	return track(&Tokenizer{p: t}), nil
}

// Close frees the tokenizer.
func (t *Tokenizer) Close() error {
	if t != nil && t.p != nil {
		untrack(t)
		C.lora_tokenizer_free(t.p)
		t.p = nil
	}
	return nil
}

func (t *Tokenizer) handle() *C.lora_tokenizer {
	if t == nil {
		return nil
	}
	return t.p
}

// Encode returns the token ids of UTF-8 text; addSpecial adds the
// post-processor's tokens (Llama's BOS).
func (t *Tokenizer) Encode(text string, addSpecial bool) ([]int32, error) {
	return t.EncodeBytes([]byte(text), addSpecial)
}

// EncodeBytes is Encode for UTF-8 bytes, read in place.
func (t *Tokenizer) EncodeBytes(text []byte, addSpecial bool) ([]int32, error) {
	ptr := (*C.char)(unsafe.Pointer(first(text)))
	var n C.size_t
	var msg *C.char
	st := C.go_lora_tokenizer_encode(t.handle(), ptr, C.size_t(len(text)), C.uint32_t(b2u(addSpecial)), nil, 0, &n, &msg)
	if st != C.LORA_ERR_BUFFER_SIZE {
		if err := check("lora_tokenizer_encode", st, msg); err != nil {
			return nil, err
		}
	} else if msg != nil {
		C.free(unsafe.Pointer(msg))
	}
	ids := make([]int32, int(n))
	st = C.go_lora_tokenizer_encode(t.handle(), ptr, C.size_t(len(text)), C.uint32_t(b2u(addSpecial)), (*C.int32_t)(first(ids)), C.size_t(len(ids)), &n, &msg)
	keepAlive(t)
	if err := check("lora_tokenizer_encode", st, msg); err != nil {
		return nil, err
	}
	return ids[:n], nil
}

// sized runs a "needed bytes" C call twice: to size the buffer, then to fill it.
func (t *Tokenizer) sized(name string, f func(p *C.lora_tokenizer, buf *C.char, len C.size_t, needed *C.size_t, msg **C.char) C.lora_status) (string, error) {
	var needed C.size_t
	var msg *C.char
	st := f(t.handle(), nil, 0, &needed, &msg)
	if st != C.LORA_ERR_BUFFER_SIZE {
		if err := check(name, st, msg); err != nil {
			return "", err
		}
	} else if msg != nil {
		C.free(unsafe.Pointer(msg))
	}
	b := make([]byte, int(needed)+1)
	st = f(t.handle(), (*C.char)(unsafe.Pointer(&b[0])), C.size_t(len(b)), &needed, &msg)
	keepAlive(t)
	if err := check(name, st, msg); err != nil {
		return "", err
	}
	return string(b[:needed]), nil
}

// Decode returns the text of ids (special tokens left out with skipSpecial).
func (t *Tokenizer) Decode(ids []int32, skipSpecial bool) (string, error) {
	return t.sized("lora_tokenizer_decode", func(p *C.lora_tokenizer, buf *C.char, n C.size_t, needed *C.size_t, msg **C.char) C.lora_status {
		return C.go_lora_tokenizer_decode(p, (*C.int32_t)(first(ids)), C.size_t(len(ids)), C.uint32_t(b2u(skipSpecial)), buf, n, needed, msg)
	})
}

// IDToToken returns the vocabulary string of id (not decoded: "Ġthe").
func (t *Tokenizer) IDToToken(id int32) (string, error) {
	return t.sized("lora_tokenizer_id_to_token", func(p *C.lora_tokenizer, buf *C.char, n C.size_t, needed *C.size_t, msg **C.char) C.lora_status {
		return C.go_lora_tokenizer_id_to_token(p, C.int32_t(id), buf, n, needed, msg)
	})
}

// TokenToID returns the id of a vocabulary string, or -1.
func (t *Tokenizer) TokenToID(token string) (int32, error) {
	ctok := C.CString(token)
	defer C.free(unsafe.Pointer(ctok))
	var id C.int32_t
	var msg *C.char
	st := C.go_lora_tokenizer_token_to_id(t.handle(), ctok, &id, &msg)
	keepAlive(t)
	return int32(id), check("lora_tokenizer_token_to_id", st, msg)
}

// IsSpecial tells whether id is a special added token (BOS, EOS, ...).
func (t *Tokenizer) IsSpecial(id int32) (bool, error) {
	var s C.uint32_t
	var msg *C.char
	st := C.go_lora_tokenizer_is_special(t.handle(), C.int32_t(id), &s, &msg)
	keepAlive(t)
	return s != 0, check("lora_tokenizer_is_special", st, msg)
}

// Info returns the vocabulary size and the BOS and EOS ids.
func (t *Tokenizer) Info() (TokenizerInfo, error) {
	var vocab C.size_t
	var bos, eos C.int32_t
	var msg *C.char
	st := C.go_lora_tokenizer_info(t.handle(), &vocab, &bos, &eos, &msg)
	keepAlive(t)
	return TokenizerInfo{int(vocab), int32(bos), int32(eos)}, check("lora_tokenizer_info", st, msg)
}
