/* The CIM layer's conversions on the CPU, one tile at a time: forward (levels, a 32-bit uniform per conversion,
 * the code from the transfer's table, decoded and summed over row groups and planes) and backward (the statistical
 * gradient). The torch reference of every step, and what each argument means, is cimlab/training/macro.py
 * (``torch_forward`` and ``torch_backward`` compute the same numbers); tests/training/test_kernels.py holds them
 * equal. Built on first use by cimlab/training/native.py; C99 with the compiler's AVX-512 intrinsics where it
 * targets them (table look-ups as in-register permutes, a small matrix product), plain C otherwise.
 *
 * Vector lanes run over LANES input vectors: a lane vector holds the conversions of one (group, plane, column) for
 * LANES vectors, so every lane reads the same column's tables, and those tables (per level: codes, slopes, decoded
 * values) fit in vector registers and are read with permutes instead of gathers.
 *
 * Levels: a conversion's ideal partial sum is sum_r x_p[r] * d[r, c] over the rows of its group. Inputs and digits
 * are held as bit masks over the group's rows (32 rows per word), so a level is
 * sum_{ib, jb, word} popcount(xbits[p][ib][word] & dbits[jb][word][c]) << (ib + jb).
 *
 * Uniforms: SplitMix64 (Steele, Lea and Flood, OOPSLA 2014) as a counter-based generator: the 64-bit word k of a
 * call is mix(seed + (k + 1) * GAMMA); conversion (i, g, p, c) uses half (k & 1) of word k >> 1 for
 * k = ((g * P + p) * C + c) * Ne + i, Ne being the vector count rounded up to a multiple of LANES.
 *
 * The backward pass needs two sums of the slopes sl = slope[lev * n_slope + stabs[c]] of a (vector, group):
 *   sa[c]    = sum_p pw[p] * sl[p][c]                     (towards dL/dx)
 *   sb[p][m] = sum_s colq[s * M + m] * sl[p][s * M + m]   (towards dL/dw)
 * and from them
 *   gx[i][pos] += sum_c digits[pos][c] * colx[c] * grad[i][c % M] * sa[c]
 *   gq[pos][m] += sum_{i, p} x_p[pos] * pw[p] * grad[i][m] * sb[p][m]
 * The backward recomputes the levels (cheaper here than keeping the sums from the forward: they would be half a
 * float per conversion, written once and read once).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define GAMMA 0x9E3779B97F4A7C15ull
#define LANES 16
#define LUT 32 /* levels (and codes) a register look-up covers: two vectors of 16 */

typedef struct {
    int32_t n;         /* input vectors */
    int32_t x_stride;  /* elements between two vectors of x (input codes as float32) */
    int32_t row0;      /* the tile's first row in x */
    int32_t n_rows;    /* the tile's rows */
    int32_t offset;    /* position of the tile's first row inside its first group */
    int32_t groups;    /* row groups G */
    int32_t rows;      /* rows per group R */
    int32_t planes;    /* input slices P */
    int32_t slice_bits;
    int32_t cols;      /* conversions per group and plane: slices x tile columns (C) */
    int32_t cell_bits;
    int32_t out_cols;  /* tile columns M (column c is slice c / M, tile column c % M) */
    int32_t gq_stride; /* backward: elements between two rows of gq (gq points at the tile's first row and column) */
    /* conv != 0: x (and gx) is a batch of padded images [B][img_c][img_h][img_w] and its matrix is their im2col, read
     * in place: vector i is output pixel (i / (out_h * out_w), its row, its column), matrix column k is (channel,
     * kernel row, kernel column) in torch.nn.functional.unfold's order; x_stride is then unused */
    int32_t conv, img_c, img_h, img_w, k_h, k_w, s_h, s_w, d_h, d_w, out_h, out_w;
} geom_t;

typedef struct {
    const int32_t* guide;  /* [rows x buckets]: the code at each bucket's left edge */
    const uint32_t* off;   /* [rows x buckets]: the step inside the bucket, as an offset (packed layout) */
    const int32_t* cum;    /* [rows x codes]: bound - 1 - 2**31 */
    int32_t shift;         /* 32 - log2(buckets) */
    int32_t buckets;
    int32_t steps;         /* search layout: comparisons after the guide */
    int32_t packed;        /* 1: packed layout (one comparison finishes) */
    int32_t n_codes;
    int32_t n_tables;
    int32_t n_levels;
} table_t;

static inline uint64_t splitmix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int32_t pad16(int32_t n) { return (n + 15) / 16 * 16; }

/* An array of n 4-byte elements, zeroed; NULL when out of memory or n is 0. */
static void* zeros(size_t n) { return n ? calloc(n, 4) : NULL; }

/* What a tile's every block needs: digit masks, digits, and per column its tables. */
typedef struct {
    int32_t C, M, S, W, Rp, Mp;
    int32_t fast;     /* the per-column tables below are in use (packed table, levels and codes within LUT) */
    uint32_t* dbits;  /* [G][cell_bits][W][C] */
    float* dft;       /* [G][C][Rp]: the digits, rows innermost */
    int32_t* tabs;    /* [C] sampling table index */
    int32_t* stabs;   /* [C] slope table index */
    int32_t* dtabs;   /* [C] row of the decoder's table */
    int32_t* lcode;   /* fast: [C][buckets][LUT] code at each bucket's left edge, by level */
    uint32_t* loff;   /* fast: [C][buckets][LUT] the step's offset in the bucket, by level */
    float* lslope;    /* [C][LUT] slope by level (LUT >= levels), or NULL */
    float* ldec;      /* fast and decoded: [C][LUT] value by code */
    float* colq;      /* [S][Mp] */
    float* colx;      /* [S][Mp] */
} tile_t;

