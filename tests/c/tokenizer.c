/*
 * C API of the tokenizer: load, encode, decode, info, token <-> id, size
 * queries, bad input, and concurrent encoding on one handle. Uses only
 * include/lora.h (plus POSIX threads and directories).
 *
 * Usage: tokenizer FIXTURES_DIR SCRATCH_DIR
 *   FIXTURES_DIR = tests/fixtures/tokenizer (made by
 *   scripts/fixtures/gen_tokenizer.py with the `tokenizers` library); the
 *   expected ids below are copied from those fixtures' cases.json.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

static char g_fixtures[2048];
static char g_dir[2048];

static lora_tokenizer *load(const char *name) {
    char path[4096];
    lora_tokenizer *t = NULL;
    snprintf(path, sizeof path, "%s/%s", g_fixtures, name);
    REQUIRE_OK(lora_tokenizer_load(path, &t));
    REQUIRE(t != NULL);
    return t;
}

static int same_ids(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

static void print_ids(const char *what, const int32_t *ids, size_t n) {
    size_t i;
    fprintf(stderr, "    %s:", what);
    for (i = 0; i < n; i++) fprintf(stderr, " %d", (int)ids[i]);
    fprintf(stderr, "\n");
}

/* Encodes with the size query first; returns the count. */
static size_t encode(const lora_tokenizer *t, const char *text, uint32_t add_special, int32_t *ids, size_t cap) {
    size_t n = 12345;
    lora_status st = lora_tokenizer_encode(t, text, strlen(text), add_special, NULL, 0, &n);
    if (n == 0) {
        CHECK(st == LORA_OK);
        return 0;
    }
    CHECK(st == LORA_ERR_BUFFER_SIZE);
    REQUIRE(n <= cap);
    {
        size_t n2 = 0;
        CHECK_OK(lora_tokenizer_encode(t, text, strlen(text), add_special, ids, n, &n2));
        CHECK(n2 == n);
    }
    return n;
}

static void check_encode(const lora_tokenizer *t, const char *text, uint32_t add_special, const int32_t *want, size_t nwant) {
    int32_t ids[256];
    size_t n = encode(t, text, add_special, ids, 256);
    if (!same_ids(ids, n, want, nwant)) {
        CHECKF(0, "encode(\"%s\", add_special=%u) differs from `tokenizers`", text, (unsigned)add_special);
        print_ids("got ", ids, n);
        print_ids("want", want, nwant);
    }
}

static void check_decode(const lora_tokenizer *t, const int32_t *ids, size_t n, uint32_t skip, const char *want, size_t want_len) {
    char buf[1024];
    size_t needed = 0;
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_tokenizer_decode(t, ids, n, skip, NULL, 0, &needed));
    CHECKF(needed == want_len, "decode needs %zu bytes, want %zu", needed, want_len);
    REQUIRE(needed < sizeof buf);
    /* Exactly the length: no room for the NUL, nothing written. */
    memset(buf, 'Z', sizeof buf);
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_tokenizer_decode(t, ids, n, skip, buf, needed, &needed));
    CHECK(buf[0] == 'Z');
    CHECK_OK(lora_tokenizer_decode(t, ids, n, skip, buf, needed + 1, &needed));
    CHECKF(needed == want_len && memcmp(buf, want, want_len) == 0 && buf[needed] == '\0', "decode gave \"%s\", want \"%s\"", buf, want);
}

static void test_llama2(void) {
    /* cases.json of llama2: "Hello <s> world </s> end". */
    static const int32_t with_bos[] = {1, 408, 344, 1, 344, 395, 344, 2, 344, 344, 314, 356};
    const char *text = "Hello <s> world </s> end";
    lora_tokenizer *t = load("llama2");
    size_t vocab = 0;
    int32_t bos = 0, eos = 0, id = 0;
    uint32_t special = 9;
    char tokbuf[64];
    size_t needed = 0;
    check_encode(t, text, 1, with_bos, 12);
    check_encode(t, text, 0, with_bos + 1, 11);
    check_decode(t, with_bos, 12, 0, "<s> Hello <s>  world </s>  end", 30);
    check_decode(t, with_bos, 12, 1, "Hello   world   end", 19);
    /* Byte fallback: <0xE6><0x97><0xA5> is "日"; cut after two bytes, each
     * byte left becomes U+FFFD (ByteFallback's rule). */
    {
        static const int32_t bytes3[] = {3 + 0xE6, 3 + 0x97, 3 + 0xA5};
        check_decode(t, bytes3, 3, 0, "\xE6\x97\xA5", 3);
        check_decode(t, bytes3, 2, 0, "\xEF\xBF\xBD\xEF\xBF\xBD", 6);
    }
    CHECK_OK(lora_tokenizer_info(t, &vocab, &bos, &eos));
    CHECKF(vocab == 745 && bos == 1 && eos == 2, "info: vocab %zu bos %d eos %d", vocab, (int)bos, (int)eos);
    CHECK_OK(lora_tokenizer_info(t, NULL, NULL, NULL));
    CHECK_OK(lora_tokenizer_token_to_id(t, "</s>", &id));
    CHECK(id == 2);
    CHECK_OK(lora_tokenizer_token_to_id(t, "no such token", &id));
    CHECK(id == -1);
    CHECK_OK(lora_tokenizer_id_to_token(t, 3 + 0x0A, tokbuf, sizeof tokbuf, &needed));
    CHECK(needed == 6 && strcmp(tokbuf, "<0x0A>") == 0);
    CHECK_OK(lora_tokenizer_is_special(t, 1, &special));
    CHECK(special == 1);
    CHECK_OK(lora_tokenizer_is_special(t, 408, &special));
    CHECK(special == 0);
    CHECK_OK(lora_tokenizer_is_special(t, -5, &special));
    CHECK(special == 0);
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_tokenizer_id_to_token(t, 100000, tokbuf, sizeof tokbuf, &needed));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_tokenizer_id_to_token(t, -1, tokbuf, sizeof tokbuf, &needed));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_tokenizer_id_to_token(t, 408, tokbuf, 2, &needed));
    CHECK(needed > 0);
    lora_tokenizer_free(t);
}

