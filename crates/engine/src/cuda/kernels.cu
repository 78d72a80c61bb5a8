// tandem's CUDA kernels. scripts/build-ptx.sh compiles them to PTX, which the binary
// embeds (src/cuda/ptx.rs) and the driver compiles for the GPU at start-up, so the
// `cuda` feature builds without a CUDA toolkit.
//
// `wt` is the element type of the matrix products' operands (the weights, and the
// activations fed to cuBLAS): half by default, bfloat16 when compiled with
// -DTANDEM_BF16. The residual stream, norms, RoPE and softmax are f32; the KV cache,
// queries and attention probabilities are half (what the tensor cores take).
//
// The KV cache has the CPU engine's block-major layout (see crates/engine/src/kv):
// element (block, layer, plane, kv_head, slot, d) is at
//   ((((block * num_layers + layer) * 2 + plane) * num_kv_heads + kv_head) * block_size + slot) * head_dim + d
// so one block is one contiguous run of bytes for the hand-off, and one head's keys in
// one block are contiguous for attention.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

typedef long long i64;

#ifdef TANDEM_BF16
typedef __nv_bfloat16 wt;
__device__ __forceinline__ wt to_wt(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float from_wt(wt x) { return __bfloat162float(x); }
#else
typedef __half wt;
__device__ __forceinline__ wt to_wt(float x) { return __float2half_rn(x); }
__device__ __forceinline__ float from_wt(wt x) { return __half2float(x); }
#endif

// Sum over the whole thread block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Asynchronous 16-byte copy global → shared (sm_80+), zero-filling when !valid (then
// `src` is not read). Lets a thread block put a whole tile's loads in flight at once.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, bool valid) {
    unsigned shared = (unsigned)__cvta_generic_to_shared(dst);
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(src),
                 "r"(bytes));
}

// Closes this thread's group of asynchronous copies issued since the last one.
__device__ __forceinline__ void commit_async_copies() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void wait_async_groups() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// x[t] = table[tokens[t]] (one block per token).
extern "C" __global__ void embed(const wt* __restrict__ table, const unsigned* __restrict__ tokens,
                                 float* __restrict__ x, int d) {
    int t = blockIdx.x;
    const wt* row = table + (i64)tokens[t] * d;
    float* out = x + (i64)t * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[i] = from_wt(row[i]);
}

// out[r] = x[rows[r]] / rms(x[rows[r]]) * w, as wt (one block per output row; rows may
// be null for the identity). When d is a multiple of 4 and the block has a thread per
// RMS_VECTORS float4s, each thread loads its x and w once, all loads in flight together:
// at one token a step is a chain of such small kernels, so latency is what counts.
#define RMS_VECTORS 4
extern "C" __global__ void rms_norm(const float* __restrict__ x, const int* __restrict__ rows,
                                    const float* __restrict__ w, wt* __restrict__ out, int d,
                                    float eps) {
    int r = blockIdx.x;
    int src = rows ? rows[r] : r;
    const float* xr = x + (i64)src * d;
    wt* o = out + (i64)r * d;
    const int n4 = d / 4;
    if (d % 4 == 0 && n4 <= RMS_VECTORS * (int)blockDim.x) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        float4 v[RMS_VECTORS];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < RMS_VECTORS; k++) {
            int i = threadIdx.x + k * blockDim.x;
            v[k] = i < n4 ? x4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
        }
        ss = block_sum(ss);
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll
        for (int k = 0; k < RMS_VECTORS; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i >= n4) break;
            float4 g = w4[i];
            o[4 * i] = to_wt(v[k].x * inv * g.x);
            o[4 * i + 1] = to_wt(v[k].y * inv * g.y);
            o[4 * i + 2] = to_wt(v[k].z * inv * g.z);
            o[4 * i + 3] = to_wt(v[k].w * inv * g.w);
        }
        return;
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = to_wt(xr[i] * inv * w[i]);
}

// Rotates the query and key heads of each token's [q | k | v] row (f32) by its
// position, writes the queries as half to q_out ([token][num_heads * head_dim]) and
// the keys and values into the KV cache at (kv_block[t], pos[t] % block_size).
extern "C" __global__ void rope_store(const float* __restrict__ qkv, const int* __restrict__ pos,
                                      const int* __restrict__ kv_block,
                                      const float* __restrict__ inv_freq, __half* __restrict__ q_out,
                                      __half* __restrict__ kv, int num_heads, int num_kv_heads,
                                      int head_dim, int interleaved, int layer, int num_layers,
                                      int block_size) {
    int t = blockIdx.x;
    int D = head_dim, half_d = D / 2;
    int q_dim = num_heads * D, kv_dim = num_kv_heads * D;
    const float* row = qkv + (i64)t * (q_dim + 2 * kv_dim);
    int p = pos[t];
    i64 plane = (i64)num_kv_heads * block_size * D;
    i64 key_base = (((i64)kv_block[t] * num_layers + layer) * 2) * plane;
    i64 value_base = key_base + plane;
    int slot = p % block_size;
    int rotated = (num_heads + num_kv_heads) * half_d;
    for (int i = threadIdx.x; i < rotated; i += blockDim.x) {
        int head = i / half_d, j = i % half_d;
        float s, c;
        sincosf((float)p * inv_freq[j], &s, &c);
        int ia = interleaved ? 2 * j : j;
        int ib = interleaved ? 2 * j + 1 : j + half_d;
        const float* src = row + head * D;  // key heads follow the query heads
        float a = src[ia], b = src[ib];
        float ra = a * c - b * s, rb = a * s + b * c;
        if (head < num_heads) {
            __half* dst = q_out + (i64)t * q_dim + head * D;
            dst[ia] = __float2half_rn(ra);
            dst[ib] = __float2half_rn(rb);
        } else {
            __half* dst = kv + key_base + ((i64)(head - num_heads) * block_size + slot) * D;
            dst[ia] = __float2half_rn(ra);
            dst[ib] = __float2half_rn(rb);
        }
    }
    const float* values = row + q_dim + kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        int h = i / D, d = i % D;
        kv[value_base + ((i64)h * block_size + slot) * D + d] = __float2half_rn(values[i]);
    }
}

