/*
 * Paged memory through the C API (lora_paged_*), using only lora.h, under
 * AddressSanitizer and UndefinedBehaviorSanitizer:
 *
 * - a round trip under a tiny budget (one chunk, 2 MiB) through the raw
 *   pointer: what is written is what is read, windows straddling chunks,
 *   a partial last chunk; the statistics show page-outs and page-ins and
 *   keep the budget; nothing is left in the backing directory;
 * - a buffer outliving its context;
 * - bad input: NULL pointers, zero bytes, sizes beyond the backing store,
 *   unusable directories, ranges past the end, wrong struct sizes; outputs
 *   are left unwritten on failure.
 *
 * Double free and use after free of a buffer are in double_free_noasan.c.
 *
 * Usage: paged [scratch-dir]   (a temporary directory is made in it)
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"

#define MIB ((size_t)1 << 20)
#define CHUNK ((size_t)LORA_PAGED_CHUNK_BYTES)

static char g_dir[1024];

static unsigned char pattern(unsigned seed, size_t i) {
    uint64_t x = (uint64_t)i * 0x9e3779b97f4a7c15ull ^ (uint64_t)seed * 0xbf58476d1ce4e5b9ull;
    return (unsigned char)((x >> 56) ^ (i & 0xff));
}

static size_t dir_entries(const char *path) {
    size_t n = 0;
    struct dirent *e;
    DIR *d = opendir(path);
    REQUIRE(d != NULL);
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) n++;
    closedir(d);
    return n;
}

static lora_paged_stats stats_of(const lora_paged *b) {
    lora_paged_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    CHECK_OK(lora_paged_get_stats(b, &s));
    return s;
}

static lora_context *new_ctx(void) {
    lora_context_params cp = lora_context_default_params();
    lora_context *ctx = NULL;
    cp.backend = LORA_BACKEND_CPU;
    cp.n_threads = 1;
    REQUIRE_OK(lora_context_new(&cp, &ctx));
    return ctx;
}

static void set_paging(lora_context *ctx, uint64_t budget, const char *dir) {
    lora_paging_params pp = lora_paging_default_params();
    pp.budget_bytes = budget;
    pp.dir = dir;
    REQUIRE_OK(lora_context_set_paging(ctx, &pp));
}

static void test_round_trip(void) {
    const size_t len = 9 * MIB + 12345, win = 777777;
    lora_context *ctx = new_ctx();
    lora_paged *buf = NULL;
    unsigned char *p = NULL;
    size_t size = 0, off, i, bad = 0;
    lora_paged_stats s, cs;

    set_paging(ctx, CHUNK, g_dir);
    REQUIRE_OK(lora_paged_alloc(ctx, len, &buf));
    REQUIRE(buf != NULL);
    CHECK(dir_entries(g_dir) == 0); /* unlinked at once */
    CHECK_OK(lora_paged_size(buf, &size));
    CHECK(size == len);
    REQUIRE_OK(lora_paged_ptr(buf, (void **)&p));
    REQUIRE(p != NULL);
    CHECK((uintptr_t)p % 4096 == 0);

    /* Zero at first. */
    for (i = 0; i < len; i += 4093) bad += p[i] != 0;
    CHECK(bad == 0);

    /* Write window by window: prefetch, write, and evict every other one. */
    for (off = 0; off < len; off += win) {
        size_t n = len - off < win ? len - off : win;
        CHECK_OK(lora_paged_prefetch(buf, off, n));
        for (i = 0; i < n; i++) p[off + i] = pattern(1, off + i);
        if ((off / win) % 2 == 1) CHECK_OK(lora_paged_evict(buf, off, n));
        s = stats_of(buf);
        CHECKF(s.bytes_resident <= 2 * CHUNK, "resident %llu over a %zu budget", (unsigned long long)s.bytes_resident, CHUNK);
    }
    /* Read back in other windows, from the end. */
    for (off = (len - 1) / MIB * MIB;; off -= MIB) {
        size_t n = len - off < MIB ? len - off : MIB;
        CHECK_OK(lora_paged_prefetch(buf, off, n));
        for (i = 0; i < n; i++) bad += p[off + i] != pattern(1, off + i);
        if (off == 0) break;
    }
    CHECKF(bad == 0, "%zu bytes differ", bad);

    s = stats_of(buf);
    CHECK(s.buffers == 1);
    CHECK(s.bytes_total == len);
    CHECK(s.bytes_resident + s.bytes_paged_out == s.bytes_total);
    CHECK(s.bytes_resident <= 2 * CHUNK);
    CHECK(s.page_outs > 0 && s.page_ins > s.page_outs);
    CHECK(s.bytes_paged_in_total >= s.page_ins * CHUNK / 2);
    CHECK(s.budget_bytes == CHUNK);
    CHECK(s.flags == 0); /* the scratch directory is on a disk */
    CHECKF(s.bytes_in_memory != LORA_PAGED_UNKNOWN && s.bytes_in_memory <= len / 2, "in memory: %llu", (unsigned long long)s.bytes_in_memory);

    /* The context's totals are this buffer's. */
    memset(&cs, 0, sizeof cs);
    cs.struct_size = sizeof cs;
    CHECK_OK(lora_context_paged_stats(ctx, &cs));
    CHECK(cs.buffers == 1 && cs.bytes_total == s.bytes_total && cs.page_ins == s.page_ins && cs.page_outs == s.page_outs);

    /* Evicting everything keeps the bytes. */
    CHECK_OK(lora_paged_evict(buf, 0, len));
    s = stats_of(buf);
    CHECK(s.bytes_resident == 0 && s.bytes_paged_out == len);
    for (i = 0; i < len; i++) bad += p[i] != pattern(1, i);
    CHECKF(bad == 0, "%zu bytes differ after evicting all", bad);

    /* Lowering the budget to zero (no limit) and back, with NULL defaults. */
    CHECK_OK(lora_context_set_paging(ctx, NULL));
    CHECK(stats_of(buf).budget_bytes == 0);

    lora_paged_free(buf);
    lora_paged_free(NULL);
    CHECK_OK(lora_context_paged_stats(ctx, &cs));
    CHECK(cs.buffers == 0 && cs.bytes_total == 0 && cs.page_outs == s.page_outs);
    CHECK(dir_entries(g_dir) == 0);
    lora_context_free(ctx);
}

