// Stands in for CUDA's <cooperative_groups.h> in the CPU emulation (emu_cuda.h).
#pragma once
#include "emu_cuda.h"