static void tile_free(tile_t* t) {
    free(t->dbits); free(t->dft); free(t->tabs); free(t->stabs); free(t->dtabs); free(t->lcode); free(t->loff);
    free(t->lslope); free(t->ldec); free(t->colq); free(t->colx);
}

static int tile_init(tile_t* t, const geom_t* g, const int32_t* digits, const int32_t* tabs, const int32_t* stabs,
                     const int32_t* dtabs, const float* colq, const float* colx) {
    const int32_t C = g->cols, M = g->out_cols, G = g->groups, R = g->rows;
    memset(t, 0, sizeof(*t));
    t->C = C; t->M = M; t->S = C / M; t->W = (R + 31) / 32; t->Rp = pad16(R); t->Mp = pad16(M);
    t->dbits = (uint32_t*)zeros((size_t)G * g->cell_bits * t->W * C);
    t->dft = (float*)zeros((size_t)G * C * t->Rp);
    t->tabs = (int32_t*)zeros((size_t)C);
    t->stabs = (int32_t*)zeros((size_t)C);
    t->dtabs = (int32_t*)zeros((size_t)C);
    t->colq = (float*)zeros((size_t)t->S * t->Mp);
    t->colx = (float*)zeros((size_t)t->S * t->Mp);
    if (!t->dbits || !t->dft || !t->tabs || !t->stabs || !t->dtabs || !t->colq || !t->colx) return -1;
    for (int32_t grp = 0; grp < G; grp++)
        for (int32_t r = 0; r < R; r++) {
            const int32_t* row = digits + ((size_t)grp * R + r) * C;
            for (int32_t c = 0; c < C; c++) {
                t->dft[((size_t)grp * C + c) * t->Rp + r] = (float)row[c];
                for (int32_t jb = 0; jb < g->cell_bits; jb++)
                    if ((row[c] >> jb) & 1)
                        t->dbits[(((size_t)grp * g->cell_bits + jb) * t->W + r / 32) * C + c] |= 1u << (r % 32);
            }
        }
    for (int32_t c = 0; c < C; c++) {
        if (tabs) t->tabs[c] = tabs[c];
        if (stabs) t->stabs[c] = stabs[c];
        if (dtabs) t->dtabs[c] = dtabs[c];
    }
    for (int32_t s = 0; s < t->S; s++)
        for (int32_t m = 0; m < M; m++) {
            if (colq) t->colq[s * t->Mp + m] = colq[s * M + m];
            if (colx) t->colx[s * t->Mp + m] = colx[s * M + m];
        }
    return 0;
}

/* per column: the slope of every level (levels within LUT), for register look-ups */
static int tile_slopes(tile_t* t, const float* slope, int32_t n_slope, int32_t n_levels) {
    if (n_levels > LUT) return 0;
    t->lslope = (float*)zeros((size_t)t->C * LUT);
    if (!t->lslope) return -1;
    for (int32_t c = 0; c < t->C; c++)
        for (int32_t s = 0; s < n_levels; s++) t->lslope[c * LUT + s] = slope[s * n_slope + t->stabs[c]];
    return 0;
}

/* per column: the sampling table by (bucket, level), and the decoder by code, where they fit register look-ups */
static int tile_tables(tile_t* t, const table_t* tb, const float* dec) {
    const int32_t T = tb->buckets;
#if defined(__AVX512F__)
    t->fast = tb->packed && tb->n_levels <= LUT && T <= 4 && (!dec || tb->n_codes <= LUT);
#else
    t->fast = 0;
#endif
    if (!t->fast) return 0;
    t->lcode = (int32_t*)zeros((size_t)t->C * T * LUT);
    t->loff = (uint32_t*)zeros((size_t)t->C * T * LUT);
    t->ldec = dec ? (float*)zeros((size_t)t->C * LUT) : NULL;
    if (!t->lcode || !t->loff || (dec && !t->ldec)) return -1;
    for (int32_t c = 0; c < t->C; c++) {
        for (int32_t b = 0; b < T; b++)
            for (int32_t s = 0; s < tb->n_levels; s++) {
                const size_t e = ((size_t)s * tb->n_tables + t->tabs[c]) * T + b;
                t->lcode[((size_t)c * T + b) * LUT + s] = tb->guide[e];
                t->loff[((size_t)c * T + b) * LUT + s] = tb->off[e];
            }
        if (dec)
            for (int32_t k = 0; k < tb->n_codes; k++) t->ldec[c * LUT + k] = dec[t->dtabs[c] + k];
    }
    return 0;
}

/* A block of LANES vectors in one group: inputs row by row and bit masks, and where x holds them. */
typedef struct {
    int32_t* v;       /* [R][LANES] */
    uint32_t* xm;     /* [bits][W][LANES]: bit b of the codes of the rows of word w */
    const int64_t* col_at;  /* [n_rows]: offset in x of the tile's row pos, beyond the vector's own */
    int64_t at[LANES];      /* offset in x of each lane's vector (its first matrix column): lane_offsets */
} block_t;

/* where x holds (vector i, matrix column k) = at(i) + col_at(k): the tile's rows' part, [n_rows]; NULL: memory */
static int64_t* column_offsets(const geom_t* g) {
    int64_t* o = (int64_t*)malloc(sizeof(int64_t) * (size_t)(g->n_rows > 0 ? g->n_rows : 1));
    if (!o) return NULL;
    for (int32_t pos = 0; pos < g->n_rows; pos++) {
        const int32_t k = g->row0 + pos, kk = g->k_h * g->k_w;
        o[pos] = g->conv ? ((int64_t)(k / kk) * g->img_h + (int64_t)(k % kk / g->k_w) * g->d_h) * g->img_w +
                               (int64_t)(k % g->k_w) * g->d_w
                         : (int64_t)k;
    }
    return o;
}

