/* The CIM layer's conversions on the CPU, one tile at a time: forward (levels, a 32-bit uniform per conversion,
 * the code from the transfer's table, decoded and summed over row groups and planes) and backward (the statistical
 * gradient). The torch reference of every step, and what each argument means, is cimlab/training/macro.py
 * (``torch_forward`` and ``torch_backward`` compute the same numbers); tests/training/test_kernels.py holds them
 * equal. Built on first use by cimlab/training/native.py; C99 with the compiler's vector intrinsics for gathers
 * where it has them, no torch headers.
 *
 * Vectors go through in blocks of BLOCK, one row group at a time, so that the loops over conversions run over a
 * block's planes and columns at once and the work memory stays small. Column arrays are padded to a multiple of
 * VL (the padding holds level 0, table 0 and weight 0) so that the inner loops have a constant length the
 * compiler keeps in vector registers.
 *
 * Levels: a conversion's ideal partial sum is sum_r x_p[r] * d[r, c] over the rows of its group. Inputs and digits
 * are held as bit masks over the group's rows (32 rows per word), so a level is
 * sum_{ib, jb, word} popcount(xbits[p][ib][word] & dbits[jb][word][c]) << (ib + jb).
 *
 * Uniforms: SplitMix64 (Steele, Lea and Flood, OOPSLA 2014) as a counter-based generator: the 64-bit word k of a
 * call is mix(seed + (k + 1) * GAMMA); conversion (i, g, p, c) uses half (c & 1) of word
 * (((i * G + g) * P + p) * Ce + c) >> 1, Ce being the column count rounded up to even.
 *
 * The backward pass needs two sums of the slopes sl = slope[lev * n_slope + stabs[c]] of a (vector, group):
 *   sa[c]    = sum_p pw[p] * sl[p][c]                     (towards dL/dx)
 *   sb[p][m] = sum_s colq[s * M + m] * sl[p][s * M + m]   (towards dL/dw)
 * and from them
 *   gx[i][pos] += sum_c digits[pos][c] * colx[c] * grad[i][c % M] * sa[c]
 *   gq[pos][m] += sum_{i, p} x_p[pos] * pw[p] * grad[i][m] * sb[p][m]
 * The forward can keep sa and sb (cim_forward with sa, sb), so the backward needs no levels (cim_backward_kept);
 * cim_backward recomputes them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define GAMMA 0x9E3779B97F4A7C15ull
#define BLOCK 32
#define VL 16

typedef struct {
    int32_t n;         /* input vectors */
    int32_t x_stride;  /* int32 elements between two vectors of x */
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
} table_t;

static int32_t pad(int32_t n) { return (n + VL - 1) / VL * VL; }

static inline uint64_t splitmix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* out[k] = table[idx[k]]: the hardware gather where the compiler targets one (it does not emit it by itself) */
static void gather_i32(const int32_t* table, const uint32_t* idx, int32_t* out, int32_t n) {
    int32_t k = 0;
#if defined(__AVX512F__)
    for (; k + 16 <= n; k += 16)
        _mm512_storeu_si512((void*)(out + k),
                            _mm512_i32gather_epi32(_mm512_loadu_si512((const void*)(idx + k)), table, 4));
#elif defined(__AVX2__)
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_si256((__m256i*)(out + k),
                            _mm256_i32gather_epi32(table, _mm256_loadu_si256((const __m256i*)(idx + k)), 4));
#endif
    for (; k < n; k++) out[k] = table[idx[k]];
}

static void gather_f32(const float* table, const uint32_t* idx, float* out, int32_t n) {
    int32_t k = 0;
#if defined(__AVX512F__)
    for (; k + 16 <= n; k += 16)
        _mm512_storeu_ps(out + k, _mm512_i32gather_ps(_mm512_loadu_si512((const void*)(idx + k)), table, 4));
#elif defined(__AVX2__)
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(out + k, _mm256_i32gather_ps(table, _mm256_loadu_si256((const __m256i*)(idx + k)), 4));
#endif
    for (; k < n; k++) out[k] = table[idx[k]];
}

