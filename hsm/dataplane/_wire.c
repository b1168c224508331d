/*
 * keyquorum.hsm.dataplane._wire: the BatchWrap and BatchUnwrap loops in C, for
 * batches where every item succeeds (docs/adr/0001).
 *
 * Why this exists: a BatchWrap of 100 items spends most of its time in the
 * interpreter, one item at a time (reading protobuf fields, encoding the
 * context, one AES-GCM call through the Python binding, framing the answer).
 * No library offers an AEAD call over many messages, so this module does the
 * per-item loop over the serialised request and writes the serialised
 * response, calling OpenSSL's EVP AES-256-GCM (the same library the standard
 * library's ssl and hashlib modules load). It implements no cryptography.
 *
 * It is an accelerator, not a second implementation of the rules: the Python
 * path in hsm/dataplane.py stays the reference and decides every error.
 * `scan` accepts a request only when every item would succeed there (the
 * checks below mirror DataPlane._wrap's step 0), and returns None for
 * anything else (an unknown field, a repeated scalar, a duplicate context
 * key, a non-ASCII context key, a size over a limit, malformed wire data...),
 * after which the caller runs the Python path on the parsed message. The
 * Python side does every check that needs the daemon (grant, activation,
 * key, encryption count) once per distinct tenant, then `seal` encrypts.
 * tests/test_wire_codec.py compares both paths byte for byte.
 *
 * Wire format read (proto/keyquorum/v1/key.proto):
 *   BatchWrapRequest { repeated WrapRequest items = 1; }
 *   WrapRequest      { string tenant = 1; bytes plaintext = 2;
 *                      map<string, string> context = 3; }
 *   map entry        { string key = 1; string value = 2; }
 * Written: BatchWrapResponse { repeated WrapResult results = 1; },
 *   WrapResult { WrapResponse ok = 1; }, WrapResponse { bytes ciphertext = 1;
 *   uint32 key_version = 2; } as the protobuf library serialises it.
 *
 * Ciphertext and associated data: see hsm/dataplane.py (format 0x01):
 *   head || nonce || AES-256-GCM(key, nonce, plaintext, label || head || ctx)
 * with ctx the RFC 8785 JSON of the context (keys ASCII here, so sorting by
 * bytes is RFC 8785's UTF-16 order; strings escaped as json.encoder's
 * encode_basestring does, which is ECMAScript's JSON.stringify).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define NONCE_SIZE 12
#define TAG_SIZE 16
#define KEY_SIZE 32
#define MAX_TENANT 63
#define MAX_HEAD (2 + MAX_TENANT + 4)
/* Distinct tenants one fast batch may name; more go the Python way. */
#define MAX_TENANTS 16
/* Context pairs the fast path handles per item, whatever the limit says. */
#define PAIRS_CAP 256

typedef struct {
    const uint8_t *p;
    size_t n;
} span_t;

typedef struct {
    size_t max_items;
    size_t max_plaintext;
    size_t max_pairs;
    size_t max_context_bytes;
} limits_t;

/* An encryption context: its pairs sorted by key, and its RFC 8785 size. */
typedef struct {
    span_t keys[PAIRS_CAP];
    span_t values[PAIRS_CAP];
    size_t pairs;
    size_t json_len;
} context_t;

/* A WrapRequest's fields. */
typedef struct {
    span_t tenant;
    span_t plaintext;
    context_t context;
} item_t;

/* -- protobuf wire reading ------------------------------------------------ */

/* A varint of at most 5 bytes below 2^31 (tags and lengths); 0 if not. */
static int read_small_varint(const uint8_t **p, const uint8_t *end, size_t *out)
{
    uint64_t value = 0;
    for (int i = 0; i < 5; i++) {
        if (*p >= end) {
            return 0;
        }
        uint8_t byte = *(*p)++;
        value |= (uint64_t)(byte & 0x7f) << (7 * i);
        if (!(byte & 0x80)) {
            if (value >= ((uint64_t)1 << 31)) {
                return 0;
            }
            *out = (size_t)value;
            return 1;
        }
    }
    return 0;
}

/* One length-delimited field: its number, and its bytes. 0 for anything else. */
static int read_len_field(const uint8_t **p, const uint8_t *end, size_t *number, span_t *body)
{
    size_t tag;
    size_t len;
    if (!read_small_varint(p, end, &tag) || (tag & 7) != 2) {
        return 0;
    }
    if (!read_small_varint(p, end, &len) || len > (size_t)(end - *p)) {
        return 0;
    }
    *number = tag >> 3;
    body->p = *p;
    body->n = len;
    *p += len;
    return 1;
}

/* -- strings ------------------------------------------------------------------ */