/* each lane's vector's part of its offsets in x (vectors i0 .. i0 + nb - 1; lanes past nb: 0) */
static void lane_offsets(const geom_t* g, int32_t i0, int32_t nb, int64_t* at) {
    const int32_t L = g->out_h * g->out_w;
    for (int32_t i = 0; i < LANES; i++) {
        const int32_t n = i0 + i;
        if (i >= nb) at[i] = 0;
        else if (!g->conv) at[i] = (int64_t)n * g->x_stride;
        else {
            const int32_t b = n / L, l = n % L;
            at[i] = ((int64_t)b * g->img_c * g->img_h + (int64_t)(l / g->out_w) * g->s_h) * g->img_w +
                    (int64_t)(l % g->out_w) * g->s_w;
        }
    }
}

/* the group's input codes of the block's nb vectors (at blk->at) by row, and (where blk->xm is given) their bit
 * masks (bit ib of slice p is bit p * slice_bits + ib of the code); rows outside the tile and lanes past nb hold 0 */
static void block_inputs(const geom_t* g, const tile_t* t, const float* x, int32_t nb, int32_t grp,
                         block_t* blk) {
    const int32_t R = g->rows, B = g->planes * g->slice_bits, W = t->W;
    int32_t* v = blk->v;
    memset(v, 0, sizeof(int32_t) * (size_t)R * LANES);
    for (int32_t r = 0; r < R; r++) {
        const int32_t pos = grp * R + r - g->offset;
        if (pos < 0 || pos >= g->n_rows) continue;
        const float* xr = x + blk->col_at[pos];
        for (int32_t i = 0; i < nb; i++) v[r * LANES + i] = (int32_t)xr[blk->at[i]];
    }
    if (!blk->xm) return;
    for (int32_t b = 0; b < B; b++)
        for (int32_t w = 0; w < W; w++) {
            uint32_t m[LANES] = {0};
            const int32_t r1 = (32 * w + 32 < R) ? 32 * w + 32 : R;
            for (int32_t r = 32 * w; r < r1; r++)
                for (int32_t i = 0; i < LANES; i++) m[i] |= (((uint32_t)v[r * LANES + i] >> b) & 1u) << (r - 32 * w);
            memcpy(blk->xm + ((size_t)b * W + w) * LANES, m, sizeof(m));
        }
}

/* the levels of (plane p, column c) for the block's lanes */
static inline void lane_levels(const geom_t* g, const tile_t* t, const block_t* blk, int32_t grp, int32_t p, int32_t c,
                               int32_t* lev) {
    const int32_t W = t->W, C = t->C, SB = g->slice_bits, CB = g->cell_bits;
    for (int32_t i = 0; i < LANES; i++) lev[i] = 0;
    for (int32_t ib = 0; ib < SB; ib++)
        for (int32_t w = 0; w < W; w++) {
            const uint32_t* a = blk->xm + ((size_t)(p * SB + ib) * W + w) * LANES;
            for (int32_t jb = 0; jb < CB; jb++) {
                const uint32_t d = t->dbits[(((size_t)grp * CB + jb) * W + w) * C + c];
                if (!d) continue;
                const int32_t sh = ib + jb;
                for (int32_t i = 0; i < LANES; i++) lev[i] += __builtin_popcount(a[i] & d) << sh;
            }
        }
}

/* the uniforms of LANES consecutive conversions k0 .. k0 + LANES - 1 (k0 even) */
static inline void lane_uniforms(uint64_t seed, uint64_t k0, uint32_t* u) {
    uint64_t z[LANES / 2];
    for (int32_t b = 0; b < LANES / 2; b++) z[b] = splitmix(seed + ((k0 >> 1) + (uint64_t)b + 1u) * GAMMA);
    for (int32_t b = 0; b < LANES / 2; b++) {
        u[2 * b] = (uint32_t)z[b];
        u[2 * b + 1] = (uint32_t)(z[b] >> 32);
    }
}

/* the codes of column c for levels lev and uniforms u, from the transfer's table (any layout) */
static inline void lane_codes_table(const table_t* tb, const tile_t* t, int32_t c, const int32_t* lev, const uint32_t* u,
                                    int32_t* code) {
    const uint32_t shift = (uint32_t)tb->shift, T = (uint32_t)tb->buckets;
    for (int32_t i = 0; i < LANES; i++) {
        const uint32_t row = (uint32_t)lev[i] * (uint32_t)tb->n_tables + (uint32_t)t->tabs[c];
        const uint32_t e = row * T + (u[i] >> shift);
        int32_t k = tb->guide[e];
        if (tb->packed) {
            k += (u[i] & ((1u << shift) - 1u)) >= tb->off[e];
        } else {
            const int32_t su = (int32_t)(u[i] ^ 0x80000000u);
            const size_t base = (size_t)row * (size_t)tb->n_codes;
            for (int32_t s = 0; s < tb->steps; s++) k += su > tb->cum[base + (size_t)k];
        }
        code[i] = k;
    }
}

#if defined(__AVX512F__)
/* lut[idx] for idx in 0 .. 32 * pieces - 1, from lut's pieces of 32 entries (two vectors each) */
static inline __m512i lut_i32(const int32_t* lut, __m512i idx, int32_t pieces) {
    __m512i r = _mm512_permutex2var_epi32(_mm512_loadu_si512((const void*)lut), idx,
                                          _mm512_loadu_si512((const void*)(lut + 16)));
    for (int32_t q = 1; q < pieces; q++) {
        const __mmask16 sel = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(idx, 5), _mm512_set1_epi32(q));
        const __m512i v = _mm512_permutex2var_epi32(_mm512_loadu_si512((const void*)(lut + 32 * q)), idx,
                                                    _mm512_loadu_si512((const void*)(lut + 32 * q + 16)));
        r = _mm512_mask_mov_epi32(r, sel, v);
    }
    return r;
}
#endif

