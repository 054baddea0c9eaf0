package lora

import (
	"runtime"
	"sync/atomic"
)

// finalized counts handles freed by the safety net (for the tests).
var finalized atomic.Int64

// closer is every handle type: Close frees the C object and is idempotent.
type closer interface{ Close() error }

// track arms the finalizer safety net of a new handle: if it becomes
// unreachable without Close, the GC frees the C object.
func track[T closer](h T) T {
	runtime.SetFinalizer(h, func(h T) {
		finalized.Add(1)
		h.Close()
	})
	return h
}

// untrack disarms it when Close runs.
func untrack[T closer](h T) { runtime.SetFinalizer(h, nil) }

// keepAlive keeps a handle (and so its finalizer) alive until a C call
// that uses its pointer has returned.
func keepAlive(h any) { runtime.KeepAlive(h) }
