// <cuda_fp16.h> of host C++: everything device code needs comes from the emulator's shim.
#pragma once
#include "cuda_shim.h"