/* the slopes of column c at levels lev */
static inline void lane_slopes(const tile_t* t, const float* slope, int32_t n_slope, int32_t c, const int32_t* lev,
                               float* sl) {
#if defined(__AVX512F__)
    if (t->lslope) {
        const float* l = t->lslope + (size_t)c * LUT;
        _mm512_storeu_ps(sl, _mm512_permutex2var_ps(_mm512_loadu_ps(l), _mm512_loadu_si512((const void*)lev),
                                                    _mm512_loadu_ps(l + 16)));
        return;
    }
#endif
    for (int32_t i = 0; i < LANES; i++) sl[i] = slope[lev[i] * n_slope + t->stabs[c]];
}

/* the decoded values of column c's codes */
static inline void lane_values(const tile_t* t, const float* dec, int32_t c, const int32_t* code, float* val) {
#if defined(__AVX512F__)
    if (t->ldec) {
        const float* l = t->ldec + (size_t)c * LUT;
        _mm512_storeu_ps(val, _mm512_permutex2var_ps(_mm512_loadu_ps(l), _mm512_loadu_si512((const void*)code),
                                                     _mm512_loadu_ps(l + 16)));
        return;
    }
#endif
    for (int32_t i = 0; i < LANES; i++) val[i] = dec[t->dtabs[c] + code[i]];
}

/* add plane p's slopes of column c to a block's slope sums (lanes innermost): sa [C][LANES], sb [P][M][LANES] */
static inline void add_slopes(const tile_t* t, int32_t p, int32_t c, float w, const float* sl, float* sa, float* sb) {
    const int32_t m = c % t->M;
    const float q = t->colq[(c / t->M) * t->Mp + m];
    float* a = sa + (size_t)c * LANES;
    float* b = sb + ((size_t)p * t->M + m) * LANES;
    for (int32_t i = 0; i < LANES; i++) {
        a[i] += w * sl[i];
        b[i] += q * sl[i];
    }
}

/* One group's pass over a block in the forward: what every column needs. */
typedef struct {
    const geom_t* g;
    const tile_t* t;
    const block_t* blk;
    const table_t* tb;
    const int32_t* pw;
    const float* dec;
    int32_t Ne, i0, grp;
    uint64_t seed;
    int32_t* iacc;  /* [C][LANES] sums of pw * code (undecoded) */
    double* dacc;   /* [C][LANES] sums of pw * value (decoded) */
} pass_t;