/* RFC 3629 UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF. */
static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xc2 && c <= 0xdf) {
            if (n - i < 2 || (s[i + 1] & 0xc0) != 0x80) {
                return 0;
            }
            i += 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            if (n - i < 3 || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80) {
                return 0;
            }
            if ((c == 0xe0 && s[i + 1] < 0xa0) || (c == 0xed && s[i + 1] >= 0xa0)) {
                return 0;
            }
            i += 3;
        } else if (c >= 0xf0 && c <= 0xf4) {
            if (n - i < 4 || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80 ||
                (s[i + 3] & 0xc0) != 0x80) {
                return 0;
            }
            if ((c == 0xf0 && s[i + 1] < 0x90) || (c == 0xf4 && s[i + 1] >= 0x90)) {
                return 0;
            }
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

static int all_ascii(span_t s)
{
    for (size_t i = 0; i < s.n; i++) {
        if (s.p[i] >= 0x80) {
            return 0;
        }
    }
    return 1;
}

/* Bytes of one JSON string with its quotes, escaped as encode_basestring does. */
static size_t json_string_len(span_t s)
{
    size_t len = 2;
    for (size_t i = 0; i < s.n; i++) {
        uint8_t c = s.p[i];
        if (c == '"' || c == '\\' || c == '\b' || c == '\f' || c == '\n' || c == '\r' ||
            c == '\t') {
            len += 2;
        } else if (c < 0x20) {
            len += 6;
        } else {
            len += 1;
        }
    }
    return len;
}

static uint8_t *json_string(uint8_t *out, span_t s)
{
    static const char hex[] = "0123456789abcdef";
    *out++ = '"';
    for (size_t i = 0; i < s.n; i++) {
        uint8_t c = s.p[i];
        switch (c) {
        case '"': *out++ = '\\'; *out++ = '"'; break;
        case '\\': *out++ = '\\'; *out++ = '\\'; break;
        case '\b': *out++ = '\\'; *out++ = 'b'; break;
        case '\f': *out++ = '\\'; *out++ = 'f'; break;
        case '\n': *out++ = '\\'; *out++ = 'n'; break;
        case '\r': *out++ = '\\'; *out++ = 'r'; break;
        case '\t': *out++ = '\\'; *out++ = 't'; break;
        default:
            if (c < 0x20) {
                memcpy(out, "\\u00", 4);
                out[4] = (uint8_t)hex[c >> 4];
                out[5] = (uint8_t)hex[c & 0xf];
                out += 6;
            } else {
                *out++ = c;
            }
        }
    }
    *out++ = '"';
    return out;
}

static int span_less(span_t a, span_t b)
{
    size_t n = a.n < b.n ? a.n : b.n;
    int c = memcmp(a.p, b.p, n);
    return c < 0 || (c == 0 && a.n < b.n);
}

static int span_equal(span_t a, span_t b)
{
    return a.n == b.n && memcmp(a.p, b.p, a.n) == 0;
}

/* -- one item --------------------------------------------------------------------- */

/* One map entry: key (non-empty, ASCII) and value (UTF-8), each at most once. */
static int parse_entry(span_t entry, span_t *key, span_t *value)
{
    const uint8_t *p = entry.p;
    const uint8_t *end = entry.p + entry.n;
    int have_key = 0;
    int have_value = 0;
    value->p = entry.p;
    value->n = 0;
    while (p < end) {
        size_t number;
        span_t body;
        if (!read_len_field(&p, end, &number, &body)) {
            return 0;
        }
        if (number == 1 && !have_key) {
            *key = body;
            have_key = 1;
        } else if (number == 2 && !have_value) {
            *value = body;
            have_value = 1;
        } else {
            return 0;
        }
    }
    return have_key && key->n > 0 && all_ascii(*key) && utf8_valid(value->p, value->n);
}

/* One context map entry into the item's sorted pairs; 0 past a limit, on a
   malformed entry or a repeated key (protobuf: last wins; the Python way). */
static int add_pair(span_t field, const limits_t *limits, context_t *context)
{
    if (context->pairs >= PAIRS_CAP || context->pairs >= limits->max_pairs) {
        return 0;
    }
    span_t key;
    span_t value;
    if (!parse_entry(field, &key, &value)) {
        return 0;
    }
    size_t at = context->pairs;
    while (at > 0 && span_less(key, context->keys[at - 1])) {
        context->keys[at] = context->keys[at - 1];
        context->values[at] = context->values[at - 1];
        at--;
    }
    if (at > 0 && span_equal(key, context->keys[at - 1])) {
        return 0;
    }
    context->keys[at] = key;
    context->values[at] = value;
    context->pairs++;
    return 1;
}

/* Sets json_len, the context's RFC 8785 size; 0 if over max_context_bytes. */
static int context_fits(const limits_t *limits, context_t *context)
{
    size_t json = 2 + (context->pairs > 0 ? context->pairs - 1 : 0);
    for (size_t i = 0; i < context->pairs; i++) {
        json += json_string_len(context->keys[i]) + 1 + json_string_len(context->values[i]);
    }
    if (json > limits->max_context_bytes) {
        return 0;
    }
    context->json_len = json;
    return 1;
}

/*
 * A WrapRequest that DataPlane._wrap's step 0 would accept: a tenant of 1 to
 * 63 ASCII bytes (the Python side checks the name itself), a plaintext of 1
 * to max_plaintext bytes, a context of distinct ASCII keys within the pair
 * and encoded-size limits. Sorts the pairs and sets json_len. 0 otherwise.
 */
static int parse_item(span_t body, const limits_t *limits, item_t *item)
{
    const uint8_t *p = body.p;
    const uint8_t *end = body.p + body.n;
    int have_tenant = 0;
    int have_plaintext = 0;
    item->context.pairs = 0;
    while (p < end) {
        size_t number;
        span_t field;
        if (!read_len_field(&p, end, &number, &field)) {
            return 0;
        }
        if (number == 1 && !have_tenant) {
            item->tenant = field;
            have_tenant = 1;
        } else if (number == 2 && !have_plaintext) {
            item->plaintext = field;
            have_plaintext = 1;
        } else if (number == 3) {
            if (!add_pair(field, limits, &item->context)) {
                return 0;
            }
        } else {
            return 0;
        }
    }
    if (!have_tenant || item->tenant.n < 1 || item->tenant.n > MAX_TENANT ||
        !all_ascii(item->tenant)) {
        return 0;
    }
    if (!have_plaintext || item->plaintext.n < 1 || item->plaintext.n > limits->max_plaintext) {
        return 0;
    }
    return context_fits(limits, &item->context);
}

static uint8_t *write_json(uint8_t *out, const context_t *context)
{
    *out++ = '{';
    for (size_t i = 0; i < context->pairs; i++) {
        if (i > 0) {
            *out++ = ',';
        }
        out = json_string(out, context->keys[i]);
        *out++ = ':';
        out = json_string(out, context->values[i]);
    }
    *out++ = '}';
    return out;
}

/* -- the batch ---------------------------------------------------------------------- */

/* A batch's items grouped by key: BatchWrap's by tenant, BatchUnwrap's by ciphertext header
   (one key version each). */
typedef struct {
    span_t groups[MAX_TENANTS];
    size_t counts[MAX_TENANTS];
    size_t distinct;
    size_t items;
    size_t max_json;
} batch_t;

/* The index of `group` among the batch's groups (added if `add`); -1 past MAX_TENANTS. */
static int group_index(batch_t *batch, span_t group, int add)
{
    for (size_t i = 0; i < batch->distinct; i++) {
        if (span_equal(batch->groups[i], group)) {
            return (int)i;
        }
    }
    if (!add || batch->distinct >= MAX_TENANTS) {
        return -1;
    }
    batch->groups[batch->distinct] = group;
    batch->counts[batch->distinct] = 0;
    return (int)batch->distinct++;
}

/* Every item of the request, checked; 0 if the fast path does not apply. */
/* What the response's size needs of one item, kept by the scan. */
typedef struct {
    uint32_t tenant;
    uint32_t plaintext_len;
} sizes_t;

/* Items a request of n bytes can hold: each takes at least 8 (two fields of 3, a frame of 2). */
static size_t item_capacity(size_t request_len, const limits_t *limits)
{
    size_t most = request_len / 8 + 1;
    return most < limits->max_items ? most : limits->max_items;
}

/* Every item of the request, checked (and, with `sizes`, noted; capacity
   item_capacity()); 0 if the fast path does not apply. */
static int scan_batch(span_t request, const limits_t *limits, batch_t *batch, item_t *item,
                      sizes_t *sizes)
{
    const uint8_t *p = request.p;
    const uint8_t *end = request.p + request.n;
    batch->distinct = 0;
    batch->items = 0;
    batch->max_json = 0;
    while (p < end) {
        size_t number;
        span_t body;
        if (!read_len_field(&p, end, &number, &body) || number != 1) {
            return 0;
        }
        if (batch->items >= limits->max_items ||
            (sizes != NULL && batch->items >= item_capacity(request.n, limits)) ||
            !parse_item(body, limits, item)) {
            return 0;
        }
        int at = group_index(batch, item->tenant, 1);
        if (at < 0) {
            return 0;
        }
        batch->counts[at]++;
        if (sizes != NULL) {
            sizes[batch->items].tenant = (uint32_t)at;
            sizes[batch->items].plaintext_len = (uint32_t)item->plaintext.n;
        }
        batch->items++;
        if (item->context.json_len > batch->max_json) {
            batch->max_json = item->context.json_len;
        }
    }
    return batch->items > 0;
}

static int parse_limits(PyObject *tuple, limits_t *limits)
{
    Py_ssize_t values[4];
    if (!PyArg_ParseTuple(tuple, "nnnn", &values[0], &values[1], &values[2], &values[3])) {
        return 0;
    }
    for (int i = 0; i < 4; i++) {
        if (values[i] < 0 || values[i] > (1 << 30)) {
            PyErr_SetString(PyExc_ValueError, "limits must be in [0, 2**30]");
            return 0;
        }
    }
    limits->max_items = (size_t)values[0];
    limits->max_plaintext = (size_t)values[1];
    limits->max_pairs = (size_t)values[2];
    limits->max_context_bytes = (size_t)values[3];
    return 1;
}

static item_t *new_item(void)
{
    item_t *item = PyMem_Malloc(sizeof(item_t));
    if (item == NULL) {
        PyErr_NoMemory();
    }
    return item;
}

/* The (request, limits) arguments every entry point but seal takes; 0 with an exception set. */
static int request_args(PyObject *args, span_t *whole, limits_t *limits)
{
    PyBytesObject *request;
    PyObject *limits_tuple;
    if (!PyArg_ParseTuple(args, "SO!", &request, &PyTuple_Type, &limits_tuple) ||
        !parse_limits(limits_tuple, limits)) {
        return 0;
    }
    /* Borrowed from `args`, which holds the bytes object for the whole call. */
    whole->p = (const uint8_t *)PyBytes_AS_STRING(request);
    whole->n = (size_t)PyBytes_GET_SIZE(request);
    return 1;
}

PyDoc_STRVAR(scan_doc,
"scan(request, limits) -> list[tuple[str, int]] | None\n\n"
"The distinct tenants of a serialised BatchWrapRequest, in order of first\n"
"appearance, each with its number of items; None unless every item passes\n"
"the data plane's step-0 checks (limits: max_items, max_plaintext,\n"
"max_context_pairs, max_context_bytes) in the shapes this module handles.");

static PyObject *wire_scan(PyObject *self, PyObject *args)
{
    (void)self;
    span_t whole;
    limits_t limits;
    batch_t batch;
    if (!request_args(args, &whole, &limits)) {
        return NULL;
    }
    item_t *item = new_item();
    if (item == NULL) {
        return NULL;
    }
    int ok = scan_batch(whole, &limits, &batch, item, NULL);
    PyMem_Free(item);
    if (!ok) {
        Py_RETURN_NONE;
    }
    PyObject *result = PyList_New((Py_ssize_t)batch.distinct);
    if (result == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < batch.distinct; i++) {
        PyObject *pair = Py_BuildValue(
            "(s#n)", (const char *)batch.groups[i].p, (Py_ssize_t)batch.groups[i].n,
            (Py_ssize_t)batch.counts[i]);
        if (pair == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)i, pair);
    }
    return result;
}

