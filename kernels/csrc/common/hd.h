// STRATA_HD marks functions compiled for both the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
#pragma once

#if defined(__CUDACC__)
#define STRATA_HD __host__ __device__ __forceinline__
#else
#define STRATA_HD inline
#endif