static int32_t words_of(const geom_t* g) { return (g->rows + 31) / 32; }

/* An int32 or float array of n elements, zeroed; NULL when out of memory (or n is 0). */
static void* zeros(size_t n) { return n ? calloc(n, 4) : NULL; }

/* Per tile, what every block needs: digit masks and digits, column tables padded to Cp = pad(C). */
typedef struct {
    int32_t C, Cp, Mp, Rp, W;
    uint32_t* dbits;  /* [G][cell_bits][W][Cp] */
    float* dft;       /* [G][C][Rp]: the digits, rows innermost */
    int32_t* tabs;    /* [Cp] sampling table index */
    int32_t* stabs;   /* [Cp] slope table index */
    float* colq;      /* [S][Mp] */
    float* colx;      /* [S][Mp] */
    float* slope0;    /* [Cp] the slopes of level 0 */
    float* sb0;       /* [Mp] their sb sums */
} tile_t;

static void tile_free(tile_t* t) {
    free(t->dbits); free(t->dft); free(t->tabs); free(t->stabs); free(t->colq); free(t->colx); free(t->slope0);
    free(t->sb0);
}

static int tile_init(tile_t* t, const geom_t* g, const int32_t* digits, const int32_t* tabs, const int32_t* stabs,
                     const float* colq, const float* colx) {
    const int32_t C = g->cols, M = g->out_cols, S = C / M, G = g->groups, R = g->rows;
    memset(t, 0, sizeof(*t));
    t->C = C; t->Cp = pad(C); t->Mp = pad(M); t->Rp = pad(R); t->W = words_of(g);
    t->dbits = (uint32_t*)zeros((size_t)G * g->cell_bits * t->W * t->Cp);
    t->dft = (float*)zeros((size_t)G * C * t->Rp);
    t->tabs = (int32_t*)zeros((size_t)t->Cp);
    t->stabs = (int32_t*)zeros((size_t)t->Cp);
    t->colq = (float*)zeros((size_t)S * t->Mp);
    t->colx = (float*)zeros((size_t)S * t->Mp);
    if (!t->dbits || !t->dft || !t->tabs || !t->stabs || !t->colq || !t->colx) return -1;
    for (int32_t grp = 0; grp < G; grp++)
        for (int32_t r = 0; r < R; r++) {
            const int32_t* row = digits + ((size_t)grp * R + r) * C;
            for (int32_t c = 0; c < C; c++) {
                t->dft[((size_t)grp * C + c) * t->Rp + r] = (float)row[c];
                for (int32_t jb = 0; jb < g->cell_bits; jb++)
                    if ((row[c] >> jb) & 1)
                        t->dbits[(((size_t)grp * g->cell_bits + jb) * t->W + r / 32) * t->Cp + c] |= 1u << (r % 32);
            }
        }
    for (int32_t c = 0; c < C; c++) {
        if (tabs) t->tabs[c] = tabs[c];
        if (stabs) t->stabs[c] = stabs[c];
    }
    for (int32_t s = 0; s < S; s++)
        for (int32_t m = 0; m < M; m++) {
            if (colq) t->colq[s * t->Mp + m] = colq[s * M + m];
            if (colx) t->colx[s * t->Mp + m] = colx[s * M + m];
        }
    return 0;
}

/* the group's input codes of vectors i0 .. i0 + nb - 1, row by row: vals[r * BLOCK + i] (0 for rows outside the
 * tile and for vectors past the block) */
static void group_inputs(const geom_t* g, const int32_t* x, int32_t i0, int32_t nb, int32_t grp, int32_t* vals) {
    memset(vals, 0, sizeof(int32_t) * (size_t)g->rows * BLOCK);
    for (int32_t r = 0; r < g->rows; r++) {
        const int32_t pos = grp * g->rows + r - g->offset;
        if (pos < 0 || pos >= g->n_rows) continue;
        const int32_t* xr = x + (size_t)i0 * g->x_stride + g->row0 + pos;
        for (int32_t i = 0; i < nb; i++) vals[r * BLOCK + i] = xr[(size_t)i * g->x_stride];
    }
}