static void test_qwen2(void) {
    /* cases.json of qwen2: a chat turn; the ByteLevel post-processor adds
     * nothing, so both encodings are equal. */
    static const int32_t want[] = {657, 84, 380, 81, 198, 316, 0, 658, 198, 657, 64, 82, 82, 455, 83, 64, 77, 83, 198};
    const char *text = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n";
    lora_tokenizer *t = load("qwen2/tokenizer.json");
    size_t vocab = 0;
    int32_t bos = 0, eos = 0;
    check_encode(t, text, 1, want, 19);
    check_encode(t, text, 0, want, 19);
    check_decode(t, want, 19, 0, text, strlen(text));
    check_decode(t, want, 19, 1, "user\nHello!\nassistant\n", 22);
    CHECK_OK(lora_tokenizer_info(t, &vocab, &bos, &eos));
    CHECKF(vocab == 660 && bos == 656 && eos == 658, "info: vocab %zu bos %d eos %d", vocab, (int)bos, (int)eos);
    lora_tokenizer_free(t);
}

static void test_bytes(void) {
    const char *text = "h\xC3\xA9llo \xF0\x9F\xA4\x97\n";
    lora_tokenizer *t = load("bytes");
    int32_t ids[64];
    size_t n, i, vocab = 0;
    int32_t bos = 0, eos = 0;
    n = encode(t, text, 1, ids, 64);
    CHECK(n == strlen(text));
    for (i = 0; i < n && i < strlen(text); i++) CHECKF(ids[i] == (unsigned char)text[i], "ids[%zu] = %d", i, (int)ids[i]);
    check_decode(t, ids, n, 0, text, strlen(text));
    /* A cut emoji: one U+FFFD for the invalid sequence (from_utf8_lossy). */
    check_decode(t, ids + 7, 3, 0, "\xEF\xBF\xBD", 3);
    {
        /* An embedded NUL: its length is in *needed. */
        static const int32_t nul[] = {0x41, 0x00, 0x42};
        check_decode(t, nul, 3, 0, "A\0B", 3);
    }
    /* Empty text and empty id lists. */
    n = 99;
    CHECK_OK(lora_tokenizer_encode(t, NULL, 0, 1, NULL, 0, &n));
    CHECK(n == 0);
    check_decode(t, NULL, 0, 0, "", 0);
    CHECK_OK(lora_tokenizer_info(t, &vocab, &bos, &eos));
    CHECKF(vocab == 256 && bos == -1 && eos == -1, "info: vocab %zu bos %d eos %d", vocab, (int)bos, (int)eos);
    lora_tokenizer_free(t);
}

