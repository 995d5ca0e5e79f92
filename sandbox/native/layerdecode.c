/*
 * layerdecode: decode one zstd layer stream without the GIL.
 *
 * Loaded with ctypes by sandbox/layerdecode.py (ctypes releases the GIL for the length of each
 * call). One call of layerdecode_read fills the caller's buffer: it reads compressed bytes
 * from an fd and decodes them with libzstd's streaming decoder (RFC 8878) straight into that
 * buffer; with hash_compressed it also hashes every byte it reads (sha256, the blob digest).
 * Decoding in Python took the GIL back after every read and every decompress call, some
 * 10,000 hand-offs per import of a Debian rootfs; see docs/snapshots.md "Import performance".
 *
 * The stream is one or more zstd frames (RFC 8878 3: concatenated frames are one stream), each
 * read to its end and its checksum, when it has one, checked by libzstd. Anything else where
 * a frame would start is garbage: skippable frames (RFC 8878 3.1.2) and legacy frames
 * included, as they are in the gzip, xz and bzip2 streams sandbox/layerstream.py decodes. A
 * stream that ends inside a frame is truncated. libzstd's default window limit
 * (ZSTD_WINDOWLOG_LIMIT_DEFAULT, 128 MiB) bounds the memory a frame can ask for.
 *
 * A frame whose window is at most the history_max given to layerdecode_new is decoded with
 * libzstd's bufferless API (ZSTD_decompressContinue), block by block straight into the
 * caller's buffer: the streaming decoder decodes into a window of its own and copies every
 * byte out (~12% of the CPU of decoding and hashing a Debian rootfs here). The caller's buffers are then regions of one
 * ring, as libzstd's own streaming decoder keeps its window: contiguous with the previous
 * region or at the start of the ring, never over the last history_max bytes decoded, and at
 * least ZSTD_BLOCKSIZE_MAX long (layerdecode_read stops before a block that might not fit in
 * what is left). A frame with a larger window goes through the streaming decoder.
 *
 * layerdecode_read returns the bytes decoded (the buffer is full unless the stream ended or
 * the next block might not fit), 0 at the clean end of the stream, or -1 with the reason in
 * layerdecode_error and, for a failed read(2), the errno in layerdecode_errno (0 for a bad
 * stream).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include <openssl/evp.h>
#define ZSTD_STATIC_LINKING_ONLY /* the bufferless API: ZSTD_decompressContinue and its kin */
#include <zstd.h>

/* Compressed reads of ZSTD_DStreamInSize() (one block plus its header, ~128 KiB) stay in the
 * cache while libzstd decodes them; `zstd -d` reads the same amount. */
#define FRAME_MAGIC "\x28\xb5\x2f\xfd" /* RFC 8878 3.1.1, little-endian 0xFD2FB528 */
#define MAGIC_SIZE 4
#define DIGEST_SIZE 32

struct layerdecode {
    int fd;
    int eof;      /* read(2) returned 0 */
    int in_frame; /* a frame has started and libzstd has not reported its end */
    int direct;         /* this frame is decoded with the bufferless API, into the ring */
    size_t block;       /* a direct frame's largest block: min(window, ZSTD_BLOCKSIZE_MAX) */
    size_t history_max; /* the largest window decoded directly */
    ZSTD_DCtx *dctx;
    EVP_MD_CTX *in_hash; /* NULL unless hash_compressed */
    unsigned char *input;
    size_t input_size;
    ZSTD_inBuffer in; /* in.src == input; in.size bytes valid, in.pos consumed */
    int error_errno;
    char error[256];
};