/* column c of a group's pass, in plain C */
static void column_portable(const pass_t* ps, int32_t c) {
    const geom_t* g = ps->g;
    const tile_t* t = ps->t;
    const int32_t P = g->planes, C = t->C;
    int32_t lev[LANES], code[LANES];
    uint32_t u[LANES];
    float val[LANES];
    for (int32_t p = 0; p < P; p++) {
        lane_levels(g, t, ps->blk, ps->grp, p, c, lev);
        lane_uniforms(ps->seed, ((uint64_t)(ps->grp * P + p) * C + c) * (uint64_t)ps->Ne + (uint64_t)ps->i0, u);
        lane_codes_table(ps->tb, t, c, lev, u, code);
        if (ps->dec) {
            lane_values(t, ps->dec, c, code, val);
            for (int32_t i = 0; i < LANES; i++) ps->dacc[(size_t)c * LANES + i] += (double)ps->pw[p] * (double)val[i];
        } else {
            for (int32_t i = 0; i < LANES; i++) ps->iacc[(size_t)c * LANES + i] += ps->pw[p] * code[i];
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VPOPCNTDQ__)
#define HAVE_COLUMN_AVX512 1
static inline __m512i mullo64(__m512i a, uint64_t b) { return _mm512_mullo_epi64(a, _mm512_set1_epi64((long long)b)); }

/* the codes of column c for levels lev and uniforms u by gathers from the transfer's table (any layout): as
 * lane_codes_table */
static inline __m512i gather_codes(const table_t* tb, const tile_t* t, int32_t c, __m512i lev, __m512i u) {
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i row = _mm512_add_epi32(_mm512_mullo_epi32(lev, _mm512_set1_epi32(tb->n_tables)),
                                         _mm512_set1_epi32(t->tabs[c]));
    const __m512i e = _mm512_add_epi32(_mm512_mullo_epi32(row, _mm512_set1_epi32(tb->buckets)),
                                       _mm512_srli_epi32(u, (unsigned)tb->shift));
    __m512i k = _mm512_i32gather_epi32(e, (const void*)tb->guide, 4);
    if (tb->packed) {
        const __m512i low = _mm512_and_si512(u, _mm512_set1_epi32((int32_t)((1u << tb->shift) - 1u)));
        const __m512i o = _mm512_i32gather_epi32(e, (const void*)tb->off, 4);
        return _mm512_mask_add_epi32(k, _mm512_cmpge_epu32_mask(low, o), k, one);
    }
    const __m512i su = _mm512_xor_si512(u, _mm512_set1_epi32((int32_t)0x80000000u));
    const __m512i base = _mm512_mullo_epi32(row, _mm512_set1_epi32(tb->n_codes));
    for (int32_t st = 0; st < tb->steps; st++) {
        const __m512i b = _mm512_i32gather_epi32(_mm512_add_epi32(base, k), (const void*)tb->cum, 4);
        k = _mm512_mask_add_epi32(k, _mm512_cmpgt_epi32_mask(su, b), k, one);
    }
    return k;
}

/* columns c0 .. c0 + NCOL - 1 of a group's pass with AVX-512: the same numbers as column_portable. Fast tiles look
 * codes and values up in registers, the others gather them from the tables. NCOL columns side by side give the
 * processor independent chains to overlap */
#define NCOL 4
static void columns_avx512(const pass_t* ps, int32_t c0) {
    const geom_t* g = ps->g;
    const tile_t* t = ps->t;
    const int32_t P = g->planes, C = t->C, W = t->W, SB = g->slice_bits, CB = g->cell_bits, T = ps->tb->buckets;
    const int32_t shift = ps->tb->shift;
    const __m512i lanes = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi64((long long)GAMMA));
    const __m512i lowmask = _mm512_set1_epi32((int32_t)((1u << shift) - 1u));
    __m512i ia[NCOL];
    __m512d da0[NCOL], da1[NCOL];
    for (int32_t j = 0; j < NCOL; j++) {
        ia[j] = _mm512_setzero_si512();
        da0[j] = _mm512_setzero_pd();
        da1[j] = _mm512_setzero_pd();
    }
    for (int32_t p = 0; p < P; p++) {
        __m512i lev[NCOL], z[NCOL], code[NCOL];
        for (int32_t j = 0; j < NCOL; j++) lev[j] = _mm512_setzero_si512();
        for (int32_t ib = 0; ib < SB; ib++)
            for (int32_t w = 0; w < W; w++) {
                const __m512i a = _mm512_loadu_si512((const void*)(ps->blk->xm + ((size_t)(p * SB + ib) * W + w) * LANES));
                for (int32_t jb = 0; jb < CB; jb++) {
                    const uint32_t* d = t->dbits + (((size_t)ps->grp * CB + jb) * W + w) * C + c0;
                    for (int32_t j = 0; j < NCOL; j++) {
                        const __m512i pc = _mm512_popcnt_epi32(_mm512_and_si512(a, _mm512_set1_epi32((int32_t)d[j])));
                        lev[j] = _mm512_add_epi32(lev[j], _mm512_slli_epi32(pc, (unsigned)(ib + jb)));
                    }
                }
            }
        const uint64_t k0 = ((uint64_t)(ps->grp * P + p) * C + c0) * (uint64_t)ps->Ne + (uint64_t)ps->i0;
        for (int32_t j = 0; j < NCOL; j++) {
            const uint64_t kj = k0 + (uint64_t)j * (uint64_t)ps->Ne;
            z[j] = _mm512_add_epi64(_mm512_set1_epi64((long long)(ps->seed + ((kj >> 1) + 1u) * GAMMA)), lanes);
        }
        for (int32_t j = 0; j < NCOL; j++) z[j] = mullo64(_mm512_xor_si512(z[j], _mm512_srli_epi64(z[j], 30)), 0xBF58476D1CE4E5B9ull);
        for (int32_t j = 0; j < NCOL; j++) z[j] = mullo64(_mm512_xor_si512(z[j], _mm512_srli_epi64(z[j], 27)), 0x94D049BB133111EBull);
        for (int32_t j = 0; j < NCOL; j++) {
            const __m512i u = _mm512_xor_si512(z[j], _mm512_srli_epi64(z[j], 31));  /* 16 uniforms, low halves first */
            if (!t->fast) {
                code[j] = gather_codes(ps->tb, t, c0 + j, lev[j], u);
                continue;
            }
            const __m512i idx = _mm512_add_epi32(lev[j], _mm512_slli_epi32(_mm512_srli_epi32(u, (unsigned)shift), 5));
            const __m512i k = lut_i32(t->lcode + (size_t)(c0 + j) * T * LUT, idx, T);
            const __m512i o = lut_i32((const int32_t*)t->loff + (size_t)(c0 + j) * T * LUT, idx, T);
            code[j] = _mm512_mask_add_epi32(k, _mm512_cmpge_epu32_mask(_mm512_and_si512(u, lowmask), o), k,
                                            _mm512_set1_epi32(1));
        }
        if (ps->dec) {
            const __m512d w = _mm512_set1_pd((double)ps->pw[p]);
            for (int32_t j = 0; j < NCOL; j++) {
                const float* l = t->ldec ? t->ldec + (size_t)(c0 + j) * LUT : NULL;
                const __m512 v = l ? _mm512_permutex2var_ps(_mm512_loadu_ps(l), code[j], _mm512_loadu_ps(l + 16))
                                   : _mm512_i32gather_ps(_mm512_add_epi32(code[j], _mm512_set1_epi32(t->dtabs[c0 + j])),
                                                         (const void*)ps->dec, 4);
                da0[j] = _mm512_fmadd_pd(w, _mm512_cvtps_pd(_mm512_castps512_ps256(v)), da0[j]);
                da1[j] = _mm512_fmadd_pd(w, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))),
                                         da1[j]);
            }
        } else {
            const int32_t w = ps->pw[p];
            if ((w & (w - 1)) == 0) {  /* plane weights are powers of two: a shift */
                const unsigned sh = (unsigned)__builtin_ctz((unsigned)w);
                for (int32_t j = 0; j < NCOL; j++) ia[j] = _mm512_add_epi32(ia[j], _mm512_slli_epi32(code[j], sh));
            } else {
                for (int32_t j = 0; j < NCOL; j++)
                    ia[j] = _mm512_add_epi32(ia[j], _mm512_mullo_epi32(code[j], _mm512_set1_epi32(w)));
            }
        }
    }
    for (int32_t j = 0; j < NCOL; j++) {
        if (ps->dec) {
            double* d = ps->dacc + (size_t)(c0 + j) * LANES;
            _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), da0[j]));
            _mm512_storeu_pd(d + 8, _mm512_add_pd(_mm512_loadu_pd(d + 8), da1[j]));
        } else {
            int32_t* d = ps->iacc + (size_t)(c0 + j) * LANES;
            _mm512_storeu_si512((void*)d, _mm512_add_epi32(_mm512_loadu_si512((const void*)d), ia[j]));
        }
    }
}
/* the slope sums of columns c0 .. c0 + NCOL - 1 of a block in one group (sa [C][LANES], sb [P][M][LANES], added
 * into): the backward pass's share of columns_avx512 */
