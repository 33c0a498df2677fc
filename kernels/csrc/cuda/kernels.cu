// CUDA versions of the layer kernels (same math as csrc/cpu through ../common/layer_math.h). Launchers
// take raw device pointers and explicit sizes, run on the given stream (0 = the default) and return the
// launch's cudaError_t as an int (0 = success); kernels/*.py validate, allocate and dispatch.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "../common/layer_math.h"
#include "kernels.h"

namespace strata::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float v, float* shared) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.f;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

__device__ float block_max(float v, float* shared) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : -FLT_MAX;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

// one block per row
__global__ void add_rms_norm_kernel(float* residual, const float* delta, const float* weight, int64_t hidden,
                                    float eps, float* out) {
    __shared__ float shared[32];
    float* r = residual + blockIdx.x * hidden;
    float sum = 0.f;
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
        if (delta != nullptr) r[i] += delta[blockIdx.x * hidden + i];
        sum += r[i] * r[i];
    }
    const float inv = rms_inverse(block_sum(sum, shared), hidden, eps);
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) out[blockIdx.x * hidden + i] = weight[i] * (r[i] * inv);
}

// one thread per (row, head, pair)
__global__ void rotary_kernel(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                              const float* cos, const float* sin) {
    const int64_t half = head_dim / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= rows * heads * half) return;
    const int64_t t = idx / (heads * half), j = (idx / half) % heads, i = idx % half;
    float* x1 = x + t * row_stride + j * head_dim + i;
    rotate_pair(x1[0], x1[half], cos[t * half + i], sin[t * half + i]);
}

__global__ void silu_and_mul_kernel(const float* gate_up, int64_t rows, int64_t inner, float* out) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= rows * inner) return;
    const int64_t t = idx / inner, i = idx % inner;
    out[idx] = silu_mul(gate_up[t * 2 * inner + i], gate_up[t * 2 * inner + inner + i]);
}

// Paged attention: one block per (query row, query head). Row t belongs to sequence row_seq[t] and attends
// its positions 0 .. row_len[t] - 1 (decodes: the whole context; prefill and verification rows: causal).
// The block's threads split the context positions (scores into shared memory, then a block-wide softmax), then split the head dimension for
// the weighted sum of V. `scores` holds max_context floats per block (dynamic shared memory).
__global__ void paged_attention_kernel(const float* q, const float* k_pool, const float* v_pool,
                                       const int64_t* block_table, const int64_t* row_seq, const int64_t* row_len,
                                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                              int64_t num_slots, int64_t block_size, int64_t max_blocks, float scale,
                                              float* out) {
    extern __shared__ float scores[];
    __shared__ float shared[32];
    const int64_t t = blockIdx.x / num_heads, h = blockIdx.x % num_heads;
    const int64_t kvh = h / (num_heads / num_kv_heads);
    const int64_t len = row_len[t];
    const int64_t* table = block_table + row_seq[t] * max_blocks;
    const float* qh = q + (t * num_heads + h) * head_dim;
    const float* kbase = k_pool + kvh * num_slots * head_dim;
    const float* vbase = v_pool + kvh * num_slots * head_dim;
    float local_max = -FLT_MAX;
    for (int64_t p = threadIdx.x; p < len; p += blockDim.x) {
        const float* k = kbase + kv_slot(table, p, block_size) * head_dim;
        float acc = 0.f;
        for (int64_t i = 0; i < head_dim; ++i) acc += qh[i] * k[i];
        scores[p] = acc * scale;
        local_max = fmaxf(local_max, scores[p]);
    }
    const float mx = block_max(local_max, shared);
    float local_sum = 0.f;
    for (int64_t p = threadIdx.x; p < len; p += blockDim.x) local_sum += (scores[p] = expf(scores[p] - mx));
    const float sum = block_sum(local_sum, shared);
    const float inv = len > 0 ? 1.f / sum : 0.f;
    for (int64_t i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float acc = 0.f;
        for (int64_t p = 0; p < len; ++p) acc += scores[p] * vbase[kv_slot(table, p, block_size) * head_dim + i];
        out[(t * num_heads + h) * head_dim + i] = acc * inv;
    }
}

int launched() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

int add_rms_norm(float* residual, const float* delta, const float* weight, int64_t rows, int64_t hidden, float eps,
                 float* out, cudaStream_t stream) {
    if (rows == 0) return 0;
    add_rms_norm_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(residual, delta, weight, hidden, eps, out);
    return launched();
}

int rotary_inplace(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim, const float* cos,
                   const float* sin, cudaStream_t stream) {
    const int64_t n = rows * heads * (head_dim / 2);
    if (n == 0) return 0;
    rotary_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        x, rows, row_stride, heads, head_dim, cos, sin);
    return launched();
}

int silu_and_mul(const float* gate_up, int64_t rows, int64_t inner, float* out, cudaStream_t stream) {
    const int64_t n = rows * inner;
    if (n == 0) return 0;
    silu_and_mul_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(gate_up, rows,
                                                                                                       inner, out);
    return launched();
}

int paged_attention(const float* q, const float* k_pool, const float* v_pool, const int64_t* block_table,
                    const int64_t* row_seq, const int64_t* row_len, int64_t rows, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, int64_t num_slots, int64_t block_size, int64_t max_blocks,
                    int64_t max_context, float scale, float* out, cudaStream_t stream) {
    if (rows == 0) return 0;
    const size_t shared_bytes = static_cast<size_t>(max_context > 0 ? max_context : 1) * sizeof(float);
    if (shared_bytes > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(paged_attention_kernel,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(shared_bytes));
        if (e != cudaSuccess) return static_cast<int>(e);
    }
    paged_attention_kernel<<<static_cast<unsigned>(rows * num_heads), kThreads, shared_bytes, stream>>>(
        q, k_pool, v_pool, block_table, row_seq, row_len, num_heads, num_kv_heads, head_dim, num_slots, block_size,
        max_blocks, scale, out);
    return launched();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace strata::cuda