// act[t][j] = SiLU(g) · u for the gate/up product's row t, [gate | up] of 2 · inter
// values in wt. A thread takes 8 neighbouring values (16-byte loads) when inter is a
// multiple of 8 (then every chunk is 16-byte aligned), one otherwise.
__device__ __forceinline__ float silu_times(float g, float u) {
    return g / (1.0f + expf(-g)) * u;
}

extern "C" __global__ void silu_mul(const wt* __restrict__ gate_up, wt* __restrict__ out,
                                    int inter, int tokens) {
    const int per_thread = inter % 8 == 0 ? 8 : 1;
    const int per_row = inter / per_thread;
    const i64 total = (i64)tokens * per_row;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (i64)gridDim.x * blockDim.x) {
        i64 t = i / per_row;
        int j = (int)(i - t * per_row) * per_thread;
        const wt* gate = gate_up + t * 2 * inter + j;
        const wt* up = gate + inter;
        wt* dst = out + t * inter + j;
        if (per_thread == 8) {
            uint4 g = *reinterpret_cast<const uint4*>(gate);
            uint4 u = *reinterpret_cast<const uint4*>(up);
            uint4 o;
            const wt* gs = reinterpret_cast<const wt*>(&g);
            const wt* us = reinterpret_cast<const wt*>(&u);
            wt* os = reinterpret_cast<wt*>(&o);
#pragma unroll
            for (int k = 0; k < 8; k++) os[k] = to_wt(silu_times(from_wt(gs[k]), from_wt(us[k])));
            *reinterpret_cast<uint4*>(dst) = o;
        } else {
            *dst = to_wt(silu_times(from_wt(*gate), from_wt(*up)));
        }
    }
}

// ---- Matrix–vector products of small steps --------------------------------------------
//
// Y[t][r] (+)= Σ_c X[t][c] · W[r][c] for T ≤ 4 tokens, W row-major [rows × cols], X
// [T × cols] in wt, Y f32 [T × rows]. A decode step of a few sequences reads every weight
// once and does T multiply-adds with it, so these run at the pace of memory. Each warp
// owns R whole rows: its lanes read 16 bytes (8 weights) at a time at chunks lane,
// lane + 32, …, so a warp's load is 512 contiguous bytes of a row, bypassing L1, while
// x (the same T rows for every warp of the block) comes through L1. Needs cols % 8 == 0
// and 16-byte aligned W and X (the caller checks; cuBLAS serves the rest).

__device__ __forceinline__ uint4 load_weights_16(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// The 8 values of a 16-byte chunk of wt, as f32.
__device__ __forceinline__ void unpack_8(uint4 v, float f[8]) {
    unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
#ifdef TANDEM_BF16
        f[2 * i] = __uint_as_float(u[i] << 16);
        f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
#else
        float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&u[i]));
        f[2 * i] = pair.x;
        f[2 * i + 1] = pair.y;
#endif
    }
}

// Two E4M3 codes, each in the high byte of a 16-bit lane, as an f16 pair worth their
// values times 2^-8: E4M3's four exponent and three mantissa bits become f16's low four
// exponent and high three mantissa bits, which scales normal and subnormal values alike
// by 2^(7 - 15). No E4M3 NaN reaches here (the loader saturates at ±448).
__device__ __forceinline__ float2 e4m3_pair(unsigned lanes) {
    unsigned h = (lanes & 0x80008000u) | ((lanes >> 1) & 0x3f803f80u);
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// The 16 values of a 16-byte chunk of E4M3 codes, as f32 times 2^-8 (e4m3_pair).
__device__ __forceinline__ void unpack_e4m3_16(uint4 v, float f[16]) {
    unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 lo = e4m3_pair(__byte_perm(u[i], 0, 0x1404));
        float2 hi = e4m3_pair(__byte_perm(u[i], 0, 0x3424));
        f[4 * i] = lo.x;
        f[4 * i + 1] = lo.y;
        f[4 * i + 2] = hi.x;
        f[4 * i + 3] = hi.y;
    }
}

// Weights per 16-byte chunk: 8 of wt, 16 of E4M3 (stored as unsigned char).
template <typename WT>
struct ChunkOf {
    static constexpr int E = sizeof(WT) == 1 ? 16 : 8;
};