/* -- what seal and open_all share ------------------------------------------------------- */

/* The associated-data buffer (label || head || context JSON) and, when wanted, the list of
   each item's context; 0 with an exception set. */
static int work_buffers(const Py_buffer *label, size_t max_json, int want_contexts,
                        size_t items, uint8_t **aad, PyObject **contexts)
{
    *aad = PyMem_Malloc((size_t)label->len + MAX_HEAD + max_json);
    if (*aad == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    return !want_contexts || (*contexts = PyList_New((Py_ssize_t)items)) != NULL;
}

/* One item's associated data in `aad`; its length, and where its context JSON starts. */
static size_t write_aad(uint8_t *aad, const Py_buffer *label, const uint8_t *head,
                        size_t head_len, const context_t *context, uint8_t **json,
                        size_t *json_len)
{
    memcpy(aad, label->buf, (size_t)label->len);
    memcpy(aad + label->len, head, head_len);
    *json = aad + label->len + head_len;
    *json_len = (size_t)(write_json(*json, context) - *json);
    return (size_t)(*json + *json_len - aad);
}

/* Item `index`'s (key index, canonical context) into `contexts`; 0 with an exception set. */
static int note_context(PyObject *contexts, size_t index, size_t key, const uint8_t *json,
                        size_t json_len)
{
    PyObject *encoded =
        Py_BuildValue("(Iy#)", (unsigned int)key, (const char *)json, (Py_ssize_t)json_len);
    if (encoded == NULL) {
        return 0;
    }
    PyList_SET_ITEM(contexts, (Py_ssize_t)index, encoded);
    return 1;
}

/* -- sealing ----------------------------------------------------------------------------- */

static size_t varint_len(size_t value)
{
    size_t n = 1;
    while (value >= 0x80) {
        value >>= 7;
        n++;
    }
    return n;
}

static uint8_t *write_varint(uint8_t *out, size_t value)
{
    while (value >= 0x80) {
        *out++ = (uint8_t)((value & 0x7f) | 0x80);
        value >>= 7;
    }
    *out++ = (uint8_t)value;
    return out;
}

typedef struct {
    EVP_CIPHER_CTX *ctx;
    uint8_t head[MAX_HEAD];
    size_t head_len;
    size_t version;
} tenant_key_t;

/* Sizes of one result's frames: WrapResult{ok = WrapResponse{ciphertext, key_version}}. */
static size_t result_len(const tenant_key_t *key, size_t plaintext_len, size_t *ct_len,
                         size_t *ok_len, size_t *inner_len)
{
    *ct_len = key->head_len + NONCE_SIZE + plaintext_len + TAG_SIZE;
    *ok_len = 1 + varint_len(*ct_len) + *ct_len + 1 + varint_len(key->version);
    *inner_len = 1 + varint_len(*ok_len) + *ok_len;
    return 1 + varint_len(*inner_len) + *inner_len;
}

/* Encrypt one item into `out` (head || nonce || ciphertext || tag); 0 on an OpenSSL error. */
static int seal_item(const tenant_key_t *key, const uint8_t *nonce, const uint8_t *aad,
                     size_t aad_len, span_t plaintext, uint8_t *out)
{
    int outl = 0;
    int finl = 0;
    EVP_CIPHER_CTX *ctx = key->ctx;
    memcpy(out, key->head, key->head_len);
    out += key->head_len;
    memcpy(out, nonce, NONCE_SIZE);
    out += NONCE_SIZE;
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(ctx, NULL, &outl, aad, (int)aad_len) != 1 ||
        EVP_EncryptUpdate(ctx, out, &outl, plaintext.p, (int)plaintext.n) != 1 ||
        (size_t)outl != plaintext.n ||
        EVP_EncryptFinal_ex(ctx, out + outl, &finl) != 1 || finl != 0 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE, out + plaintext.n) != 1) {
        return 0;
    }
    return 1;
}

