/*
 * C API basics: version, status names, the thread-local last error, the
 * log callback, contexts (defaults, CPU, CUDA where absent, bad params).
 * Uses only include/lora.h (plus POSIX threads to check that the last
 * error is per thread).
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "check.h"

static void test_version(void) {
    char want[64];
    const char *s = lora_version_string();
    CHECK(lora_version() >> 16 == LORA_VERSION_MAJOR);
    CHECK(lora_version() == LORA_VERSION);
    CHECK(((lora_version() >> 8) & 0xFF) == LORA_VERSION_MINOR);
    CHECK((lora_version() & 0xFF) == LORA_VERSION_PATCH);
    REQUIRE(s != NULL);
    snprintf(want, sizeof want, "%d.%d.%d", LORA_VERSION_MAJOR, LORA_VERSION_MINOR, LORA_VERSION_PATCH);
    CHECKF(strcmp(s, want) == 0, "lora_version_string() = \"%s\", header says %s", s, want);
    CHECK(lora_version_string() == s); /* static */
}

static void test_status_str(void) {
    /* Every status the header defines: distinct, non-empty names. */
    static const lora_status defined[] = {
        LORA_OK,
        LORA_ERR_NULL_POINTER,
        LORA_ERR_INVALID_ARGUMENT,
        LORA_ERR_INVALID_SHAPE,
        LORA_ERR_INVALID_BLOCKSIZE,
        LORA_ERR_BUFFER_SIZE,
        LORA_ERR_UNKNOWN_DTYPE,
        LORA_ERR_NON_FINITE,
        LORA_ERR_IO,
        LORA_ERR_FILE_FORMAT,
        LORA_ERR_TENSOR_NOT_FOUND,
        LORA_ERR_DTYPE_MISMATCH,
        LORA_ERR_SHAPE_MISMATCH,
        LORA_ERR_CUDA_UNAVAILABLE,
        LORA_ERR_CUDA,
        LORA_ERR_OUT_OF_MEMORY,
        LORA_ERR_UNSUPPORTED,
        LORA_ERR_STRUCT_SIZE,
        LORA_ERR_PANIC,
        LORA_ERR_INTERNAL,
        LORA_ERR_INVALID_STATE,
        LORA_ERR_CANCELLED,
        LORA_ERR_DEVICE_MEMORY_EXCEEDED,
    };
    static const lora_status unknown[] = {23, 24, 100, -1, INT32_MIN, INT32_MAX};
    const size_t n = sizeof defined / sizeof defined[0];
    const char *unk = lora_status_str(-1);
    size_t i, j;
    REQUIRE(unk != NULL);
    CHECKF(strcmp(unk, "unknown status") == 0, "lora_status_str(-1) = \"%s\"", unk);
    /* Values are explicit and never renumbered: 0..22 in header order. */
    for (i = 0; i < n; i++) CHECKF(defined[i] == (lora_status)i, "status #%zu has value %d", i, (int)defined[i]);
    for (i = 0; i < n; i++) {
        const char *s = lora_status_str(defined[i]);
        REQUIRE(s != NULL);
        CHECKF(s[0] != '\0', "status %d has an empty name", (int)defined[i]);
        CHECKF(strcmp(s, unk) != 0, "defined status %d is named \"%s\"", (int)defined[i], s);
        CHECK(lora_status_str(defined[i]) == s); /* static */
        for (j = 0; j < i; j++)
            CHECKF(strcmp(s, lora_status_str(defined[j])) != 0, "statuses %d and %d share the name \"%s\"", (int)defined[i],
                   (int)defined[j], s);
    }
    CHECK(strcmp(lora_status_str(LORA_OK), "ok") == 0);
    for (i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        const char *s = lora_status_str(unknown[i]);
        REQUIRE(s != NULL);
        CHECKF(strcmp(s, "unknown status") == 0, "lora_status_str(%d) = \"%s\"", (int)unknown[i], s);
    }
}

static void *other_thread(void *arg) {
    size_t *len = arg;
    /* A fresh thread has no error yet... */
    len[0] = lora_last_error(NULL, 0);
    /* ...and its failures stay its own. */
    (void)lora_context_backend(NULL, NULL);
    len[1] = lora_last_error(NULL, 0);
    return NULL;
}

