/*
 * Tiny assertion helpers for the C API tests (tests/c/NAME.c), which use only
 * include/lora.h. Every failure prints file:line, the expression, the
 * status name (lora_status_str) and the thread's lora_last_error text.
 *
 * CHECK*   record a failure and go on (so one run reports every mismatch);
 * REQUIRE* print and exit(1) at once (when going on would be meaningless).
 * A program ends with `return check_exit_code();`.
 *
 * Set LORA_TEST_VERBOSE=1 to print every expected failure and its message.
 *
 * EXPECT_ERR(want, call) checks the status of a call that must fail and
 * that the call left a fresh, non-empty message for lora_last_error: before
 * the call it plants a known marker message (by making a call that is
 * rejected with a known text), and after it requires a different one.
 */
#ifndef LORA_TEST_CHECK_H
#define LORA_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora.h"

static inline int *check_failures_(void) {
    static int n;
    return &n;
}

/* The calling thread's last error, copied into a static buffer. */
static inline const char *check_last_error_(void) {
    static char buf[4096];
    buf[0] = '\0';
    lora_last_error(buf, sizeof buf);
    return buf;
}

static inline void check_fail_(const char *file, int line, const char *what) {
    fprintf(stderr, "%s:%d: CHECK failed: %s\n", file, line, what);
    ++*check_failures_();
}

static inline int check_exit_code(void) {
    int n = *check_failures_();
    if (n != 0) {
        fprintf(stderr, "%d check(s) failed\n", n);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}

/* The marker: lora_set_log_callback rejects this level with
 * LORA_ERR_INVALID_ARGUMENT and a message naming it. */
#define CHECK_MARKER_LEVEL 1234567
static inline char *check_marker_text_(void) {
    static char marker[512];
    return marker;
}
static inline void check_mark_(void) {
    (void)lora_set_log_callback(NULL, NULL, CHECK_MARKER_LEVEL);
    if (check_marker_text_()[0] == '\0') lora_last_error(check_marker_text_(), 512);
}

static inline int check_status_(const char *file, int line, const char *expr, lora_status got, lora_status want) {
    if (got == want) return 1;
    fprintf(stderr, "%s:%d: %s\n    returned %d (%s), expected %d (%s)\n    last error: %s\n", file, line, expr, (int)got,
            lora_status_str(got), (int)want, lora_status_str(want), check_last_error_());
    ++*check_failures_();
    return 0;
}

/* Status check for a call made after check_mark_(): on an expected failure
 * the message must be non-empty and not the marker. */
static inline int check_err_(const char *file, int line, const char *expr, lora_status got, lora_status want) {
    char msg[4096];
    size_t n;
    int ok = check_status_(file, line, expr, got, want);
    if (want == LORA_OK) return ok;
    msg[0] = '\0';
    n = lora_last_error(msg, sizeof msg);
    if (n == 0 || msg[0] == '\0') {
        fprintf(stderr, "%s:%d: %s\n    failed with %s but lora_last_error is empty\n", file, line, expr, lora_status_str(got));
        ++*check_failures_();
        return 0;
    }
    if (getenv("LORA_TEST_VERBOSE")) printf("%s:%d: %s -> %s: %s\n", file, line, expr, lora_status_str(got), msg);
    if (strcmp(msg, check_marker_text_()) == 0) {
        fprintf(stderr, "%s:%d: %s\n    failed with %s but did not set lora_last_error (still the marker)\n", file, line, expr,
                lora_status_str(got));
        ++*check_failures_();
        return 0;
    }
    return ok;
}

#define CHECK(cond)                                                   \
    do {                                                              \
        if (!(cond)) check_fail_(__FILE__, __LINE__, #cond);          \
    } while (0)

#define CHECKF(cond, ...)                                             \
    do {                                                              \
        if (!(cond)) {                                                \
            check_fail_(__FILE__, __LINE__, #cond);                   \
            fprintf(stderr, "    ");                                  \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, "\n");                                    \
        }                                                             \
    } while (0)

#define REQUIRE(cond)                                                 \
    do {                                                              \
        if (!(cond)) {                                                \
            check_fail_(__FILE__, __LINE__, #cond);                   \
            exit(check_exit_code());                                  \
        }                                                             \
    } while (0)

/* A call that must succeed. */
#define CHECK_OK(call) ((void)check_status_(__FILE__, __LINE__, #call, (call), LORA_OK))
#define REQUIRE_OK(call)                                                              \
    do {                                                                              \
        if (!check_status_(__FILE__, __LINE__, #call, (call), LORA_OK)) exit(check_exit_code()); \
    } while (0)

/* A call that must fail with `want` and set a fresh, non-empty message. */
#define EXPECT_ERR(want, call) \
    ((void)check_err_(__FILE__, __LINE__, #call, (check_mark_(), (call)), (want)))

#endif /* LORA_TEST_CHECK_H */
