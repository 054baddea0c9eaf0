/*
 * Proves that the harness catches what it claims to: built with the same
 * flags and run with the same ASAN_OPTIONS / UBSAN_OPTIONS as the real C
 * tests, each mode below except "ok" must make the run fail with the named
 * sanitizer report. If a flag or an option stops working (a sanitizer
 * silently disabled, reports that do not change the exit status, leak
 * checking off), the driver's canary test fails.
 *
 * It also links the library and calls into it, so the checks hold for
 * programs that load liblora (whose Rust code is not instrumented but whose
 * allocations go through the sanitizer's malloc).
 *
 * Usage: sanitizer_canary ok|heap-overflow|use-after-free|signed-overflow|misaligned|leak
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora.h"

static volatile int sink;

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "ok";
    lora_context *ctx = NULL;
    lora_context_params p = lora_context_default_params();
    p.backend = LORA_BACKEND_CPU;
    if (lora_context_new(&p, &ctx) != LORA_OK) {
        fprintf(stderr, "lora_context_new failed\n");
        return 3;
    }
    lora_context_free(ctx);

    if (strcmp(mode, "ok") == 0) {
        printf("canary ok\n");
    } else if (strcmp(mode, "heap-overflow") == 0) {
        volatile int i = 16;
        char *volatile b = malloc(16); /* volatile: hides the size from UBSan's object-size check, so ASan reports it */
        if (!b) return 3;
        memset(b, 0, 16);
        sink = b[i]; /* one past the end */
        free(b);
    } else if (strcmp(mode, "use-after-free") == 0) {
        char *volatile b = malloc(16);
        if (!b) return 3;
        b[0] = 1;
        free(b);
        sink = b[0];
    } else if (strcmp(mode, "signed-overflow") == 0) {
        volatile int x = INT32_MAX;
        sink = x + 1; /* UBSan: signed integer overflow */
    } else if (strcmp(mode, "misaligned") == 0) {
        uint64_t buf[2] = {0, 0};
        volatile uintptr_t addr = (uintptr_t)buf + 1;
        sink = (int)*(const uint32_t *)addr; /* UBSan: misaligned load */
    } else if (strcmp(mode, "leak") == 0) {
        char *volatile b = malloc(1234);
        if (!b) return 3;
        b[0] = 1;
        b = NULL; /* LeakSanitizer at exit */
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    return 0;
}
