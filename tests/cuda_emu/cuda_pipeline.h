// Stands in for CUDA's <cuda_pipeline.h> in the CPU emulation (emu_cuda.h).
#pragma once
#include "emu_cuda.h"
