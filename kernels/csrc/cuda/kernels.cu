// CUDA versions of the layer kernels (same math as csrc/cpu through ../common/layer_math.h). Launchers
// take raw device pointers and explicit sizes, run on the given stream (0 = the default) and return the
// launch's cudaError_t as an int (0 = success); kernels/*.py validate, allocate and dispatch.
#include <cuda_runtime.h>

#include <atomic>
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

// Paged attention, the general kernel (any head dim, any group size, unaligned tensors): one block per
// (query row, query head). Row t belongs to sequence row_seq[t] and attends its positions 0 .. row_len[t] - 1
// (decodes: the whole context; prefill and verification rows: causal). The block's threads split the context
// positions (scores into shared memory, then a block-wide softmax), then split the head dimension for the
// weighted sum of V. `scores` holds max_context floats per block (dynamic shared memory), so contexts are
// bounded by the shared memory (about 57,000 positions on sm_90).
__global__ void paged_attention_generic_kernel(const float* q, const float* k_pool, const float* v_pool,
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

// Paged attention, the fast kernel (head dim 64 or 128, up to 8 query heads per KV head, 16-byte aligned
// float32 tensors): split-K over the context ("flash decoding"). One block per (query row, KV head,
// partition of `partition` positions) serves every query head of the group, so each K/V row is read from
// memory once per row rather than once per query head; the context is cut into partitions so that short
// batches still fill the SMs. A row whose context fits one partition writes its output directly; longer
// ones write each partition's unnormalised sum with its max and exp-sum, and paged_attention_reduce_kernel
// combines them.
//   K pass: kKeyLanes = D / 8 lanes hold one position's K row (8 floats each, two float4 loads) and reduce
//           the dot products with shuffles; the scores go to shared memory.
//   softmax: one warp per query head over the partition's scores (max, exp, sum).
//   V pass: D / 4 lanes cover a row (one float4 each); the block's other lanes split the positions, and
//           their partial sums are added through shared memory.
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kMaxPartition = 256;
constexpr int kMaxGroup = 8;

__device__ __forceinline__ int slot_of(const int64_t* table, int p, int block_size) {
    return static_cast<int>(table[p / block_size]) * block_size + p % block_size;
}

__device__ __forceinline__ float dot8(const float (&q)[8], const float4& a, const float4& b) {
    return q[0] * a.x + q[1] * a.y + q[2] * a.z + q[3] * a.w + q[4] * b.x + q[5] * b.y + q[6] * b.z + q[7] * b.w;
}

// the split kernel's arguments (passed by value: one struct instead of 19 parameters at each launch)
struct SplitParams {
    const float* q;
    const float* k_pool;
    const float* v_pool;
    const int64_t* block_table;
    const int64_t* row_seq;
    const int64_t* row_len;
    int num_heads, num_kv_heads, group;
    int64_t num_slots;
    int block_size;
    int64_t max_blocks;
    int partition, max_partitions;
    float scale;
    float* out;
    float* part_acc;                                  // [rows, H, max_partitions, D] (rows spanning partitions)
    float* part_max;                                  // [rows, H, max_partitions]
    float* part_sum;                                  // [rows, H, max_partitions]
};

template <int D, int G>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_split_kernel(const SplitParams p) {
    const float* __restrict__ q = p.q;
    const float* __restrict__ k_pool = p.k_pool;
    const float* __restrict__ v_pool = p.v_pool;
    const int64_t* __restrict__ block_table = p.block_table;
    const int num_heads = p.num_heads, num_kv_heads = p.num_kv_heads, group = p.group, block_size = p.block_size;
    const int partition = p.partition;
    const int64_t num_slots = p.num_slots;
    const float scale = p.scale;
    constexpr int kKeyLanes = D / 8;                  // lanes per K row
    constexpr int kKeysPerWarp = 32 / kKeyLanes;
    constexpr int kDimLanes = D / 4;                  // lanes per V row in the V pass
    constexpr int kPosLanes = kAttnThreads / kDimLanes;
    __shared__ float scores[G][kMaxPartition];
    __shared__ float partial[kPosLanes][G][D];
    __shared__ float head_max[G], head_sum[G];

    const int t = blockIdx.x / num_kv_heads, kvh = blockIdx.x % num_kv_heads, part = blockIdx.y;
    const int len = static_cast<int>(p.row_len[t]);
    const int start = part * partition;
    if (start >= len && part > 0) return;             // this row's context has fewer partitions
    const int end = min(start + partition, len), n = end - start;
    const int num_parts = len > 0 ? (len + partition - 1) / partition : 1;
    const int64_t* table = block_table + p.row_seq[t] * p.max_blocks;
    const float* kbase = k_pool + kvh * num_slots * D;
    const float* vbase = v_pool + kvh * num_slots * D;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    // K pass
    {
        const int key = lane / kKeyLanes, sub = lane % kKeyLanes;
        float qr[G][8];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            if (g < group) {
                const float* qh = q + (static_cast<int64_t>(t) * num_heads + kvh * group + g) * D + sub * 8;
                const float4 a = *reinterpret_cast<const float4*>(qh), b = *reinterpret_cast<const float4*>(qh + 4);
                qr[g][0] = a.x * scale; qr[g][1] = a.y * scale; qr[g][2] = a.z * scale; qr[g][3] = a.w * scale;
                qr[g][4] = b.x * scale; qr[g][5] = b.y * scale; qr[g][6] = b.z * scale; qr[g][7] = b.w * scale;
            }
        }
        constexpr int kUnroll = 2;
        constexpr int kStride = kAttnWarps * kKeysPerWarp;
        for (int base = start + warp * kKeysPerWarp; base < end; base += kStride * kUnroll) {
            float4 ka[kUnroll], kb[kUnroll];
            bool valid[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int p = base + u * kStride + key;
                valid[u] = p < end;
                if (valid[u]) {
                    const float* k = kbase + static_cast<int64_t>(slot_of(table, p, block_size)) * D + sub * 8;
                    ka[u] = *reinterpret_cast<const float4*>(k);
                    kb[u] = *reinterpret_cast<const float4*>(k + 4);
                } else {
                    ka[u] = kb[u] = make_float4(0.f, 0.f, 0.f, 0.f);
                }
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    if (g < group) {
                        float s = dot8(qr[g], ka[u], kb[u]);
#pragma unroll
                        for (int offset = kKeyLanes / 2; offset > 0; offset /= 2)
                            s += __shfl_xor_sync(0xffffffff, s, offset);
                        if (sub == 0 && valid[u]) scores[g][base + u * kStride + key - start] = s;
                    }
                }
            }
        }
    }
    __syncthreads();

    // softmax over the partition, one warp per query head
    for (int g = warp; g < group; g += kAttnWarps) {
        float m = -FLT_MAX;
        for (int i = lane; i < n; i += 32) m = fmaxf(m, scores[g][i]);
        for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, offset));
        float sum = 0.f;
        for (int i = lane; i < n; i += 32) {
            const float e = expf(scores[g][i] - m);
            scores[g][i] = e;
            sum += e;
        }
        for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
        if (lane == 0) {
            head_max[g] = m;
            head_sum[g] = sum;
        }
    }
    __syncthreads();

    // V pass
    const int dl = threadIdx.x % kDimLanes, pl = threadIdx.x / kDimLanes;
    float acc[G][4];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = 0.f;
