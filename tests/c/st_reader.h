/*
 * A small, test-only safetensors reader and writer, independent of
 * liblora, for the C API tests.
 *
 * Format (https://github.com/huggingface/safetensors): an 8-byte
 * little-endian header length N, N bytes of JSON
 *   {"__metadata__": {"k": "v", ...},
 *    "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
 * then the data section; offsets are relative to its start.
 *
 * Also a minimal JSON parser (objects, arrays, strings with the usual
 * escapes, numbers, true/false/null), enough for safetensors headers and
 * bitsandbytes' quant-state JSON. Numbers keep their source text so
 * integers can be read exactly and floats with strtod.
 *
 * Everything is header-only `static` code; unused functions are marked
 * so that -Wunused-function stays quiet.
 */
#ifndef LORA_TEST_ST_READER_H
#define LORA_TEST_ST_READER_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define ST_UNUSED __attribute__((unused))
#else
#define ST_UNUSED
#endif

/* ------------------------------------------------------------------ */
/* JSON                                                                */
/* ------------------------------------------------------------------ */

typedef enum { SJ_NULL, SJ_BOOL, SJ_NUM, SJ_STR, SJ_ARR, SJ_OBJ } sj_type;

typedef struct sj_value {
    sj_type type;
    int boolean;
    char *text;             /* SJ_STR: decoded UTF-8; SJ_NUM: source text */
    size_t n;               /* SJ_ARR / SJ_OBJ: number of items */
    struct sj_value *items; /* SJ_ARR / SJ_OBJ: the values */
    char **keys;            /* SJ_OBJ: the keys (decoded) */
} sj_value;

typedef struct {
    const char *p, *end;
    const char *err;
    int depth;
} sj_parser;