// acc[r][t] += chunk c of weight row r · the same columns of x row t (x has n8
// 16-byte chunks a row).
template <int T, int R, typename WT>
__device__ __forceinline__ void gemv_chunk(const uint4 w[R], const uint4* __restrict__ x, int n8,
                                           int c, float acc[R][T]) {
    constexpr int E = ChunkOf<WT>::E;
    float wf[R][E];
#pragma unroll
    for (int r = 0; r < R; r++) {
        if constexpr (E == 16) {
            unpack_e4m3_16(w[r], wf[r]);
        } else {
            unpack_8(w[r], wf[r]);
        }
    }
#pragma unroll
    for (int t = 0; t < T; t++) {
        float xf[E];
#pragma unroll
        for (int h = 0; h < E / 8; h++) unpack_8(__ldg(x + (i64)t * n8 + c * (E / 8) + h), xf + 8 * h);
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int k = 0; k < E; k++) acc[r][t] = fmaf(wf[r][k], xf[k], acc[r][t]);
    }
}

// The warp's dot products of rows `row[0..R)` with the T rows of x, summed over the
// warp (every lane holds the sums).
template <int T, int R, typename WT>
__device__ __forceinline__ void gemv_rows(const WT* __restrict__ W, const int row[R], int cols,
                                          const wt* __restrict__ X, float acc[R][T]) {
    constexpr int U = 4;  // chunks in flight per lane and row
    const int lane = threadIdx.x & 31, n8 = cols / 8, chunks = cols / ChunkOf<WT>::E;
    const uint4* x = reinterpret_cast<const uint4*>(X);
    const uint4* w[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        w[r] = reinterpret_cast<const uint4*>(W + (i64)row[r] * cols);
#pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = 0.0f;
    }
    int c = lane;
    for (; c + 32 * (U - 1) < chunks; c += 32 * U) {
        uint4 v[U][R];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int r = 0; r < R; r++) v[u][r] = load_weights_16(w[r] + c + 32 * u);
#pragma unroll
        for (int u = 0; u < U; u++) gemv_chunk<T, R, WT>(v[u], x, n8, c + 32 * u, acc);
    }
    for (; c < chunks; c += 32) {
        uint4 v[R];
#pragma unroll
        for (int r = 0; r < R; r++) v[r] = load_weights_16(w[r] + c);
        gemv_chunk<T, R, WT>(v, x, n8, c, acc);
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < T; t++)
            for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
}

// Rows per warp: two once x's loads from L1 would outnumber the weights' by 4.
template <int T>
struct GemvRows {
    static constexpr int R = T >= 4 ? 2 : 1;
};

// What the sums are multiplied by: 1 for wt weights; for E4M3 weights their matrix's
// scale, times the 2^8 that unpack_e4m3_16 leaves out.
template <typename WT>
__device__ __forceinline__ float weight_factor(const float* scale) {
    if constexpr (sizeof(WT) == 1) {
        return *scale * 256.0f;
    } else {
        return 1.0f;
    }
}

template <int T, typename WT>
__device__ __forceinline__ void gemv_impl(const WT* __restrict__ W, const float* scale, int rows,
                                          int cols, const wt* __restrict__ X,
                                          float* __restrict__ Y, int accumulate) {
    constexpr int R = GemvRows<T>::R;
    const int warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    int row[R];
#pragma unroll
    for (int r = 0; r < R; r++) row[r] = min(warp * R + r, rows - 1);
    if (warp * R >= rows) return;
    float acc[R][T];
    gemv_rows<T, R, WT>(W, row, cols, X, acc);
    const float factor = weight_factor<WT>(scale);
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (warp * R + r >= rows) break;
#pragma unroll
        for (int t = 0; t < T; t++) {
            if (lane == t) {
                float* y = Y + (i64)t * rows + row[r];
                float v = acc[r][t] * factor;
                *y = accumulate ? *y + v : v;
            }
        }
    }
}

// act[t][j] = SiLU(gate_j · x_t) · (up_j · x_t) for the fused [gate | up] matrix of
// 2 · inter rows: the gate/up product and SiLU·up in one pass, nothing in between.
template <int T, typename WT>
__device__ __forceinline__ void gemv_silu_impl(const WT* __restrict__ W, const float* scale,
                                               int inter, int cols, const wt* __restrict__ X,
                                               wt* __restrict__ act) {
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (j >= inter) return;
    const int row[2] = {j, inter + j};
    float acc[2][T];
    gemv_rows<T, 2, WT>(W, row, cols, X, acc);
    const float factor = weight_factor<WT>(scale);
#pragma unroll
    for (int t = 0; t < T; t++) {
        if (lane == t) {
            float g = acc[0][t] * factor, u = acc[1][t] * factor;
            act[(i64)t * inter + j] = to_wt(g / (1.0f + expf(-g)) * u);
        }
    }
}

// gemv_t*/gemv_silu_t*: weights in wt. gemv_f8_t*/gemv_silu_f8_t*: E4M3 weights (cols a
// multiple of 16) times the f32 at `scale`.
#define GEMV_KERNELS(T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        gemv_t##T(const wt* __restrict__ W, int rows, int cols, const wt* __restrict__ X,     \
                  float* __restrict__ Y, int accumulate) {                                     \
        gemv_impl<T, wt>(W, nullptr, rows, cols, X, Y, accumulate);                            \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        gemv_silu_t##T(const wt* __restrict__ W, int inter, int cols,                          \
                       const wt* __restrict__ X, wt* __restrict__ act) {                       \
        gemv_silu_impl<T, wt>(W, nullptr, inter, cols, X, act);                                \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        gemv_f8_t##T(const unsigned char* __restrict__ W, const float* __restrict__ scale,     \
                     int rows, int cols, const wt* __restrict__ X, float* __restrict__ Y,      \
                     int accumulate) {                                                         \
        gemv_impl<T, unsigned char>(W, scale, rows, cols, X, Y, accumulate);                   \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        gemv_silu_f8_t##T(const unsigned char* __restrict__ W, const float* __restrict__ scale, \
                          int inter, int cols, const wt* __restrict__ X,                       \
                          wt* __restrict__ act) {                                              \
        gemv_silu_impl<T, unsigned char>(W, scale, inter, cols, X, act);                       \
    }