/* A buffer keeps its context's pager alive. */
static void test_outlives_context(void) {
    lora_context *ctx = new_ctx();
    lora_paged *buf = NULL;
    float *f = NULL;
    size_t i, bad = 0;
    set_paging(ctx, CHUNK, g_dir);
    REQUIRE_OK(lora_paged_alloc(ctx, 3 * MIB, &buf));
    lora_context_free(ctx);
    REQUIRE_OK(lora_paged_ptr(buf, (void **)&f));
    for (i = 0; i < 3 * MIB / 4; i++) f[i] = (float)i * 0.5f;
    CHECK_OK(lora_paged_evict(buf, 0, 3 * MIB));
    CHECK_OK(lora_paged_prefetch(buf, 0, 3 * MIB));
    for (i = 0; i < 3 * MIB / 4; i++) bad += f[i] != (float)i * 0.5f;
    CHECK(bad == 0);
    lora_paged_free(buf);
}

static void test_bad_input(const char *scratch) {
    lora_context *ctx = new_ctx();
    lora_paged *const SENT = (lora_paged *)(uintptr_t)0x5e471e10;
    lora_paged *out = SENT, *buf = NULL;
    lora_paging_params pp = lora_paging_default_params();
    lora_paged_stats s;
    char file[1100], missing[1100];
    void *ptr = (void *)(uintptr_t)0x1234;
    size_t size = 777;
    FILE *f;

    set_paging(ctx, 4 * CHUNK, g_dir);

    /* lora_paged_alloc */
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_alloc(NULL, 4096, &out));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_alloc(ctx, 4096, NULL));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_paged_alloc(ctx, 0, &out));
    EXPECT_ERR(LORA_ERR_OUT_OF_MEMORY, lora_paged_alloc(ctx, (size_t)1 << 46, &out)); /* 64 TiB: more than the disk */
    EXPECT_ERR(LORA_ERR_OUT_OF_MEMORY, lora_paged_alloc(ctx, SIZE_MAX / 2, &out));
    EXPECT_ERR(LORA_ERR_OUT_OF_MEMORY, lora_paged_alloc(ctx, SIZE_MAX, &out));
    CHECK(out == SENT);
    CHECK(dir_entries(g_dir) == 0);

    /* lora_context_set_paging: unusable directories; nothing changes. */
    snprintf(file, sizeof file, "%s/a-file", scratch);
    snprintf(missing, sizeof missing, "%s/missing/dir", scratch);
    f = fopen(file, "w");
    REQUIRE(f != NULL);
    fputs("x", f);
    fclose(f);
    pp.budget_bytes = 1;
    pp.dir = missing;
    EXPECT_ERR(LORA_ERR_IO, lora_context_set_paging(ctx, &pp));
    pp.dir = file;
    EXPECT_ERR(LORA_ERR_IO, lora_context_set_paging(ctx, &pp));
    pp.dir = "/proc/self"; /* no file can be made there, even by root */
    EXPECT_ERR(LORA_ERR_IO, lora_context_set_paging(ctx, &pp));
    pp.dir = "";
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_context_set_paging(ctx, &pp));
    if (geteuid() != 0) {
        char ro[1100];
        snprintf(ro, sizeof ro, "%s/read-only", scratch);
        REQUIRE(mkdir(ro, 0555) == 0);
        pp.dir = ro;
        EXPECT_ERR(LORA_ERR_IO, lora_context_set_paging(ctx, &pp));
        rmdir(ro);
    }
    pp.dir = g_dir;
    pp.struct_size = 3;
    EXPECT_ERR(LORA_ERR_STRUCT_SIZE, lora_context_set_paging(ctx, &pp));
    pp.struct_size = sizeof pp + 8;
    EXPECT_ERR(LORA_ERR_STRUCT_SIZE, lora_context_set_paging(ctx, &pp));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_set_paging(NULL, NULL));
    remove(file);
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    CHECK_OK(lora_context_paged_stats(ctx, &s));
    CHECK(s.budget_bytes == 4 * CHUNK); /* unchanged by the failures */

    /* A directory removed after it was set. */
    {
        char gone[1100];
        snprintf(gone, sizeof gone, "%s/gone", scratch);
        REQUIRE(mkdir(gone, 0700) == 0);
        set_paging(ctx, 0, gone);
        REQUIRE(rmdir(gone) == 0);
        EXPECT_ERR(LORA_ERR_IO, lora_paged_alloc(ctx, 4096, &out));
        CHECK(out == SENT);
        set_paging(ctx, 4 * CHUNK, g_dir);
    }

    /* Accessors, prefetch and evict on a live buffer. */
    REQUIRE_OK(lora_paged_alloc(ctx, 10000, &buf));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_ptr(NULL, &ptr));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_ptr(buf, NULL));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_size(NULL, &size));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_size(buf, NULL));
    CHECK(ptr == (void *)(uintptr_t)0x1234 && size == 777);
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_prefetch(NULL, 0, 1));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_paged_prefetch(buf, 0, 10001));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_paged_prefetch(buf, 10000, 1));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_paged_prefetch(buf, 5, SIZE_MAX)); /* offset + bytes overflows */
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_evict(NULL, 0, 1));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_paged_evict(buf, SIZE_MAX, 2));
    CHECK_OK(lora_paged_prefetch(buf, 10000, 0)); /* empty range at the end: nothing */
    CHECK_OK(lora_paged_evict(buf, 0, 0));
    CHECK_OK(lora_paged_prefetch(buf, 0, 10000));
    CHECK_OK(lora_paged_evict(buf, 9999, 1));

    /* Statistics need the caller's struct size. */
    memset(&s, 0xA5, sizeof s);
    s.struct_size = 0;
    EXPECT_ERR(LORA_ERR_STRUCT_SIZE, lora_paged_get_stats(buf, &s));
    s.struct_size = sizeof s - 8;
    EXPECT_ERR(LORA_ERR_STRUCT_SIZE, lora_context_paged_stats(ctx, &s));
    CHECK(s.buffers == 0xA5A5A5A5A5A5A5A5ull); /* not written */
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_get_stats(buf, NULL));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_paged_get_stats(NULL, &s));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_context_paged_stats(NULL, &s));

    lora_paged_free(buf);
    CHECK(dir_entries(g_dir) == 0);
    lora_context_free(ctx);
}

int main(int argc, char **argv) {
    const char *scratch = argc > 1 ? argv[1] : ".";
    snprintf(g_dir, sizeof g_dir, "%s/paged-XXXXXX", scratch);
    REQUIRE(mkdtemp(g_dir) != NULL);

    test_round_trip();
    test_outlives_context();
    test_bad_input(scratch);

    CHECK(dir_entries(g_dir) == 0);
    CHECK(rmdir(g_dir) == 0);
    return check_exit_code();
}