static void test_bad_input(void) {
    lora_tokenizer *t = load("llama2");
    lora_tokenizer *none = NULL;
    int32_t ids[8] = {0};
    size_t n = 0;
    char path[4096];
    FILE *f;
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_load(NULL, &none));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_load(g_fixtures, NULL));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_tokenizer_load("", &none));
    EXPECT_ERR(LORA_ERR_IO, lora_tokenizer_load("/nonexistent/tokenizer.json", &none));
    EXPECT_ERR(LORA_ERR_IO, lora_tokenizer_load(g_fixtures, &none)); /* no tokenizer.json there */
    CHECK(none == NULL);
    /* A Unigram model: refused by name, nothing returned. */
    snprintf(path, sizeof path, "%s/unigram.json", g_dir);
    f = fopen(path, "w");
    REQUIRE(f != NULL);
    fputs("{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]], \"unk_id\": 0}}", f);
    fclose(f);
    EXPECT_ERR(LORA_ERR_UNSUPPORTED, lora_tokenizer_load(path, &none));
    CHECK(none == NULL);
    CHECK(strstr(check_last_error_(), "Unigram") != NULL);
    f = fopen(path, "w");
    REQUIRE(f != NULL);
    fputs("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a a\"]}}", f);
    fclose(f);
    EXPECT_ERR(LORA_ERR_FILE_FORMAT, lora_tokenizer_load(path, &none));
    CHECK(none == NULL);
    remove(path);

    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_encode(NULL, "a", 1, 0, ids, 8, &n));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_encode(t, "a", 1, 0, ids, 8, NULL));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_encode(t, NULL, 1, 0, ids, 8, &n));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_encode(t, "abc", 3, 0, NULL, 8, &n));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_tokenizer_encode(t, "ab\xC3(", 4, 0, ids, 8, &n));
    CHECK(strstr(check_last_error_(), "byte 2") != NULL);
    /* Too small a buffer: the count comes back, the buffer is untouched. */
    ids[0] = -7;
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_tokenizer_encode(t, "Hello world", 11, 1, ids, 1, &n));
    CHECK(n > 1 && ids[0] == -7);
    /* len counts bytes: text need not be NUL-terminated. */
    {
        int32_t a[16], b[16];
        size_t na = 0, nb = 0;
        CHECK_OK(lora_tokenizer_encode(t, "Hello worldXXXX", 11, 1, a, 16, &na));
        CHECK_OK(lora_tokenizer_encode(t, "Hello world", 11, 1, b, 16, &nb));
        CHECK(same_ids(a, na, b, nb));
    }
    {
        static const int32_t neg[] = {5, -1};
        char buf[16];
        size_t needed = 0;
        EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_tokenizer_decode(t, neg, 2, 0, buf, sizeof buf, &needed));
        CHECK(strstr(check_last_error_(), "ids[1]") != NULL);
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_decode(t, NULL, 2, 0, buf, sizeof buf, &needed));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_decode(t, neg, 1, 0, buf, sizeof buf, NULL));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_decode(t, neg, 1, 0, NULL, sizeof buf, &needed));
        /* Ids past the vocabulary are skipped, as `tokenizers` does. */
        {
            static const int32_t big[] = {100000, 408};
            char want[16];
            size_t wn = 0;
            CHECK_OK(lora_tokenizer_decode(t, big + 1, 1, 0, want, sizeof want, &wn));
            CHECK_OK(lora_tokenizer_decode(t, big, 2, 0, buf, sizeof buf, &needed));
            CHECK(needed == wn && strcmp(buf, want) == 0);
        }
    }
    {
        int32_t id;
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_token_to_id(t, NULL, &id));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_token_to_id(t, "a", NULL));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_tokenizer_info(NULL, NULL, NULL, NULL));
    }
    lora_tokenizer_free(t);
    lora_tokenizer_free(NULL);
}

/* Several threads encode and decode on one handle at once. */
typedef struct {
    const lora_tokenizer *t;
    int ok;
} worker_arg;

static void *worker(void *p) {
    worker_arg *a = p;
    static const char *texts[] = {"The quick brown fox jumps over the lazy dog.", "I'll don't 12345678 \xE6\x97\xA5\xE6\x9C\xAC",
                                  "<|im_start|>x<|im_end|>", "   spaces   and\ttabs\n"};
    int32_t ids[512];
    char buf[2048];
    int round;
    a->ok = 1;
    for (round = 0; round < 200; round++) {
        const char *s = texts[round % 4];
        size_t n = 0, needed = 0;
        if (lora_tokenizer_encode(a->t, s, strlen(s), 0, ids, 512, &n) != LORA_OK) a->ok = 0;
        if (lora_tokenizer_decode(a->t, ids, n, 0, buf, sizeof buf, &needed) != LORA_OK) a->ok = 0;
        if (strcmp(buf, s) != 0) a->ok = 0; /* byte-level BPE round-trips exactly */
    }
    return NULL;
}

static void test_threads(void) {
    lora_tokenizer *t = load("qwen2");
    pthread_t th[4];
    worker_arg args[4];
    int i;
    for (i = 0; i < 4; i++) {
        args[i].t = t;
        args[i].ok = 0;
        REQUIRE(pthread_create(&th[i], NULL, worker, &args[i]) == 0);
    }
    for (i = 0; i < 4; i++) {
        REQUIRE(pthread_join(th[i], NULL) == 0);
        CHECKF(args[i].ok, "thread %d got a wrong round trip", i);
    }
    lora_tokenizer_free(t);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s FIXTURES_DIR SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    snprintf(g_fixtures, sizeof g_fixtures, "%s", argv[1]);
    snprintf(g_dir, sizeof g_dir, "%s/lora-tokenizer-XXXXXX", argv[2]);
    REQUIRE(mkdtemp(g_dir) != NULL);
    test_llama2();
    test_qwen2();
    test_bytes();
    test_bad_input();
    test_threads();
    rmdir(g_dir);
    return check_exit_code();
}