static ssize_t fail(struct layerdecode *d, int errnum, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

static ssize_t fail(struct layerdecode *d, int errnum, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(d->error, sizeof d->error, format, args);
    va_end(args);
    d->error_errno = errnum;
    return -1;
}

void layerdecode_free(struct layerdecode *d)
{
    if (d == NULL)
        return;
    ZSTD_freeDCtx(d->dctx);
    EVP_MD_CTX_free(d->in_hash);
    free(d->input);
    free(d);
}

static EVP_MD_CTX *new_sha256(void)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx != NULL && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* A decoder for the stream on fd whose first head_size bytes (head) the caller has already
 * read; NULL when out of memory. */
struct layerdecode *layerdecode_new(int fd, const unsigned char *head, size_t head_size,
                                    int hash_compressed, size_t history_max)
{
    struct layerdecode *d = calloc(1, sizeof *d);
    if (d == NULL)
        return NULL;
    d->fd = fd;
    d->history_max = history_max;
    d->input_size = ZSTD_DStreamInSize();
    if (d->input_size < head_size)
        d->input_size = head_size;
    d->input = malloc(d->input_size);
    d->dctx = ZSTD_createDCtx();
    d->in_hash = hash_compressed ? new_sha256() : NULL;
    if (d->input == NULL || d->dctx == NULL || (hash_compressed && d->in_hash == NULL)) {
        layerdecode_free(d);
        return NULL;
    }
    memcpy(d->input, head, head_size);
    d->in.src = d->input;
    d->in.size = head_size;
    if (d->in_hash != NULL && EVP_DigestUpdate(d->in_hash, head, head_size) != 1) {
        layerdecode_free(d);
        return NULL;
    }
    return d;
}

/* Keep the unconsumed input, then read more after it: 1 if bytes came, 0 at the end of the
 * file, -1 on failure. */
static int read_more(struct layerdecode *d)
{
    size_t kept = d->in.size - d->in.pos;
    memmove(d->input, d->input + d->in.pos, kept);
    d->in.pos = 0;
    d->in.size = kept;
    ssize_t got;
    do
        got = read(d->fd, d->input + kept, d->input_size - kept);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return (int)fail(d, errno, "read: %s", strerror(errno));
    if (got == 0) {
        d->eof = 1;
        return 0;
    }
    if (d->in_hash != NULL && EVP_DigestUpdate(d->in_hash, d->input + kept, (size_t)got) != 1)
        return (int)fail(d, 0, "sha256 of the compressed bytes failed");
    d->in.size += (size_t)got;
    return 1;
}

/* A frame starts at the input: decode it directly if its window is small enough (its header
 * read whole first), else with the streaming decoder. 1, or -1 on failure. */
static int choose_decoder(struct layerdecode *d)
{
    ZSTD_frameHeader header;
    size_t need;
    for (;;) {
        need = ZSTD_getFrameHeader(&header, d->input + d->in.pos, d->in.size - d->in.pos);
        if (ZSTD_isError(need))
            return (int)fail(d, 0, "corrupt data: %s", ZSTD_getErrorName(need));
        if (need == 0 || d->eof)
            break; /* the header is whole, or the stream ends inside it (found below) */
        if (read_more(d) < 0)
            return -1;
    }
    d->direct = need == 0 && header.windowSize <= d->history_max;
    d->block = d->direct ? header.blockSizeMax : 0;
    size_t reset = d->direct ? ZSTD_decompressBegin(d->dctx)
                             : ZSTD_DCtx_reset(d->dctx, ZSTD_reset_session_only);
    if (ZSTD_isError(reset))
        return (int)fail(d, 0, "zstd: %s", ZSTD_getErrorName(reset));
    return 1;
}

/* One step of a direct frame: the next block (or header, or checksum) decoded at
 * out->pos, or the frame's end noted. 1 after a step, 0 if the next block might not fit in
 * what is left of the buffer, -1 on failure. */
static int direct_step(struct layerdecode *d, ZSTD_outBuffer *out)
{
    size_t need = ZSTD_nextSrcSizeToDecompress(d->dctx);
    if (need == 0) {
        d->in_frame = 0; /* decoded, and its checksum checked */
        d->direct = 0;
        return 1;
    }
    ZSTD_nextInputType_e next = ZSTD_nextInputType(d->dctx);
    if ((next == ZSTDnit_block || next == ZSTDnit_lastBlock) && out->size - out->pos < d->block)
        return 0;
    while (d->in.size - d->in.pos < need && !d->eof)
        if (read_more(d) < 0)
            return -1;
    if (d->in.size - d->in.pos < need)
        return (int)fail(d, 0, "truncated: the stream ends inside a member");
    size_t got = ZSTD_decompressContinue(d->dctx, (char *)out->dst + out->pos,
                                         out->size - out->pos, d->input + d->in.pos, need);
    if (ZSTD_isError(got))
        return (int)fail(d, 0, "corrupt data: %s", ZSTD_getErrorName(got));
    d->in.pos += need;
    out->pos += got;
    return 1;
}

/* Between frames: 1 if a frame starts here, 0 at the clean end of the stream, -1 if anything
 * else follows (or the read failed). */
static int start_frame(struct layerdecode *d)
{
    while (d->in.size - d->in.pos < MAGIC_SIZE && !d->eof)
        if (read_more(d) < 0)
            return -1;
    const unsigned char *next = d->input + d->in.pos;
    size_t left = d->in.size - d->in.pos;
    if (left == 0)
        return 0;
    if (left >= MAGIC_SIZE && memcmp(next, FRAME_MAGIC, MAGIC_SIZE) == 0) {
        d->in_frame = 1;
        return choose_decoder(d);
    }
    char shown[8 * 4 + 1] = "";
    for (size_t i = 0; i < left && i < 8; i++)
        snprintf(shown + 4 * i, 5, "\\x%02x", next[i]);
    return (int)fail(d, 0, "trailing garbage after the last member (b'%s')", shown);
}

ssize_t layerdecode_read(struct layerdecode *d, unsigned char *buffer, size_t size)
{
    ZSTD_outBuffer out = {buffer, size, 0};
    while (out.pos < out.size) {
        if (!d->in_frame) {
            int started = start_frame(d);
            if (started < 0)
                return -1;
            if (started == 0)
                break;
        }
        if (d->direct) {
            int stepped = direct_step(d, &out);
            if (stepped < 0)
                return -1;
            if (stepped == 0) {
                if (out.pos == 0)
                    return fail(d, 0, "internal: a buffer shorter than a block");
                break;
            }
            continue;
        }
        if (d->in.pos == d->in.size && !d->eof && read_more(d) < 0)
            return -1;
        size_t in_before = d->in.pos, out_before = out.pos;
        size_t hint = ZSTD_decompressStream(d->dctx, &out, &d->in);
        if (ZSTD_isError(hint))
            return fail(d, 0, "corrupt data: %s", ZSTD_getErrorName(hint));
        if (hint == 0) {
            d->in_frame = 0; /* the frame is decoded, its checksum checked, all flushed */
            continue;
        }
        /* libzstd stops only with its output full or its input all consumed: no progress
         * at all with the input used up and the file at its end means the frame is cut. */
        if (d->in.pos == in_before && out.pos == out_before) {
            if (d->in.pos < d->in.size)
                return fail(d, 0, "corrupt data: the decoder made no progress");
            if (d->eof)
                return fail(d, 0, "truncated: the stream ends inside a member");
        }
    }
    return (ssize_t)out.pos;
}

/* The sha256 of the compressed bytes (with hash_compressed) into digest; 0 on success. Call
 * once, at the end of the stream. */
int layerdecode_digest(struct layerdecode *d, unsigned char *digest)
{
    unsigned int size;
    if (d->in_hash == NULL || EVP_DigestFinal_ex(d->in_hash, digest, &size) != 1 ||
        size != DIGEST_SIZE)
        return -1;
    return 0;
}

const char *layerdecode_error(const struct layerdecode *d)
{
    return d->error;
}

int layerdecode_errno(const struct layerdecode *d)
{
    return d->error_errno;
}