static void slopes_avx512(const geom_t* g, const tile_t* t, const block_t* blk, int32_t grp, const int32_t* pw,
                          int32_t c0, float* sa, float* sb) {
    const int32_t P = g->planes, C = t->C, W = t->W, SB = g->slice_bits, CB = g->cell_bits, M = t->M;
    for (int32_t p = 0; p < P; p++) {
        __m512i lev[NCOL];
        for (int32_t j = 0; j < NCOL; j++) lev[j] = _mm512_setzero_si512();
        for (int32_t ib = 0; ib < SB; ib++)
            for (int32_t w = 0; w < W; w++) {
                const __m512i a = _mm512_loadu_si512((const void*)(blk->xm + ((size_t)(p * SB + ib) * W + w) * LANES));
                for (int32_t jb = 0; jb < CB; jb++) {
                    const uint32_t* d = t->dbits + (((size_t)grp * CB + jb) * W + w) * C + c0;
                    for (int32_t j = 0; j < NCOL; j++) {
                        const __m512i pc = _mm512_popcnt_epi32(_mm512_and_si512(a, _mm512_set1_epi32((int32_t)d[j])));
                        lev[j] = _mm512_add_epi32(lev[j], _mm512_slli_epi32(pc, (unsigned)(ib + jb)));
                    }
                }
            }
        const __m512 w = _mm512_set1_ps((float)pw[p]);
        for (int32_t j = 0; j < NCOL; j++) {
            const int32_t c = c0 + j, m = c % M;
            const float* l = t->lslope + (size_t)c * LUT;
            const __m512 sl = _mm512_permutex2var_ps(_mm512_loadu_ps(l), lev[j], _mm512_loadu_ps(l + 16));
            float* a = sa + (size_t)c * LANES;
            float* b = sb + ((size_t)p * M + m) * LANES;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(w, sl, _mm512_loadu_ps(a)));
            _mm512_storeu_ps(b, _mm512_fmadd_ps(_mm512_set1_ps(t->colq[(c / M) * t->Mp + m]), sl, _mm512_loadu_ps(b)));
        }
    }
}
#endif

/* Forward: out[i][m] = sum_s sw[s] * sum over groups and planes of pw[p] * value(code of column s * M + m),
 * value(code) = code, or dec[dtabs[c] + code] when dec is given. Returns 0, or -1 when out of memory. */
int cim_forward(const geom_t* g, const float* x, const int32_t* digits, const int32_t* pw, const double* sw,
                const table_t* tb, const int32_t* tabs, const float* dec, const int32_t* dtabs, uint64_t seed,
                double* out) {
    tile_t t;
    block_t blk;
    const int32_t P = g->planes, G = g->groups, C = g->cols, M = g->out_cols, S = C / M;
    const int32_t Ne = pad16(g->n);
    int rc = -1;
    double* dacc = (double*)calloc((size_t)C * LANES, sizeof(double));
    int32_t* iacc = (int32_t*)zeros((size_t)C * LANES);
    blk.v = (int32_t*)zeros((size_t)g->rows * LANES);
    blk.xm = (uint32_t*)zeros((size_t)P * g->slice_bits * ((g->rows + 31) / 32) * LANES);
    int64_t* col_at = column_offsets(g);
    blk.col_at = col_at;
    if (tile_init(&t, g, digits, tabs, NULL, dtabs, NULL, NULL) || tile_tables(&t, tb, dec) || !dacc || !iacc ||
        !blk.v || !blk.xm || !col_at)
        goto done;
    pass_t ps = {g, &t, &blk, tb, pw, dec, Ne, 0, 0, seed, iacc, dacc};
    for (int32_t i0 = 0; i0 < g->n; i0 += LANES) {
        const int32_t nb = (g->n - i0 < LANES) ? g->n - i0 : LANES;
        memset(dacc, 0, sizeof(double) * (size_t)C * LANES);
        memset(iacc, 0, sizeof(int32_t) * (size_t)C * LANES);
        lane_offsets(g, i0, nb, blk.at);
        for (int32_t grp = 0; grp < G; grp++) {
            block_inputs(g, &t, x, nb, grp, &blk);
            ps.i0 = i0;
            ps.grp = grp;
            int32_t c = 0;
#if defined(HAVE_COLUMN_AVX512)
            for (; c + NCOL <= C; c += NCOL) columns_avx512(&ps, c);
#endif
            for (; c < C; c++) column_portable(&ps, c);
        }
        for (int32_t i = 0; i < nb; i++) {
            double* o = out + (size_t)(i0 + i) * M;
            for (int32_t m = 0; m < M; m++) {
                double s = 0.0;
                for (int32_t s2 = 0; s2 < S; s2++) {
                    const size_t k = (size_t)(s2 * M + m) * LANES + i;
                    s += sw[s2] * (dec ? dacc[k] : (double)iacc[k]);
                }
                o[m] = s;
            }
        }
    }
    rc = 0;
done:
    tile_free(&t);
    free(dacc); free(iacc); free(blk.v); free(blk.xm); free(col_at);
    return rc;
}