GEMV_KERNELS(1)
GEMV_KERNELS(2)
GEMV_KERNELS(3)
GEMV_KERNELS(4)

// ---- FP8 activations ---------------------------------------------------------------------
//
// An FP8 product's activations go to E4M3 with one scale for the whole product (vLLM's
// dynamic per-tensor scheme): fp8_amax finds the largest |x| (into *amax, zeroed by the
// caller, as the bits of a non-negative float, so atomicMax on them orders them), then
// fp8_quantize writes the codes and the scale that turns them back into x. n8 counts
// 16-byte chunks of x (8 values).

__device__ float block_max(float v, float* scratch);

// The E4M3 code nearest to x, ties to even, saturating at ±448: the same function as
// e4m3_from_f32 in crates/engine/src/cuda/fp8.rs, bit for bit.
__device__ __forceinline__ unsigned e4m3_code(float x) {
    unsigned sign = (__float_as_uint(x) >> 24) & 0x80u;
    float a = fminf(fabsf(x), 448.0f);
    unsigned code;
    if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9
        code = (unsigned)__float2int_rn(a * 512.0f);
    } else {
        unsigned b = __float_as_uint(a);
        unsigned r = b + 0x7ffffu + ((b >> 20) & 1u);
        code = (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u);
    }
    return sign | code;
}

extern "C" __global__ void __launch_bounds__(256)
    fp8_amax(const wt* __restrict__ x, long long n8, unsigned* __restrict__ amax) {
    __shared__ float scratch[32];
    const uint4* v = reinterpret_cast<const uint4*>(x);
    float m = 0.0f;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n8; i += (i64)gridDim.x * blockDim.x) {
        float f[8];
        unpack_8(v[i], f);
#pragma unroll
        for (int k = 0; k < 8; k++) m = fmaxf(m, fabsf(f[k]));
    }
    m = block_max(m, scratch);
    if (threadIdx.x == 0) atomicMax(amax, __float_as_uint(m));
}

extern "C" __global__ void __launch_bounds__(256)
    fp8_quantize(const wt* __restrict__ x, long long n8, const unsigned* __restrict__ amax,
                 uint2* __restrict__ codes, float* __restrict__ scale) {
    const float a = __uint_as_float(*amax);
    const float inv = a > 0.0f ? 448.0f / a : 1.0f;
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale = a > 0.0f ? a / 448.0f : 1.0f;
    const uint4* v = reinterpret_cast<const uint4*>(x);
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n8; i += (i64)gridDim.x * blockDim.x) {
        float f[8];
        unpack_8(v[i], f);
        uint2 out;
        out.x = e4m3_code(f[0] * inv) | e4m3_code(f[1] * inv) << 8 | e4m3_code(f[2] * inv) << 16 |
                e4m3_code(f[3] * inv) << 24;
        out.y = e4m3_code(f[4] * inv) | e4m3_code(f[5] * inv) << 8 | e4m3_code(f[6] * inv) << 16 |
                e4m3_code(f[7] * inv) << 24;
        codes[i] = out;
    }
}

// Copies whole blocks: dst block dst_ids[i] = src block src_ids[i] (blockIdx.y = i).
// The KV hand-off between two GPUs' caches (peer or IPC-mapped memory).
extern "C" __global__ void copy_blocks(const uint4* __restrict__ src, const int* __restrict__ src_ids,
                                       uint4* __restrict__ dst, const int* __restrict__ dst_ids,
                                       i64 vectors_per_block) {
    const uint4* s = src + (i64)src_ids[blockIdx.y] * vectors_per_block;
    uint4* d = dst + (i64)dst_ids[blockIdx.y] * vectors_per_block;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < vectors_per_block;
         i += (i64)gridDim.x * blockDim.x)
        d[i] = s[i];
}

// ---------------------------------------------------------------------------------
// Attention: causal softmax(q kᵀ / √d) v over the paged cache, flash-attention style
// (keys in tiles, an online softmax, tensor-core products in half with f32
// accumulation).
//
// A thread block serves one sequence, one KV head, one tile of 16·WARPS "rows" and one
// split of the keys: one warp and key tiles of 32 for decode-sized row tiles (more
// blocks fit an SM, which memory-bound decodes need), four warps and key tiles of 64
// for prompts. Rows pack the query heads of the KV head's group with the tokens
// (row = token · group + head in group), so a decode step's group shares one pass over
// the keys. seq_info[s] = {first row of the sequence in the batch, new tokens, tokens
// already cached, offset of its block table in block_tables}; work[2i], work[2i+1] =
// (sequence, row tile) of grid x index i.
//
// With one split the result goes straight to `out`; with several, each split leaves
// its unnormalised output and (max, sum) in `part_o`/`part_ml` and attn_combine
// merges them.