static void test_last_error(void) {
    char full[1024], small[8], one[1];
    size_t n, m, i;
    pthread_t th;
    size_t other[2] = {0, 0};

    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_new(NULL, NULL));
    n = lora_last_error(NULL, 0);
    CHECK(n > 0);
    CHECK(lora_last_error(NULL, 12345) == n); /* NULL buf, any len */
    memset(full, 'X', sizeof full);
    m = lora_last_error(full, sizeof full);
    CHECK(m == n);
    REQUIRE(n < sizeof full);
    CHECK(full[n] == '\0');
    CHECK(strlen(full) == n);
    CHECKF(strstr(full, "out") != NULL, "message \"%s\" does not name the NULL argument 'out'", full);

    /* Truncation: NUL-terminated, nothing written past len. */
    memset(small, 'X', sizeof small);
    m = lora_last_error(small, 5);
    CHECK(m == n);
    CHECK(small[4] == '\0');
    CHECK(memcmp(small, full, 4) == 0);
    for (i = 5; i < sizeof small; i++) CHECK(small[i] == 'X');
    one[0] = 'X';
    CHECK(lora_last_error(one, 1) == n);
    CHECK(one[0] == '\0');
    one[0] = 'X';
    CHECK(lora_last_error(one, 0) == n); /* len 0: nothing written */
    CHECK(one[0] == 'X');
    /* Exactly n+1 bytes: the whole message. */
    {
        char *exact = malloc(n + 1);
        REQUIRE(exact != NULL);
        CHECK(lora_last_error(exact, n + 1) == n);
        CHECK(memcmp(exact, full, n + 1) == 0);
        /* n bytes: one character short. */
        CHECK(lora_last_error(exact, n) == n);
        CHECK(exact[n - 1] == '\0' && memcmp(exact, full, n - 1) == 0);
        free(exact);
    }

    /* Successful calls do not clear it. */
    CHECK_OK(lora_set_log_callback(NULL, NULL, LORA_LOG_ERROR));
    {
        char again[1024];
        lora_last_error(again, sizeof again);
        CHECK(strcmp(again, full) == 0);
    }

    /* Per thread. */
    REQUIRE(pthread_create(&th, NULL, other_thread, other) == 0);
    REQUIRE(pthread_join(th, NULL) == 0);
    CHECKF(other[0] == 0, "a new thread's last error has length %zu", other[0]);
    CHECK(other[1] > 0);
    {
        char again[1024];
        lora_last_error(again, sizeof again);
        CHECKF(strcmp(again, full) == 0, "another thread's failure changed this thread's message to \"%s\"", again);
    }
}

typedef struct {
    atomic_int calls;
    atomic_int limit;       /* the max_level installed */
    atomic_int above_limit; /* messages delivered above it */
    atomic_int bad_level;
    atomic_int null_message;
    atomic_int wrong_user;
} log_state;

static log_state g_log;

static void log_cb(lora_log_level level, const char *message, void *user) {
    atomic_fetch_add(&g_log.calls, 1);
    if (level < LORA_LOG_ERROR || level > LORA_LOG_DEBUG) atomic_fetch_add(&g_log.bad_level, 1);
    if (level > atomic_load(&g_log.limit)) atomic_fetch_add(&g_log.above_limit, 1);
    if (message == NULL) atomic_fetch_add(&g_log.null_message, 1);
    else (void)strlen(message); /* must be a readable NUL-terminated string */
    if (user != &g_log) atomic_fetch_add(&g_log.wrong_user, 1);
}