static void free_keys(tenant_key_t *keys, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        EVP_CIPHER_CTX_free(keys[i].ctx); /* cleanses the key schedule */
        keys[i].ctx = NULL;
    }
}

/* Prepare one tenant's key from (key buffer, head, version); 0 with an exception set. */
static int load_key(PyObject *entry, span_t tenant, tenant_key_t *key)
{
    Py_buffer secret;
    const char *head;
    Py_ssize_t head_len;
    Py_ssize_t version;
    key->ctx = NULL;
    if (!PyTuple_Check(entry) ||
        !PyArg_ParseTuple(entry, "y*y#n", &secret, &head, &head_len, &version)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "keys are (key, head, version) tuples");
        }
        return 0;
    }
    int ok = 0;
    if (secret.len != KEY_SIZE) {
        PyErr_SetString(PyExc_ValueError, "an AES-256-GCM key is 32 bytes");
    } else if (head_len != (Py_ssize_t)(2 + tenant.n + 4) || (uint8_t)head[1] != tenant.n ||
               memcmp(head + 2, tenant.p, tenant.n) != 0) {
        PyErr_SetString(PyExc_ValueError, "a key's header names another tenant");
    } else if (version < 1 || version > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "key version must be in [1, 2**32)");
    } else {
        key->ctx = EVP_CIPHER_CTX_new();
        if (key->ctx == NULL ||
            EVP_EncryptInit_ex(key->ctx, EVP_aes_256_gcm(), NULL, secret.buf, NULL) != 1) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not prepare AES-256-GCM");
        } else {
            memcpy(key->head, head, (size_t)head_len);
            key->head_len = (size_t)head_len;
            key->version = (size_t)version;
            ok = 1;
        }
    }
    PyBuffer_Release(&secret);
    return ok;
}