/* bit masks of the block's inputs: xm[(b * W + w) * BLOCK + i] holds bit b of the codes of the rows of word w
 * (bit ib of slice p is bit p * slice_bits + ib of the code) */
static void input_masks(const geom_t* g, const int32_t* vals, uint32_t* xm) {
    const int32_t W = words_of(g), B = g->planes * g->slice_bits;
    memset(xm, 0, sizeof(uint32_t) * (size_t)B * W * BLOCK);
    for (int32_t b = 0; b < B; b++)
        for (int32_t r = 0; r < g->rows; r++) {
            uint32_t* m = xm + ((size_t)b * W + r / 32) * BLOCK;
            const int32_t* v = vals + (size_t)r * BLOCK;
            const int32_t sh = r % 32;
            for (int32_t i = 0; i < BLOCK; i++) m[i] |= (((uint32_t)v[i] >> b) & 1u) << sh;
        }
}

/* levels lev[(i * planes + p) * Cp + c] of a block's conversions in one group (padding: level 0); zero[i * P + p]
 * is 1 where the plane drives no row (every level 0) */
static void block_levels(const geom_t* g, const tile_t* t, const uint32_t* xm, int32_t nb, int32_t grp, int32_t* lev,
                         uint8_t* zero) {
    const int32_t W = t->W, Cp = t->Cp, P = g->planes, SB = g->slice_bits;
    const uint32_t* dg = t->dbits + (size_t)grp * g->cell_bits * W * Cp;
    memset(lev, 0, sizeof(int32_t) * (size_t)nb * P * Cp);
    for (int32_t i = 0; i < nb; i++)
        for (int32_t p = 0; p < P; p++) {
            int32_t* l = lev + ((size_t)i * P + p) * Cp;
            uint8_t z = 1;
            for (int32_t ib = 0; ib < SB; ib++)
                for (int32_t w = 0; w < W; w++) {
                    const uint32_t a = xm[((size_t)(p * SB + ib) * W + w) * BLOCK + i];
                    if (!a) continue;
                    z = 0;
                    for (int32_t jb = 0; jb < g->cell_bits; jb++) {
                        const uint32_t* d = dg + ((size_t)jb * W + w) * Cp;
                        const int32_t sh = ib + jb;
                        for (int32_t c0 = 0; c0 < Cp; c0 += VL)
                            for (int32_t k = 0; k < VL; k++) l[c0 + k] += __builtin_popcount(a & d[c0 + k]) << sh;
                    }
                }
            zero[i * P + p] = z;
        }
}

/* the uniforms of a block's conversions in one group, u[(i * P + p) * Cp + c] (padding: 0) */
static void block_uniforms(const geom_t* g, const tile_t* t, int32_t i0, int32_t nb, int32_t grp, uint64_t seed,
                           uint32_t* u) {
    const int32_t C = t->C, Ce = (C + 1) & ~1, Cp = t->Cp, P = g->planes;
    for (int32_t i = 0; i < nb; i++)
        for (int32_t p = 0; p < P; p++) {
            const uint64_t word0 = ((((uint64_t)(i0 + i) * g->groups + grp) * P + p) * (uint64_t)Ce) >> 1;
            uint32_t* ur = u + ((size_t)i * P + p) * Cp;
            for (int32_t b = 0; b < C / 2; b++) {
                const uint64_t z = splitmix(seed + (word0 + (uint64_t)b + 1u) * GAMMA);
                ur[2 * b] = (uint32_t)z;
                ur[2 * b + 1] = (uint32_t)(z >> 32);
            }
            if (C & 1) ur[C - 1] = (uint32_t)splitmix(seed + (word0 + (uint64_t)(C / 2) + 1u) * GAMMA);
            for (int32_t c = C; c < Cp; c++) ur[c] = 0;
        }
}