/* c[ii * ldc + k] += sum_j at[j * ldat + ii] * b[j * ldb + k] for ii < 16 and k < 16: a small matrix product (the
 * left matrix stored transposed) with its 16 x 16 accumulators in vector registers */
static void gemm16(const float* at, int32_t ldat, const float* b, int32_t ldb, int32_t K, float* c, int32_t ldc) {
#if defined(__AVX512F__)
    __m512 acc[16];
    for (int32_t ii = 0; ii < 16; ii++) acc[ii] = _mm512_setzero_ps();
    for (int32_t j = 0; j < K; j++) {
        const float* aj = at + (size_t)j * ldat;
        const __m512 bj = _mm512_loadu_ps(b + (size_t)j * ldb);
        for (int32_t ii = 0; ii < 16; ii++) acc[ii] = _mm512_fmadd_ps(_mm512_set1_ps(aj[ii]), bj, acc[ii]);
    }
    for (int32_t ii = 0; ii < 16; ii++)
        _mm512_storeu_ps(c + (size_t)ii * ldc, _mm512_add_ps(_mm512_loadu_ps(c + (size_t)ii * ldc), acc[ii]));
#else
    float acc[16][16];
    memset(acc, 0, sizeof(acc));
    for (int32_t j = 0; j < K; j++) {
        const float* aj = at + (size_t)j * ldat;
        const float* bj = b + (size_t)j * ldb;
        for (int32_t ii = 0; ii < 16; ii++)
            for (int32_t k = 0; k < 16; k++) acc[ii][k] += aj[ii] * bj[k];
    }
    for (int32_t ii = 0; ii < 16; ii++)
        for (int32_t k = 0; k < 16; k++) c[(size_t)ii * ldc + k] += acc[ii][k];
#endif
}

