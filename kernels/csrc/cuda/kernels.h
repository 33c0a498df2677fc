// Host launchers of the CUDA kernels (kernels.cu). Every pointer is a device pointer; each returns the
// cudaError_t of its launch as an int (0 = success).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace strata::cuda {

int add_rms_norm(float* residual, const float* delta, const float* weight, int64_t rows, int64_t hidden, float eps,
                 float* out, cudaStream_t stream);
int rotary_inplace(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim, const float* cos,
                   const float* sin, cudaStream_t stream);
int silu_and_mul(const float* gate_up, int64_t rows, int64_t inner, float* out, cudaStream_t stream);
// float32 pools; q/out [rows, H, D]; row t reads the blocks of sequence row_seq[t] (block_table
// [S, max_blocks]) and attends its first row_len[t] positions; max_context bounds row_len. Head dims 64 and
// 128 with up to 8 query heads per KV head (16-byte aligned tensors) run the split-K kernel, which needs
// paged_attention_workspace_floats(...) floats of `workspace` (0 when the context fits one partition);
// other shapes run the general kernel (one head's scores in shared memory: max_context up to ~57,000).
int paged_attention(const float* q, const float* k_pool, const float* v_pool, const int64_t* block_table,
                    const int64_t* row_seq, const int64_t* row_len, int64_t rows, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, int64_t num_slots, int64_t block_size, int64_t max_blocks,
                    int64_t max_context, float scale, float* out, float* workspace, int64_t workspace_floats,
                    cudaStream_t stream);
bool paged_attention_fast(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t max_context);
int64_t paged_attention_partition(int64_t rows, int64_t num_kv_heads, int64_t max_context);
int64_t paged_attention_workspace_floats(int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                         int64_t max_context);
// k/v rows [T, KVH, D] (rows k_stride / v_stride elements apart, heads contiguous) into the pools
// [KVH, num_slots, D] at slot_mapping [T]; elem_bytes 4 (float32) or 2 (bfloat16)
int reshape_and_cache(const void* k, const void* v, int64_t k_stride, int64_t v_stride, const int64_t* slot_mapping,
                      int64_t rows, int64_t kv_heads, int64_t head_dim, int64_t num_slots, int64_t elem_bytes,
                      void* k_pool, void* v_pool, cudaStream_t stream);
const char* error_string(int code);
int device_count();

}  // namespace strata::cuda