/* codes of n conversions (n a multiple of Cp): levels lev, table index tabs[k % Cp], uniforms u */
static void draw_codes(const table_t* t, const int32_t* lev, const int32_t* tabs, int32_t Cp, const uint32_t* u,
                       int32_t n, uint32_t* idx, int32_t* e, int32_t* code) {
    const uint32_t shift = (uint32_t)t->shift, T = (uint32_t)t->buckets, nt = (uint32_t)t->n_tables;
    const uint32_t lowmask = (1u << shift) - 1u;
    for (int32_t k0 = 0; k0 < n; k0 += Cp)
        for (int32_t c = 0; c < Cp; c++)
            idx[k0 + c] = ((uint32_t)lev[k0 + c] * nt + (uint32_t)tabs[c]) * T + (u[k0 + c] >> shift);
    gather_i32(t->guide, idx, code, n);
    if (t->packed) {
        gather_i32((const int32_t*)t->off, idx, e, n);
        for (int32_t k = 0; k < n; k++) code[k] += (u[k] & lowmask) >= (uint32_t)e[k];
    } else {
        for (int32_t k = 0; k < n; k++) {
            const int32_t su = (int32_t)(u[k] ^ 0x80000000u);
            const size_t base = (size_t)(idx[k] / T) * (size_t)t->n_codes;
            int32_t m = code[k];
            for (int32_t s = 0; s < t->steps; s++) m += su > t->cum[base + (size_t)m];
            code[k] = m;
        }
    }
}

/* the slopes of level 0 per column (a plane that drives no row) and their sb sums, for slope_sums */
static int tile_slopes(tile_t* t, const geom_t* g, const float* slope) {
    const int32_t M = g->out_cols, S = t->C / M;
    t->slope0 = (float*)zeros((size_t)t->Cp);
    t->sb0 = (float*)zeros((size_t)t->Mp);
    if (!t->slope0 || !t->sb0) return -1;
    for (int32_t c = 0; c < t->C; c++) t->slope0[c] = slope[t->stabs[c]];
    for (int32_t s = 0; s < S; s++)
        for (int32_t m = 0; m < M; m++) t->sb0[m] += t->colq[s * t->Mp + m] * t->slope0[s * M + m];
    return 0;
}

/* a block's slope sums in one group: sa[i * Cp + c], sb[(i * P + p) * Mp + m] (see the top of the file); idx and
 * sl: work memory of the block's conversions (sl with Mp elements to spare) */
static void slope_sums(const geom_t* g, const tile_t* t, const int32_t* lev, const uint8_t* zero, int32_t nb,
                       const float* slope, int32_t n_slope, const int32_t* pw, uint32_t* idx, float* sl, float* sa,
                       float* sb) {
    const int32_t Cp = t->Cp, Mp = t->Mp, P = g->planes, M = g->out_cols, S = t->C / M;
    for (int32_t k = 0; k < nb * P; k++) {
        if (zero[k]) continue;
        const int32_t* l = lev + (size_t)k * Cp;
        uint32_t* ix = idx + (size_t)k * Cp;
        for (int32_t c = 0; c < Cp; c++) ix[c] = (uint32_t)(l[c] * n_slope + t->stabs[c]);
        gather_f32(slope, ix, sl + (size_t)k * Cp, Cp);
    }
    for (int32_t i = 0; i < nb; i++) {
        for (int32_t c0 = 0; c0 < Cp; c0 += VL) {
            float acc[VL] = {0.0f};
            for (int32_t p = 0; p < P; p++) {
                const float w = (float)pw[p];
                const float* slp = (zero[i * P + p] ? t->slope0 : sl + ((size_t)i * P + p) * Cp) + c0;
                for (int32_t k = 0; k < VL; k++) acc[k] += w * slp[k];
            }
            for (int32_t k = 0; k < VL; k++) sa[(size_t)i * Cp + c0 + k] = acc[k];
        }
        for (int32_t p = 0; p < P; p++) {
            float* sbp = sb + ((size_t)i * P + p) * Mp;
            if (zero[i * P + p]) {
                memcpy(sbp, t->sb0, sizeof(float) * (size_t)Mp);
                continue;
            }
            const float* slp = sl + ((size_t)i * P + p) * Cp;
            for (int32_t m0 = 0; m0 < Mp; m0 += VL) {
                float acc[VL] = {0.0f};
                for (int32_t s = 0; s < S; s++)  /* lanes past M read the next slice's slopes, times colq = 0 */
                    for (int32_t k = 0; k < VL; k++) acc[k] += t->colq[s * Mp + m0 + k] * slp[s * M + m0 + k];
                for (int32_t k = 0; k < VL; k++) sbp[m0 + k] = acc[k];
            }
        }
    }
}