static void test_log(void) {
    lora_context *ctx = NULL;
    lora_context_params p = lora_context_default_params();
    int before;

    atomic_store(&g_log.limit, LORA_LOG_DEBUG);
    CHECK_OK(lora_set_log_callback(log_cb, &g_log, LORA_LOG_DEBUG));
    /* A failure is logged at DEBUG; making a context logs at INFO. */
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_backend(NULL, NULL));
    p.backend = LORA_BACKEND_CPU;
    p.n_threads = 1;
    CHECK_OK(lora_context_new(&p, &ctx));
    lora_context_free(ctx);
    CHECKF(atomic_load(&g_log.calls) > 0, "no log message at LORA_LOG_DEBUG");
    CHECK(atomic_load(&g_log.bad_level) == 0);
    CHECK(atomic_load(&g_log.null_message) == 0);
    CHECK(atomic_load(&g_log.wrong_user) == 0);

    /* Invalid levels are rejected (and install nothing). */
    CHECK_OK(lora_set_log_callback(NULL, NULL, LORA_LOG_DEBUG));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_set_log_callback(log_cb, &g_log, LORA_LOG_DEBUG + 1));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_set_log_callback(log_cb, &g_log, -1));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_set_log_callback(NULL, NULL, 1000));

    /* Removed: no more calls. */
    before = atomic_load(&g_log.calls);
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_backend(NULL, NULL));
    CHECK_OK(lora_context_new(&p, &ctx));
    lora_context_free(ctx);
    CHECKF(atomic_load(&g_log.calls) == before, "callback called %d times after removal", atomic_load(&g_log.calls) - before);

    /* At ERROR level, only ERROR messages arrive (the same calls that
     * logged at DEBUG/INFO above). */
    atomic_store(&g_log.limit, LORA_LOG_ERROR);
    CHECK_OK(lora_set_log_callback(log_cb, &g_log, LORA_LOG_ERROR));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_backend(NULL, NULL));
    CHECK_OK(lora_context_new(&p, &ctx));
    lora_context_free(ctx);
    CHECKF(atomic_load(&g_log.above_limit) == 0, "%d messages above LORA_LOG_ERROR delivered", atomic_load(&g_log.above_limit));
    CHECK_OK(lora_set_log_callback(NULL, NULL, LORA_LOG_ERROR));
}

static void check_describe(const lora_context *ctx, const char *must_contain) {
    char buf[256], tiny[4];
    size_t needed = 0, needed2 = 0;
    CHECK_OK(lora_context_describe(ctx, buf, sizeof buf, &needed));
    CHECK(needed == strlen(buf));
    CHECK(needed > 0);
    if (must_contain) CHECKF(strstr(buf, must_contain) != NULL, "describe = \"%s\", expected it to contain \"%s\"", buf, must_contain);
    CHECK_OK(lora_context_describe(ctx, NULL, 0, &needed2));
    CHECK(needed2 == needed);
    CHECK_OK(lora_context_describe(ctx, NULL, 0, NULL));
    memset(tiny, 'X', sizeof tiny);
    CHECK_OK(lora_context_describe(ctx, tiny, 3, &needed2));
    CHECK(needed2 == needed);
    CHECK(tiny[2] == '\0' && tiny[3] == 'X' && memcmp(tiny, buf, 2) == 0);
}