PyDoc_STRVAR(seal_doc,
"seal(request, limits, keys, label, nonces, want_contexts) -> (bytes, list | None)\n\n"
"The serialised BatchWrapResponse of a request `scan` accepted with the same\n"
"limits: `keys` holds one (key, header, version) per tenant in scan's order,\n"
"`label` starts every item's associated data, `nonces` holds 12 bytes per\n"
"item in order. With want_contexts, also each item's (tenant index, canonical\n"
"context) in order, for the usage records.");

static PyObject *wire_seal(PyObject *self, PyObject *args)
{
    (void)self;
    PyBytesObject *request;
    PyObject *limits_tuple;
    PyObject *key_list;
    Py_buffer label;
    Py_buffer nonces;
    int want_contexts;
    limits_t limits;
    batch_t batch;
    tenant_key_t keys[MAX_TENANTS];
    size_t loaded = 0;
    PyObject *response = NULL;
    PyObject *contexts = NULL;
    PyObject *result = NULL;
    uint8_t *aad = NULL;
    sizes_t *sizes = NULL;
    item_t *item = NULL;
    int failed = 0;

    if (!PyArg_ParseTuple(args, "SO!O!y*y*p", &request, &PyTuple_Type, &limits_tuple,
                          &PyList_Type, &key_list, &label, &nonces, &want_contexts)) {
        return NULL;
    }
    span_t whole = {(const uint8_t *)PyBytes_AS_STRING(request),
                    (size_t)PyBytes_GET_SIZE(request)};
    if (!parse_limits(limits_tuple, &limits) || (item = new_item()) == NULL) {
        goto done;
    }
    sizes = PyMem_Malloc(item_capacity(whole.n, &limits) * sizeof(sizes_t));
    if (sizes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (!scan_batch(whole, &limits, &batch, item, sizes)) {
        PyErr_SetString(PyExc_ValueError, "seal: the request is not one scan accepts");
        goto done;
    }
    if ((size_t)PyList_GET_SIZE(key_list) != batch.distinct) {
        PyErr_SetString(PyExc_ValueError, "seal: one key per distinct tenant is needed");
        goto done;
    }
    if ((size_t)nonces.len != NONCE_SIZE * batch.items) {
        PyErr_SetString(PyExc_ValueError, "seal: 12 nonce bytes per item are needed");
        goto done;
    }
    for (; loaded < batch.distinct; loaded++) {
        if (!load_key(PyList_GET_ITEM(key_list, (Py_ssize_t)loaded), batch.groups[loaded],
                      &keys[loaded])) {
            EVP_CIPHER_CTX_free(keys[loaded].ctx);
            goto done;
        }
    }

    /* The response's size, then one allocation. */
    size_t total = 0;
    for (size_t i = 0; i < batch.items; i++) {
        size_t ct_len, ok_len, inner_len;
        total += result_len(&keys[sizes[i].tenant], sizes[i].plaintext_len, &ct_len, &ok_len,
                            &inner_len);
    }
    response = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (response == NULL ||
        !work_buffers(&label, batch.max_json, want_contexts, batch.items, &aad, &contexts)) {
        goto done;
    }

    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(response);
    const uint8_t *nonce = nonces.buf;
    size_t index = 0;
    PyThreadState *thread = want_contexts ? NULL : PyEval_SaveThread();
    {
        const uint8_t *p = whole.p;
        const uint8_t *end = whole.p + whole.n;
        size_t number;
        span_t body;
        size_t ct_len, ok_len, inner_len;
        while (p < end && read_len_field(&p, end, &number, &body)) {
            /* The bytes are immutable and scan_batch accepted them; checked anyway. */
            if (index >= batch.items || !parse_item(body, &limits, item)) {
                failed = 3;
                break;
            }
            const tenant_key_t *key = &keys[sizes[index].tenant];
            uint8_t *json;
            size_t json_len;
            size_t aad_len =
                write_aad(aad, &label, key->head, key->head_len, &item->context, &json, &json_len);
            result_len(key, item->plaintext.n, &ct_len, &ok_len, &inner_len);
            *out++ = 0x0a; /* results = 1 */
            out = write_varint(out, inner_len);
            *out++ = 0x0a; /* ok = 1 */
            out = write_varint(out, ok_len);
            *out++ = 0x0a; /* ciphertext = 1 */
            out = write_varint(out, ct_len);
            if (!seal_item(key, nonce, aad, aad_len, item->plaintext, out)) {
                failed = 1;
                break;
            }
            out += ct_len;
            *out++ = 0x10; /* key_version = 2 */
            out = write_varint(out, key->version);
            nonce += NONCE_SIZE;
            if (want_contexts &&
                !note_context(contexts, index, sizes[index].tenant, json, json_len)) {
                failed = 2;
                break;
            }
            index++;
        }
    }
    if (thread != NULL) {
        PyEval_RestoreThread(thread);
    }
    if (failed == 1) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-256-GCM encryption failed");
    }
    if (failed || index != batch.items || out != (uint8_t *)PyBytes_AS_STRING(response) + total) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "seal: the response was not written whole");
        }
        goto done;
    }
    result = Py_BuildValue("(OO)", response, contexts != NULL ? contexts : Py_None);