/* c[ii * ldc + k] += sum_j at[j * ldat + ii] * b[j * ldb + k] for ii < 16 and k < VL: a small matrix product
 * (the left matrix stored transposed) with its 16 x VL accumulators in vector registers */
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
    float acc[16][VL];
    memset(acc, 0, sizeof(acc));
    for (int32_t j = 0; j < K; j++) {
        const float* aj = at + (size_t)j * ldat;
        const float* bj = b + (size_t)j * ldb;
        for (int32_t ii = 0; ii < 16; ii++)
            for (int32_t k = 0; k < VL; k++) acc[ii][k] += aj[ii] * bj[k];
    }
    for (int32_t ii = 0; ii < 16; ii++)
        for (int32_t k = 0; k < VL; k++) c[(size_t)ii * ldc + k] += acc[ii][k];
#endif
}

/* dL/dx and dL/dw of a block in one group from its slope sums (see the top of the file), as two small matrix
 * products: [vectors x C] x [C x rows] and [rows x (vectors, planes)] x [(vectors, planes) x M]. Work memory
 * (left matrices transposed): tw [C][BLOCK], gxb [BLOCK][Rp], xf [BLOCK * P][Rp], gw [BLOCK * P][Mp]; gqp
 * [G * Rp][Mp] (the tile's rows by group position) */
static void block_grads(const geom_t* g, const tile_t* t, const int32_t* vals, int32_t i0, int32_t nb, int32_t grp,
                        const float* sa, const float* sb, const float* grad, const int32_t* pw, float* tw, float* gxb,
                        float* xf, float* gw, float* gx, float* gqp) {
    const int32_t C = t->C, Cp = t->Cp, Mp = t->Mp, Rp = t->Rp, P = g->planes, R = g->rows, M = g->out_cols;
    const int32_t S = C / M, SB = g->slice_bits, smax = (1 << g->slice_bits) - 1, J = BLOCK * P;
    const float* dg_t = t->dft + (size_t)grp * C * Rp;
    memset(tw, 0, sizeof(float) * (size_t)BLOCK * C);
    memset(gw, 0, sizeof(float) * (size_t)J * Mp);
    for (int32_t i = 0; i < nb; i++) {
        const float* gi = grad + (size_t)(i0 + i) * M;
        const float* sai = sa + (size_t)i * Cp;
        for (int32_t s = 0; s < S; s++)
            for (int32_t m = 0; m < M; m++)
                tw[(size_t)(s * M + m) * BLOCK + i] = sai[s * M + m] * t->colx[s * Mp + m] * gi[m];
        for (int32_t p = 0; p < P; p++) {
            const float w = (float)pw[p];
            const float* sbp = sb + ((size_t)i * P + p) * Mp;
            float* gwp = gw + ((size_t)i * P + p) * Mp;
            for (int32_t m = 0; m < M; m++) gwp[m] = w * gi[m] * sbp[m];
        }
    }
    memset(gxb, 0, sizeof(float) * (size_t)BLOCK * Rp);
    for (int32_t i = 0; i < BLOCK; i += 16)
        for (int32_t r0 = 0; r0 < Rp; r0 += VL) gemm16(tw + i, BLOCK, dg_t + r0, Rp, C, gxb + (size_t)i * Rp + r0, Rp);
    for (int32_t i = 0; i < nb; i++)
        for (int32_t r = 0; r < R; r++) {
            const int32_t pos = grp * R + r - g->offset;
            if (pos >= 0 && pos < g->n_rows) gx[(size_t)(i0 + i) * g->n_rows + pos] += gxb[(size_t)i * Rp + r];
        }
    memset(xf, 0, sizeof(float) * (size_t)Rp * J);
    for (int32_t r = 0; r < R; r++)
        for (int32_t p = 0; p < P; p++) {
            const int32_t* v = vals + (size_t)r * BLOCK;
            for (int32_t i = 0; i < BLOCK; i++) xf[((size_t)i * P + p) * Rp + r] = (float)((v[i] >> (p * SB)) & smax);
        }
    for (int32_t r0 = 0; r0 < Rp; r0 += 16)
        for (int32_t m0 = 0; m0 < Mp; m0 += VL)
            gemm16(xf + r0, Rp, gw + m0, Mp, J, gqp + ((size_t)grp * Rp + r0) * Mp + m0, Mp);
}