struct SeqInfo {
    int row;
    int n_tokens;
    int start_pos;
    int table_offset;
};

// FlashAttention-2's way: each warp keeps its 16 rows' scores, softmax state and
// output in registers, as the fragments of `mma.sync.m16n8k16` (PTX ISA's layouts: a
// thread holds rows lane/4 and lane/4 + 8, columns 2·(lane % 4) and the next), and
// reads Q, K and V from shared memory with `ldmatrix`. A score tile's accumulators are
// laid out as the next product's A operand, so P never goes through shared memory.
// Keys and values are double-buffered: the next tile's copies are in flight while this
// one is computed (Q passes through the second buffer on its way to registers). Work
// items run last first: causal rows further down have more keys, and starting them
// first leaves short blocks for the tail.

// c += a · b (16×16 f16 by 16×8 f16, f32 accumulators).
__device__ __forceinline__ void mma_16816(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8×8 half matrices from shared memory; lane i gives the address of row i % 8 of
// matrix i / 8.
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const __half* p) {
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const __half* p) {
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// Two floats as one register of halves, the first in the low half.
__device__ __forceinline__ unsigned pack_halves(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(unsigned*)&h;
}

template <int D, int WARPS, int KT>
__device__ void attention_mma_impl(const __half* __restrict__ q, const __half* __restrict__ kv,
                                   wt* __restrict__ out, const SeqInfo* __restrict__ seq_info,
                                   const int* __restrict__ block_tables,
                                   const int* __restrict__ work, float* __restrict__ part_o,
                                   float* __restrict__ part_ml, int n_rows, int num_heads,
                                   int num_kv_heads, int layer, int num_layers, int block_size,
                                   float scale) {
    constexpr int ROWS = 16 * WARPS;
    constexpr int LDH = D + 8;  // halves per row: rows 16 bytes apart in the banks
    constexpr int THREADS = 32 * WARPS;
    constexpr int CHUNKS = D / 8;
    constexpr int KSTEPS = D / 16;  // k-steps of Q·Kᵀ
    constexpr int NT = KT / 8;      // 8-key column tiles of S
    constexpr int DT = D / 8;       // 8-wide column tiles of O
    static_assert(ROWS <= KT, "Q is staged in a key buffer");

    // Two buffers, each a tile of keys then its values.
    extern __shared__ __align__(128) unsigned char smem[];
    __half* kv_buf = (__half*)smem;
    constexpr int BUF = 2 * KT * LDH;
    __half* Qs = kv_buf + BUF;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int item = gridDim.x - 1 - blockIdx.x;
    const int seq = work[2 * item], tile = work[2 * item + 1];
    const int kv_head = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const SeqInfo info = seq_info[seq];
    const int group = num_heads / num_kv_heads;
    const int total_rows = info.n_tokens * group;
    const int row0 = tile * ROWS;
    if (row0 >= total_rows) return;
    const int last_row = min(row0 + ROWS, total_rows) - 1;
    const int kv_end = info.start_pos + last_row / group + 1;  // keys the tile can see
    const int tiles = (kv_end + KT - 1) / KT;
    const int tile_begin = split * tiles / splits, tile_end = (split + 1) * tiles / splits;
    const i64 plane = (i64)num_kv_heads * block_size * D;
    const int q_stride = num_heads * D;
    const float scale_log2 = scale * 1.44269504088896341f;

    for (int c = tid; c < ROWS * CHUNKS; c += THREADS) {
        int r = c / CHUNKS, part = c % CHUNKS, R = row0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (R < total_rows) {
            int t = R / group, head = kv_head * group + R % group;
            v = *(const uint4*)(q + (i64)(info.row + t) * q_stride + head * D + part * 8);
        }
        *(uint4*)(Qs + r * LDH + part * 8) = v;
    }
    __syncthreads();

    const int wrow = warp * 16;  // the warp's first row in the tile
    const bool warp_active = row0 + wrow < total_rows;
    const int fr = lane >> 2, fc = (lane & 3) * 2;  // fragment row (and fr + 8), columns
    // Query positions of this thread's two rows (-1 for padding: it sees no key).
    int pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        int R = row0 + wrow + fr + 8 * h;
        pos[h] = R < total_rows ? info.start_pos + R / group : -1;
    }
    unsigned qf[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
        ldmatrix_x4(qf[kk], Qs + (wrow + (lane & 15)) * LDH + kk * 16 + (lane >> 4) * 8);
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    __syncthreads();  // Q is in registers: its buffer takes keys from here on

    // Copies key tile kt and its values into buffer `buf`, as one group.
    auto load_tile = [&](int kt, int buf) {
        __half* Kb = kv_buf + buf * BUF;
        __half* Vb = Kb + KT * LDH;
        for (int c = tid; c < KT * CHUNKS; c += THREADS) {
            int j = c / CHUNKS, part = c % CHUNKS, key = kt * KT + j;
            bool valid = key < kv_end;
            const __half* src = kv;
            if (valid) {
                i64 block = block_tables[info.table_offset + key / block_size];
                src = kv + ((block * num_layers + layer) * 2) * plane +
                      ((i64)kv_head * block_size + key % block_size) * D + part * 8;
            }
            copy_async_16(Kb + j * LDH + part * 8, src, valid);
            copy_async_16(Vb + j * LDH + part * 8, valid ? src + plane : src, valid);
        }
        commit_async_copies();
    };
    if (tile_begin < tile_end) load_tile(tile_begin, 0);
    for (int kt = tile_begin; kt < tile_end; ++kt) {
        const int k0 = kt * KT, buf = (kt - tile_begin) & 1;
        const __half* Ks = kv_buf + buf * BUF;
        const __half* Vs = Ks + KT * LDH;
        if (kt + 1 < tile_end) {
            load_tile(kt + 1, buf ^ 1);
            wait_async_groups<1>();
        } else {
            wait_async_groups<0>();
        }
        __syncthreads();
        if (warp_active) {
            // S = Q·Kᵀ, 16 rows × 64 keys.
            float s[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KSTEPS; kk += 2) {
                    unsigned b[4];  // k-steps kk and kk + 1 of keys 8j..8j+7
                    ldmatrix_x4(b, Ks + (j * 8 + (lane & 7)) * LDH + kk * 16 + (lane >> 3) * 8);
                    mma_16816(s[j], qf[kk], b);
                    mma_16816(s[j], qf[kk + 1], b + 2);
                }
            }
            // Online softmax in base 2 (scores carry log2(e)/√d, so each exponential is
            // one ex2); the four lanes of a quad share a row. Only tiles that reach past
            // one of this thread's rows need the causal mask.
            const bool unmasked = k0 + KT - 1 <= min(pos[0], pos[1]);
            float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int h = e >> 1, key = k0 + j * 8 + fc + (e & 1);
                    float v = s[j][e] * scale_log2;
                    if (!unmasked && key > pos[h]) v = -INFINITY;
                    s[j][e] = v;
                    tile_max[h] = fmaxf(tile_max[h], v);
                }
            float alpha[2], sum[2] = {0.0f, 0.0f}, base[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
                tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
                float m_new = fmaxf(m[h], tile_max[h]);
                alpha[h] = m[h] == -INFINITY ? 0.0f : exp2f(m[h] - m_new);
                m[h] = m_new;
                // A row with no visible key yet: its scores are all -inf and give 0.
                base[h] = m_new == -INFINITY ? 0.0f : m_new;
            }
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int h = e >> 1;
                    float p = exp2f(s[j][e] - base[h]);
                    s[j][e] = p;
                    sum[h] += p;
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 1);
                sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 2);
                l[h] = l[h] * alpha[h] + sum[h];
            }
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][0] *= alpha[0];
                o[dt][1] *= alpha[0];
                o[dt][2] *= alpha[1];
                o[dt][3] *= alpha[1];
            }
            // O += P·V: score tiles 2kk and 2kk + 1 are the A operand of keys
            // 16kk..16kk+15.