static void test_context(void) {
    lora_context *ctx = NULL;
    lora_context_params p = lora_context_default_params();
    lora_backend b = 0xdead;

    /* Defaults. */
    CHECK(p.struct_size == sizeof(lora_context_params));
    CHECK(p.backend == LORA_BACKEND_AUTO);
    CHECK(p.n_threads == 0);
    CHECK(p.device_index == 0);
    CHECK(p.seed == 0);

    /* NULL params = defaults (AUTO: CUDA when present, else the CPU). */
    REQUIRE_OK(lora_context_new(NULL, &ctx));
    REQUIRE(ctx != NULL);
    CHECK_OK(lora_context_backend(ctx, &b));
    CHECKF(b == LORA_BACKEND_CPU || b == LORA_BACKEND_CUDA, "backend %u", (unsigned)b);
    check_describe(ctx, NULL);
    lora_context_free(ctx);

    /* Explicit default params. */
    ctx = NULL;
    REQUIRE_OK(lora_context_new(&p, &ctx));
    lora_context_free(ctx);

    /* CPU, one thread. */
    p.backend = LORA_BACKEND_CPU;
    p.n_threads = 1;
    p.seed = 42;
    ctx = NULL;
    REQUIRE_OK(lora_context_new(&p, &ctx));
    b = 0xdead;
    CHECK_OK(lora_context_backend(ctx, &b));
    CHECK(b == LORA_BACKEND_CPU);
    check_describe(ctx, "cpu");
    check_describe(ctx, "1");
    /* NULL out pointers. */
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_backend(ctx, NULL));
    b = 0xdead;
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_backend(NULL, &b));
    CHECK(b == 0xdead);
    {
        char buf[16] = "untouched";
        size_t needed = 777;
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_describe(NULL, buf, sizeof buf, &needed));
        CHECK(needed == 777 && strcmp(buf, "untouched") == 0);
    }
    lora_context_free(ctx);

    /* CUDA: LORA_ERR_CUDA_UNAVAILABLE on a machine without a usable GPU,
     * and *out is not written. (Where a GPU works, it must succeed and
     * report the CUDA backend.) */
    {
        lora_context *const sentinel = (lora_context *)(uintptr_t)0x5e471e1;
        lora_context_params c = lora_context_default_params();
        lora_status st;
        c.backend = LORA_BACKEND_CUDA;
        ctx = sentinel;
        check_mark_();
        st = lora_context_new(&c, &ctx);
        if (st == LORA_OK) {
            printf("note: a CUDA device is usable here; checking the CUDA backend instead of CUDA_UNAVAILABLE\n");
            CHECK(ctx != sentinel && ctx != NULL);
            b = 0xdead;
            CHECK_OK(lora_context_backend(ctx, &b));
            CHECK(b == LORA_BACKEND_CUDA);
            check_describe(ctx, "cuda");
            lora_context_free(ctx);
        } else {
            (void)check_err_(__FILE__, __LINE__, "lora_context_new(CUDA)", st, LORA_ERR_CUDA_UNAVAILABLE);
            CHECK(ctx == sentinel);
        }
        /* No device 4095 anywhere. */
        c.device_index = 4095;
        ctx = sentinel;
        EXPECT_ERR(LORA_ERR_CUDA_UNAVAILABLE, lora_context_new(&c, &ctx));
        CHECK(ctx == sentinel);
        /* AUTO with no such device falls back to the CPU. */
        c.backend = LORA_BACKEND_AUTO;
        ctx = NULL;
        CHECK_OK(lora_context_new(&c, &ctx));
        if (ctx) {
            b = 0xdead;
            CHECK_OK(lora_context_backend(ctx, &b));
            CHECK(b == LORA_BACKEND_CPU);
            lora_context_free(ctx);
        }
    }

    /* Unknown backend values. */
    {
        lora_context *const sentinel = (lora_context *)(uintptr_t)0x5e471e1;
        lora_context_params c = lora_context_default_params();
        static const lora_backend bad[] = {3, 4, 1000, 0xFFFFFFFFu};
        size_t i;
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            c.backend = bad[i];
            ctx = sentinel;
            EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_context_new(&c, &ctx));
            CHECK(ctx == sentinel);
        }
    }

    /* struct_size: 0, too small, too large. */
    {
        lora_context *const sentinel = (lora_context *)(uintptr_t)0x5e471e1;
        lora_context_params c = lora_context_default_params();
        static const uint32_t bad[] = {0, 4, (uint32_t)sizeof(lora_context_params) - 4, (uint32_t)sizeof(lora_context_params) + 8,
                                       0xFFFFFFFFu};
        size_t i;
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            c.struct_size = bad[i];
            ctx = sentinel;
            EXPECT_ERR(LORA_ERR_STRUCT_SIZE, lora_context_new(&c, &ctx));
            CHECK(ctx == sentinel);
        }
    }

    /* NULL out. */
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_new(NULL, NULL));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_new(&p, NULL));

    /* Free(NULL) is a no-op. */
    lora_context_free(NULL);
}

static void test_nf4_defaults(void) {
    lora_nf4_params p = lora_nf4_default_params();
    CHECK(p.struct_size == sizeof(lora_nf4_params));
    CHECK(p.blocksize == 64);
    CHECK(p.double_quant == 1);
    lora_nf4_free(NULL);
}

int main(void) {
    test_version();
    test_status_str();
    test_last_error();
    test_log();
    test_context();
    test_nf4_defaults();
    return check_exit_code();
}