#pragma unroll 4
    for (int i = pl; i < n; i += kPosLanes) {
        const float4 v = *reinterpret_cast<const float4*>(
            vbase + static_cast<int64_t>(slot_of(table, start + i, block_size)) * D + dl * 4);
#pragma unroll
        for (int g = 0; g < G; ++g) {
            if (g < group) {
                const float w = scores[g][i];
                acc[g][0] += w * v.x; acc[g][1] += w * v.y; acc[g][2] += w * v.z; acc[g][3] += w * v.w;
            }
        }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (g < group) {
            partial[pl][g][dl * 4 + 0] = acc[g][0];
            partial[pl][g][dl * 4 + 1] = acc[g][1];
            partial[pl][g][dl * 4 + 2] = acc[g][2];
            partial[pl][g][dl * 4 + 3] = acc[g][3];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group * D; idx += kAttnThreads) {
        const int g = idx / D, d = idx % D;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kPosLanes; ++j) sum += partial[j][g][d];
        const int64_t head_row = static_cast<int64_t>(t) * num_heads + kvh * group + g;
        if (num_parts == 1) {
            p.out[head_row * D + d] = head_sum[g] > 0.f ? sum / head_sum[g] : 0.f;
        } else {
            const int64_t at = head_row * p.max_partitions + part;
            p.part_acc[at * D + d] = sum;
            if (d == 0) {
                p.part_max[at] = head_max[g];
                p.part_sum[at] = head_sum[g];
            }
        }
    }
}