done:
    free_keys(keys, loaded);
    PyBuffer_Release(&label);
    PyBuffer_Release(&nonces);
    if (aad != NULL) {
        PyMem_Free(aad);
    }
    PyMem_Free(item);
    PyMem_Free(sizes);
    Py_XDECREF(response);
    Py_XDECREF(contexts);
    return result;
}

/* -- BatchUnwrap -------------------------------------------------------------------------- */

/*
 * Read (proto/keyquorum/v1/key.proto):
 *   BatchUnwrapRequest { repeated UnwrapRequest items = 1; }
 *   UnwrapRequest      { bytes ciphertext = 1; map<string, string> context = 2;
 *                        bytes recipient_public_key = 3; }
 * Written: BatchUnwrapResponse { repeated UnwrapResult results = 1; },
 *   UnwrapResult { UnwrapResponse ok = 1; }, UnwrapResponse { bytes plaintext = 1;
 *   string tenant = 3; uint32 key_version = 4; } as the protobuf library
 *   serialises it.
 */

/* The smallest header: format byte, tenant length, a 1-byte tenant, the version. */
#define MIN_HEAD (2 + 1 + 4)

/* An UnwrapRequest's fields: the ciphertext (its header's size) and the context. */
typedef struct {
    span_t ciphertext;
    size_t head_len;
    context_t context;
} sealed_item_t;

/*
 * An UnwrapRequest the Python path's short way would open if the tag is
 * authentic: no recipient key (a sealed answer is HPKE, the Python way), a
 * format-0x01 ciphertext with a 1 to 63-byte ASCII tenant, a version other
 * than 0, a nonce, a tag and at least one byte of plaintext; a context as
 * parse_item takes it. 0 otherwise (an unknown or repeated field too).
 */
static int parse_sealed_item(span_t body, const limits_t *limits, sealed_item_t *item)
{
    const uint8_t *p = body.p;
    const uint8_t *end = body.p + body.n;
    int have_ciphertext = 0;
    item->context.pairs = 0;
    while (p < end) {
        size_t number;
        span_t field;
        if (!read_len_field(&p, end, &number, &field)) {
            return 0;
        }
        if (number == 1 && !have_ciphertext) {
            item->ciphertext = field;
            have_ciphertext = 1;
        } else if (number == 2) {
            if (!add_pair(field, limits, &item->context)) {
                return 0;
            }
        } else {
            return 0;
        }
    }
    if (!have_ciphertext) {
        return 0;
    }
    const uint8_t *c = item->ciphertext.p;
    size_t n = item->ciphertext.n;
    if (n < MIN_HEAD || c[0] != 0x01 || c[1] < 1 || c[1] > MAX_TENANT) {
        return 0;
    }
    size_t head_len = 2 + (size_t)c[1] + 4;
    span_t tenant = {c + 2, (size_t)c[1]};
    if (n < head_len + NONCE_SIZE + TAG_SIZE + 1 || !all_ascii(tenant)) {
        return 0;
    }
    const uint8_t *version = c + head_len - 4;
    if ((version[0] | version[1] | version[2] | version[3]) == 0) {
        return 0;
    }
    item->head_len = head_len;
    return context_fits(limits, &item->context);
}

/* Every item of a BatchUnwrapRequest, checked; 0 if the fast path does not apply. */
static int scan_unwrap_batch(span_t request, const limits_t *limits, batch_t *batch,
                             sealed_item_t *item)
{
    const uint8_t *p = request.p;
    const uint8_t *end = request.p + request.n;
    batch->distinct = 0;
    batch->items = 0;
    batch->max_json = 0;
    while (p < end) {
        size_t number;
        span_t body;
        if (!read_len_field(&p, end, &number, &body) || number != 1) {
            return 0;
        }
        if (batch->items >= limits->max_items || !parse_sealed_item(body, limits, item)) {
            return 0;
        }
        span_t head = {item->ciphertext.p, item->head_len};
        int at = group_index(batch, head, 1);
        if (at < 0) {
            return 0;
        }
        batch->counts[at]++;
        batch->items++;
        if (item->context.json_len > batch->max_json) {
            batch->max_json = item->context.json_len;
        }
    }
    return batch->items > 0;
}

PyDoc_STRVAR(scan_unwrap_doc,
"scan_unwrap(request, limits) -> list[tuple[bytes, int]] | None\n\n"
"The distinct ciphertext headers of a serialised BatchUnwrapRequest, in order\n"
"of first appearance, each with its number of items; None unless every item\n"
"is one the data plane's short way could open (no recipient key, a well-formed\n"
"format-0x01 ciphertext with a plaintext, a context within the limits) in the\n"
"shapes this module handles.");