static void sj_free(sj_value *v) {
    size_t i;
    if (!v) return;
    free(v->text);
    for (i = 0; i < v->n; i++) {
        sj_free(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    memset(v, 0, sizeof *v);
}

static void sj_ws(sj_parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++;
}

static int sj_hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    int i;
    for (i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

/* Parses a JSON string at ps->p (which is at '"') into a malloc'd buffer. */
static char *sj_string(sj_parser *ps) {
    const char *s = ps->p + 1;
    size_t cap = (size_t)(ps->end - s) + 1, n = 0;
    char *out = malloc(cap + 1);
    if (!out) {
        ps->err = "out of memory";
        return NULL;
    }
    while (s < ps->end && *s != '"') {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20) {
            ps->err = "control character in string";
            free(out);
            return NULL;
        }
        if (c != '\\') {
            out[n++] = (char)c;
            s++;
            continue;
        }
        if (s + 1 >= ps->end) break;
        s++;
        switch (*s) {
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        case '/': out[n++] = '/'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (ps->end - s < 5 || !sj_hex4(s + 1, &cp)) {
                ps->err = "bad \\u escape";
                free(out);
                return NULL;
            }
            s += 4;
            /* Surrogate halves are kept as '?': names in these files are ASCII. */
            if (cp >= 0xD800 && cp <= 0xDFFF) out[n++] = '?';
            else if (cp < 0x80) out[n++] = (char)cp;
            else if (cp < 0x800) {
                out[n++] = (char)(0xC0 | (cp >> 6));
                out[n++] = (char)(0x80 | (cp & 0x3F));
            } else {
                out[n++] = (char)(0xE0 | (cp >> 12));
                out[n++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                out[n++] = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default:
            ps->err = "bad escape";
            free(out);
            return NULL;
        }
        s++;
    }
    if (s >= ps->end) {
        ps->err = "unterminated string";
        free(out);
        return NULL;
    }
    out[n] = '\0';
    ps->p = s + 1;
    return out;
}

static int sj_value_parse(sj_parser *ps, sj_value *v);

static int sj_push(sj_parser *ps, sj_value *v, size_t *cap, char *key) {
    if (v->n == *cap) {
        size_t nc = *cap ? 2 * *cap : 8;
        sj_value *ni = realloc(v->items, nc * sizeof *ni);
        if (!ni) {
            ps->err = "out of memory";
            free(key);
            return 0;
        }
        v->items = ni;
        if (v->type == SJ_OBJ) {
            char **nk = realloc(v->keys, nc * sizeof *nk);
            if (!nk) {
                ps->err = "out of memory";
                free(key);
                return 0;
            }
            v->keys = nk;
        }
        *cap = nc;
    }
    memset(&v->items[v->n], 0, sizeof v->items[v->n]);
    if (v->type == SJ_OBJ) v->keys[v->n] = key;
    v->n++;
    if (!sj_value_parse(ps, &v->items[v->n - 1])) return 0;
    return 1;
}

static int sj_value_parse(sj_parser *ps, sj_value *v) {
    memset(v, 0, sizeof *v);
    if (++ps->depth > 64) {
        ps->err = "nesting too deep";
        return 0;
    }
    sj_ws(ps);
    if (ps->p >= ps->end) {
        ps->err = "unexpected end";
        return 0;
    }
    switch (*ps->p) {
    case '{': {
        size_t cap = 0;
        v->type = SJ_OBJ;
        ps->p++;
        sj_ws(ps);
        if (ps->p < ps->end && *ps->p == '}') {
            ps->p++;
            break;
        }
        for (;;) {
            char *key;
            sj_ws(ps);
            if (ps->p >= ps->end || *ps->p != '"') {
                ps->err = "expected a key";
                return 0;
            }
            if (!(key = sj_string(ps))) return 0;
            sj_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                free(key);
                ps->err = "expected ':'";
                return 0;
            }
            ps->p++;
            if (!sj_push(ps, v, &cap, key)) return 0;
            sj_ws(ps);
            if (ps->p < ps->end && *ps->p == ',') {
                ps->p++;
                continue;
            }
            if (ps->p < ps->end && *ps->p == '}') {
                ps->p++;
                break;
            }
            ps->err = "expected ',' or '}'";
            return 0;
        }
        break;
    }
    case '[': {
        size_t cap = 0;
        v->type = SJ_ARR;
        ps->p++;
        sj_ws(ps);
        if (ps->p < ps->end && *ps->p == ']') {
            ps->p++;
            break;
        }
        for (;;) {
            if (!sj_push(ps, v, &cap, NULL)) return 0;
            sj_ws(ps);
            if (ps->p < ps->end && *ps->p == ',') {
                ps->p++;
                continue;
            }
            if (ps->p < ps->end && *ps->p == ']') {
                ps->p++;
                break;
            }
            ps->err = "expected ',' or ']'";
            return 0;
        }
        break;
    }
    case '"':
        v->type = SJ_STR;
        if (!(v->text = sj_string(ps))) return 0;
        break;
    case 't':
    case 'f':
    case 'n': {
        static const char *const words[] = {"true", "false", "null"};
        int i;
        for (i = 0; i < 3; i++) {
            size_t l = strlen(words[i]);
            if ((size_t)(ps->end - ps->p) >= l && memcmp(ps->p, words[i], l) == 0) {
                v->type = i == 2 ? SJ_NULL : SJ_BOOL;
                v->boolean = i == 0;
                ps->p += l;
                break;
            }
        }
        if (i == 3) {
            ps->err = "bad literal";
            return 0;
        }
        break;
    }
    default: {
        const char *s = ps->p;
        size_t l;
        while (ps->p < ps->end && strchr("+-0123456789.eE", *ps->p) && *ps->p != '\0') ps->p++;
        l = (size_t)(ps->p - s);
        if (l == 0) {
            ps->err = "unexpected character";
            return 0;
        }
        v->type = SJ_NUM;
        v->text = malloc(l + 1);
        if (!v->text) {
            ps->err = "out of memory";
            return 0;
        }
        memcpy(v->text, s, l);
        v->text[l] = '\0';
        break;
    }
    }
    ps->depth--;
    return 1;
}

/* Parses `len` bytes of JSON into *out; returns NULL or an error text. */
static const char *sj_parse(const char *json, size_t len, sj_value *out) {
    sj_parser ps;
    ps.p = json;
    ps.end = json + len;
    ps.err = NULL;
    ps.depth = 0;
    if (!sj_value_parse(&ps, out)) {
        sj_free(out);
        return ps.err ? ps.err : "parse error";
    }
    sj_ws(&ps);
    if (ps.p != ps.end) {
        sj_free(out);
        return "trailing characters after the JSON value";
    }
    return NULL;
}

ST_UNUSED static const sj_value *sj_get(const sj_value *obj, const char *key) {
    size_t i;
    if (!obj || obj->type != SJ_OBJ) return NULL;
    for (i = 0; i < obj->n; i++)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

/* An integer number (exactly, via strtoull); 0 on failure. */
ST_UNUSED static int sj_u64(const sj_value *v, uint64_t *out) {
    char *end;
    unsigned long long x;
    if (!v || v->type != SJ_NUM || v->text[0] == '-') return 0;
    errno = 0;
    x = strtoull(v->text, &end, 10);
    if (errno != 0 || *end != '\0') return 0;
    *out = (uint64_t)x;
    return 1;
}

ST_UNUSED static int sj_double(const sj_value *v, double *out) {
    char *end;
    if (!v || v->type != SJ_NUM) return 0;
    *out = strtod(v->text, &end);
    return *end == '\0';
}

/* ------------------------------------------------------------------ */
/* safetensors reading                                                 */
/* ------------------------------------------------------------------ */

#define ST_MAX_DIMS 8

typedef struct {
    char *name;
    char dtype[8]; /* "F32", "F16", "BF16", "U8", ... */
    size_t ndim;
    uint64_t shape[ST_MAX_DIMS];
    uint64_t begin, end;       /* offsets in the data section */
    const unsigned char *data; /* into st_file.bytes; any alignment */
    size_t nbytes;
} st_tensor;

typedef struct {
    unsigned char *bytes; /* the whole file */
    size_t len;
    size_t header_len;
    size_t n;
    st_tensor *tensors;
    size_t n_meta;
    char **meta_keys, **meta_values;
} st_file;

static int st_read_all(const char *path, unsigned char **bytes, size_t *len) {
    FILE *f = fopen(path, "rb");
    long sz;
    size_t got;
    if (!f) return 0;
    if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return 0;
    }
    *bytes = malloc((size_t)sz + 1);
    if (!*bytes) {
        fclose(f);
        return 0;
    }
    got = fread(*bytes, 1, (size_t)sz, f);
    fclose(f);
    if (got != (size_t)sz) {
        free(*bytes);
        *bytes = NULL;
        return 0;
    }
    *len = (size_t)sz;
    return 1;
}

ST_UNUSED static void st_close(st_file *f) {
    size_t i;
    for (i = 0; i < f->n; i++) free(f->tensors[i].name);
    for (i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->tensors);
    free(f->meta_keys);
    free(f->meta_values);
    free(f->bytes);
    memset(f, 0, sizeof *f);
}

static char *st_strdup(const char *s) {
    size_t l = strlen(s);
    char *d = malloc(l + 1);
    if (d) memcpy(d, s, l + 1);
    return d;
}

static size_t st_dtype_size(const char *dt) {
    if (strcmp(dt, "F32") == 0 || strcmp(dt, "I32") == 0 || strcmp(dt, "U32") == 0) return 4;
    if (strcmp(dt, "F16") == 0 || strcmp(dt, "BF16") == 0 || strcmp(dt, "I16") == 0 || strcmp(dt, "U16") == 0) return 2;
    if (strcmp(dt, "U8") == 0 || strcmp(dt, "I8") == 0 || strcmp(dt, "BOOL") == 0) return 1;
    if (strcmp(dt, "F64") == 0 || strcmp(dt, "I64") == 0 || strcmp(dt, "U64") == 0) return 8;
    return 0;
}

/* Opens and validates `path`; returns NULL or an error text. */
ST_UNUSED static const char *st_open(const char *path, st_file *f) {
    uint64_t hl = 0;
    sj_value root;
    const char *err;
    size_t i, data_len;
    int k;
    memset(f, 0, sizeof *f);
    if (!st_read_all(path, &f->bytes, &f->len)) return "cannot read the file";
    if (f->len < 8) {
        st_close(f);
        return "shorter than 8 bytes";
    }
    for (k = 7; k >= 0; k--) hl = (hl << 8) | f->bytes[k];
    if (hl > f->len - 8) {
        st_close(f);
        return "header length past the end of the file";
    }
    f->header_len = (size_t)hl;
    data_len = f->len - 8 - f->header_len;
    if ((err = sj_parse((const char *)f->bytes + 8, f->header_len, &root)) != NULL) {
        st_close(f);
        return err;
    }
    if (root.type != SJ_OBJ) {
        sj_free(&root);
        st_close(f);
        return "header is not a JSON object";
    }
    f->tensors = calloc(root.n ? root.n : 1, sizeof *f->tensors);
    f->meta_keys = calloc(root.n ? root.n : 1, sizeof *f->meta_keys);
    f->meta_values = calloc(root.n ? root.n : 1, sizeof *f->meta_values);
    if (!f->tensors || !f->meta_keys || !f->meta_values) {
        sj_free(&root);
        st_close(f);
        return "out of memory";
    }
    err = NULL;
    for (i = 0; i < root.n && !err; i++) {
        const sj_value *v = &root.items[i];
        if (strcmp(root.keys[i], "__metadata__") == 0) {
            size_t j;
            if (v->type != SJ_OBJ) {
                err = "__metadata__ is not an object";
                break;
            }
            free(f->meta_keys);
            free(f->meta_values);
            f->meta_keys = calloc(v->n ? v->n : 1, sizeof *f->meta_keys);
            f->meta_values = calloc(v->n ? v->n : 1, sizeof *f->meta_values);
            if (!f->meta_keys || !f->meta_values) {
                err = "out of memory";
                break;
            }
            for (j = 0; j < v->n; j++) {
                if (v->items[j].type != SJ_STR) {
                    err = "__metadata__ value is not a string";
                    break;
                }
                f->meta_keys[j] = st_strdup(v->keys[j]);
                f->meta_values[j] = st_strdup(v->items[j].text);
                f->n_meta = j + 1;
            }
        } else {
            st_tensor *t = &f->tensors[f->n];
            const sj_value *dt = sj_get(v, "dtype"), *sh = sj_get(v, "shape"), *off = sj_get(v, "data_offsets");
            size_t j, es;
            uint64_t numel = 1;
            if (!dt || dt->type != SJ_STR || strlen(dt->text) >= sizeof t->dtype || !sh || sh->type != SJ_ARR ||
                sh->n > ST_MAX_DIMS || !off || off->type != SJ_ARR || off->n != 2 || !sj_u64(&off->items[0], &t->begin) ||
                !sj_u64(&off->items[1], &t->end)) {
                err = "bad tensor entry";
                break;
            }
            t->name = st_strdup(root.keys[i]);
            f->n++;
            strcpy(t->dtype, dt->text);
            t->ndim = sh->n;
            for (j = 0; j < sh->n; j++) {
                if (!sj_u64(&sh->items[j], &t->shape[j])) err = "bad shape";
                else numel *= t->shape[j];
            }
            es = st_dtype_size(t->dtype);
            if (!err && (t->end < t->begin || t->end > data_len)) err = "data offsets out of range";
            if (!err && es != 0 && numel * es != t->end - t->begin) err = "tensor size does not match shape and dtype";
            if (!err) {
                t->data = f->bytes + 8 + f->header_len + t->begin;
                t->nbytes = (size_t)(t->end - t->begin);
            }
        }
    }
    sj_free(&root);
    if (err) {
        st_close(f);
        return err;
    }
    return NULL;
}

ST_UNUSED static const st_tensor *st_get(const st_file *f, const char *name) {
    size_t i;
    for (i = 0; i < f->n; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

ST_UNUSED static const char *st_meta(const st_file *f, const char *key) {
    size_t i;
    for (i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_values[i];
    return NULL;
}

ST_UNUSED static uint64_t st_numel(const st_tensor *t) {
    uint64_t n = 1;
    size_t i;
    for (i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Little-endian fp32 element i of a tensor's (possibly unaligned) data. */
ST_UNUSED static float st_f32_at(const unsigned char *p, size_t i) {
    uint32_t u = (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 | (uint32_t)p[4 * i + 2] << 16 | (uint32_t)p[4 * i + 3] << 24;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ------------------------------------------------------------------ */
/* safetensors writing (for hand-made, possibly hostile, test files)   */
/* ------------------------------------------------------------------ */

typedef struct {
    const char *name;
    const char *dtype;
    size_t ndim;
    uint64_t shape[ST_MAX_DIMS];
    const void *data;
    size_t nbytes;
} st_out;

/* Writes `8-byte length | header | data` to `path` verbatim. */
ST_UNUSED static int st_write_raw(const char *path, uint64_t header_len_field, const void *header, size_t header_bytes,
                                  const void *data, size_t data_bytes) {
    unsigned char le[8];
    int i, ok;
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    for (i = 0; i < 8; i++) le[i] = (unsigned char)(header_len_field >> (8 * i));
    ok = fwrite(le, 1, 8, f) == 8;
    if (ok && header_bytes) ok = fwrite(header, 1, header_bytes, f) == header_bytes;
    if (ok && data_bytes) ok = fwrite(data, 1, data_bytes, f) == data_bytes;
    return fclose(f) == 0 && ok;
}

/* Writes a well-formed safetensors file holding `n` tensors, in that
 * order, contiguous, with __metadata__ {"format": "pt"}; header padded with
 * spaces to a multiple of 8 as the reference writer does. */
ST_UNUSED static int st_write(const char *path, const st_out *ts, size_t n) {
    size_t cap = 64, len = 0, total = 0, i, j, off = 0;
    char *h;
    unsigned char *data;
    int ok;
    for (i = 0; i < n; i++) {
        cap += strlen(ts[i].name) + strlen(ts[i].dtype) + 96 + 22 * ts[i].ndim;
        total += ts[i].nbytes;
    }
    h = malloc(cap);
    data = malloc(total ? total : 1);
    if (!h || !data) {
        free(h);
        free(data);
        return 0;
    }
    len += (size_t)sprintf(h + len, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (i = 0; i < n; i++) {
        len += (size_t)sprintf(h + len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", ts[i].name, ts[i].dtype);
        for (j = 0; j < ts[i].ndim; j++) len += (size_t)sprintf(h + len, "%s%llu", j ? "," : "", (unsigned long long)ts[i].shape[j]);
        len += (size_t)sprintf(h + len, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                               (unsigned long long)(off + ts[i].nbytes));
        if (ts[i].nbytes) memcpy(data + off, ts[i].data, ts[i].nbytes);
        off += ts[i].nbytes;
    }
    h[len++] = '}';
    while (len % 8 != 0) h[len++] = ' ';
    ok = st_write_raw(path, len, h, len, data, total);
    free(h);
    free(data);
    return ok;
}

/* Copies tensor `t` of an open file into an st_out (borrowing its data). */
ST_UNUSED static st_out st_out_of(const st_tensor *t) {
    st_out o;
    size_t i;
    memset(&o, 0, sizeof o);
    o.name = t->name;
    o.dtype = t->dtype;
    o.ndim = t->ndim;
    for (i = 0; i < t->ndim; i++) o.shape[i] = t->shape[i];
    o.data = t->data;
    o.nbytes = t->nbytes;
    return o;
}

#endif /* LORA_TEST_ST_READER_H */