// combines the partitions of rows whose context spans several: one block per (row, query head)
__global__ void paged_attention_reduce_kernel(const int64_t* __restrict__ row_len, int num_heads, int head_dim,
                                              int partition, int max_partitions, const float* __restrict__ part_acc,
                                              const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                              float* __restrict__ out) {
    const int64_t head_row = blockIdx.x;
    const int len = static_cast<int>(row_len[head_row / num_heads]);
    const int num_parts = (len + partition - 1) / partition;
    if (num_parts <= 1) return;                       // written by the split kernel
    const float* pm = part_max + head_row * max_partitions;
    const float* ps = part_sum + head_row * max_partitions;
    float m = -FLT_MAX;
    for (int j = 0; j < num_parts; ++j) m = fmaxf(m, pm[j]);
    float total = 0.f;
    for (int j = 0; j < num_parts; ++j) total += ps[j] * expf(pm[j] - m);
    const float inv = 1.f / total;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < num_parts; ++j) acc += part_acc[(head_row * max_partitions + j) * head_dim + d] * expf(pm[j] - m);
        out[head_row * head_dim + d] = acc * inv;
    }
}

// reshape-and-cache: row t's K and V heads ([KVH, D] each, rows `k_stride` / `v_stride` elements apart) to
// slot slot_mapping[t] of the pools [KVH, num_slots, D]; one thread per element; a slot outside the pool is
// skipped
template <typename T>
__global__ void reshape_and_cache_kernel(const T* __restrict__ k, const T* __restrict__ v, int64_t k_stride,
                                         int64_t v_stride, const int64_t* __restrict__ slot_mapping, int64_t rows,
                                         int64_t kv_heads, int64_t head_dim, int64_t num_slots, T* __restrict__ k_pool,
                                         T* __restrict__ v_pool) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t per_row = kv_heads * head_dim;
    if (idx >= rows * per_row) return;
    const int64_t t = idx / per_row, i = idx % per_row, h = i / head_dim, d = i % head_dim;
    const int64_t slot = slot_mapping[t];
    if (slot < 0 || slot >= num_slots) return;        // never written outside the pool (the CPU path raises)
    k_pool[(h * num_slots + slot) * head_dim + d] = k[t * k_stride + i];
    v_pool[(h * num_slots + slot) * head_dim + d] = v[t * v_stride + i];
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

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// the current device's SM count, asked once per device
int num_sms() {
    constexpr int kDevices = 64;
    static std::atomic<int> sms[kDevices] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) return 108;
    int n = sms[device].load(std::memory_order_relaxed);
    if (n == 0) {
        if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 108;
        sms[device].store(n, std::memory_order_relaxed);
    }
    return n;
}

}  // namespace

bool paged_attention_fast(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t max_context) {
    return (head_dim == 64 || head_dim == 128) && num_kv_heads > 0 && num_heads % num_kv_heads == 0 &&
           num_heads / num_kv_heads <= kMaxGroup && max_context < (int64_t{1} << 30);
}

int64_t paged_attention_partition(int64_t rows, int64_t num_kv_heads, int64_t max_context) {
    // the longest partition (fewest partial sums) that still gives every SM about four blocks
    int64_t partition = kMaxPartition;
    while (partition > 32 && rows * num_kv_heads * ((max_context + partition - 1) / partition) < 4 * num_sms())
        partition /= 2;
    return partition;
}

int64_t paged_attention_workspace_floats(int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                         int64_t max_context) {
    if (!paged_attention_fast(num_heads, num_kv_heads, head_dim, max_context)) return 0;
    const int64_t partition = paged_attention_partition(rows, num_kv_heads, max_context);
    const int64_t parts = (max_context + partition - 1) / partition;
    return parts > 1 ? rows * num_heads * parts * (head_dim + 2) : 0;
}

namespace {

template <int D>
void launch_split(const SplitParams& p, dim3 grid, cudaStream_t stream) {
    // the register tile G: the group size rounded up to 1, 2, 4 or 8
    if (p.group == 1) paged_attention_split_kernel<D, 1><<<grid, kAttnThreads, 0, stream>>>(p);
    else if (p.group == 2) paged_attention_split_kernel<D, 2><<<grid, kAttnThreads, 0, stream>>>(p);
    else if (p.group <= 4) paged_attention_split_kernel<D, 4><<<grid, kAttnThreads, 0, stream>>>(p);
    else paged_attention_split_kernel<D, 8><<<grid, kAttnThreads, 0, stream>>>(p);
}

}  // namespace