#pragma unroll
            for (int kk = 0; kk < KT / 16; ++kk) {
                unsigned a[4] = {pack_halves(s[2 * kk][0], s[2 * kk][1]),
                                 pack_halves(s[2 * kk][2], s[2 * kk][3]),
                                 pack_halves(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                 pack_halves(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    unsigned b[4];  // columns dt and dt + 1 of keys 16kk..16kk+15
                    ldmatrix_x4_trans(b, Vs + (kk * 16 + (lane & 15)) * LDH + dt * 8 +
                                             (lane >> 4) * 8);
                    mma_16816(o[dt], a, b);
                    mma_16816(o[dt + 1], a, b + 2);
                }
            }
        }
        __syncthreads();
    }

    if (!warp_active) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        int R = row0 + wrow + fr + 8 * h;
        if (R >= total_rows) continue;
        int t = info.row + R / group, head = kv_head * group + R % group;
        float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        i64 cell = ((i64)split * n_rows + t) * num_heads + head;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int d = dt * 8 + fc + e;
                float v = o[dt][2 * h + e];
                if (splits == 1) {
                    out[(i64)t * q_stride + head * D + d] = to_wt(v * inv);
                } else {
                    part_o[cell * D + d] = v;
                }
            }
        if (splits > 1 && fc == 0) {
            part_ml[cell * 2] = m[h] * 0.69314718055994531f;  // back to base e
            part_ml[cell * 2 + 1] = l[h];
        }
    }
}

#define ATTENTION_MMA(D, W)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * W) attention_mma_d##D##_w##W(         \
        const __half* q, const __half* kv, wt* out, const SeqInfo* seq_info,                \
        const int* block_tables, const int* work, float* part_o, float* part_ml, int n_rows, \
        int num_heads, int num_kv_heads, int layer, int num_layers, int block_size,         \
        float scale) {                                                                       \
        attention_mma_impl<D, W, (W == 1 ? 32 : 64)>(                                        \
            q, kv, out, seq_info, block_tables, work, part_o, part_ml, n_rows, num_heads,   \
            num_kv_heads, layer, num_layers, block_size, scale);                            \
    }

ATTENTION_MMA(64, 1)
ATTENTION_MMA(64, 4)
ATTENTION_MMA(128, 1)
ATTENTION_MMA(128, 4)