static PyObject *wire_scan_unwrap(PyObject *self, PyObject *args)
{
    (void)self;
    span_t whole;
    limits_t limits;
    batch_t batch;
    if (!request_args(args, &whole, &limits)) {
        return NULL;
    }
    sealed_item_t *item = PyMem_Malloc(sizeof(sealed_item_t));
    if (item == NULL) {
        return PyErr_NoMemory();
    }
    int ok = scan_unwrap_batch(whole, &limits, &batch, item);
    PyMem_Free(item);
    if (!ok) {
        Py_RETURN_NONE;
    }
    PyObject *result = PyList_New((Py_ssize_t)batch.distinct);
    if (result == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < batch.distinct; i++) {
        PyObject *pair = Py_BuildValue("(y#n)", (const char *)batch.groups[i].p,
                                       (Py_ssize_t)batch.groups[i].n, (Py_ssize_t)batch.counts[i]);
        if (pair == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)i, pair);
    }
    return result;
}

typedef struct {
    EVP_CIPHER_CTX *ctx;
    span_t head;
    size_t version;
} version_key_t;

/* Prepare one key version's decryption from (key buffer, header); 0 with an exception set. */
static int load_version_key(PyObject *entry, span_t head, version_key_t *key)
{
    Py_buffer secret;
    const char *given;
    Py_ssize_t given_len;
    key->ctx = NULL;
    if (!PyTuple_Check(entry) || !PyArg_ParseTuple(entry, "y*y#", &secret, &given, &given_len)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "keys are (key, header) tuples");
        }
        return 0;
    }
    int ok = 0;
    if (secret.len != KEY_SIZE) {
        PyErr_SetString(PyExc_ValueError, "an AES-256-GCM key is 32 bytes");
    } else if ((size_t)given_len != head.n || memcmp(given, head.p, head.n) != 0) {
        PyErr_SetString(PyExc_ValueError, "a key's header is not the batch's");
    } else {
        key->ctx = EVP_CIPHER_CTX_new();
        if (key->ctx == NULL ||
            EVP_DecryptInit_ex(key->ctx, EVP_aes_256_gcm(), NULL, secret.buf, NULL) != 1) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not prepare AES-256-GCM");
        } else {
            const uint8_t *v = head.p + head.n - 4;
            key->head = head;
            key->version = ((size_t)v[0] << 24) | ((size_t)v[1] << 16) | ((size_t)v[2] << 8) | v[3];
            ok = 1;
        }
    }
    PyBuffer_Release(&secret);
    return ok;
}

/* Sizes of one result's frames:
   UnwrapResult{ok = UnwrapResponse{plaintext, tenant, key_version}}. */
static size_t unwrap_result_len(const version_key_t *key, size_t plaintext_len, size_t *ok_len,
                                size_t *inner_len)
{
    size_t tenant_len = key->head.n - 6;
    *ok_len = 1 + varint_len(plaintext_len) + plaintext_len + 1 + varint_len(tenant_len) +
              tenant_len + 1 + varint_len(key->version);
    *inner_len = 1 + varint_len(*ok_len) + *ok_len;
    return 1 + varint_len(*inner_len) + *inner_len;
}