static void copy_gq(const geom_t* g, const tile_t* t, const float* gqp, float* gq) {
    for (int32_t grp = 0; grp < g->groups; grp++)
        for (int32_t r = 0; r < g->rows; r++) {
            const int32_t pos = grp * g->rows + r - g->offset;
            if (pos < 0 || pos >= g->n_rows) continue;
            for (int32_t m = 0; m < g->out_cols; m++)
                gq[(size_t)pos * g->out_cols + m] += gqp[((size_t)grp * t->Rp + r) * t->Mp + m];
        }
}

/* Forward: out[i][m] = sum_s sw[s] * sum over groups and planes of pw[p] * value(code of column s * M + m),
 * value(code) = code, or dec[dtabs[c] + code] when dec is given. With sa and sb (padded: [G][n][pad(C)] and
 * [G][n][P][pad(M)]), also the slope sums of every (vector, group) for cim_backward_kept. Returns 0, or -1 when
 * out of memory. */
int cim_forward(const geom_t* g, const int32_t* x, const int32_t* digits, const int32_t* pw, const double* sw,
                const table_t* tb, const int32_t* tabs, const float* dec, const int32_t* dtabs, uint64_t seed,
                double* out, const float* slope, const int32_t* stabs, int32_t n_slope, const float* colq, float* sa,
                float* sb) {
    tile_t t;
    const int32_t P = g->planes, G = g->groups, C = g->cols, M = g->out_cols, S = C / M;
    const size_t block = (size_t)BLOCK * P * pad(C);
    int rc = -1;
    int32_t* vals = (int32_t*)zeros((size_t)BLOCK * g->rows);
    uint32_t* xm = (uint32_t*)zeros((size_t)P * g->slice_bits * words_of(g) * BLOCK);
    uint8_t* zero = (uint8_t*)calloc((size_t)BLOCK * P, 1);
    int32_t* lev = (int32_t*)zeros(block);
    uint32_t* u = (uint32_t*)zeros(block);
    uint32_t* idx = (uint32_t*)zeros(block);
    int32_t* e = (int32_t*)zeros(block);
    int32_t* code = (int32_t*)zeros(block);
    float* sl = (float*)zeros(block + (size_t)pad(M));
    float* val = (float*)zeros(block);
    int32_t* dtp = (int32_t*)zeros((size_t)pad(C));
    int32_t* iacc = (int32_t*)zeros((size_t)BLOCK * pad(C));
    double* dacc = (double*)calloc((size_t)BLOCK * pad(C), sizeof(double));
    if (tile_init(&t, g, digits, tabs, stabs, colq, NULL) || (sa && tile_slopes(&t, g, slope)) || !vals ||
        !xm || !zero || !lev || !u || !idx || !e || !code || !sl || !val || !dtp || !iacc || !dacc)
        goto done;
    const int32_t Cp = t.Cp;
    if (dec)
        for (int32_t c = 0; c < C; c++) dtp[c] = dtabs[c];
    for (int32_t i0 = 0; i0 < g->n; i0 += BLOCK) {
        const int32_t nb = (g->n - i0 < BLOCK) ? g->n - i0 : BLOCK;
        const int32_t n = nb * P * Cp;
        memset(iacc, 0, sizeof(int32_t) * (size_t)nb * Cp);
        memset(dacc, 0, sizeof(double) * (size_t)nb * Cp);
        for (int32_t grp = 0; grp < G; grp++) {
            group_inputs(g, x, i0, nb, grp, vals);
            input_masks(g, vals, xm);
            block_levels(g, &t, xm, nb, grp, lev, zero);
            block_uniforms(g, &t, i0, nb, grp, seed, u);
            draw_codes(tb, lev, t.tabs, Cp, u, n, idx, e, code);
            if (sa)
                slope_sums(g, &t, lev, zero, nb, slope, n_slope, pw, idx, sl, sa + ((size_t)grp * g->n + i0) * Cp,
                           sb + ((size_t)grp * g->n + i0) * P * t.Mp);
            if (dec) {
                for (int32_t k0 = 0; k0 < n; k0 += Cp)
                    for (int32_t c = 0; c < Cp; c++) idx[k0 + c] = (uint32_t)(dtp[c] + code[k0 + c]);
                gather_f32(dec, idx, val, n);
                for (int32_t i = 0; i < nb; i++)
                    for (int32_t c0 = 0; c0 < Cp; c0 += VL) {
                        double acc[VL];
                        double* a = dacc + (size_t)i * Cp + c0;
                        for (int32_t k = 0; k < VL; k++) acc[k] = a[k];
                        for (int32_t p = 0; p < P; p++) {
                            const double w = (double)pw[p];
                            const float* vp = val + ((size_t)i * P + p) * Cp + c0;
                            for (int32_t k = 0; k < VL; k++) acc[k] += w * (double)vp[k];
                        }
                        for (int32_t k = 0; k < VL; k++) a[k] = acc[k];
                    }
            } else {
                for (int32_t i = 0; i < nb; i++)
                    for (int32_t c0 = 0; c0 < Cp; c0 += VL) {
                        int32_t acc[VL];
                        int32_t* a = iacc + (size_t)i * Cp + c0;
                        for (int32_t k = 0; k < VL; k++) acc[k] = a[k];
                        for (int32_t p = 0; p < P; p++) {
                            const int32_t w = pw[p];
                            const int32_t* cp = code + ((size_t)i * P + p) * Cp + c0;
                            for (int32_t k = 0; k < VL; k++) acc[k] += w * cp[k];
                        }
                        for (int32_t k = 0; k < VL; k++) a[k] = acc[k];
                    }
            }
        }
        for (int32_t i = 0; i < nb; i++) {
            double* o = out + (size_t)(i0 + i) * M;
            for (int32_t m = 0; m < M; m++) o[m] = 0.0;
            for (int32_t s2 = 0; s2 < S; s2++) {
                const double w = sw[s2];
                if (dec) {
                    const double* a = dacc + (size_t)i * Cp + s2 * M;
                    for (int32_t m = 0; m < M; m++) o[m] += w * a[m];
                } else {
                    const int32_t* a = iacc + (size_t)i * Cp + s2 * M;
                    for (int32_t m = 0; m < M; m++) o[m] += w * (double)a[m];
                }
            }
        }
    }
    rc = 0;
done:
    tile_free(&t);
    free(vals); free(xm); free(zero); free(lev); free(u); free(idx); free(e); free(code); free(sl); free(val);
    free(dtp); free(iacc); free(dacc);
    return rc;
}