// Merges the splits of attention: grid (token, head), head_dim threads.
extern "C" __global__ void attn_combine(const float* __restrict__ part_o,
                                        const float* __restrict__ part_ml, wt* __restrict__ out,
                                        int n_rows, int num_heads, int head_dim, int splits) {
    int t = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s)
        m = fmaxf(m, part_ml[(((i64)s * n_rows + t) * num_heads + head) * 2]);
    float l = 0.0f, acc = 0.0f;
    if (m != -INFINITY) {
        for (int s = 0; s < splits; ++s) {
            i64 cell = ((i64)s * n_rows + t) * num_heads + head;
            float ms = part_ml[cell * 2];
            if (ms == -INFINITY) continue;
            float w = expf(ms - m);
            l += w * part_ml[cell * 2 + 1];
            acc += w * part_o[cell * head_dim + d];
        }
    }
    out[((i64)t * num_heads + head) * head_dim + d] = to_wt(l > 0.0f ? acc / l : 0.0f);
}

// The better of two (value, index) candidates for the greedy argmax: the larger value,
// the lower index on ties. `index == NO_INDEX` marks "nothing seen" (a NaN, or no
// element), which any real element beats, -INFINITY included.
#define NO_INDEX 0x7fffffff
__device__ __forceinline__ void keep_better(float& value, int& index, float other_value,
                                            int other_index) {
    if (other_value > value || (other_value == value && other_index < index)) {
        value = other_value;
        index = other_index;
    }
}

// *id = the index of the largest of row[0..vocab), with the host sampler's rules: the
// first index on ties, NaN skipped, 0 for a row of NaN. Called by a whole block
// (blockDim.x a multiple of 32); thread 0 writes *id.
__device__ void argmax_row(const float* __restrict__ row, int vocab, unsigned* id) {
    float value = -INFINITY;
    int index = NO_INDEX;
    // Each thread's indices increase, so a strict `>` keeps its first maximum.
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > value || (index == NO_INDEX && v == v)) {
            value = v;
            index = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1)
        keep_better(value, index, __shfl_xor_sync(0xffffffffu, value, o),
                    __shfl_xor_sync(0xffffffffu, index, o));
    __shared__ float values[32];
    __shared__ int indices[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        values[warp] = value;
        indices[warp] = index;
    }
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x >> 5;
        value = lane < warps ? values[lane] : -INFINITY;
        index = lane < warps ? indices[lane] : NO_INDEX;
        for (int o = 16; o > 0; o >>= 1)
            keep_better(value, index, __shfl_xor_sync(0xffffffffu, value, o),
                        __shfl_xor_sync(0xffffffffu, index, o));
        if (lane == 0) *id = index == NO_INDEX ? 0u : (unsigned)index;
    }
}

// ids[r] = argmax_row(logits[r]), one block per row. Greedy steps bring back these ids,
// not the logits.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab,
                                       unsigned* __restrict__ ids) {
    argmax_row(logits + (i64)blockIdx.x * vocab, vocab, &ids[blockIdx.x]);
}

// One row's sampling, as the host's `DeviceDraw` packs it (crates/engine/src/sample.rs).
struct DrawParams {
    float temperature;  // 0: the argmax of the adjusted row
    int top_k;          // 0: every token
    float top_p;        // 1: every token
    float min_p;        // 0: off
    float uniform;      // the host sampler's draw, in [0, 1)
    int adjust_start;   // this row's adjustments in the adjustments array
    int adjust_count;
    int unused;
};

// A change to one logit, in the host's order: bias added, held back (-inf), the
// repetition penalty (divides a positive logit, multiplies a negative one), then the
// presence and frequency penalties subtracted.
struct LogitAdjust {
    int token;
    float bias;
    int banned;
    float repetition;
    float penalty;
};