/* Decrypt one item's body into `out`; 0 unless it authenticates. */
static int open_item(const version_key_t *key, const sealed_item_t *item, const uint8_t *aad,
                     size_t aad_len, uint8_t *out)
{
    const uint8_t *nonce = item->ciphertext.p + item->head_len;
    const uint8_t *body = nonce + NONCE_SIZE;
    size_t body_len = item->ciphertext.n - item->head_len - NONCE_SIZE - TAG_SIZE;
    uint8_t tag[TAG_SIZE];
    int outl = 0;
    int finl = 0;
    EVP_CIPHER_CTX *ctx = key->ctx;
    memcpy(tag, body + body_len, TAG_SIZE);
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_DecryptUpdate(ctx, NULL, &outl, aad, (int)aad_len) != 1 ||
        EVP_DecryptUpdate(ctx, out, &outl, body, (int)body_len) != 1 ||
        (size_t)outl != body_len ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, tag) != 1 ||
        EVP_DecryptFinal_ex(ctx, out + outl, &finl) != 1 || finl != 0) {
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(open_all_doc,
"open_all(request, limits, keys, label, want_contexts) -> (bytearray, list | None) | None\n\n"
"The serialised BatchUnwrapResponse of a request `scan_unwrap` accepted with\n"
"the same limits, every item opened: `keys` holds one (key, header) per header\n"
"in scan_unwrap's order, `label` starts every item's associated data. None,\n"
"with nothing of any plaintext left behind, if any item does not authenticate.\n"
"The answer is a bytearray, for the caller to wipe once it is sent on. With\n"
"want_contexts, also each item's (header index, canonical context) in order.");

static PyObject *wire_open_all(PyObject *self, PyObject *args)
{
    (void)self;
    PyBytesObject *request;
    PyObject *limits_tuple;
    PyObject *key_list;
    Py_buffer label;
    int want_contexts;
    limits_t limits;
    batch_t batch;
    version_key_t keys[MAX_TENANTS];
    size_t loaded = 0;
    PyObject *response = NULL;
    PyObject *contexts = NULL;
    PyObject *result = NULL;
    uint8_t *aad = NULL;
    sealed_item_t *item = NULL;
    int failed = 0;

    if (!PyArg_ParseTuple(args, "SO!O!y*p", &request, &PyTuple_Type, &limits_tuple,
                          &PyList_Type, &key_list, &label, &want_contexts)) {
        return NULL;
    }
    span_t whole = {(const uint8_t *)PyBytes_AS_STRING(request),
                    (size_t)PyBytes_GET_SIZE(request)};
    if (!parse_limits(limits_tuple, &limits)) {
        goto done;
    }
    item = PyMem_Malloc(sizeof(sealed_item_t));
    if (item == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (!scan_unwrap_batch(whole, &limits, &batch, item)) {
        PyErr_SetString(PyExc_ValueError, "open_all: not a request scan_unwrap accepts");
        goto done;
    }
    if ((size_t)PyList_GET_SIZE(key_list) != batch.distinct) {
        PyErr_SetString(PyExc_ValueError, "open_all: one key per distinct header is needed");
        goto done;
    }
    for (; loaded < batch.distinct; loaded++) {
        if (!load_version_key(PyList_GET_ITEM(key_list, (Py_ssize_t)loaded), batch.groups[loaded],
                              &keys[loaded])) {
            EVP_CIPHER_CTX_free(keys[loaded].ctx);
            goto done;
        }
    }

    /* The response's size (a second read of the immutable request), then one allocation. */
    size_t total = 0;
    {
        const uint8_t *p = whole.p;
        const uint8_t *end = whole.p + whole.n;
        size_t number;
        span_t body;
        size_t ok_len, inner_len;
        while (p < end && read_len_field(&p, end, &number, &body)) {
            if (!parse_sealed_item(body, &limits, item)) {
                break;
            }
            span_t head = {item->ciphertext.p, item->head_len};
            int at = group_index(&batch, head, 0);
            if (at < 0) {
                break;
            }
            size_t plain = item->ciphertext.n - item->head_len - NONCE_SIZE - TAG_SIZE;
            total += unwrap_result_len(&keys[at], plain, &ok_len, &inner_len);
        }
    }
    response = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (response == NULL ||
        !work_buffers(&label, batch.max_json, want_contexts, batch.items, &aad, &contexts)) {
        goto done;
    }

    uint8_t *start = (uint8_t *)PyByteArray_AS_STRING(response);
    uint8_t *out = start;
    size_t index = 0;
    PyThreadState *thread = want_contexts ? NULL : PyEval_SaveThread();
    {
        const uint8_t *p = whole.p;
        const uint8_t *end = whole.p + whole.n;
        size_t number;
        span_t body;
        size_t ok_len, inner_len;
        while (p < end && read_len_field(&p, end, &number, &body)) {
            int at = -1;
            if (index < batch.items && parse_sealed_item(body, &limits, item)) {
                span_t head = {item->ciphertext.p, item->head_len};
                at = group_index(&batch, head, 0);
            }
            if (at < 0) {
                failed = 3; /* the bytes are immutable and were accepted: checked anyway */
                break;
            }
            const version_key_t *key = &keys[at];
            size_t plain = item->ciphertext.n - item->head_len - NONCE_SIZE - TAG_SIZE;
            if (unwrap_result_len(key, plain, &ok_len, &inner_len) > total - (size_t)(out - start)) {
                failed = 3;
                break;
            }
            uint8_t *json;
            size_t json_len;
            size_t aad_len =
                write_aad(aad, &label, key->head.p, key->head.n, &item->context, &json, &json_len);
            *out++ = 0x0a; /* results = 1 */
            out = write_varint(out, inner_len);
            *out++ = 0x0a; /* ok = 1 */
            out = write_varint(out, ok_len);
            *out++ = 0x0a; /* plaintext = 1 */
            out = write_varint(out, plain);
            if (!open_item(key, item, aad, aad_len, out)) {
                failed = 1;
                break;
            }
            out += plain;
            *out++ = 0x1a; /* tenant = 3 */
            out = write_varint(out, key->head.n - 6);
            memcpy(out, key->head.p + 2, key->head.n - 6);
            out += key->head.n - 6;
            *out++ = 0x20; /* key_version = 4 */
            out = write_varint(out, key->version);
            if (want_contexts && !note_context(contexts, index, (size_t)at, json, json_len)) {
                failed = 2;
                break;
            }
            index++;
        }
    }
    if (thread != NULL) {
        PyEval_RestoreThread(thread);
    }
    if (failed || index != batch.items || out != start + total) {
        /* Nothing opened leaves: the plaintexts written so far are erased. */
        OPENSSL_cleanse(start, total);
        if (failed == 1) {
            PyErr_Clear();
            Py_INCREF(Py_None);
            result = Py_None;
        } else if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "open_all: the response was not written whole");
        }
        goto done;
    }
    result = Py_BuildValue("(OO)", response, contexts != NULL ? contexts : Py_None);

done:
    for (size_t i = 0; i < loaded; i++) {
        EVP_CIPHER_CTX_free(keys[i].ctx); /* cleanses the key schedule */
    }
    PyBuffer_Release(&label);
    if (aad != NULL) {
        PyMem_Free(aad);
    }
    PyMem_Free(item);
    Py_XDECREF(response);
    Py_XDECREF(contexts);
    return result;
}

static PyMethodDef wire_methods[] = {
    {"scan", wire_scan, METH_VARARGS, scan_doc},
    {"seal", wire_seal, METH_VARARGS, seal_doc},
    {"scan_unwrap", wire_scan_unwrap, METH_VARARGS, scan_unwrap_doc},
    {"open_all", wire_open_all, METH_VARARGS, open_all_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef wire_module = {
    PyModuleDef_HEAD_INIT,
    "_wire",
    "BatchWrap's and BatchUnwrap's per-item loops in C over OpenSSL's AES-256-GCM.",
    -1,
    wire_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__wire(void)
{
    return PyModule_Create(&wire_module);
}