/* Backward from the slope sums cim_forward kept (see the top of the file): gx [n][n_rows] and gq [n_rows][M]
 * accumulated into. Returns 0, or -1 (memory). */
int cim_backward_kept(const geom_t* g, const int32_t* x, const int32_t* digits, const int32_t* pw, const float* sa,
                      const float* sb, const float* grad, const float* colx, float* gx, float* gq) {
    tile_t t;
    const int32_t P = g->planes, G = g->groups;
    int rc = -1;
    int32_t* vals = (int32_t*)zeros((size_t)BLOCK * g->rows);
    float* tw = (float*)zeros((size_t)BLOCK * g->cols);
    float* gxb = (float*)zeros((size_t)BLOCK * pad(g->rows));
    float* xf = (float*)zeros((size_t)pad(g->rows) * BLOCK * P);
    float* gw = (float*)zeros((size_t)BLOCK * P * pad(g->out_cols));
    float* gqp = (float*)zeros((size_t)G * pad(g->rows) * pad(g->out_cols));
    if (tile_init(&t, g, digits, NULL, NULL, NULL, colx) || !vals || !tw || !gxb || !xf || !gw || !gqp) goto done;
    for (int32_t i0 = 0; i0 < g->n; i0 += BLOCK) {
        const int32_t nb = (g->n - i0 < BLOCK) ? g->n - i0 : BLOCK;
        for (int32_t grp = 0; grp < G; grp++) {
            group_inputs(g, x, i0, nb, grp, vals);
            block_grads(g, &t, vals, i0, nb, grp, sa + ((size_t)grp * g->n + i0) * t.Cp,
                        sb + ((size_t)grp * g->n + i0) * P * t.Mp, grad, pw, tw, gxb, xf, gw, gx, gqp);
        }
    }
    copy_gq(g, &t, gqp, gq);
    rc = 0;
done:
    tile_free(&t);
    free(vals); free(tw); free(gxb); free(xf); free(gw); free(gqp);
    return rc;
}