int paged_attention(const float* q, const float* k_pool, const float* v_pool, const int64_t* block_table,
                    const int64_t* row_seq, const int64_t* row_len, int64_t rows, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, int64_t num_slots, int64_t block_size, int64_t max_blocks,
                    int64_t max_context, float scale, float* out, float* workspace, int64_t workspace_floats,
                    cudaStream_t stream) {
    if (rows == 0) return 0;
    const bool fast = paged_attention_fast(num_heads, num_kv_heads, head_dim, max_context) && aligned16(q) &&
                      aligned16(k_pool) && aligned16(v_pool) && aligned16(out) && block_size < (1 << 30) &&
                      num_slots * num_kv_heads * head_dim < (int64_t{1} << 40);
    const int64_t need = paged_attention_workspace_floats(rows, num_heads, num_kv_heads, head_dim, max_context);
    if (fast && workspace_floats >= need) {
        const int64_t partition = paged_attention_partition(rows, num_kv_heads, max_context);
        const int64_t parts = max_context > 0 ? (max_context + partition - 1) / partition : 1;
        if (parts > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
        float* part_max = need ? workspace + rows * num_heads * parts * head_dim : nullptr;
        const SplitParams p{q, k_pool, v_pool, block_table, row_seq, row_len, static_cast<int>(num_heads),
                            static_cast<int>(num_kv_heads), static_cast<int>(num_heads / num_kv_heads), num_slots,
                            static_cast<int>(block_size), max_blocks, static_cast<int>(partition),
                            static_cast<int>(parts), scale, out, workspace, part_max,
                            need ? part_max + rows * num_heads * parts : nullptr};
        const dim3 grid(static_cast<unsigned>(rows * num_kv_heads), static_cast<unsigned>(parts));
        if (head_dim == 64) launch_split<64>(p, grid, stream);
        else launch_split<128>(p, grid, stream);
        int e = launched();
        if (e != 0 || parts == 1) return e;
        paged_attention_reduce_kernel<<<static_cast<unsigned>(rows * num_heads), 64, 0, stream>>>(
            row_len, static_cast<int>(num_heads), static_cast<int>(head_dim), static_cast<int>(partition),
            static_cast<int>(parts), p.part_acc, p.part_max, p.part_sum, out);
        return launched();
    }
    const size_t shared_bytes = static_cast<size_t>(max_context > 0 ? max_context : 1) * sizeof(float);
    if (shared_bytes > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(paged_attention_generic_kernel,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(shared_bytes));
        if (e != cudaSuccess) return static_cast<int>(e);
    }
    paged_attention_generic_kernel<<<static_cast<unsigned>(rows * num_heads), kThreads, shared_bytes, stream>>>(
        q, k_pool, v_pool, block_table, row_seq, row_len, num_heads, num_kv_heads, head_dim, num_slots, block_size,
        max_blocks, scale, out);
    return launched();
}

int reshape_and_cache(const void* k, const void* v, int64_t k_stride, int64_t v_stride, const int64_t* slot_mapping,
                      int64_t rows, int64_t kv_heads, int64_t head_dim, int64_t num_slots, int64_t elem_bytes,
                      void* k_pool, void* v_pool, cudaStream_t stream) {
    const int64_t n = rows * kv_heads * head_dim;
    if (n == 0) return 0;
    const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    if (elem_bytes == 4)
        reshape_and_cache_kernel<float><<<blocks, kThreads, 0, stream>>>(
            static_cast<const float*>(k), static_cast<const float*>(v), k_stride, v_stride, slot_mapping, rows,
            kv_heads, head_dim, num_slots, static_cast<float*>(k_pool), static_cast<float*>(v_pool));
    else if (elem_bytes == 2)
        reshape_and_cache_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(
            static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), k_stride, v_stride, slot_mapping, rows,
            kv_heads, head_dim, num_slots, static_cast<uint16_t*>(k_pool), static_cast<uint16_t*>(v_pool));
    else
        return static_cast<int>(cudaErrorInvalidValue);
    return launched();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace strata::cuda
