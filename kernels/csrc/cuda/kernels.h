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
// [S, max_blocks]) and attends its first row_len[t] positions; max_context bounds row_len (the scores of
// one head live in shared memory)
int paged_attention(const float* q, const float* k_pool, const float* v_pool, const int64_t* block_table,
                    const int64_t* row_seq, const int64_t* row_len, int64_t rows, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, int64_t num_slots, int64_t block_size, int64_t max_blocks,
                    int64_t max_context, float scale, float* out, cudaStream_t stream);
const char* error_string(int code);
int device_count();

}  // namespace strata::cuda