/* Backward with the levels recomputed (for layers whose slope sums the forward did not keep): gx [n][n_rows] and
 * gq [n_rows][M] accumulated into. Returns 0, or -1 (memory). */
int cim_backward(const geom_t* g, const int32_t* x, const int32_t* digits, const int32_t* pw, const float* slope,
                 const int32_t* stabs, int32_t n_slope, const float* grad, const float* colx, const float* colq,
                 float* gx, float* gq) {
    tile_t t;
    const int32_t P = g->planes, G = g->groups;
    const size_t block = (size_t)BLOCK * P * pad(g->cols);
    int rc = -1;
    int32_t* vals = (int32_t*)zeros((size_t)BLOCK * g->rows);
    uint32_t* xm = (uint32_t*)zeros((size_t)P * g->slice_bits * words_of(g) * BLOCK);
    uint8_t* zero = (uint8_t*)calloc((size_t)BLOCK * P, 1);
    int32_t* lev = (int32_t*)zeros(block);
    uint32_t* idx = (uint32_t*)zeros(block);
    float* sl = (float*)zeros(block + (size_t)pad(g->out_cols));
    float* sa = (float*)zeros((size_t)BLOCK * pad(g->cols));
    float* sb = (float*)zeros((size_t)BLOCK * P * pad(g->out_cols));
    float* tw = (float*)zeros((size_t)BLOCK * g->cols);
    float* gxb = (float*)zeros((size_t)BLOCK * pad(g->rows));
    float* xf = (float*)zeros((size_t)pad(g->rows) * BLOCK * P);
    float* gw = (float*)zeros((size_t)BLOCK * P * pad(g->out_cols));
    float* gqp = (float*)zeros((size_t)G * pad(g->rows) * pad(g->out_cols));
    if (tile_init(&t, g, digits, NULL, stabs, colq, colx) || tile_slopes(&t, g, slope) || !vals || !xm ||
        !zero || !lev || !idx || !sl || !sa || !sb || !tw || !gxb || !xf || !gw || !gqp)
        goto done;
    for (int32_t i0 = 0; i0 < g->n; i0 += BLOCK) {
        const int32_t nb = (g->n - i0 < BLOCK) ? g->n - i0 : BLOCK;
        for (int32_t grp = 0; grp < G; grp++) {
            group_inputs(g, x, i0, nb, grp, vals);
            input_masks(g, vals, xm);
            block_levels(g, &t, xm, nb, grp, lev, zero);
            slope_sums(g, &t, lev, zero, nb, slope, n_slope, pw, idx, sl, sa, sb);
            block_grads(g, &t, vals, i0, nb, grp, sa, sb, grad, pw, tw, gxb, xf, gw, gx, gqp);
        }
    }
    copy_gq(g, &t, gqp, gq);
    rc = 0;
done:
    tile_free(&t);
    free(vals); free(xm); free(zero); free(lev); free(idx); free(sl); free(sa); free(sb); free(tw); free(gxb);
    free(xf); free(gw); free(gqp);
    return rc;
}