// An unsigned key with the floats' order (NaN, mapped to 0, below everything).
__device__ __forceinline__ unsigned order_key(float v) {
    if (v != v) return 0u;
    unsigned bits = __float_as_uint(v);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The block's sum of `v` (blockDim.x a multiple of 32, at most 1024), in every thread.
__device__ double block_sum(double v, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The block's largest `v`, in every thread.
__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The smallest key among the largest of a row's keys: with `by_mass` false, the key of
// the `want`-th largest scaled logit; with it true, the key at which the mass of the
// kept tokens (`kept_floor` and above), largest first, reaches `want_mass`. A radix
// select, 8 bits a pass from the top; every thread gets the result.
__device__ unsigned select_key(const float* row, int vocab, float inv_t, float max_s,
                               unsigned kept_floor, float min_p, bool by_mass, int want,
                               double want_mass) {
    __shared__ double bins[256];
    __shared__ unsigned chosen_prefix;
    __shared__ double left_f;
    __shared__ int left_i;
    unsigned prefix = 0, mask = 0;
    if (threadIdx.x == 0) {
        left_i = want;
        left_f = want_mass;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) bins[b] = 0.0;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float s = row[i] * inv_t;
            unsigned key = order_key(s);
            if ((key & mask) != prefix || key < kept_floor) continue;
            if (by_mass) {
                float w = expf(s - max_s);
                if (w >= min_p) atomicAdd(&bins[(key >> shift) & 255], (double)w);
            } else {
                atomicAdd(&bins[(key >> shift) & 255], 1.0);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int b = 255;
            if (by_mass) {
                double left = left_f;
                for (; b > 0 && bins[b] < left; --b) left -= bins[b];
                left_f = left;
            } else {
                int left = left_i;
                for (; b > 0 && (int)bins[b] < left; --b) left -= (int)bins[b];
                left_i = left;
            }
            chosen_prefix = prefix | ((unsigned)b << shift);
        }
        __syncthreads();
        prefix = chosen_prefix;
        mask |= 255u << shift;
    }
    return prefix;
}

// ids[r] = the token the host's sampler picks from logits[r] for params[r] with the
// same draw (one block per row, blockDim.x = 1024): the adjustments applied in place,
// then greedy (the argmax, as argmax_rows), or temperature, top-k, min-p and top-p
// keeping tokens as the host keeps its candidates, and the draw walked over the kept
// tokens in index order — the host's order — so both pick the same token except where
// the draw falls within rounding of a boundary between two tokens. Ties at the top-k
// or top-p boundary keep every tied token (the host keeps an arbitrary few of them);
// NaN logits are never picked.
extern "C" __global__ void sample_rows(float* __restrict__ logits, int vocab,
                                       const DrawParams* __restrict__ params,
                                       const LogitAdjust* __restrict__ adjusts,
                                       unsigned* __restrict__ ids) {
    __shared__ float scratch[32];
    __shared__ double wide_scratch[32];
    __shared__ double sums[1024];
    float* row = logits + (i64)blockIdx.x * vocab;
    const DrawParams p = params[blockIdx.x];
    for (int i = threadIdx.x; i < p.adjust_count; i += blockDim.x) {
        LogitAdjust a = adjusts[p.adjust_start + i];
        if (a.token < 0 || a.token >= vocab) continue;
        float l = row[a.token] + a.bias;
        if (a.banned) l = -INFINITY;
        if (a.repetition != 1.f) l = l > 0.f ? l / a.repetition : l * a.repetition;
        row[a.token] = l - a.penalty;
    }
    __syncthreads();
    if (!(p.temperature >= 1e-5f) || p.top_k == 1) {
        argmax_row(row, vocab, &ids[blockIdx.x]);
        return;
    }
    const float inv_t = 1.f / p.temperature;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float s = row[i] * inv_t;
        if (s == s) m = fmaxf(m, s);
    }
    const float max_s = block_max(m, scratch);
    // The top-k floor: the k-th largest scaled logit's key (0 keeps everything).
    unsigned floor_key = 1u;
    if (p.top_k > 0 && p.top_k < vocab)
        floor_key = select_key(row, vocab, inv_t, max_s, 1u, 0.f, false, p.top_k, 0.0);
    // min-p drops weights below min_p (the best token's weight is 1); top-p then keeps
    // the largest weights until their mass reaches top_p of what is left.
    const float min_p = p.min_p > 0.f ? p.min_p : 0.f;
    if (p.top_p < 1.f) {
        double mass = 0.0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float s = row[i] * inv_t;
            float w = expf(s - max_s);
            if (order_key(s) >= floor_key && w >= min_p) mass += w;
        }
        mass = block_sum(mass, wide_scratch);
        floor_key = select_key(row, vocab, inv_t, max_s, floor_key, min_p, true, 0,
                               (double)p.top_p * mass);
    }
    // The draw, walked over the kept tokens in index order: each thread sums a
    // contiguous run, a scan gives each run's start, and the run the target falls in
    // is walked.
    const int run = (vocab + blockDim.x - 1) / blockDim.x;
    const int first = min((int)threadIdx.x * run, vocab), end = min(first + run, vocab);
    // Sums in f64, as on the host: over a flat distribution of 128k tokens, f32's
    // rounding outgrows a single token's probability.
    double own = 0.0;
    int first_kept = NO_INDEX, last_kept = -1;
    for (int i = first; i < end; ++i) {
        float s = row[i] * inv_t;
        float w = expf(s - max_s);
        if (order_key(s) >= floor_key && w >= min_p) {
            own += w;
            first_kept = min(first_kept, i);
            last_kept = i;
        }
    }
    sums[threadIdx.x] = own;
    __syncthreads();
    // Inclusive scan of the runs' sums (Hillis–Steele over shared memory).
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {
        double add = threadIdx.x >= (unsigned)o ? sums[threadIdx.x - o] : 0.0;
        __syncthreads();
        sums[threadIdx.x] += add;
        __syncthreads();
    }
    const double target = (double)p.uniform * sums[blockDim.x - 1];
    const double before = threadIdx.x > 0 ? sums[threadIdx.x - 1] : 0.0;
    __shared__ int picked, last;
    if (threadIdx.x == 0) {
        picked = NO_INDEX;
        last = -1;
    }
    __syncthreads();
    if (last_kept >= 0) {
        atomicMax(&last, last_kept);
        if (!(target > 0.0)) {
            // A draw of 0: the host's walk stops at the first kept token.
            atomicMin(&picked, first_kept);
        } else if (before < target && target <= sums[threadIdx.x]) {
            double walked = before;
            for (int i = first_kept; i <= last_kept; ++i) {
                float s = row[i] * inv_t;
                float w = expf(s - max_s);
                if (order_key(s) < floor_key || !(w >= min_p)) continue;
                walked += w;
                if (walked >= target || i == last_kept) {
                    atomicMin(&picked, i);
                    break;
                }
            }
        }
    }
    __syncthreads();
    // No run holds the target (rounding put it past the total): the last kept token,
    // as on the host.
    if (threadIdx.x == 0) {
        int token = picked != NO_INDEX ? picked : last;
        ids[blockIdx.x] = token < 0 ? 0u : (unsigned)token;
    }
}