/* dst[i * ldd + k] = src[k * lds + i] for i, k < 16 */
static void transpose16(const float* src, int32_t lds, float* dst, int32_t ldd) {
#if defined(__AVX512F__)
    __m512 r[16], t[16];
    for (int32_t i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + (size_t)i * lds);
    for (int32_t i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int32_t i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int32_t i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int32_t i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
    for (int32_t i = 0; i < 16; i++) _mm512_storeu_ps(dst + (size_t)i * ldd, r[i]);
#else
    for (int32_t i = 0; i < 16; i++)
        for (int32_t k = 0; k < 16; k++) dst[(size_t)i * ldd + k] = src[(size_t)k * lds + i];
#endif
}

/* Work memory of the gradients of a block. */
typedef struct {
    float* tw;   /* [C][LANES] */
    float* gxb;  /* [LANES][Rp] */
    float* xf;   /* [P * LANES][Rp] */
    float* wt;   /* [P * LANES][Mp] */
    float* tmp;  /* [max(Rp, Mp)][LANES] */
} grads_t;

static int grads_init(grads_t* w, const geom_t* g, const tile_t* t) {
    w->tw = (float*)zeros((size_t)t->C * LANES);
    w->gxb = (float*)zeros((size_t)LANES * t->Rp);
    w->xf = (float*)zeros((size_t)g->planes * LANES * t->Rp);
    w->wt = (float*)zeros((size_t)g->planes * LANES * t->Mp);
    w->tmp = (float*)zeros((size_t)(t->Rp > t->Mp ? t->Rp : t->Mp) * LANES);
    return (w->tw && w->gxb && w->xf && w->wt && w->tmp) ? 0 : -1;
}

static void grads_free(grads_t* w) { free(w->tw); free(w->gxb); free(w->xf); free(w->wt); free(w->tmp); }

/* dL/dx and dL/dw of a block in one group from its slope sums (sa [C][LANES], sb [P][M][LANES]; see the top of the
 * file) and its upstream gradient (gt [M][LANES]), as two small matrix products: [lanes x C] x [C x rows] and
 * [rows x (planes, lanes)] x [(planes, lanes) x M]; gqp [G * Rp][Mp] */
static void block_grads(const geom_t* g, const tile_t* t, const block_t* blk, int32_t nb, int32_t grp,
                        const int32_t* pw, const float* sa, const float* sb, const float* gt, grads_t* w, float* gx,
                        float* gqp) {
    const int32_t C = t->C, M = t->M, S = t->S, Mp = t->Mp, Rp = t->Rp, P = g->planes, R = g->rows;
    const int32_t SB = g->slice_bits, smax = (1 << g->slice_bits) - 1;
    const float* dg_t = t->dft + (size_t)grp * C * Rp;
    for (int32_t s = 0; s < S; s++)
        for (int32_t m = 0; m < M; m++) {
            const int32_t c = s * M + m;
            const float x = t->colx[s * Mp + m];
            const float* a = sa + (size_t)c * LANES;
            const float* gm = gt + (size_t)m * LANES;
            float* tw = w->tw + (size_t)c * LANES;
            for (int32_t i = 0; i < LANES; i++) tw[i] = a[i] * x * gm[i];
        }
    memset(w->gxb, 0, sizeof(float) * (size_t)LANES * Rp);
    for (int32_t r0 = 0; r0 < Rp; r0 += 16) gemm16(w->tw, LANES, dg_t + r0, Rp, C, w->gxb + r0, Rp);
    /* the group's rows r with a tile row pos = grp * R + r - offset in 0 .. n_rows - 1 */
    const int32_t base = grp * R - g->offset;
    const int32_t rlo = base < 0 ? -base : 0, rhi = (g->n_rows - base < R) ? g->n_rows - base : R;
    for (int32_t i = 0; i < nb; i++) {
        float* dst = gx + blk->at[i];
        const float* src = w->gxb + (size_t)i * Rp;
        for (int32_t r = rlo; r < rhi; r++) dst[blk->col_at[base + r]] += src[r];
    }
    for (int32_t p = 0; p < P; p++) {
        const float wp = (float)pw[p];
        memset(w->tmp, 0, sizeof(float) * (size_t)Mp * LANES);
        for (int32_t m = 0; m < M; m++) {
            const float* b = sb + ((size_t)p * M + m) * LANES;
            const float* gm = gt + (size_t)m * LANES;
            float* d = w->tmp + (size_t)m * LANES;
            for (int32_t i = 0; i < LANES; i++) d[i] = wp * gm[i] * b[i];
        }
        for (int32_t m0 = 0; m0 < Mp; m0 += 16)
            transpose16(w->tmp + (size_t)m0 * LANES, LANES, w->wt + (size_t)p * LANES * Mp + m0, Mp);
        memset(w->tmp, 0, sizeof(float) * (size_t)Rp * LANES);
        for (int32_t r = 0; r < R; r++) {
            const int32_t* v = blk->v + (size_t)r * LANES;
            float* d = w->tmp + (size_t)r * LANES;
            for (int32_t i = 0; i < LANES; i++) d[i] = (float)((v[i] >> (p * SB)) & smax);
        }
        for (int32_t r0 = 0; r0 < Rp; r0 += 16)
            transpose16(w->tmp + (size_t)r0 * LANES, LANES, w->xf + (size_t)p * LANES * Rp + r0, Rp);
    }
    for (int32_t r0 = 0; r0 < Rp; r0 += 16)
        for (int32_t m0 = 0; m0 < Mp; m0 += 16)
            gemm16(w->xf + r0, Rp, w->wt + m0, Mp, P * LANES, gqp + ((size_t)grp * Rp + r0) * Mp + m0, Mp);
}

static void copy_gq(const geom_t* g, const tile_t* t, const float* gqp, float* gq) {
    for (int32_t grp = 0; grp < g->groups; grp++)
        for (int32_t r = 0; r < g->rows; r++) {
            const int32_t pos = grp * g->rows + r - g->offset;
            if (pos < 0 || pos >= g->n_rows) continue;
            for (int32_t m = 0; m < g->out_cols; m++)
                gq[(size_t)pos * g->gq_stride + m] += gqp[((size_t)grp * t->Rp + r) * t->Mp + m];
        }
}

/* Backward: gx (x's layout: the tile's rows of n vectors) and gq (its n_rows x M block) accumulated into, the levels
 * recomputed. gt: the upstream gradient by blocks, [pad16(n) / LANES][M][LANES]. Returns 0, or -1 (memory). */
int cim_backward(const geom_t* g, const float* x, const int32_t* digits, const int32_t* pw, const float* slope,
                 const int32_t* stabs, int32_t n_slope, int32_t n_levels, const float* gt, const float* colx,
                 const float* colq, float* gx, float* gq) {
    tile_t t;
    block_t blk;
    grads_t w;
    const int32_t P = g->planes, G = g->groups, C = g->cols, M = g->out_cols;
    int rc = -1;
    memset(&w, 0, sizeof(w));
    float* gqp = (float*)zeros((size_t)G * pad16(g->rows) * pad16(M));
    float* sab = (float*)zeros((size_t)C * LANES);
    float* sbb = (float*)zeros((size_t)P * M * LANES);
    blk.v = (int32_t*)zeros((size_t)g->rows * LANES);
    blk.xm = (uint32_t*)zeros((size_t)P * g->slice_bits * ((g->rows + 31) / 32) * LANES);
    int64_t* col_at = column_offsets(g);
    blk.col_at = col_at;
    if (tile_init(&t, g, digits, NULL, stabs, NULL, colq, colx) || tile_slopes(&t, slope, n_slope, n_levels) ||
        grads_init(&w, g, &t) || !gqp || !sab || !sbb || !blk.v || !blk.xm || !col_at)
        goto done;
    for (int32_t i0 = 0; i0 < g->n; i0 += LANES) {
        const int32_t nb = (g->n - i0 < LANES) ? g->n - i0 : LANES;
        lane_offsets(g, i0, nb, blk.at);
        for (int32_t grp = 0; grp < G; grp++) {
            block_inputs(g, &t, x, nb, grp, &blk);
            const float* gtb = gt + (size_t)(i0 / LANES) * M * LANES;
            memset(sab, 0, sizeof(float) * (size_t)C * LANES);
            memset(sbb, 0, sizeof(float) * (size_t)P * M * LANES);
            int32_t c0 = 0;
#if defined(HAVE_COLUMN_AVX512)
            if (t.lslope)
                for (; c0 + NCOL <= C; c0 += NCOL) slopes_avx512(g, &t, &blk, grp, pw, c0, sab, sbb);
#endif
            for (int32_t c = c0; c < C; c++)
                for (int32_t p = 0; p < P; p++) {
                    int32_t lev[LANES];
                    float sl[LANES];
                    lane_levels(g, &t, &blk, grp, p, c, lev);
                    lane_slopes(&t, slope, n_slope, c, lev, sl);
                    add_slopes(&t, p, c, (float)pw[p], sl, sab, sbb);
                }
            block_grads(g, &t, &blk, nb, grp, pw, sab, sbb, gtb, &w, gx, gqp);
        }
    }
    copy_gq(g, &t, gqp, gq);
    rc = 0;
done:
    tile_free(&t);
    grads_free(&w);
    free(gqp); free(sab); free(sbb); free(blk.v); free(blk.xm); free(col_at);
    return rc;
}
